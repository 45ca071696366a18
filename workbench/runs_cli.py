"""``workbench runs``: list, show, export and import the runs of a results store (workbench/runs.py).

    workbench runs list [--kind parity|bench|diverge] [--model M] [--limit N] [--json]
    workbench runs show ID [--rows N] [--json]          (also: ``runs load ID``)
    workbench runs export FILE [--ids ID ...]           (FILE.jsonl, or FILE.jsonl.gz compressed)
    workbench runs import FILE [FILE ...]

``list``, ``show`` and ``export`` open the store read-only (they work on a store you can't write, and never
change it); ``import`` merges another machine's export: every run once, with its provenance, which ``list``
shows in its ``origin`` / ``imported`` columns.
"""
from __future__ import annotations

import argparse
import json
import sys

DB_HELP = "results database (default $WORKBENCH_DB or the user data dir)"


def _store(args, readonly: bool):
    from .runs import RunStore
    return RunStore(args.db, readonly=readonly)


def _cell(v) -> str:
    import pandas as pd
    if v is None or (not isinstance(v, (list, dict, str)) and pd.isna(v)):
        return ""
    if isinstance(v, pd.Timestamp):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return str(v)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_list(args) -> int:
    import warnings

    import pandas as pd
    with _store(args, readonly=True) as st:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # printed below instead
            df = st.list(kind=args.kind, model=args.model, limit=args.limit)
        problems = list(st.problems)
        path, ro = st.path, st.read_only
    if args.json:
        out = df.copy()
        for c in ("created_at", "imported_at"):
            out[c] = [None if pd.isna(v) else v.isoformat() for v in out[c]]
        print(out.to_json(orient="records", force_ascii=False))
    else:
        rows = []
        for _, r in df.iterrows():
            verdict = "" if pd.isna(r["passed"]) else ("PASSED" if r["passed"] else "FAILED")
            imported = ""
            if _cell(r["imported_at"]):
                imported = f"{_cell(r['imported_at'])} from {_cell(r['imported_from'])}"
            rows.append([r["run_id"], _cell(r["created_at"]), r["kind"], _cell(r["model"]), verdict,
                         _cell(r["backends"]), _cell(r["dtypes"]), str(r["n_rows"]), _cell(r["machine"]),
                         _cell(r["origin"]) or "here", imported])
        print(f"{len(df)} run(s) in {path}" + (" (read-only)" if ro and "readonly=True" not in ro else ""))
        if rows:
            print(_table(rows, ["run_id", "created (UTC)", "kind", "model", "verdict", "backends", "dtypes", "rows",
                                "machine", "origin", "imported"]))
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    return 0


def cmd_show(args) -> int:
    with _store(args, readonly=True) as st:
        run = st.load(args.run_id)
    if args.json:
        from .runs import _dumps  # the store's own JSON: NaN/inf as {"$float": "nan"}, numpy as Python
        print(_dumps(dict(run_id=run.run_id, kind=run.kind, meta=run.meta, provenance=run.provenance,
                          rows=run.rows.to_dict("records"))))
        return 0
    print(f"run {run.run_id} ({run.kind}), created {run.created_at}")
    for k, v in run.meta.items():
        if v is not None and k != "created_at":
            print(f"  {k}: {json.dumps(v, default=str, ensure_ascii=False) if not isinstance(v, str) else v}")
    if run.provenance:
        p = run.provenance
        print(f"  imported {p.get('imported_at')} on {p.get('imported_on')} from {p.get('source_file')} "
              f"(sha256 {str(p.get('source_sha256'))[:12]}); made on {p.get('origin_host')} in "
              f"{p.get('origin_store')}" + (f", via {len(p['via'])} other store(s)" if p.get("via") else ""))
    else:
        print("  made in this store (not imported)")
    n = len(run.rows)
    shown = run.rows if args.rows is None else run.rows.head(args.rows)
    print(f"{n} row(s)" + (f", first {len(shown)}:" if len(shown) < n else ":"))
    if n:
        import pandas as pd
        with pd.option_context("display.max_columns", None, "display.width", 200):
            print(shown.to_string(index=False))
    return 0


def cmd_export(args) -> int:
    with _store(args, readonly=True) as st:
        s = st.export_runs(args.file, ids=args.ids)
    print(f"exported {s['n_runs']} run(s) from {st.path} to {s['path']} (sha256 {s['sha256'][:16]})")
    return 0


def cmd_import(args) -> int:
    with _store(args, readonly=False) as st:
        for f in args.files:
            r = st.import_runs(f)
            print(f"{r['file']}: {r['n_runs']} run(s): {len(r['added'])} added, {len(r['present'])} already in "
                  f"{st.path}")
    return 0


def add_cli(sub):
    """``workbench runs ...`` (cli.SUBCOMMANDS)."""
    p = sub.add_parser("runs", help="list, show, export and import the runs of the results store",
                       description=__doc__.split("\n\n")[0])
    rs = p.add_subparsers(dest="runs_cmd", required=True)

    ls = rs.add_parser("list", help="one line per run, newest first (with provenance of imported runs)")
    ls.add_argument("--kind", default=None, choices=["parity", "bench", "diverge"])
    ls.add_argument("--model", default=None, help="model name or source path")
    ls.add_argument("--limit", type=int, default=None)
    ls.add_argument("--json", action="store_true", help="JSON records instead of a table")
    ls.add_argument("--db", default=None, help=DB_HELP)
    ls.set_defaults(fn=cmd_list)

    for name in ("show", "load"):
        sh = rs.add_parser(name, help="a run's metadata, provenance and rows" + (" (= show)" if name == "load"
                                                                                 else ""))
        sh.add_argument("run_id", help="run id or a unique prefix")
        sh.add_argument("--rows", type=int, default=50, help="rows to print (default %(default)s)")
        sh.add_argument("--json", action="store_true", help="the whole run as JSON")
        sh.add_argument("--db", default=None, help=DB_HELP)
        sh.set_defaults(fn=cmd_show)

    ex = rs.add_parser("export", help="write runs to a portable, verified file for another machine")
    ex.add_argument("file", help="FILE.jsonl (or .jsonl.gz)")
    ex.add_argument("--ids", nargs="+", default=None, metavar="ID", help="only these runs (ids or unique prefixes)")
    ex.add_argument("--db", default=None, help=DB_HELP)
    ex.set_defaults(fn=cmd_export)

    im = rs.add_parser("import", help="merge exports of other machines into this store (no duplicates)")
    im.add_argument("files", nargs="+", metavar="FILE")
    im.add_argument("--db", default=None, help=DB_HELP)
    im.set_defaults(fn=cmd_import)
    return p


if __name__ == "__main__":  # python -m workbench.runs_cli ...
    ap = argparse.ArgumentParser(prog="workbench")
    add_cli(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args(["runs", *sys.argv[1:]])
    sys.exit(a.fn(a))
