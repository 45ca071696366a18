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
