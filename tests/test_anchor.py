"""The anchor (issue 14): every report first compares the float64 reference with HF transformers in float64
on the same weights, per tap and layer; it is the summary's first line, report.anchor, and part of the stored
run; a disagreement or an anchor that cannot run fails the report; anchor=False is knowingly unanchored.
Also: requested references that cannot run fail the report (issue 12 item 3), the progress callback, and
the decode="fast" interface."""
from __future__ import annotations

import numpy as np
import pytest

import _planted as P
from conftest import cpu_backends, fixture_dir, have, one_torch_thread

import workbench as wb
from workbench import cli
from workbench import parity as par

IDS = np.random.default_rng(3).integers(3, 256, size=24).tolist()
needs_hf = pytest.mark.skipif(not have("transformers"), reason="the anchor needs HF transformers "
                              "(pip install gemma-workbench[reference])")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@needs_hf
def test_anchor_rows_first_line_and_store(tmp_db):
    rep = wb.compare(fixture_dir("gemma2"), backends=["torch:cpu"], prompt=IDS, db=tmp_db, progress=False)
    assert rep.passed and rep.anchored, rep.summary()
    L = 4
    names = {(r["tap"], r["layer"]) for r in rep.anchor}
    for i in range(L):
        assert {("hook_resid_post", i), ("hook_attn_out", i), ("hook_mlp_out", i)} <= names
    assert {("hook_embed", None), ("ln_final.hook_normalized", None), ("logits", None)} <= names
    assert all(r["phase"] == "anchor" and r["backend"] == "hf" and r["dtype"] == "float64" for r in rep.anchor)
    # HF casts its norms to float32: the agreement is at float32 rounding, within a per-tap tolerance
    assert max(r["rel_max"] for r in rep.anchor) < 1e-5
    assert all(par.ANCHOR_FLOOR <= r["tol"] <= par.ANCHOR_CAP for r in rep.anchor)
    lines = rep.summary().splitlines()
    assert lines[1].startswith("reference anchored to HF transformers") and lines[1].endswith("PASSED")
    run = wb.runs.load(rep.run_id, db=tmp_db)
    assert run.meta["anchor"]["status"] == "anchored" and run.meta["passed"] is True
    assert (run.rows.phase == "anchor").sum() == len(rep.anchor)


@needs_hf
def test_anchor_disagreement_fails_whatever_the_backends_say():
    with P.planted("final_softcap_dropped"):
        rep = wb.compare(fixture_dir("gemma2"), backends=["torch:cpu"], prompt=IDS, store=False, progress=False)
    assert all(r["passed"] for r in rep.rows), "the backends agree with the (wrong) reference"
    assert not rep.passed and rep.anchor_info["status"] == "failed"
    assert rep.anchor_info["first_at"] == "logits"          # the softcap is applied to the logits only
    assert "ANCHOR FAILED" in rep.summary() and rep.summary().endswith("Overall: FAILED")


def test_anchor_false_is_knowingly_unanchored(tmp_db):
    rep = wb.compare(fixture_dir("gemma1"), backends=["torch:cpu"], prompt=IDS, db=tmp_db, progress=False,
                     anchor=False)
    assert rep.passed and not rep.anchored and rep.anchor == []
    assert "UNANCHORED (knowingly" in rep.summary().splitlines()[1]
    assert wb.runs.load(rep.run_id, db=tmp_db).meta["anchor"]["status"] == "off"


def test_without_transformers_the_report_is_unanchored_and_fails(monkeypatch):
    def no_hf():
        raise ImportError("No module named 'transformers'")
    monkeypatch.setattr(par, "_import_hf", no_hf)
    rep = wb.compare(fixture_dir("gemma1"), backends=["torch:cpu"], prompt=IDS, store=False, progress=False)
    assert all(r["passed"] for r in rep.rows)
    assert not rep.passed
    line = rep.summary().splitlines()[1]
    assert line.startswith("UNANCHORED: transformers is not installed") and line.endswith("FAILED")


def test_cli_no_anchor_flag(capsys, monkeypatch):
    monkeypatch.setattr(par, "_import_hf", lambda: (_ for _ in ()).throw(ImportError("no transformers")))
    ids = ",".join(map(str, IDS))
    base = ["parity", "--model", str(fixture_dir("gemma1")), "--backends", "torch:cpu", "--prompt-ids", ids,
            "--no-store"]
    assert cli.main(base) == 1
    assert "UNANCHORED: transformers is not installed" in capsys.readouterr().out
    assert cli.main(base + ["--no-anchor"]) == 0
    assert "UNANCHORED (knowingly" in capsys.readouterr().out


