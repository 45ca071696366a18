"""The ``workbench`` command line: one parser for every subcommand, the demo through that parser, generate from
token ids, and ``bench --baseline`` (regression -> exit 1, unknown id -> exit 2 before anything is stored,
``--no-store`` still compares)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from _stored import scaled_bench_copies
from conftest import ROOT, cpu_backends, fixture_dir, have

pytestmark = pytest.mark.skipif(not have("torch"), reason="torch is not installed")

FX = str(fixture_dir("gemma3_text"))
QUICK = ["--model", FX, "--backends", "torch:cpu", "--prompt-len", "8", "--gen-len", "4", "--repeats", "1"]


def _main(argv):
    from workbench.cli import main
    return main(argv)


def _n_runs(db) -> int:
    from workbench import runs
    if not db.exists():
        return 0
    with runs.RunStore(db) as st:
        return len(st)


# ------------------------------------------------------------------------------------------------ the parser
def test_every_subcommand_parses_with_its_defaults():
    from workbench.cli import build_parser, parse
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    assert {"info", "parity", "generate", "bench", "notebooks", "dashboard", "demo"} <= set(sub.choices)
    a = parse(["parity"])
    assert (a.model, a.backends, a.dtypes, a.prompt_ids, a.tolerance) == ("gemma3-270m", "all", "float32", None, None)
    assert parse(["parity", "--prompt-ids", "2, 651,6037"]).prompt_ids == [2, 651, 6037]
    assert parse(["generate", "--prompt-ids", "1,2,3"]).prompt_ids == [1, 2, 3]


@pytest.mark.parametrize("argv, flag", [(["generate", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
                                        (["generate", "--prompt-ids", "1,a"], "--prompt-ids"),
                                        (["parity", "--prompt-ids", ""], "--prompt-ids"),
                                        (["bench", "--repeats", "0"], "--repeats")])
def test_bad_arguments_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        _main(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_demo_runs_parity_and_bench_through_the_parser(tmp_path, capsys):
    """`workbench demo --no-dashboard` on a fixture: parity (float32 + bfloat16) and a bench, both stored."""
    from workbench import runs
    db = tmp_path / "runs.sqlite"
    rc = _main(["demo", "--model", FX, "--prompt-ids", "1,2,3,4,5,6,7,8", "--db", str(db), "--no-dashboard"])
    out = capsys.readouterr().out
    assert rc == 0, out
    kinds = sorted(runs.list(db=db)["kind"])
    assert kinds == ["bench", "parity"]
    par = runs.load(runs.list(kind="parity", db=db)["run_id"].iloc[0], db=db)
    assert set(par.rows["dtype"]) >= {"float32", "bfloat16"}
    assert "demo: parity PASSED, benchmark done" in out


def test_generate_from_token_ids(tmp_path):
    """A checkpoint without a tokenizer from the CLI: --prompt-ids, output as ids, same tokens as the API."""
    import workbench as wb
    r = subprocess.run([sys.executable, "-m", "workbench", "generate", "--model", FX, "--prompt-ids", "1,2,3",
                        "--max-new-tokens", "5"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = wb.load(FX, progress=False)
    want = m.generate([1, 2, 3], max_new_tokens=5).token_ids
    assert len(want) == 5
    assert r.stdout.strip() == "1 2 3 -> " + " ".join(map(str, want))
    assert "generated 5 tok" in r.stderr


@pytest.mark.parametrize("argv", [["generate", "--model", FX], ["generate", "hi", "--prompt-ids", "1", "--model", FX]])
def test_generate_needs_exactly_one_prompt(argv, capsys):
    assert _main(argv) == 2
    err = capsys.readouterr().err
    assert "--prompt-ids" in err and "Traceback" not in err


@pytest.mark.parametrize("stream", [False, True])
def test_negative_max_new_tokens_names_the_argument(stream):
    import workbench as wb
    from workbench.model.gemma import InputError
    m = wb.load(FX, progress=False)
    with pytest.raises(InputError, match="max_new_tokens.*>= 0.*-1"):
        m.generate([1, 2, 3], max_new_tokens=-1, stream=stream)   # raised at the call, also when streaming
    assert m.generate([1, 2, 3], max_new_tokens=0).token_ids == []


# ------------------------------------------------------------------------------------------------ bench --baseline
@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """A store with a real bench run of the fixture, plus copies of it scaled x1000 (this machine can't reach
    those: any new run is a regression against them) and x0.001 (any new run beats them), and a parity run."""
    import workbench as wb
    from workbench import runs
    db = tmp_path_factory.mktemp("baseline") / "runs.sqlite"
    res = wb.bench(FX, backends=["torch:cpu"], dtypes=["float32"], prompt_len=8, gen_len=4, repeats=1, db=db,
                   progress=False)
    real = runs.load(res.run_id, db=db)
    ids = {"real": res.run_id}
    with runs.RunStore(db) as st:
        ids.update(scaled_bench_copies(st, real))
    rep = wb.compare(FX, backends=["torch:cpu"], prompt=[1, 2, 3, 4], references=(), db=db, progress=False)
    ids["parity"] = rep.run_id
    return db, ids


def test_bench_regression_against_baseline_exits_1(baselines, capsys):
    db, ids = baselines
    n = _n_runs(db)
    assert _main(["bench", *QUICK, "--db", str(db), "--baseline", ids["fast"]]) == 1
    out = capsys.readouterr().out
    assert "REGRESSIONS against the baseline" in out and "regression(s)" in out
    assert _n_runs(db) == n + 1                  # the new run is stored


def test_bench_faster_than_baseline_exits_0(baselines, capsys):
    db, ids = baselines
    assert _main(["bench", *QUICK, "--db", str(db), "--baseline", ids["slow"][:8]]) == 0   # a unique prefix
    out = capsys.readouterr().out
    assert f"baseline {ids['slow']}: no regressions" in out and "REGRESSIONS" not in out


def test_bench_unknown_baseline_fails_before_running(baselines, capsys):
    db, _ = baselines
    n = _n_runs(db)
    assert _main(["bench", *QUICK, "--db", str(db), "--baseline", "nosuchrun"]) == 2
    cap = capsys.readouterr()
    assert "baseline: no run 'nosuchrun'" in cap.err and "Traceback" not in cap.err
    assert "loading" not in cap.err and "warm-up" not in cap.err     # nothing was loaded or measured
    assert _n_runs(db) == n                      # nothing was stored


def test_bench_baseline_of_another_kind_is_refused(baselines, capsys):
    db, ids = baselines
    n = _n_runs(db)
    assert _main(["bench", *QUICK, "--db", str(db), "--baseline", ids["parity"]]) == 2
    assert "is a parity run, not a bench run" in capsys.readouterr().err
    assert _n_runs(db) == n


def test_bench_no_store_still_compares(baselines, capsys):
    db, ids = baselines
    n = _n_runs(db)
    assert _main(["bench", *QUICK, "--db", str(db), "--no-store", "--baseline", ids["fast"]]) == 1
    out = capsys.readouterr().out
    assert "REGRESSIONS against the baseline" in out and "stored run" not in out
    assert _n_runs(db) == n                      # compared, not stored
    assert _main(["bench", *QUICK, "--db", str(db), "--no-store", "--baseline", ids["slow"]]) == 0
    assert _n_runs(db) == n


def test_bench_result_comparison_frame(baselines):
    import workbench as wb
    db, ids = baselines
    res = wb.bench(FX, backends=["torch:cpu"], dtypes=["float32"], prompt_len=8, gen_len=4, repeats=1, db=db,
                   store=False, baseline=ids["fast"], progress=False)
    cmp = res.comparison
    assert cmp.attrs["baseline_id"] == ids["fast"] and res.run_id is None
    row = cmp[(cmp["backend"] == "torch:cpu") & (cmp["dtype"] == "float32")].iloc[0]
    assert row["status"] == "both" and bool(row["regression"])
    assert row["decode_tok_s_ratio"] < 0.01      # against a baseline 1000x this machine's speed
    assert len(res.regressions) == int(cmp["regression"].sum()) >= 1
