"""The parity engine: an injected fault is caught and named; unavailable backends are skipped with their
reason, never passed; runs are stored; the CLI exits non-zero on failure."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, cpu_backends, fixture_dir

import workbench as wb
from workbench.parity import metrics

IDS = list(range(3, 27))


def test_metrics_nan_never_passes_and_inf_must_match():
    ref = np.array([1.0, -2.0, 3.0])
    assert metrics(ref, ref)["rel_max"] == 0
    m = metrics(ref, np.array([1.0, np.nan, 3.0]))
    assert m["nan_count"] == 1 and m["rel_max"] == float("inf")
    m = metrics(np.array([np.inf, 1.0]), np.array([-np.inf, 1.0]))
    assert m["inf_mismatch"] == 1 and m["min_tol"] == float("inf")
    m = metrics(np.array([np.inf, 1.0]), np.array([np.inf, 1.0]))
    assert m["inf_mismatch"] == 0 and m["rel_max"] == 0
    m = metrics(np.array([2.0, 4.0]), np.array([2.0, 4.4]))
    assert m["rel_max"] == pytest.approx(0.1) and m["max_abs"] == pytest.approx(0.4)


@pytest.mark.parametrize("backend", cpu_backends())
def test_injected_fault_is_the_first_divergence(backend, tmp_db):
    rep = wb.compare(fixture_dir("gemma3_text"), backends=cpu_backends(), dtypes=["float32"], prompt=IDS,
                     references=(), db=tmp_db, progress=False,
                     fault={"backend": backend, "layer": 4, "tap": "hook_mlp_out", "scale": 1e-3})
    assert not rep.passed
    fd = rep.first_divergence
    assert (fd["backend"], fd["tap"], fd["layer"], fd["phase"]) == (backend, "hook_mlp_out", 4, "prefill")
    others = [b for b in cpu_backends() if b != backend]
    for b in others:
        assert f"{b}:float32" not in rep.divergences(), "the fault is on one backend only"
    # everything before layer 4's MLP output is clean on the faulty backend too
    df = rep.to_frame()
    d = df[(df.backend == backend) & (df.phase == "prefill")]
    assert d[d.order < fd["order"]].passed.all()
    assert "FAILED" in rep.summary() and "hook_mlp_out @ layer 4" in rep.summary()


def test_unavailable_backend_is_skipped_not_passed(tmp_db):
    rep = wb.compare(fixture_dir("gemma1"), backends=["torch:cuda", "mlx:gpu", "torch:mps"], dtypes=["float32"],
                     prompt=IDS, references=(), db=tmp_db, progress=False)
    if any(b in wb.backends.available() for b in ("torch:cuda", "mlx:gpu", "torch:mps")):
        pytest.skip("a GPU backend is available here")
    assert rep.rows == [] and not rep.passed
    assert set(rep.skipped) == {"torch:cuda:float32", "mlx:gpu:float32", "torch:mps:float32"}
    assert all(why for why in rep.skipped.values())
    assert "SKIPPED" in rep.summary()


def test_float64_on_mlx_is_skipped_with_reason(tmp_db):
    if "mlx:cpu" not in wb.backends.available():
        pytest.skip("mlx not installed")
    rep = wb.compare(fixture_dir("gemma1"), backends=["mlx:cpu"], dtypes=["float64"], prompt=IDS,
                     references=(), db=tmp_db, progress=False)
    assert "float64 runs on torch:cpu only" in rep.skipped["mlx:cpu:float64"]


def test_report_is_stored_and_loads_back(tmp_db):
    rep = wb.compare(fixture_dir("gemma4_kv"), backends=cpu_backends(), dtypes=["float32", "bfloat16"],
                     prompt=IDS, references=(), db=tmp_db, progress=False)
    assert rep.passed, rep.summary()
    run = wb.runs.load(rep.run_id, db=tmp_db)
    assert run.kind == "parity" and run.meta["passed"] is True
    # the stored rows are the anchor rows (phase "anchor") and then the targets' rows
    assert len(run.rows) == len(rep.anchor) + len(rep.rows) and len(rep.anchor) > 0
    assert (run.rows.phase == "anchor").sum() == len(rep.anchor)
    L = wb.load(fixture_dir("gemma4_kv")).config.num_hidden_layers
    d = run.rows[(run.rows.tap == "hook_resid_post") & (run.rows.phase == "decode")]
    assert sorted(set(d.layer.dropna().astype(int))) == list(range(L))
    fig = rep.heatmap(by="taps", backend=cpu_backends()[0], dtype="float32")
    assert fig.axes


def test_cli_exit_codes(tmp_path):
    db = str(tmp_path / "cli.sqlite")
    base = [sys.executable, "-m", "workbench.cli", "parity", "--model", str(fixture_dir("gemma2")),
            "--backends", "torch:cpu", "--db", db, "--json", str(tmp_path / "rows.json")]
    ids = ",".join(map(str, IDS))
    env = {"PYTHONPATH": str(ROOT)}
    import os
    env = dict(os.environ, **env)
    ok = subprocess.run(base + ["--prompt-ids", ids], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "PASSED" in ok.stdout and "stored run" in ok.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows and all(r["passed"] for r in rows)
    bad = subprocess.run(base + ["--prompt-ids", ids, "--dtypes", "float16,float32", "--tolerance", "float32=1e-9"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "FAILED" in bad.stdout


# ------------------------------------------------------------------------------------------ stored reports
def _old_row(tap, layer=None, rel_max=0.0, passed=True, **kw):
    return dict(backend="torch:cpu", dtype="float32", kind="torch:cpu", phase="prefill", tap=tap, layer=layer,
                tol=1e-4, max_abs=rel_max, rel_max=rel_max, rel_l2=rel_max, nmse=0.0, cosine=1.0, nan_count=0,
                inf_count=0, inf_mismatch=0, min_tol=rel_max, ref_scale=1.0, passed=passed, **kw)


def test_stored_report_is_the_fresh_report(tmp_db):
    """ParityReport.from_run gives back the report wb.compare returned (same verdict, divergence, summary), from
    the exact stored rows and from the DataFrame alone; a run stored before the anchor existed (no anchor status,
    rows without order/route/margin) reads back UNANCHORED with its first divergence; another kind is refused."""
    from workbench.parity import ParityReport
    fx = fixture_dir("gemma3_text")
    rep = wb.compare(fx, backends=["torch:cpu"], dtypes=["float32"], prompt=IDS[:12], references=(), db=tmp_db,
                     progress=False, decode_steps=2, fault={"backend": "torch:cpu", "layer": 2, "scale": 1e-2})
    assert not rep.passed and rep.first_divergence is not None
    run = wb.runs.load(rep.run_id, db=tmp_db)
    for back in (ParityReport.from_run(rep.run_id, store=tmp_db), ParityReport.from_run(run)):
        assert back.run_id == rep.run_id and back.passed == rep.passed
        assert back.first_divergence == rep.first_divergence and back.summary() == rep.summary()
        assert back.rows == rep.rows and back.anchor == rep.anchor and back.anchor_info == rep.anchor_info
    run.records = None                       # a Run made from the DataFrame only
    back = ParityReport.from_run(run)
    assert back.summary() == rep.summary() and back.target_table() == rep.target_table()
    fd = back.first_divergence
    assert (fd["tap"], fd["layer"], type(fd["layer"])) == (rep.first_divergence["tap"], 2, int)

    old = [_old_row("hook_embed"), _old_row("hook_mlp_out", 1), _old_row("hook_mlp_out", 2, 3e-3, False),
           _old_row("logits", top1=1.0, top5_overlap=1.0)]
    with wb.runs.RunStore(tmp_db) as st:
        rid = st.save("parity", dict(model="old", reference="torch:cpu:float64", n_tokens=8, decode_steps=0,
                                     passed=False), old)
        bench_id = st.save("bench", dict(model="old"), [dict(backend="torch:cpu", dtype="float32", status="ok")])
    back = ParityReport.from_run(rid, store=tmp_db)
    assert not back.passed and back.anchor == [] and back.summary().splitlines()[1].startswith("UNANCHORED")
    assert (back.first_divergence["tap"], back.first_divergence["layer"]) == ("hook_mlp_out", 2)
    assert back.target_table()[0]["first_divergence"] == "hook_mlp_out @ layer 2"
    assert back.summary().endswith("Overall: FAILED")
    with pytest.raises(ValueError, match="not 'parity'"):
        ParityReport.from_run(bench_id, store=tmp_db)


def test_progress_is_one_callback_for_compare_bench_and_diverge(capsys):
    """compare, bench and diverge report through the same progress= callback, fn(done, total, what): forward
    only, ending at the total, nothing printed; progress=True prints the steps as "[i/N] what (t s)" lines."""
    import re
    from workbench.bench import bench
    from workbench.diverge import diverge
    fx = fixture_dir("gemma3_text")
    runs = ((wb.compare, dict(prompt=IDS[:8], references=(), anchor=False, decode_steps=1), "torch:cpu:float32"),
            (bench, dict(prompt_len=4, gen_len=2, repeats=2), "torch:cpu float32 run 2/2"),
            (diverge, dict(prompt=IDS[:8], steps=2, dtypes=["float32"]), "torch:cpu:float32: steps compared"))
    for fn, kw, expect in runs:
        calls = []
        fn(fx, backends=["torch:cpu"], store=False, progress=lambda i, n, w: calls.append((i, n, w)), **kw)
        done, total = [c[0] for c in calls], calls[-1][1]
        assert done == sorted(done) and done[-1] == total and {c[1] for c in calls} == {total}, calls
        assert any(w.startswith(expect) for _, _, w in calls), (expect, calls)
        assert "[1/" not in capsys.readouterr().err
    wb.compare(fx, backends=["torch:cpu"], prompt=IDS[:8], references=(), anchor=False, store=False, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"^\[1/3\] reference torch:cpu:float64 \(\d+\.\ds\)$", err, re.M), err
    assert re.search(r"^\[3/3\] torch:cpu:float32 \(\d+\.\ds\)$", err, re.M), err
