"""The results store (workbench/runs.py): round trips, safety of the user's file, atomicity, concurrency."""
import hashlib
import json
import math
import multiprocessing as mp
import os
import sqlite3
import sys
from pathlib import Path

import pandas as pd
import pytest

from workbench import runs
from workbench.runs import RunStore, RunStoreError


def sha256(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def parity_rows(n=5, backend="torch:cpu", dtype="float32"):
    return [dict(backend=backend, dtype=dtype, phase="prefill", tap="hook_resid_post", layer=i,
                 max_abs=1e-6 * (i + 1), rel_max=2e-6, rel_l2=1e-7, nmse=1e-14, cosine=1.0, nan_count=0,
                 inf_count=0, min_tol=1e-5, tol=1e-4, passed=True) for i in range(n)]


def bench_rows(decode=50.0, prefill=1000.0, mlx_decode=40.0):
    return [dict(backend="torch:cpu", dtype="float32", prompt_len=64, gen_len=32, prefill_tok_s=prefill,
                 decode_tok_s=decode, ttft_s=0.064),
            dict(backend="mlx:cpu", dtype="float32", prompt_len=64, gen_len=32, prefill_tok_s=800.0,
                 decode_tok_s=mlx_decode, ttft_s=0.08)]


@pytest.fixture
def store(tmp_path):
    with RunStore(tmp_path / "runs.sqlite") as st:
        yield st


def files_in(d) -> dict:
    return {p.name: sha256(p) for p in Path(d).iterdir() if p.is_file()}


# ---------------------------------------------------------------------------------------------------- round trip


def test_round_trip_meta_and_rows(store):
    rows = [
        dict(backend="torch:cpu", layer=0, x=1.5, nan=math.nan, pinf=math.inf, ninf=-math.inf, none=None,
             ok=True, s="héllo ✓", big=2**62, neg=-3, zero=0.0, tricky={"$float": "nan"}, lst=[1, math.nan]),
        dict(backend="mlx:cpu", layer=1, x=-0.25, nan=0.0, pinf=1.0, ninf=2.0, none=None, ok=False, s="",
             big=1, neg=0, zero=-0.0, tricky={}, lst=[]),
    ]
    meta = dict(model="gemma3-270m", source="/models/g.gguf", source_hash="abc123", backends=["torch:cpu", "mlx:cpu"],
                device="NVIDIA H100 80GB HBM3", dtypes=["float32", "bfloat16"], versions={"torch": "2.4"},
                git_commit="deadbeef-dirty", params={"decode_steps": 4, "tol": math.inf, "taps": None},
                passed=False, machine={"hostname": "box", "cpu": "EPYC"}, reference="torch:cpu:float64",
                skipped={"hf": "no transformers"}, token_ids=[2, 105, 7])
    rid = store.save("parity", meta, rows)
    run = store.load(rid)
    assert run.run_id == rid and run.kind == "parity"
    for k, v in meta.items():
        if k == "params":
            assert run.meta[k]["decode_steps"] == 4 and run.meta[k]["tol"] == math.inf and run.meta[k]["taps"] is None
        else:
            assert run.meta[k] == v, k
    assert run.meta["created_at"].endswith("+00:00")

    df = run.rows
    assert list(df.columns) == list(rows[0])
    assert len(df) == 2
    got = df.to_dict("records")
    for want, have in zip(rows, got):
        for k, v in want.items():
            h = have[k]
            if isinstance(v, float) and math.isnan(v):
                assert isinstance(h, float) and math.isnan(h), k
            elif k == "lst":
                assert len(h) == len(v) and (not v or (h[0] == 1 and math.isnan(h[1])))
            else:
                assert h == v and type(h) is type(v) or (isinstance(v, bool) and bool(h) is v), (k, v, h)
    assert math.copysign(1, got[1]["zero"]) == -1.0
    assert df["layer"].dtype == "int64" and df["ok"].dtype == bool and df["x"].dtype == "float64"
    assert df["none"].isna().all()


def test_columns_union_order_and_empty_rows(store):
    rid = store.save("bench", {"model": "m"}, [{"b": 1, "a": 2}, {"a": 3, "c": "x"}])
    df = store.load(rid).rows
    assert list(df.columns) == ["b", "a", "c"]
    assert df["b"].isna().tolist() == [False, True]
    rid2 = store.save("bench", {"model": "m"}, [])
    r = store.load(rid2)
    assert r.rows.empty and store.list().set_index("run_id").loc[rid2, "n_rows"] == 0


def test_singular_backend_dtype_and_derived_fields(store):
    rid = store.save("bench", {"model": "m", "backend": "mlx:gpu", "dtype": "bfloat16"}, bench_rows())
    r = store.load(rid)
    assert r.meta["backends"] == ["mlx:gpu"] and r.meta["backend"] == "mlx:gpu"
    assert r.meta["dtypes"] == ["bfloat16"] and r.meta["dtype"] == "bfloat16"
    rid2 = store.save("parity", {"model": "m"}, parity_rows(3, "torch:cuda", "bfloat16"))
    r2 = store.load(rid2)
    assert r2.meta["backends"] == ["torch:cuda"] and r2.meta["dtypes"] == ["bfloat16"]
    assert r2.meta["passed"] is True  # all rows passed
    row = store.list().set_index("run_id").loc[rid2]
    assert row["backends"] == "torch:cuda" and row["dtypes"] == "bfloat16" and bool(row["passed"]) is True


def test_numpy_values_are_stored_as_python(store):
    np = pytest.importorskip("numpy")
    rid = store.save("parity", {"model": "m", "passed": np.bool_(True), "params": {"a": np.float32(0.5)}},
                     [{"v": np.float32(0.25), "n": np.int64(3), "b": np.bool_(False), "nan": np.float64("nan")}])
    r = store.load(rid)
    assert r.meta["passed"] is True and r.meta["params"] == {"a": 0.5}
    rec = r.rows.to_dict("records")[0]
    # each term on its own (was `A and B and C or b == False`, which checked only the last term)
    assert rec["v"] == 0.25 and type(rec["v"]) is float
    assert rec["n"] == 3 and type(rec["n"]) is int
    assert r.rows["b"].dtype == bool and bool(rec["b"]) is False
    assert math.isnan(rec["nan"])
    with sqlite3.connect(store.path) as c:  # stored as JSON values, not reprs of numpy objects
        data = json.loads(c.execute("SELECT data FROM run_rows WHERE run_id = ?", (rid,)).fetchone()[0])
    c.close()
    assert data["v"] == 0.25 and data["n"] == 3 and data["b"] is False and data["nan"] == {"$float": "nan"}


def test_bad_kind_and_bad_rows_rejected(store):
    with pytest.raises(ValueError, match="kind"):
        store.save("nope", {}, [])
    with pytest.raises(TypeError):
        store.save("bench", {}, [1, 2])
    assert store.list().empty


# ----------------------------------------------------------------------------------------------------------- list


def test_list_filters_ordering_limit(store):
    ids = {}
    ids["p_old"] = store.save("parity", {"model": "a", "created_at": "2024-01-01T00:00:00Z"}, parity_rows(2))
    ids["b_new"] = store.save("bench", {"model": "b", "created_at": "2024-03-01T00:00:00+00:00"}, bench_rows())
    ids["p_mid"] = store.save("parity", {"model": "b", "created_at": "2024-02-01T01:00:00+01:00"}, parity_rows(3))
    ids["p_now"] = store.save("parity", {"model": "a"}, parity_rows(1))  # created_at filled in: now

    df = store.list()
    assert list(df["run_id"]) == [ids["p_now"], ids["b_new"], ids["p_mid"], ids["p_old"]]
    for col in ("run_id", "kind", "created_at", "model", "source_hash", "backends", "device", "dtypes",
                "git_commit", "passed", "n_rows", "params"):
        assert col in df.columns
    assert str(df["created_at"].dt.tz) == "UTC"
    assert df.set_index("run_id").loc[ids["p_mid"], "created_at"] == pd.Timestamp("2024-02-01T00:00:00Z")
    assert df.set_index("run_id").loc[ids["p_mid"], "n_rows"] == 3

    assert list(store.list(kind="parity")["run_id"]) == [ids["p_now"], ids["p_mid"], ids["p_old"]]
    assert list(store.list(kind="bench")["run_id"]) == [ids["b_new"]]
    assert list(store.list(model="b")["run_id"]) == [ids["b_new"], ids["p_mid"]]
    assert list(store.list(kind="parity", model="a")["run_id"]) == [ids["p_now"], ids["p_old"]]
    assert list(store.list(limit=2)["run_id"]) == [ids["p_now"], ids["b_new"]]
    assert store.list(model="zzz").empty
    assert list(store.list(model="zzz").columns) == list(df.columns)


def test_same_timestamp_newest_insert_first(store):
    ts = "2025-05-05T05:05:05+00:00"
    a = store.save("bench", {"created_at": ts}, [])
    b = store.save("bench", {"created_at": ts}, [])
    assert list(store.list()["run_id"]) == [b, a]


def test_bad_created_at_rejected(store):
    with pytest.raises(ValueError, match="ISO-8601"):
        store.save("bench", {"created_at": "yesterday"}, [])


def test_prefix_lookup_and_delete(store):
    rid = store.save("parity", {"model": "m"}, parity_rows(2))
    assert store.load(rid[:5]).run_id == rid
    assert store.resolve(rid[:3]) == rid and rid[:4] in store
    with pytest.raises(KeyError, match="nosuchrun"):
        store.load("nosuchrun")
    with pytest.raises(KeyError):
        store.load("")
    # an ambiguous prefix: force two ids sharing one
    with sqlite3.connect(store.path) as c:
        c.execute("UPDATE runs SET run_id = 'abc111' WHERE run_id = ?", (rid,))
        c.execute("UPDATE run_rows SET run_id = 'abc111' WHERE run_id = ?", (rid,))
    rid2 = store.save("parity", {"model": "m"}, parity_rows(2))
    with sqlite3.connect(store.path) as c:
        c.execute("UPDATE runs SET run_id = 'abc222' WHERE run_id = ?", (rid2,))
        c.execute("UPDATE run_rows SET run_id = 'abc222' WHERE run_id = ?", (rid2,))
    with pytest.raises(KeyError, match="ambiguous"):
        store.load("abc")
    assert store.load("abc2").run_id == "abc222"
    assert store.delete("abc1") == "abc111"
    with pytest.raises(KeyError):
        store.load("abc111")
    assert list(store.list()["run_id"]) == ["abc222"]
    with sqlite3.connect(store.path) as c:
        assert c.execute("SELECT COUNT(*) FROM run_rows WHERE run_id = 'abc111'").fetchone()[0] == 0
    with pytest.raises(KeyError):
        store.delete("abc111")


# ---------------------------------------------------------------------------------------------------- default path


def test_default_path_from_env(tmp_path, monkeypatch):
    db = tmp_path / "nested" / "dir" / "my.sqlite"
    monkeypatch.setenv("WORKBENCH_DB", str(db))
    assert runs.default_path() == db
    st = RunStore()
    assert st.path == db and db.exists()  # parent dirs created
    rid = st.save("bench", {"model": "m"}, bench_rows())
    st.close()
    assert list(runs.list()["run_id"]) == [rid]
    assert list(runs.list(kind="parity")["run_id"]) == []
    assert runs.load(rid[:6]).run_id == rid


def test_default_path_user_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBENCH_DB", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert runs.default_path() == tmp_path / "xdg" / "gemma-workbench" / "runs.sqlite"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert runs.default_path() == tmp_path / "home" / ".local" / "share" / "gemma-workbench" / "runs.sqlite"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert runs.default_path() == (tmp_path / "home" / "Library" / "Application Support" / "gemma-workbench"
                                   / "runs.sqlite")
    assert not (tmp_path / "home").exists()  # computing the path creates nothing


