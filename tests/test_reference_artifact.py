"""Reference artifacts: export the float64 taps once, compare on another machine (here: a fresh process in another
directory) with the same rows as a direct wb.compare; an artifact of other weights/config is refused."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES, ROOT, have
import workbench as wb
from workbench import reference_artifact as ra

IDS = [2, 17, 200, 31, 5, 99, 64, 3, 250, 11, 42, 7, 128, 19]
_METRICS = ("max_abs", "rel_max", "rel_l2", "nmse", "cosine", "ref_scale")


def _key(r):
    return (r["backend"], r["dtype"], r["phase"], r["tap"], r["layer"] if r["layer"] == r["layer"] else None)


def _same_rows(a, b):
    ka = {_key(r): r for r in a}
    kb = {_key(r): r for r in b}
    assert set(ka) == set(kb) and len(ka) > 10
    for k, r in ka.items():
        s = kb[k]
        assert r["passed"] == s["passed"], k
        for m in _METRICS:
            x, y = float(r[m]), float(s[m])
            assert abs(x - y) <= 1e-12 * max(1.0, abs(x)), (k, m, x, y)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    return ra.export(FIXTURES / "gemma3_text", d / "ref.wbref", prompt=IDS, decode_steps=3, progress=False)


def test_artifact_contents(artifact):
    art = ra.read(artifact)
    m = art.manifest
    assert m["format"] == ra.FORMAT and m["token_ids"] == IDS and m["reference"] == "torch:cpu:float64"
    assert set(m["hashes"]) == {"weights", "config", "tokenizer"} and len(m["hashes"]["weights"]) == 64
    assert m["versions"]["torch"] and m["versions"]["numpy"]
    assert all(v.dtype == np.float64 for v in art.taps.values())
    assert art.taps["logits"].shape == (1, len(IDS), 256)
    # the stored taps are the float64 reference's own (a fresh forward equals them exactly)
    ref = wb.load(FIXTURES / "gemma3_text", dtype="float64").forward(IDS, taps=["blocks.*.hook_resid_post"])
    np.testing.assert_array_equal(art.taps["blocks.2.hook_resid_post"], ref.taps["blocks.2.hook_resid_post"])
    assert not artifact.with_name(artifact.name + ".partial").exists()


def test_against_in_a_fresh_process_reproduces_direct_compare(artifact, tmp_path):
    direct = wb.compare(FIXTURES / "gemma3_text", backends="torch:cpu", dtypes="float32", prompt=IDS,
                        decode_steps=3, references=(), store=False, progress=False, anchor=False)
    elsewhere = tmp_path / "other-machine"
    elsewhere.mkdir()
    shutil.copy(artifact, elsewhere / "copied.wbref")
    r = subprocess.run([sys.executable, "-m", "workbench.comparison", "compare", "copied.wbref",
                        "--model", str(FIXTURES / "gemma3_text"), "--backends", "torch:cpu",
                        "--dtypes", "float32", "--no-anchor", "--no-store", "--json", "rows.json"],
                       cwd=elsewhere, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode in (0, 1), r.stderr
    assert "copied.wbref" in r.stdout            # the report names the artifact as its reference
    rows = json.loads((elsewhere / "rows.json").read_text())
    _same_rows(direct.rows, rows)
    assert {x["phase"] for x in rows} == {"prefill", "decode"}


def test_against_stores_a_parity_run(artifact, tmp_path):
    """Stored like any wb.compare run; the anchor (HF float64 here) checks the artifact's reference taps."""
    db = str(tmp_path / "runs.sqlite")
    rep = wb.compare(FIXTURES / "gemma3_text", against=artifact, backends="torch:cpu", dtypes="float32", db=db,
                     progress=False)
    assert rep.passed and rep.run_id
    if have("transformers"):
        assert rep.anchor_info["status"] == "anchored", rep.anchor_info
    from workbench import runs
    st = runs.RunStore(db)
    got = st.load(rep.run_id)
    assert got is not None


def test_hash_mismatch_is_refused(artifact, tmp_path):
    other = tmp_path / "edited"
    shutil.copytree(FIXTURES / "gemma3_text", other)
    from safetensors.numpy import load_file, save_file
    t = load_file(str(other / "model.safetensors"))
    k = next(k for k in t if k.endswith("mlp.down_proj.weight"))
    t[k] = t[k] * np.float32(1.001)
    save_file(t, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ra.ArtifactMismatch, match="weights: artifact"):
        wb.compare(other, against=artifact, backends="torch:cpu", store=False, progress=False)
    cfgd = tmp_path / "cfg"
    shutil.copytree(FIXTURES / "gemma3_text", cfgd)
    c = json.loads((cfgd / "config.json").read_text())
    c["rms_norm_eps"] = 1e-5
    (cfgd / "config.json").write_text(json.dumps(c))
    with pytest.raises(ra.ArtifactMismatch, match="config: artifact") as e:
        wb.compare(cfgd, against=artifact, backends="torch:cpu", store=False, progress=False)
    assert "weights:" not in str(e.value)      # only what differs is named


def test_not_an_artifact(tmp_path):
    with pytest.raises(ra.ArtifactError, match="no such file"):
        ra.read(tmp_path / "missing.wbref")
    with pytest.raises(ra.ArtifactError, match="not a workbench reference artifact"):
        ra.read(FIXTURES / "gemma3_text" / "model.safetensors")
    bad = tmp_path / "junk.wbref"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ra.ArtifactError):
        ra.read(bad)


def test_cli_export_then_parity_against_elsewhere(tmp_path):
    """The README's two commands as printed: `workbench reference export` here, `workbench parity --against` in
    another directory (another machine's checkout), same rows as a direct compare (the CLI's JSON rounds to 10
    decimal places)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    model = str(FIXTURES / "gemma4_e2b")
    ids = ",".join(str(i) for i in IDS)
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "reference", "export", "--model", model,
                        "--prompt-ids", ids, "-o", str(tmp_path / "e2b.wbref")], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (tmp_path / "e2b.wbref").exists()
    other = tmp_path / "elsewhere"
    other.mkdir()
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "parity", "--against", str(tmp_path / "e2b.wbref"),
                        "--model", model, "--backends", "torch:cpu", "--dtypes", "float32", "--decode-steps", "3",
                        "--no-anchor", "--no-store", "--json", "rows.json"], cwd=other, capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "e2b.wbref" in r.stdout and "PASSED" in r.stdout
    rows = json.loads((other / "rows.json").read_text())
    direct = wb.compare(model, backends="torch:cpu", dtypes="float32", prompt=IDS, decode_steps=3, references=(),
                        store=False, progress=False, anchor=False)
    a = {_key(x): x for x in direct.rows}
    b = {_key(x): x for x in rows}
    assert set(a) == set(b)
    for k in a:
        assert abs(a[k]["rel_max"] - b[k]["rel_max"]) <= 1e-10 and a[k]["passed"] == b[k]["passed"], k


def test_parity_engine_takes_only_a_resolved_artifact(artifact):
    """Files are read by the dispatch (workbench.comparison, i.e. wb.compare), never by parity.compare: a path
    given to the engine is refused with the way to go, before any model is read."""
    from workbench import parity
    with pytest.raises(TypeError, match="resolved reference artifact.*wb.compare"):
        parity.compare(FIXTURES / "gemma3_text", against=str(artifact), backends="torch:cpu", store=False,
                       progress=False)
