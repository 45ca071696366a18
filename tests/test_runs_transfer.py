"""Merging results stores of several machines: RunStore.export_runs / import_runs (issue 16 item 3)."""
from __future__ import annotations

import gzip
import json
import math
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from workbench import runs
from workbench.runs import RunStore, RunStoreError


def parity_rows(n, backend, dtype="float32", seed=0.0):
    return [dict(backend=backend, dtype=dtype, phase="prefill", tap="hook_resid_post", layer=i,
                 rel_max=1e-7 * (i + 1) + seed, nan=math.nan, inf=-math.inf, neg_zero=-0.0, s="héllo ✓",
                 passed=True) for i in range(n)]


def raw_run(db, run_id):
    """The run's record (without the store-local seq) and row texts, read with plain sqlite3."""
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    c.row_factory = sqlite3.Row
    rec = dict(c.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone())
    rec.pop("seq")
    rows = [r["data"] for r in c.execute("SELECT data FROM run_rows WHERE run_id = ? ORDER BY idx", (run_id,))]
    c.close()
    return rec, rows


def counts(db):
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    out = (c.execute("SELECT COUNT(*) FROM runs").fetchone()[0],
           c.execute("SELECT COUNT(*) FROM run_rows").fetchone()[0],
           c.execute("SELECT COUNT(DISTINCT run_id) FROM runs").fetchone()[0])
    c.close()
    return out


@pytest.fixture
def two_machines(tmp_path, monkeypatch):
    """A Mac's store (mlx runs) and a CUDA server's (torch runs), each exported on its own host."""
    out = {}
    for host, backend in (("mac-studio", "mlx:gpu"), ("h200-box", "torch:cuda")):
        monkeypatch.setattr(runs, "_hostname", lambda host=host: host)
        db = tmp_path / host / "runs.sqlite"
        with RunStore(db) as st:
            ids = [st.save("parity", {"model": "gemma3-270m", "machine": {"hostname": host}, "params": {"i": i}},
                           parity_rows(6, backend, seed=i * 1e-3)) for i in range(3)]
            ids.append(st.save("bench", {"model": "gemma3-270m"},
                               [dict(backend=backend, dtype="bfloat16", decode_tok_s=100.0 + len(host))]))
            summary = st.export_runs(tmp_path / f"{host}.jsonl.gz" if host == "mac-studio"
                                     else tmp_path / f"{host}.jsonl")
        out[host] = dict(db=db, ids=ids, file=Path(summary["path"]), summary=summary)
    monkeypatch.setattr(runs, "_hostname", lambda: "laptop")
    return out


def test_merge_two_stores_keeps_every_run_once(tmp_path, two_machines):
    mac, srv = two_machines["mac-studio"], two_machines["h200-box"]
    assert mac["summary"]["n_runs"] == 4 and srv["summary"]["n_runs"] == 4
    merged = tmp_path / "merged.sqlite"
    with RunStore(merged) as st:
        a = st.import_runs(mac["file"])
        b = st.import_runs(srv["file"])
        assert sorted(a["added"]) == sorted(mac["ids"]) and a["present"] == []
        assert sorted(b["added"]) == sorted(srv["ids"]) and b["present"] == []
        again = st.import_runs(mac["file"])  # the same file twice: nothing new
        assert again["added"] == [] and sorted(again["present"]) == sorted(mac["ids"])
        df = st.list()
    assert counts(merged) == (8, 3 * 6 * 2 + 2, 8)
    assert sorted(df["run_id"]) == sorted(mac["ids"] + srv["ids"])
    # identical content, byte for byte, to the store each run was made in
    for m in (mac, srv):
        for rid in m["ids"]:
            assert raw_run(merged, rid) == raw_run(m["db"], rid)
    # provenance, shown by list() and kept on the run
    by = df.set_index("run_id")
    for host, m in two_machines.items():
        for rid in m["ids"]:
            assert by.loc[rid, "origin"] == host
            assert by.loc[rid, "imported_from"] == str(m["file"].resolve())
            assert str(by.loc[rid, "imported_at"].tz) == "UTC"
    with RunStore(merged) as st:
        run = st.load(mac["ids"][0])
        p = run.provenance
        assert p["origin_host"] == "mac-studio" and p["origin_store"] == str(mac["db"].resolve())
        assert p["imported_on"] == "laptop" and p["source_file"] == str(mac["file"].resolve())
        assert p["source_sha256"] == mac["summary"]["sha256"]
        # the values themselves survive (NaN, -inf, -0.0, unicode)
        r0 = run.rows.to_dict("records")[0]
        assert math.isnan(r0["nan"]) and r0["inf"] == -math.inf and math.copysign(1, r0["neg_zero"]) == -1
        assert r0["s"] == "héllo ✓" and run.meta["machine"] == {"hostname": "mac-studio"}
        assert st.load(srv["ids"][-1]).rows["decode_tok_s"].tolist() == [108.0]