# ------------------------------------------------------------------------------------------- the user's file is safe


def test_newer_schema_refused_and_untouched(tmp_path):
    db = tmp_path / "runs.sqlite"
    with RunStore(db) as st:
        st.save("parity", {"model": "m"}, parity_rows(3))
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA user_version = 2")
    c.close()
    before = files_in(tmp_path)
    with pytest.raises(RunStoreError) as e:
        RunStore(db)
    msg = str(e.value)
    assert "newer gemma-workbench" in msg and "schema 2 > 1" in msg and "not modified" in msg and str(db) in msg
    assert files_in(tmp_path) == before  # same bytes, and no -wal/-shm left behind


@pytest.mark.parametrize("damage", ["random", "truncated", "text", "header_only"])
def test_corrupt_file_refused_and_untouched(tmp_path, damage):
    db = tmp_path / "runs.sqlite"
    if damage == "random":
        db.write_bytes(os.urandom(8192))
    elif damage == "text":
        db.write_text("model,backend\ngemma,torch\n")
    else:
        good = tmp_path / "good.sqlite"
        with RunStore(good) as st:
            for _ in range(5):
                st.save("parity", {"model": "m", "params": {"pad": "x" * 2000}}, parity_rows(60))
        data = good.read_bytes()
        good.unlink()
        assert len(data) > 8 * 4096
        db.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:100])
    before = files_in(tmp_path)
    with pytest.raises(RunStoreError) as e:
        RunStore(db)
    assert str(db) in str(e.value) and "not modified" in str(e.value)
    assert files_in(tmp_path) == before


