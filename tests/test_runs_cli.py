"""``workbench runs list/show/load/export/import`` (workbench/runs_cli.py), run through the real parser."""
from __future__ import annotations

import json
import math


from test_runs_safety import make_store, read_only
from workbench import cli, runs
from workbench.runs import RunStore


def wb(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_runs_list_show_export_import(tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "mac.sqlite", tmp_path / "srv.sqlite"
    monkeypatch.setattr(runs, "_hostname", lambda: "mac-studio")
    with RunStore(a) as st:
        pa = st.save("parity", {"model": "gemma3-270m"}, [dict(backend="mlx:gpu", dtype="float32", layer=0,
                                                               rel_max=1e-7, nan=math.nan, passed=True)])
        ba = st.save("bench", {"model": "gemma3-270m"}, [dict(backend="mlx:gpu", dtype="bfloat16",
                                                              decode_tok_s=300.0)])
    with RunStore(b) as st:
        pb = st.save("parity", {"model": "gemma3-270m"}, [dict(backend="torch:cuda", dtype="float32", layer=0,
                                                               rel_max=2e-7, passed=False)])
    code, out, _ = wb(capsys, "runs", "export", str(tmp_path / "mac.jsonl.gz"), "--db", str(a))
    assert code == 0 and "exported 2 run(s)" in out
    code, out, _ = wb(capsys, "runs", "export", str(tmp_path / "one.jsonl"), "--ids", pa[:6], "--db", str(a))
    assert code == 0 and "exported 1 run(s)" in out
    monkeypatch.setattr(runs, "_hostname", lambda: "h200-box")
    code, out, _ = wb(capsys, "runs", "import", str(tmp_path / "mac.jsonl.gz"), str(tmp_path / "one.jsonl"),
                      "--db", str(b))
    assert code == 0
    assert "mac.jsonl.gz: 2 run(s): 2 added, 0 already" in out and "one.jsonl: 1 run(s): 0 added, 1 already" in out
    code, out, _ = wb(capsys, "runs", "list", "--db", str(b))
    assert code == 0 and "3 run(s) in" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines()[2:]}
    assert set(lines) == {pa, ba, pb}
    assert "mac-studio" in lines[pa] and "mac.jsonl.gz" in lines[pa] and "PASSED" in lines[pa]
    assert " here" in lines[pb] and "FAILED" in lines[pb] and "mac-studio" not in lines[pb]
    code, out, _ = wb(capsys, "runs", "list", "--kind", "bench", "--json", "--db", str(b))
    recs = json.loads(out)
    assert [r["run_id"] for r in recs] == [ba] and recs[0]["origin"] == "mac-studio"
    assert recs[0]["imported_from"].endswith("mac.jsonl.gz")
    code, out, _ = wb(capsys, "runs", "show", pa[:5], "--db", str(b))
    assert code == 0 and f"run {pa} (parity)" in out and "made on mac-studio" in out and "rel_max" in out
    code, out, _ = wb(capsys, "runs", "load", pb, "--json", "--db", str(b))
    d = json.loads(out)
    assert d["run_id"] == pb and d["provenance"] is None and d["rows"][0]["rel_max"] == 2e-7
    code, out, _ = wb(capsys, "runs", "load", pa, "--json", "--db", str(b))
    assert json.loads(out)["rows"][0]["nan"] == {"$float": "nan"}  # strict JSON, the store's NaN marker
    # errors: one line, exit 2
    code, _, err = wb(capsys, "runs", "show", "nosuch", "--db", str(b))
    assert code == 2 and "no run 'nosuch'" in err and "Traceback" not in err
    code, _, err = wb(capsys, "runs", "list", "--db", str(tmp_path / "missing.sqlite"))
    assert code == 2 and "no results store there" in err
    assert not (tmp_path / "missing.sqlite").exists()


def test_runs_list_and_load_on_read_only_store(tmp_path, capsys):
    d = tmp_path / "shared"
    d.mkdir()
    db = d / "runs.sqlite"
    ids = make_store(db)
    with read_only(d, db):
        code, out, _ = wb(capsys, "runs", "list", "--db", str(db))
        assert code == 0 and "2 run(s)" in out and ids["p"] in out
        code, out, _ = wb(capsys, "runs", "load", ids["b"], "--db", str(db))
        assert code == 0 and "decode_tok_s" in out
        code, out, _ = wb(capsys, "runs", "export", str(tmp_path / "out.jsonl"), "--db", str(db))
        assert code == 0 and "exported 2 run(s)" in out
        code, _, err = wb(capsys, "runs", "import", str(tmp_path / "out.jsonl"), "--db", str(db))
        assert code == 2 and "read-only" in err and "Traceback" not in err
