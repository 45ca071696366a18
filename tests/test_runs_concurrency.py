"""The results store under concurrent load, and writers killed mid-save (issue 20).

The load test reproduces what the dashboard meets in real use: several processes saving runs (each opening a
store per run, as parity.py and bench.py do) while readers reopen the store every few tens of milliseconds
*without closing the previous store first* (a Streamlit rerun, a notebook cell run twice) and list and load
runs, through RunStore and through the dashboard's own open path (dashboards/_logic.py). Before the fix 46 of
50 such reopens failed with "database disk image is malformed": RunStore read the database file's header with
open()/close(), and closing any descriptor of a file drops every POSIX lock the process holds on it, so a
writer elsewhere saw itself as the last connection and deleted the WAL under the live reader.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
import warnings

import pytest

from conftest import ROOT
from workbench import runs
from workbench.runs import RunStore

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork, SIGKILL and Linux fcntl")
CTX = mp.get_context("fork") if sys.platform.startswith("linux") else None


def expected_rows(w: int, j: int, n: int) -> list[dict]:
    """Deterministic content of writer w's run j, so a reader can check any run it loads."""
    return [dict(backend="torch:cpu", dtype="float32", phase="prefill", tap="hook_resid_post", layer=k, w=w, j=j,
                 rel_max=(w * 1000 + j * 10 + k) * 1e-7, nan=math.nan, ok=(k % 3 != 0), s=f"w{w}j{j}k{k}")
            for k in range(n)]


def same_rows(got: list[dict], want: list[dict]) -> bool:
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if set(g) != set(w):
            return False
        for k, v in w.items():
            if isinstance(v, float) and math.isnan(v):
                if not (isinstance(g[k], float) and math.isnan(g[k])):
                    return False
            elif g[k] != v or type(g[k]) is not type(v):
                return False
    return True


# ------------------------------------------------------------------------------------------------ the load test


def _writer(db, w, n_runs, n_rows, pause, start, q):
    start.wait(30)
    for j in range(n_runs):
        st = RunStore(db)  # a store per run, like workbench.parity / workbench.bench
        rid = st.save("parity", {"model": f"w{w}", "params": {"w": w, "j": j}}, expected_rows(w, j, n_rows))
        q.put((w, j, rid))
        del st  # closed by refcount, as in parity.py (no explicit close)
        time.sleep(pause)


def _reader(db, how, n_rows, writing, stop, q):
    """Reopen, list and load until told to stop; errors are counted, never raised."""
    warnings.simplefilter("ignore")
    if how == "dashboard":
        from dashboards import _logic as L
    import pandas  # noqa: F401 - imported before the writers start
    q.put("ready")
    opens = errors = during = checked = 0
    msgs: list[str] = []
    st = None
    while True:
        last = stop.is_set()
        active = writing.is_set()
        try:
            if how == "dashboard":
                new = L.open_store(db)  # the previous store is still alive while this one opens
                df, problems = L.list_runs(new)
                if problems:
                    raise AssertionError(f"problems: {problems}")
                for rid in list(df["run_id"][:2]):
                    run, err = L.load_run(new, rid)
                    if err:
                        raise AssertionError(err)
                    p = run.meta["params"]
                    if not same_rows(run.rows.to_dict("records"), expected_rows(p["w"], p["j"], n_rows)):
                        raise AssertionError(f"run {rid}: rows differ from what was saved")
                    checked += 1
            else:
                new = RunStore(db)
                df = new.list()
                if new.problems:
                    raise AssertionError(f"problems: {new.problems}")
                for rid in list(df["run_id"][:2]):
                    run = new.load(rid)
                    p = run.meta["params"]
                    if not same_rows(run.rows.to_dict("records"), expected_rows(p["w"], p["j"], n_rows)):
                        raise AssertionError(f"run {rid}: rows differ from what was saved")
                    checked += 1
                len(new)
            st = new  # the old one is released only now
            opens += 1
            during += active
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors += 1
            opens += 1
            if len(msgs) < 5:
                msgs.append(f"{type(e).__name__}: {e}")
        if last:
            break
        time.sleep(0.03)
    del st
    q.put(dict(how=how, opens=opens, errors=errors, during=during, checked=checked, msgs=msgs))


def run_load(db, n_writers, n_runs, n_rows, pause, readers=("store", "dashboard")):
    start, writing, stop = CTX.Event(), CTX.Event(), CTX.Event()
    q_w, q_r = CTX.Queue(), CTX.Queue()
    rd = [CTX.Process(target=_reader, args=(db, how, n_rows, writing, stop, q_r)) for how in readers]
    for p in rd:
        p.start()
    assert [q_r.get(timeout=60) for _ in rd] == ["ready"] * len(rd)
    ws = [CTX.Process(target=_writer, args=(db, w, n_runs, n_rows, pause, start, q_w)) for w in range(n_writers)]
    for p in ws:
        p.start()
    writing.set()
    start.set()
    saved = []
    deadline = time.monotonic() + 120
    while len(saved) < n_writers * n_runs and time.monotonic() < deadline:
        try:
            saved.append(q_w.get(timeout=1))
        except Exception:
            if not any(p.is_alive() for p in ws):
                break
    for p in ws:
        p.join(30)
    writing.clear()
    stop.set()
    reports = [q_r.get(timeout=60) for _ in rd]
    for p in rd:
        p.join(30)
    return [p.exitcode for p in ws], saved, reports