def test_foreign_sqlite_db_refused_and_untouched(tmp_path):
    db = tmp_path / "other.sqlite"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE contacts (name TEXT)")
        c.execute("INSERT INTO contacts VALUES ('ada')")
    c.close()
    before = files_in(tmp_path)
    with pytest.raises(RunStoreError, match="another application"):
        RunStore(db)
    assert files_in(tmp_path) == before


def test_directory_refused(tmp_path):
    with pytest.raises(RunStoreError, match="not a file"):
        RunStore(tmp_path)


def test_empty_file_becomes_a_store(tmp_path):
    db = tmp_path / "runs.sqlite"
    db.touch()
    with RunStore(db) as st:
        assert st.list().empty
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == runs.SCHEMA_VERSION
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    c.close()


# ------------------------------------------------------------------------------------------------------ atomicity


def test_failed_save_leaves_nothing(store):
    keep = store.save("parity", {"model": "m"}, parity_rows(2))
    rows = parity_rows(50)
    rows[25]["bad"] = object()  # can't be serialised: fails half-way through writing the rows
    with pytest.raises(TypeError, match="row 25"):
        store.save("parity", {"model": "m"}, rows)
    assert list(store.list()["run_id"]) == [keep]
    with sqlite3.connect(store.path) as c:
        assert c.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
        assert c.execute("SELECT COUNT(*) FROM run_rows").fetchone()[0] == 2
    c.close()
    # the store is still usable
    rid = store.save("parity", {"model": "m"}, parity_rows(4))
    assert len(store.load(rid).rows) == 4


