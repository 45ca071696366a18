"""The results store and files that aren't ours, or aren't writable (issue 12 item 7, issue 20).

A foreign SQLite file is inspected on a read-only connection and refused with its bytes, size and directory
unchanged; a store on a read-only file or directory opens for reading (RunStore, the dashboard's open path,
runs.list/load) and says so clearly on any write.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import runs
from workbench.runs import RunStore, RunStoreError


def snapshot(d: Path) -> dict:
    """name -> (size, sha256, first 100 bytes) of every file in d."""
    out = {}
    for p in sorted(Path(d).iterdir()):
        if p.is_file():
            b = p.read_bytes()
            out[p.name] = (len(b), hashlib.sha256(b).hexdigest(), b[:100])
    return out


def make_foreign(path: Path, kind: str) -> None:
    c = sqlite3.connect(path)
    if kind == "contacts":
        c.execute("CREATE TABLE contacts (name TEXT)")
        c.execute("INSERT INTO contacts VALUES ('ada')")
    elif kind == "runs_table":  # another application's table happens to be called `runs`
        c.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
        c.execute("INSERT INTO runs (name) VALUES ('5k in the park')")
    elif kind == "our_table_names":  # our table names, but not our schema or application id
        c.execute("CREATE TABLE runs (x)")
        c.execute("CREATE TABLE run_rows (y)")
    elif kind == "app_id":
        c.execute("PRAGMA application_id = 1234")
        c.execute("CREATE TABLE t (x)")
    elif kind == "user_version_only":
        c.execute("PRAGMA user_version = 7")
    elif kind == "wal_mode":
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("CREATE TABLE notes (body TEXT)")
        c.executemany("INSERT INTO notes VALUES (?)", [("x" * 500,)] * 50)
    elif kind == "index_only":
        c.execute("CREATE TABLE runs (run_id TEXT)")
        c.execute("CREATE INDEX other_idx ON runs (run_id)")
    c.commit()
    c.close()


@pytest.mark.parametrize("kind", ["contacts", "runs_table", "our_table_names", "app_id", "user_version_only",
                                  "wal_mode", "index_only"])
def test_foreign_sqlite_refused_read_only_bytes_unchanged(tmp_path, kind):
    db = tmp_path / "other.sqlite"
    make_foreign(db, kind)
    before = snapshot(tmp_path)
    assert set(before) == {"other.sqlite"}  # a WAL-mode file closed cleanly has no -wal/-shm
    with pytest.raises(RunStoreError) as e:
        RunStore(db)
    msg = str(e.value)
    assert str(db) in msg and "not modified" in msg and "another application" in msg, msg
    after = snapshot(tmp_path)
    assert after == before, "size, hash and header of the foreign file (and its directory) are unchanged"
    with pytest.raises(RunStoreError):
        RunStore(db, readonly=True)
    assert snapshot(tmp_path) == before
    c = sqlite3.connect(db)  # and the other application's data is still there
    assert c.execute("PRAGMA quick_check").fetchone() == ("ok",)
    c.close()


def test_foreign_file_while_its_application_has_it_open(tmp_path):
    """The other application holds its WAL database open (its -wal/-shm exist): refused, its files untouched."""
    db = tmp_path / "other.sqlite"
    make_foreign(db, "wal_mode")
    owner = sqlite3.connect(db)
    owner.execute("INSERT INTO notes VALUES ('live')")
    owner.commit()
    main_before = (db.stat().st_size, hashlib.sha256(db.read_bytes()).hexdigest())
    with pytest.raises(RunStoreError, match="another application"):
        RunStore(db)
    assert (db.stat().st_size, hashlib.sha256(db.read_bytes()).hexdigest()) == main_before
    assert owner.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 51
    owner.close()


def test_empty_sqlite_database_is_adopted(tmp_path):
    """A valid SQLite file with no schema at all (nothing in it to damage) becomes a store."""
    db = tmp_path / "blank.sqlite"
    c = sqlite3.connect(db)
    c.execute("VACUUM")  # writes the header page: a 4 KiB database with nothing in it
    c.close()
    assert db.stat().st_size > 0
    with RunStore(db) as st:
        rid = st.save("bench", {"model": "m"}, [{"decode_tok_s": 2.0}])
        assert st.load(rid).rows["decode_tok_s"].tolist() == [2.0]


def test_newer_schema_refused_readonly_too(tmp_path):
    db = tmp_path / "runs.sqlite"
    with RunStore(db) as st:
        st.save("parity", {"model": "m"}, [{"x": 1}])
    c = sqlite3.connect(db)
    c.execute("PRAGMA user_version = 9")
    c.close()
    before = snapshot(tmp_path)
    for ro in (False, True):
        with pytest.raises(RunStoreError, match=r"newer gemma-workbench \(schema 9 > 1\)"):
            RunStore(db, readonly=ro)
        assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ read-only


@contextlib.contextmanager
def read_only(*paths: Path):
    """Make paths unwritable for this process: chmod for a normal user; root ignores permission bits, so
    there the immutable attribute (chattr +i), which binds root too."""
    if os.geteuid() != 0:
        modes = [p.stat().st_mode for p in paths]
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, m in zip(paths, modes):
                p.chmod(m)
        return
    if not shutil.which("chattr"):
        pytest.skip("running as root without chattr: can't make a file read-only for root")
    done = []
    try:
        for p in paths:
            r = subprocess.run(["chattr", "+i", str(p)], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"chattr +i failed ({r.stderr.strip()}): can't make a file read-only for root here")
            done.append(p)
        yield
    finally:
        for p in done:
            subprocess.run(["chattr", "-i", str(p)], check=True)


def make_store(db: Path) -> dict:
    ids = {}
    with RunStore(db) as st:
        ids["p"] = st.save("parity", {"model": "m"}, [dict(backend="torch:cpu", dtype="float32", layer=i,
                                                           rel_max=1e-7 * i, passed=True) for i in range(4)])
        ids["b"] = st.save("bench", {"model": "m"}, [dict(backend="torch:cpu", dtype="float32",
                                                          decode_tok_s=50.0, prefill_tok_s=900.0)])
    for s in ("-wal", "-shm"):
        assert not Path(str(db) + s).exists()
    return ids


def check_reads_and_refuses_writes(db: Path, ids: dict, tmp_path: Path):
    from dashboards import _logic as L
    st = L.open_store(str(db))  # the dashboard's own open path
    assert st.read_only
    df, problems = L.list_runs(st)
    assert not problems and sorted(df["run_id"]) == sorted(ids.values())
    run, err = L.load_run(st, ids["p"])
    assert err is None and run.rows["layer"].tolist() == [0, 1, 2, 3]
    assert runs.load(ids["b"][:6], db=db).rows["decode_tok_s"].tolist() == [50.0]
    assert len(runs.list(db=db)) == 2
    for what, call in (("save", lambda: st.save("bench", {}, [])), ("delete", lambda: st.delete(ids["p"]))):
        with pytest.raises(RunStoreError) as e:
            call()
        msg = str(e.value)
        assert "read-only" in msg and str(db) in msg and "listed and loaded" in msg, (what, msg)
    st.close()
    assert sorted(runs.list(db=db)["run_id"]) == sorted(ids.values())


def test_read_only_file(tmp_path):
    db = tmp_path / "runs.sqlite"
    ids = make_store(db)
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    with read_only(db):
        check_reads_and_refuses_writes(db, ids, tmp_path)
        with RunStore(db) as st:
            assert "not writable" in st.read_only
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest


def test_read_only_directory(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    db = d / "runs.sqlite"
    ids = make_store(db)
    before = snapshot(d)
    with read_only(d):
        check_reads_and_refuses_writes(db, ids, tmp_path)
        with RunStore(db) as st:
            assert "directory is not writable" in st.read_only
        with pytest.raises(RunStoreError, match="none can be made .its directory is not writable"):
            RunStore(d / "new.sqlite")
    assert snapshot(d) == before


def test_readonly_flag(tmp_path):
    db = tmp_path / "runs.sqlite"
    with pytest.raises(RunStoreError, match="no results store there"):
        RunStore(db, readonly=True)
    assert not db.exists()
    ids = make_store(db)
    with RunStore(db, readonly=True) as st:
        assert st.read_only == "opened with readonly=True"
        assert len(st.list()) == 2
        with pytest.raises(RunStoreError, match="read-only"):
            st.save("bench", {}, [])
    with RunStore(db) as st:  # the same file, writable
        assert st.read_only is None
        st.save("bench", {}, [])
        assert len(st.list()) == 3 and ids["p"] in st


def test_read_only_directory_with_unfolded_wal_is_refused_clearly(tmp_path):
    """A writer died (its WAL still holds committed runs) and the -shm is gone: in a read-only directory the
    WAL can't be read, and reading the file alone would silently miss those runs, so it is refused."""
    d = tmp_path / "shared"
    d.mkdir()
    db = d / "runs.sqlite"
    code = ("import os, sys; sys.path.insert(0, sys.argv[2]); from workbench.runs import RunStore\n"
            "st = RunStore(sys.argv[1]); st.save('bench', {}, [{'i': 1}]); os._exit(0)")  # no close: WAL stays
    root = Path(runs.__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code, str(db), str(root)], check=True)
    wal, shm = Path(str(db) + "-wal"), Path(str(db) + "-shm")
    assert wal.stat().st_size > 0
    shm.unlink()
    with read_only(d):
        with pytest.raises(RunStoreError, match="write-ahead log .runs.sqlite-wal. holds changes"):
            RunStore(db)
    with RunStore(db) as st:  # writable again: the run is there
        assert len(st.list()) == 1