def check_store(db, saved, n_writers, n_runs, n_rows):
    ids = [rid for _, _, rid in saved]
    assert len(ids) == n_writers * n_runs and len(set(ids)) == len(ids), "every save returned its own id"
    assert {(w, j) for w, j, _ in saved} == {(w, j) for w in range(n_writers) for j in range(n_runs)}
    with RunStore(db) as st:
        df = st.list()
        assert not st.problems
        assert sorted(df["run_id"]) == sorted(ids), "every run stored exactly once, nothing else"
        for w, j, rid in saved:
            run = st.load(rid)
            assert run.meta["params"] == {"w": w, "j": j} and run.meta["model"] == f"w{w}"
            assert same_rows(run.rows.to_dict("records"), expected_rows(w, j, n_rows)), rid
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        assert c.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        assert c.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == n_writers * n_runs
        assert c.execute("SELECT COUNT(*) FROM run_rows").fetchone()[0] == n_writers * n_runs * n_rows
    c.close()


@pytest.mark.parametrize("schema_first", [False, True], ids=["racing-to-create", "existing-store"])
def test_load_8_writers_with_readers(tmp_path, schema_first):
    db = str(tmp_path / "runs.sqlite")
    if schema_first:
        RunStore(db).close()
    n_writers, n_runs, n_rows = 8, 10, 40
    t0 = time.monotonic()
    codes, saved, reports = run_load(db, n_writers, n_runs, n_rows, pause=0.25)
    took = time.monotonic() - t0
    assert codes == [0] * n_writers
    for r in reports:
        assert r["errors"] == 0, f"{r['how']} reader: {r['errors']} of {r['opens']} opens failed: {r['msgs']}"
        # the test means something only if the readers really worked while the writers wrote
        assert r["during"] >= 10 and r["checked"] >= 10, r
    check_store(db, saved, n_writers, n_runs, n_rows)
    assert took < 60, f"load test took {took:.0f} s"


@pytest.mark.slow
def test_load_16_writers_with_readers_large(tmp_path):
    db = str(tmp_path / "runs.sqlite")
    n_writers, n_runs, n_rows = 16, 20, 200
    codes, saved, reports = run_load(db, n_writers, n_runs, n_rows, pause=0.05,
                                     readers=("store", "dashboard", "store"))
    assert codes == [0] * n_writers
    for r in reports:
        assert r["errors"] == 0, f"{r['how']} reader: {r['errors']} of {r['opens']} opens failed: {r['msgs']}"
        assert r["during"] >= 5, r
    check_store(db, saved, n_writers, n_runs, n_rows)


# ------------------------------------------------------------------------------- the mechanism, checked directly

