"""Stress the results store as issue 20 measured it: N writer processes each saving R runs (a store opened per
run, as workbench.parity/bench do) while a reader process reopens the store every INTERVAL seconds without
closing the previous one first (as a dashboard rerun or a notebook cell run twice does), lists it and loads
the newest run. Prints the reader's failures.

    .venv/bin/python tools/store_stress.py                       # the current workbench/runs.py
    git show 054b424:workbench/runs.py > /tmp/runs_old.py        # the store before the fix
    .venv/bin/python tools/store_stress.py --runs-module /tmp/runs_old.py

Measured on the 2-core build machine (2026-12-01): before the fix 46-58 of 50-63 reopens failed with
"database disk image is malformed"; after it 0 of 18-42 (fewer opens only because a successful one lists and
loads, which a failed one skipped).
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_runs(module_path):
    if not module_path:
        sys.path.insert(0, str(ROOT))
        from workbench import runs
        return runs
    spec = importlib.util.spec_from_file_location("workbench_runs_under_test", module_path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def writer(runs, db, w, n_runs, n_rows, pause, start):
    start.wait(60)
    for j in range(n_runs):
        st = runs.RunStore(db)
        st.save("parity", {"model": f"w{w}", "params": {"j": j}},
                [dict(backend="torch:cpu", dtype="float32", layer=k, rel_max=1e-7 * k, passed=True, w=w, j=j)
                 for k in range(n_rows)])
        st.close()
        time.sleep(pause)


def reader(runs, db, interval, keep_previous, stop, q):
    warnings.simplefilter("ignore")
    opens = errors = 0
    msgs = collections.Counter()
    st = None
    while not stop.is_set():
        opens += 1
        try:
            if not keep_previous and st is not None:
                st.close()
            new = runs.RunStore(db)
            df = new.list()
            if len(df):
                new.load(df["run_id"].iloc[0])
            st = new
        except Exception as e:  # noqa: BLE001 - counted
            errors += 1
            msgs[f"{type(e).__name__}: {str(e)[-110:]}"] += 1
        time.sleep(interval)
    q.put((opens, errors, dict(msgs)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--runs", type=int, default=10, help="runs per writer")
    ap.add_argument("--rows", type=int, default=100, help="rows per run")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between one writer's runs")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between the reader's reopens")
    ap.add_argument("--close-previous", action="store_true", help="the reader closes its store before reopening")
    ap.add_argument("--existing", action="store_true", help="create the store before the writers start")
    ap.add_argument("--runs-module", default=None, help="path of a runs.py to test instead of workbench.runs")
    args = ap.parse_args()
    runs = load_runs(args.runs_module)
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as d:
        db = os.path.join(d, "runs.sqlite")
        if args.existing:
            runs.RunStore(db).close()
        start, stop, q = ctx.Event(), ctx.Event(), ctx.Queue()
        rd = ctx.Process(target=reader, args=(runs, db, args.interval, not args.close_previous, stop, q))
        rd.start()
        ws = [ctx.Process(target=writer, args=(runs, db, w, args.runs, args.rows, args.pause, start))
              for w in range(args.writers)]
        for p in ws:
            p.start()
        t0 = time.time()
        start.set()
        for p in ws:
            p.join()
        stop.set()
        opens, errors, msgs = q.get()
        rd.join()
        with runs.RunStore(db) as st:
            n = len(st.list())
        print(f"{args.writers} writers x {args.runs} runs: exit codes {[p.exitcode for p in ws]}, {n} runs stored, "
              f"{time.time() - t0:.1f} s; reader: {errors} of {opens} reopens failed")
        for m, c in msgs.items():
            print(f"  {c} x {m}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
