#!/usr/bin/env python3
"""wb.diverge on the card: the real Gemma 3 270M on torch:cuda and mlx:gpu (whichever exist) x bfloat16 / float16
(float32 too with --float32) against torch:cpu float64, 64 greedy tokens, on the fast route (the model's generate,
route recorded) and the plain per-token loop (--route both, the default here).

    .venv/bin/python tests/tools/gpu/diverge.py [--steps 64] [--route both] [--db out/diverge-gpu.sqlite] [--out diverge_gpu.md]

Prints (and writes to --out) per target: route, tokens generated, first differing token (step, both tokens, the
reference's margin, verdict), KL mean / max, top-1 agreement, route mismatches (fast tokens the teacher-forced plain
loop would not pick), the local-overflow / suspect layers, and the largest local and inherited errors. Exit 2 when no
GPU backend is available. The run is stored in --db (kind "diverge") for the dashboard's divergence page.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--route", default="both", choices=["fast", "plain", "both"])
    ap.add_argument("--float32", action="store_true", help="also float32")
    ap.add_argument("--backends", default=None, help="comma list (default: torch:cuda, mlx:gpu where available)")
    ap.add_argument("--db", default=str(ROOT / "out" / "diverge-gpu.sqlite"))
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--prompt-ids", default=None, help="token ids (checkpoints without a tokenizer)")
    args = ap.parse_args(argv)

    import numpy as np

    import workbench as wb
    from workbench.backends import base
    av = list(base.available())
    backends = args.backends.split(",") if args.backends else [b for b in ("torch:cuda", "mlx:gpu") if b in av]
    if not backends:
        print(f"no GPU backend here (available: {av})", file=sys.stderr)
        return 2
    dtypes = (["float32"] if args.float32 else []) + ["bfloat16", "float16"]
    pathlib.Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prompt = [int(x) for x in args.prompt_ids.split(",")] if args.prompt_ids else None
    div = wb.diverge(args.model, backends=backends, dtypes=dtypes, prompt=prompt, steps=args.steps, route=args.route,
                     db=args.db, progress=True)
    lines = [f"# wb.diverge on {platform.node()} ({', '.join(sorted(set(div.meta.get('devices', {}).values())))}),"
             f" {args.model}, {args.steps} steps, run {div.run_id}, {time.perf_counter() - t0:.0f} s", "",
             div.summary(), "",
             "| target | route | generated | first diff (step) | target / ref token | ref margin | verdict | KL mean | "
             "KL max | top-1 | route mismatches | overflow layers | max local (layer) | max inherited |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if math.isfinite(float(v)) else str(v))  # noqa: E731
    for t in div.targets:
        info = div.meta["target_info"][t]
        rs = div.target_steps(t)
        kl = np.array([np.nan if r.get("kl") is None else float(r["kl"]) for r in rs])
        d = div.divergences()[t]
        loc = [r for r in div.local if r["target"] == t]
        fin = [r for r in loc if math.isfinite(float(r["local"]))]
        ml = max(fin, key=lambda r: r["local"]) if fin else None
        mi = max(float(r["inherited"]) for r in loc) if loc else None
        lines.append("| " + " | ".join([
            t, str(info.get("route")), str(info.get("generated")), "-" if d is None else str(d["step"]),
            "-" if d is None else f"{d['token_text']!r} / {d['ref_token_text']!r}",
            "-" if d is None else fmt(d["ref_margin"]), "none" if d is None else d["verdict"],
            fmt(np.nanmean(kl)) if np.isfinite(kl).any() else "nan",
            fmt(np.nanmax(kl)) if np.isfinite(kl).any() else "nan",
            f"{np.mean([bool(r['agree']) for r in rs]):.2f}" if rs else "-",
            str(info.get("route_mismatch") or "none"),
            str([r["layer"] for r in loc if r.get("overflow")] or "none"),
            "-" if ml is None else f"{fmt(ml['local'])} ({ml['layer']})", fmt(mi)]) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