_PROBE = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
SHARED_FIRST, SHARED_SIZE = 0x40000000 + 2, 510   # SQLite's unix locking bytes (os_unix.c)
fl = struct.pack("hhqqi", fcntl.F_WRLCK, 0, SHARED_FIRST, SHARED_SIZE, 0)
t, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, fl))
print(pid if t != fcntl.F_UNLCK else 0)
"""


def lock_holder(db) -> int:
    """pid of a process holding SQLite's SHARED lock on db (as seen from another process), 0 if none."""
    out = subprocess.run([sys.executable, "-c", _PROBE, str(db)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_opening_a_second_store_keeps_this_process_locks(tmp_path):
    """An open WAL connection holds a SHARED lock on the database file; that is what stops a writer in another
    process, closing its last connection, from deleting the WAL under it. Opening another RunStore on the same
    file in this process (the dashboard's rerun, the dashboard's in-process new run) must not drop it."""
    db = tmp_path / "runs.sqlite"
    a = RunStore(db)
    rid = a.save("bench", {"model": "m"}, [{"decode_tok_s": 1.0}])
    a.list()
    assert lock_holder(db) == os.getpid()
    b = RunStore(db)  # the old code read the file's header with open()/close() here, dropping a's lock
    assert lock_holder(db) == os.getpid()
    b.close()
    c = RunStore(db, readonly=True)
    c.load(rid)
    c.close()
    assert lock_holder(db) == os.getpid()
    assert a.load(rid).rows["decode_tok_s"].tolist() == [1.0]
    a.close()
    assert lock_holder(db) == 0


def test_reader_survives_writers_closing_their_last_connection(tmp_path):
    """The failure of issue 20 in its smallest form: a reader keeps one store open and opens a second one;
    a writer process then saves and closes (its close checkpoints and, if it believes it is the last
    connection, deletes the WAL and shared-memory files); the reader then reads."""
    db = str(tmp_path / "runs.sqlite")
    first = RunStore(db)
    first.save("bench", {"model": "m"}, [{"i": 0}])
    for i in range(1, 6):
        RunStore(db).list()  # a second store opened and dropped while `first` stays open
        p = subprocess.run([sys.executable, "-c", (
            "import sys; sys.path.insert(0, sys.argv[2]); from workbench.runs import RunStore\n"
            "st = RunStore(sys.argv[1]); st.save('bench', {'model': 'm'}, [{'i': int(sys.argv[3])}]); st.close()"),
            db, str(ROOT), str(i)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        df = first.list()
        assert len(df) == i + 1 and not first.problems
        assert {int(first.load(r).rows["i"][0]) for r in df["run_id"]} == set(range(i + 1))
    first.close()


# ------------------------------------------------------------------------------ writers killed in the middle


def _killable(db, stage, w_fd, n_rows):
    """Child: save one run and stop at `stage` (tell the parent, then wait to be killed)."""
    def stop_here():
        os.write(w_fd, b"!")
        time.sleep(120)

    if stage.startswith("row:"):
        at = int(stage.split(":")[1])
        real = runs._dumps

        def dumps(v, strict=False, where="value"):
            if where == f"row {at}":
                stop_here()
            return real(v, strict, where)
        runs._dumps = dumps
    else:
        runs._hook = lambda s: stop_here() if s == stage else None
    st = RunStore(db)
    st.save("parity", {"model": "killed", "params": {"stage": stage}}, expected_rows(99, 0, n_rows))
    os._exit(3)  # not reached: killed first


def _save_one(db, w, j, n_rows):
    st = RunStore(db)
    st.save("parity", {"model": f"w{w}", "params": {"w": w, "j": j}}, expected_rows(w, j, n_rows))
    st.close()


def assert_whole(db):
    """The store opens; every run in it is whole; no row belongs to no run. Returns the number of runs."""
    with RunStore(db) as st:
        df = st.list()
        assert not st.problems, st.problems
        for rid in df["run_id"]:
            run = st.load(rid)
            assert len(run.rows) == run_rows_expected(run)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        assert c.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        assert c.execute("SELECT COUNT(*) FROM run_rows WHERE run_id NOT IN (SELECT run_id FROM runs)"
                         ).fetchone()[0] == 0
        n = c.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    c.close()
    return n, df


def run_rows_expected(run) -> int:
    return 300 if run.meta["model"] == "killed" else 20


@pytest.mark.parametrize("stage", ["begin", "run_row", "row:0", "row:150", "row:299", "rows", "before_commit"])
def test_sigkill_mid_save_leaves_run_absent_and_store_usable(tmp_path, stage):
    db = str(tmp_path / "runs.sqlite")
    _save_one(db, 0, 0, 20)
    reader = RunStore(db)  # a reader that stays open through the kill
    assert len(reader.list()) == 1
    r_fd, w_fd = os.pipe()
    p = CTX.Process(target=_killable, args=(db, stage, w_fd, 300))
    p.start()
    ready, _, _ = select.select([r_fd], [], [], 30)
    assert ready, f"the writer never reached {stage}"
    assert os.read(r_fd, 1) == b"!"
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    os.close(r_fd)
    os.close(w_fd)
    assert p.exitcode == -signal.SIGKILL
    n, df = assert_whole(db)
    assert n == 1 and list(df["model"]) == ["w0"], "a run killed before its commit is absent"
    assert len(reader.list()) == 1 and not reader.problems
    # the next writer (another process) succeeds, and its run is whole
    q = CTX.Process(target=_save_one, args=(db, 1, 1, 20))
    q.start()
    q.join(60)
    assert q.exitcode == 0
    n, df = assert_whole(db)
    assert n == 2 and sorted(df["model"]) == ["w0", "w1"]
    assert len(reader.list()) == 2
    reader.close()


def _save_forever(db, n_rows):
    st = RunStore(db)
    i = 0
    while True:
        st.save("parity", {"model": "killed", "params": {"i": i}}, expected_rows(99, i, n_rows))
        i += 1


@pytest.mark.parametrize("delay_ms", [5, 40, 90, 170, 260])
def test_sigkill_at_a_random_moment_keeps_every_run_whole(tmp_path, delay_ms):
    """Killed at arbitrary moments of a stream of large saves (the commit itself included, by chance):
    every run in the store is whole, and the next writer succeeds."""
    db = str(tmp_path / "runs.sqlite")
    RunStore(db).close()
    p = CTX.Process(target=_save_forever, args=(db, 300))
    p.start()
    time.sleep(0.15 + delay_ms / 1000)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    n, df = assert_whole(db)
    q = CTX.Process(target=_save_one, args=(db, 1, 1, 20))
    q.start()
    q.join(60)
    assert q.exitcode == 0
    n2, _ = assert_whole(db)
    assert n2 == n + 1