def test_interrupt_mid_write_rolls_back(store, monkeypatch):
    real = runs._dumps
    calls = {"n": 0}

    def flaky(v, strict=False, where="value"):
        if where.startswith("row "):
            calls["n"] += 1
            if calls["n"] == 10:
                raise KeyboardInterrupt
        return real(v, strict, where)

    monkeypatch.setattr(runs, "_dumps", flaky)
    with pytest.raises(KeyboardInterrupt):
        store.save("bench", {"model": "m"}, [{"i": i} for i in range(30)])
    monkeypatch.setattr(runs, "_dumps", real)
    assert store.list().empty
    with sqlite3.connect(store.path) as c:
        assert c.execute("SELECT COUNT(*) FROM run_rows").fetchone()[0] == 0
    c.close()


# ---------------------------------------------------------------------------------------------------- concurrency


def _writer(db, worker, n_runs, n_rows, start):
    start.wait(30)
    st = RunStore(db)
    for j in range(n_runs):
        rows = [dict(worker=worker, run=j, idx=k, value=k * 0.5, nan=math.nan) for k in range(n_rows)]
        st.save("bench", {"model": f"w{worker}", "params": {"j": j}}, rows)
    st.close()


def test_concurrent_writers(tmp_path):
    db = str(tmp_path / "sub" / "runs.sqlite")  # not created yet: the writers race to create it too
    # fork (Linux) is fast; elsewhere spawn, which re-imports this module in each child
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(db, w, 10, 50, start)) for w in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with RunStore(db) as st:
        df = st.list()
        assert len(df) == 40 and (df["n_rows"] == 50).all() and not st.problems
        seen = set()
        for rid in df["run_id"]:
            rows = st.load(rid).rows
            assert len(rows) == 50 and list(rows["idx"]) == list(range(50))
            assert rows["worker"].nunique() == 1 and rows["nan"].isna().all()
            seen.add((int(rows["worker"][0]), int(rows["run"][0])))
        assert seen == {(w, j) for w in range(4) for j in range(10)}