def test_import_into_a_store_with_its_own_runs_and_chains(tmp_path, two_machines, monkeypatch):
    """Import straight into the server's store (which has runs of its own), then re-export the union from
    there and merge it on a third machine: every run once, the origin stays the machine that made it."""
    mac, srv = two_machines["mac-studio"], two_machines["h200-box"]
    with RunStore(srv["db"]) as st:
        r = st.import_runs(mac["file"])
        assert sorted(r["added"]) == sorted(mac["ids"])
        assert pd.isna(st.list().set_index("run_id").loc[srv["ids"][0], "origin"])  # made here: no import record
        monkeypatch.setattr(runs, "_hostname", lambda: "h200-box")
        union = st.export_runs(tmp_path / "union.jsonl")
    assert union["n_runs"] == 8
    monkeypatch.setattr(runs, "_hostname", lambda: "third")
    third = tmp_path / "third.sqlite"
    with RunStore(third) as st:
        st.import_runs(mac["file"])  # overlaps the union
        r = st.import_runs(union["path"])
        assert sorted(r["present"]) == sorted(mac["ids"]) and sorted(r["added"]) == sorted(srv["ids"])
        df = st.list().set_index("run_id")
        assert len(df) == 8
        for rid in mac["ids"]:
            assert df.loc[rid, "origin"] == "mac-studio"
        for rid in srv["ids"]:
            assert df.loc[rid, "origin"] == "h200-box"
        assert st.load(srv["ids"][0]).provenance["via"] == []
    # the union's copy of a Mac run records the hop through the server's store
    lines = [json.loads(x) for x in Path(union["path"]).read_text().splitlines()]
    hop = next(x for x in lines[1:-1] if x["run"]["run_id"] == mac["ids"][0])["provenance"]
    assert hop["origin_host"] == "mac-studio" and hop["via"][0]["store"] == str(srv["db"].resolve())
    assert counts(third)[0] == counts(third)[2] == 8


def test_export_subset_by_id_and_prefix(tmp_path, two_machines):
    mac = two_machines["mac-studio"]
    with RunStore(mac["db"]) as st:
        s = st.export_runs(tmp_path / "sub.jsonl", ids=[mac["ids"][0], mac["ids"][1][:6], mac["ids"][0]])
        assert s["n_runs"] == 2
        with pytest.raises(KeyError, match="nosuch"):
            st.export_runs(tmp_path / "bad.jsonl", ids=["nosuch"])
    assert not (tmp_path / "bad.jsonl").exists() and not list(tmp_path.glob(".bad.jsonl*"))
    with RunStore(tmp_path / "x.sqlite") as st:
        assert sorted(st.import_runs(s["path"])["added"]) == sorted(mac["ids"][:2])


def rewrite(src: Path, dst: Path, edit) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()
    lines = edit(lines)
    dst.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return dst


def _tamper_value(lines):
    obj = json.loads(lines[2])
    obj["rows"][0]["rel_max"] = 0.5  # a changed number
    lines[2] = json.dumps(obj, ensure_ascii=False)
    return lines


def _tamper_meta(lines):
    obj = json.loads(lines[1])
    obj["run"]["passed"] = 0
    lines[1] = json.dumps(obj)
    return lines


def _dup(lines):
    return lines[:2] + [lines[1]] + lines[2:]


def _newer(lines):
    h = json.loads(lines[0])
    h["version"] = 99
    return [json.dumps(h)] + lines[1:]