def test_requested_reference_that_cannot_run_fails(capsys):
    """issue 12 item 3: llamacpp on a non-GGUF source is not 'SKIPPED ... Overall: PASSED'."""
    rep = wb.compare(fixture_dir("gemma1"), backends=["torch:cpu"], prompt=IDS, store=False, progress=False,
                     anchor=False, references=["llamacpp"])
    assert all(r["passed"] for r in rep.rows) and not rep.passed
    assert "GGUF" in rep.failed_references["llamacpp"]
    assert "FAILED (requested reference could not run" in rep.summary()
    ids = ",".join(map(str, IDS))
    rc = cli.main(["parity", "--model", str(fixture_dir("gemma1")), "--backends", "torch:cpu", "--prompt-ids", ids,
                   "--no-store", "--no-anchor", "--references", "hf,llamacpp"])
    out = capsys.readouterr().out
    assert rc == 1 and "llamacpp" in out and "Overall: FAILED" in out
    # the default ('auto') asks for nothing that cannot run here
    rep = wb.compare(fixture_dir("gemma1"), backends=["torch:cpu"], prompt=IDS, store=False, progress=False,
                     anchor=False)
    assert rep.passed and not rep.failed_references


def test_progress_callback_and_bool():
    seen = []
    wb.compare(fixture_dir("gemma1"), backends=["torch:cpu", "mlx:gpu"], prompt=IDS, store=False, anchor=False,
               progress=lambda step, total, what: seen.append((step, total, what)))
    done = [s for s, _, _ in seen]      # steps 1..total in order; a note ("loading ...") repeats the count so far
    assert sorted(set(done) - {0}) == list(range(1, seen[-1][1] + 1)) and done == sorted(done)
    assert seen[-1][0] == seen[-1][1] and seen[0][2].startswith("loading")
    assert any("mlx:gpu" in w for _, _, w in seen) and any("reference" in w for _, _, w in seen)


def test_decode_fast_rows_carry_the_route(monkeypatch):
    import sys
    import types

    def fake_capture(model, ids_arr, P, taps):
        cache = model.new_cache(batch=1, max_len=ids_arr.shape[1])
        model.forward(ids_arr[:, :P], cache=cache)
        steps = [model.forward(ids_arr[:, t:t + 1], taps=taps, cache=cache) for t in range(P, ids_arr.shape[1])]
        got = {n: np.concatenate([s.taps[n] for s in steps], axis=1) for n in steps[0].taps}
        got["logits"] = np.concatenate([s.logits for s in steps], axis=1)
        return got, "test-route"
    monkeypatch.setitem(sys.modules, "workbench.decode", types.SimpleNamespace(capture_decode=fake_capture))
    rep = wb.compare(fixture_dir("gemma3_text"), backends=["torch:cpu"], prompt=IDS, store=False, progress=False,
                     anchor=False, decode="fast")
    dec = [r for r in rep.rows if r["phase"] == "decode"]
    assert dec and all(r["route"] == "test-route" for r in dec) and rep.passed
    assert "decode[test-route]" in rep.summary()
    monkeypatch.setitem(sys.modules, "workbench.decode", types.SimpleNamespace())
    with pytest.raises(NotImplementedError, match="capture_decode"):
        wb.compare(fixture_dir("gemma1"), backends=["torch:cpu"], prompt=IDS, store=False, progress=False,
                   anchor=False, decode="fast")
    with pytest.raises(ValueError, match="decode must be"):
        wb.compare(fixture_dir("gemma1"), prompt=IDS, store=False, anchor=False, decode="turbo")


@needs_hf
@pytest.mark.parametrize("name", ["gemma1", "gemma2", "gemma3_text", "gemma3_nested", "gemma4_kv", "gemma4_e2b",
                                  "gemma4_moe", "gemma4_bidir"])
def test_every_fixture_is_anchored(name):
    """Measured: HF float64 vs our float64 within 10x of our own float32 error at every tap (ratio <= 0.9)."""
    cfg = wb.load(fixture_dir(name)).config
    ids = np.random.default_rng(5).integers(3, cfg.vocab_size, size=P.min_prompt(cfg)).tolist()
    rep = wb.compare(fixture_dir(name), backends=cpu_backends()[:1], prompt=ids, store=False, progress=False)
    assert rep.anchored and rep.passed, rep.summary()
    assert max(par._margin(r) for r in rep.anchor) < 0.5