# ---------------------------------------------------------------------------------------------- damaged records


@pytest.mark.parametrize("column", ["extra", "params", "versions", "backends", "columns"])
def test_damaged_meta_json_skipped_and_reported(store, column):
    good1 = store.save("parity", {"model": "m", "foo": 1, "params": {"a": 1}, "versions": {}}, parity_rows(2))
    bad = store.save("parity", {"model": "m", "foo": 2, "params": {"a": 2}, "versions": {}}, parity_rows(2))
    good2 = store.save("parity", {"model": "m", "foo": 3}, parity_rows(2))
    with sqlite3.connect(store.path) as c:
        c.execute(f"UPDATE runs SET {column} = '{{not json' WHERE run_id = ?", (bad,))
    c.close()
    with pytest.warns(runs.RunStoreWarning, match=bad):
        df = store.list()
    assert list(df["run_id"]) == [good2, good1]
    assert len(store.problems) == 1 and bad in store.problems[0] and column in store.problems[0]
    with pytest.raises(RunStoreError, match=bad):
        store.load(bad)
    assert store.load(good1).meta["foo"] == 1


def test_damaged_or_missing_rows_reported(store):
    a = store.save("parity", {"model": "m"}, parity_rows(5))
    b = store.save("parity", {"model": "m"}, parity_rows(5))
    with sqlite3.connect(store.path) as c:
        c.execute("UPDATE run_rows SET data = 'garbage' WHERE run_id = ? AND idx = 3", (a,))
        c.execute("DELETE FROM run_rows WHERE run_id = ? AND idx = 4", (b,))
    c.close()
    with pytest.raises(RunStoreError, match=f"{a}.*row 3"):
        store.load(a)
    with pytest.raises(RunStoreError, match=f"{b}.*4 rows stored, 5 expected"):
        store.load(b)
    with pytest.warns(runs.RunStoreWarning):
        df = store.list()
    assert list(df["run_id"]) == [a]  # row contents aren't parsed by list(); the missing row is noticed
    assert len(store.problems) == 1 and b in store.problems[0]


# --------------------------------------------------------------------------------------------------- benchmarks