@pytest.mark.parametrize("edit,match", [
    (_tamper_value, "does not match its SHA-256"),
    (_tamper_meta, "does not match its SHA-256"),
    (lambda ls: ls[:-1], "no end marker"),                 # truncated after a run
    (lambda ls: ls[:2] + ls[3:], "end marker says 4 runs"),  # a run dropped
    (lambda ls: ls[:2] + ["{not json"] + ls[2:], "not valid JSON"),
    (_dup, "appears twice"),
    (_newer, "newer gemma-workbench .export version 99"),
    (lambda ls: ['{"format": "something-else", "version": 1}'] + ls[1:], "not a gemma-workbench runs export"),
], ids=["row-value", "meta", "truncated", "run-dropped", "bad-json", "duplicate", "newer", "foreign"])
def test_import_verifies_before_writing(tmp_path, two_machines, edit, match):
    srv = two_machines["h200-box"]
    bad = rewrite(srv["file"], tmp_path / "bad.jsonl", edit)
    target = tmp_path / "t.sqlite"
    with RunStore(target) as st:
        keep = st.save("bench", {"model": "local"}, [{"decode_tok_s": 1.0}])
        with pytest.raises(RunStoreError, match=match) as e:
            st.import_runs(bad)
        assert str(bad) in str(e.value)
        assert list(st.list()["run_id"]) == [keep], "nothing was imported"


def test_gzip_truncated_refused(tmp_path, two_machines):
    mac = two_machines["mac-studio"]
    data = gzip.decompress(mac["file"].read_bytes())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(data[: len(data) * 2 // 3]))
    with RunStore(tmp_path / "t.sqlite") as st:
        with pytest.raises(RunStoreError, match="cut.jsonl.gz"):
            st.import_runs(cut)
        assert st.list().empty


def test_same_id_different_content_refused(tmp_path, two_machines):
    srv = two_machines["h200-box"]
    target = tmp_path / "t.sqlite"
    with RunStore(target) as st:
        st.import_runs(srv["file"])
    c = sqlite3.connect(target)
    c.execute("UPDATE runs SET model = 'edited' WHERE run_id = ?", (srv["ids"][1],))
    c.commit()
    c.close()
    before = counts(target)
    with RunStore(target) as st:
        with pytest.raises(RunStoreError, match=f"different content: {srv['ids'][1]}"):
            st.import_runs(srv["file"])
    assert counts(target) == before


def test_import_into_store_made_before_provenance_existed(tmp_path, two_machines):
    """Stores made before run_imports existed get the table on their first import."""
    db = tmp_path / "old.sqlite"
    with RunStore(db) as st:
        old = st.save("bench", {}, [{"decode_tok_s": 1.0}])
    c = sqlite3.connect(db)
    c.execute("DROP TABLE run_imports")
    c.commit()
    c.close()
    with RunStore(db) as st:
        assert st.list()["origin"].isna().all()
        st.import_runs(two_machines["mac-studio"]["file"])
        df = st.list().set_index("run_id")
        assert len(df) == 5 and pd.isna(df.loc[old, "origin"])
        st.delete(two_machines["mac-studio"]["ids"][0])
        assert len(st.list()) == 4


def test_export_from_read_only_store_and_refusals(tmp_path, two_machines):
    mac = two_machines["mac-studio"]
    s = runs.export_runs(tmp_path / "ro.jsonl", db=mac["db"])  # opens the store read-only
    assert s["n_runs"] == 4
    with RunStore(mac["db"], readonly=True) as st:
        with pytest.raises(RunStoreError, match="read-only"):
            st.import_runs(s["path"])
        with pytest.raises(RunStoreError, match="the results store itself"):
            st.export_runs(mac["db"])
    with RunStore(mac["db"]) as st:
        with pytest.raises(RunStoreError, match="this results store itself"):
            st.import_runs(mac["db"])
        with pytest.raises(RunStoreError, match="no such export file"):
            st.import_runs(tmp_path / "missing.jsonl")
        with pytest.raises(RunStoreError, match="not a gemma-workbench runs export"):
            st.import_runs(_write(tmp_path / "junk.jsonl", "hello\n"))


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p