def test_compare_bench_flags_20_percent_not_2(store):
    base = store.save("bench", {"model": "m"}, bench_rows(decode=50.0, prefill=1000.0, mlx_decode=40.0))
    new = store.save("bench", {"model": "m"}, bench_rows(decode=40.0, prefill=980.0, mlx_decode=39.2))
    cmp = store.compare_bench(new, base)
    assert list(cmp.columns[:4]) == ["backend", "dtype", "prompt_len", "gen_len"]
    for c in ("decode_tok_s_ratio", "prefill_tok_s_ratio", "ttft_s_ratio", "decode_tok_s_base", "regression"):
        assert c in cmp.columns
    by = cmp.set_index("backend")
    assert bool(by.loc["torch:cpu", "regression"]) is True  # decode 20 % slower
    assert by.loc["torch:cpu", "regressed"] == "decode_tok_s"
    assert by.loc["torch:cpu", "decode_tok_s_ratio"] == pytest.approx(0.8)
    assert bool(by.loc["mlx:cpu", "regression"]) is False  # 2 % slower: within threshold
    assert by.loc["mlx:cpu", "decode_tok_s_ratio"] == pytest.approx(0.98)
    assert (cmp["status"] == "both").all()
    # a prefill slowdown counts too; the threshold is adjustable
    slow_prefill = store.save("bench", {"model": "m"}, bench_rows(decode=50.0, prefill=700.0))
    assert store.compare_bench(slow_prefill, base).set_index("backend").loc["torch:cpu", "regressed"] == "prefill_tok_s"
    assert not store.compare_bench(new, base, threshold=0.25)["regression"].any()
    # faster is never a regression
    assert not store.compare_bench(base, new)["regression"].any()
    # module-level convenience
    assert runs.compare_bench(new[:6], base[:6], db=store.path)["regression"].sum() == 1


def test_compare_bench_generic_keys_and_unmatched_rows(store):
    base = store.save("bench", {}, [dict(backend="torch:cpu", dtype="float32", decode_tok_s=10.0),
                                    dict(backend="torch:cpu", dtype="bfloat16", decode_tok_s=10.0)])
    new = store.save("bench", {}, [dict(backend="torch:cpu", dtype="float32", decode_tok_s=5.0, extra_metric=1.0),
                                   dict(backend="mlx:cpu", dtype="float32", decode_tok_s=5.0)])
    cmp = store.compare_bench(new, base)
    assert "prompt_len" not in cmp.columns and "extra_metric" not in cmp.columns
    status = dict(zip(zip(cmp["backend"], cmp["dtype"]), cmp["status"]))
    assert status == {("torch:cpu", "float32"): "both", ("mlx:cpu", "float32"): "new",
                      ("torch:cpu", "bfloat16"): "missing"}
    assert cmp["regression"].tolist() == [s == "both" for s in cmp["status"]]
    parity = store.save("parity", {}, parity_rows(1))
    with pytest.raises(ValueError, match="not a bench run"):
        store.compare_bench(parity, base)


# ---------------------------------------------------------------------------------------------------- provenance


def test_provenance_helpers(tmp_path):
    v = runs.collect_versions()
    assert v["python"].count(".") == 2 and "numpy" in v
    assert "torch" not in v or isinstance(v["torch"], str)
    m = runs.machine_info()
    assert {"hostname", "platform", "cpu"} <= set(m)
    json.dumps(m)
    assert runs.git_commit(tmp_path) is None  # not a repository
    assert runs.git_commit(tmp_path / "missing" / "dir") is None  # never raises


def test_git_commit_in_a_repo(tmp_path):
    import shutil
    import subprocess
    if not shutil.which("git"):
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_SYSTEM=os.devnull)

    def git(*a):
        subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True, env=env)

    git("init", "-q")
    (repo / "f.txt").write_text("1")
    git("add", "f.txt")
    git("commit", "-q", "-m", "x")
    sha = runs.git_commit(repo)
    assert sha and len(sha) == 40 and not sha.endswith("-dirty")
    (repo / "f.txt").write_text("2")
    assert runs.git_commit(repo) == sha + "-dirty"
