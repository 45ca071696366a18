#!/usr/bin/env python3
"""A parity run's own cost on the card (issue 19, item 5): the targets' forwards against everything else.

    python3 tests/tools/gpu/paritycost_bench.py [--tokens 600] [--backends B,..] [--dtypes D,..] [--out DIR]

* A random checkpoint of the Gemma 3 270M config (decode_bench's ``make``: ``workbench make-random gemma3-270m``).
* A device self-check first: ``workbench.parity_metrics.tap_metrics`` on CUDA tensors (float64 there) against the
  numpy definitions ``parity.metrics`` / ``parity._topk_agree`` on the same arrays (NaN, inf, ties included), and
  the runs of same-size taps against the one-tap route (``batch=False``).
* ``wb.compare`` of a --tokens-token prompt (random ids), 4 decode steps, 4 targets (default torch:cuda and
  torch:cuda:0 — the one card named twice — x bfloat16 / float32), anchor and same-dtype budgets off (they are
  HF runs on the CPU, not the parity machinery; --anchor turns the anchor on), store=False. Printed from the
  run's own meta["cost"]: per target the build, its own forward (prefill + the decode route's prefill and steps,
  device synchronised) and the parity overhead (reference upload, statistics on the device, the scalars'
  transfer, the rows), the ratio overhead / forward, the reference's and the whole run's wall time. Run twice
  when the budget allows (cold: first CUDA kernels; warm: the same again).
* Statistics per phase on one target (torch:cuda bfloat16), where time is left: ``tap_metrics`` the one-tap way
  (``batch=False``: the route before the runs of same-size taps) against the runs, first call (reference upload)
  and warm, prefill and decode, with and without the logits.
* The old host route for comparison, on the bfloat16 CUDA target's prefill taps only, where time is left:
  ``m.forward``'s numpy taps (device -> host per tap) and ``parity.metrics`` per tap, ``_topk_agree`` on the
  logits (numpy argsort over the vocabulary).

A hard budget (--budget, default 130 s, SIGALRM) stops it; what was measured is written as it goes:
DIR/paritycost.md and DIR/paritycost.json (default $OUT or ./out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import signal
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import decode_bench as db  # noqa: E402  (say, card, make; puts the checkout on sys.path)

say = db.say
T0 = time.perf_counter()
RESULT: dict = {}


class OutOfTime(Exception):
    pass


def _alarm(signum, frame):
    raise OutOfTime("the script's time budget ran out")


def left(budget: float) -> float:
    return budget - (time.perf_counter() - T0)


def dump(out: pathlib.Path) -> None:
    RESULT["elapsed_s"] = round(time.perf_counter() - T0, 1)
    (out / "paritycost.json").write_text(json.dumps(RESULT, indent=1, default=str) + "\n")


def self_check(device: str = "cuda") -> dict:
    """tap_metrics on ``device`` tensors == the numpy definitions (float64 on the device)."""
    import numpy as np
    import torch

    from workbench import parity as P
    from workbench import parity_metrics as M
    rng = np.random.default_rng(0)
    ref = {"a": rng.standard_normal((1, 64, 640)) * 3, "logits": np.round(rng.standard_normal((1, 16, 4096)) * 8)
           + rng.standard_normal((1, 16, 4096)) * 1e-3}
    for k in "bcd":                                       # a run of four same-size taps (the batched route)
        ref[k] = rng.standard_normal((1, 64, 640)) * 2
    ref["e"] = rng.standard_normal((1, 5, 32))            # a second size
    x = {k: (v + 1e-3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in ref.items()}
    x["a"][0, 3, 4] = np.nan
    x["a"][0, 5, 6] = np.inf
    x["c"][0, 9, :] = np.nan                              # a NaN row beside clean taps
    x["logits"] = np.round(x["logits"] * 2) / 2          # ties everywhere
    xs = {k: torch.from_numpy(v).to(device) for k, v in x.items()}
    for k in "fg":                                        # a bfloat16 run: its stack cast to float64 in one copy
        ref[k] = rng.standard_normal((1, 64, 640))
        xs[k] = torch.from_numpy(ref[k] + 1e-2 * rng.standard_normal(ref[k].shape)).to(device, torch.bfloat16)
        x[k] = xs[k].double().cpu().numpy()
    xs["g"][0, 1, 2] = float("inf")
    x["g"][0, 1, 2] = np.inf
    got = M.tap_metrics(ref, xs)
    one = M.tap_metrics(ref, xs, batch=False)            # every tap on its own: the same numbers
    worst = {}
    for k in ref:
        for key, g1 in one[k].items():
            g = got[k][key]
            worst[f"{k}.{key} (runs vs one-tap)"] = 0.0 if g == g1 else abs(g - g1) / max(abs(g1), 1e-300)
        w = P.metrics(ref[k], x[k])
        if k == "logits":
            w["top1"], w["top5_overlap"] = P._topk_agree(ref[k], x[k])
        for key, wv in w.items():
            g = got[k][key]
            if isinstance(wv, float) and math.isinf(wv):
                dev = 0.0 if g == wv else math.inf
            else:
                dev = abs(g - wv) / max(abs(wv), 1e-300)
            worst[f"{k}.{key}"] = dev
    bad = {k: v for k, v in worst.items() if v > 1e-9}
    return dict(max_rel_dev=max(worst.values()), bad=bad, ok=not bad)


def one_compare(ck, ids, backends, dtypes, anchor: bool) -> dict:
    """One wb.compare of backends x dtypes; the cost split from its meta["cost"]."""
    import workbench as wb
    t = time.perf_counter()
    rep = wb.compare(str(ck), backends=backends, dtypes=dtypes, prompt=ids, decode_steps=4, anchor=anchor,
                     budgets=False, store=False, progress=True)
    wall = time.perf_counter() - t
    say("\n```\n" + rep.summary() + "\n```")
    c = rep.meta["cost"]
    return dict(c, compare_wall_s=wall, passed=rep.passed, skipped=rep.skipped)


def report(tag: str, r: dict) -> None:
    say(f"\n### {tag}\n")
    say("| target | build s | own forward s | parity overhead s | overhead / forward |")
    say("|---|---|---|---|---|")
    for k, v in r["per_target"].items():
        ratio = v["metrics_s"] / v["forward_s"] if v["forward_s"] else float("nan")
        say(f"| {k} | {v['build_s']:.2f} | {v['forward_s']:.3f} | {v['metrics_s']:.3f} | {ratio:.2f} |")
    ratio = r["overhead_ratio"] if r["overhead_ratio"] is not None else float("nan")
    say(f"\ntargets' own forward {r['targets_forward_s']:.2f} s, parity overhead {r['parity_overhead_s']:.2f} s "
        f"(ratio {ratio:.2f}; goal: targets' forward + overhead <= 2x the forward, i.e. ratio <= 1); "
        f"reference (torch:cpu float64) {r['reference_s']:.1f} s, anchor {r['anchor_s']:.1f} s, load "
        f"{r['load_s']:.1f} s; whole compare {r['compare_wall_s']:.1f} s; passed={r['passed']}"
        + (f"; skipped {r['skipped']}" if r["skipped"] else ""))


def legacy(ck, ids, budget: float, backend: str = "torch:cuda") -> dict:
    """The old host route on one target's prefill (bfloat16): numpy taps, parity.metrics, _topk_agree."""
    import numpy as np
    import torch

    import workbench as wb
    from workbench import parity as P
    ref = wb.load(str(ck), backend="torch:cpu", dtype="float64", progress=False)
    a = np.asarray(ids)[None]
    ro = ref.forward(a, taps=P.DEFAULT_TAPS)
    rt = dict(ro.taps, logits=ro.logits)
    del ref
    m = wb.load(str(ck), backend=backend, dtype="bfloat16", progress=False)
    m.forward(a[:, :8], taps=P.DEFAULT_TAPS)           # warm-up
    m.decoder.ops.synchronize()
    t = time.perf_counter()
    o = m.forward(a, taps=P.DEFAULT_TAPS)              # taps to the host, one per tap
    t_fwd = time.perf_counter() - t
    got = dict(o.taps, logits=o.logits)
    t = time.perf_counter()
    for k, v in got.items():
        P.metrics(rt[k], v)
    t_met = time.perf_counter() - t
    out = dict(forward_with_host_taps_s=t_fwd, numpy_metrics_s=t_met)
    if left(budget) > 40:     # numpy's argsort is one long C call (SIGALRM waits for it): 64 rows, scaled
        n = min(64, a.shape[1])
        t = time.perf_counter()
        P._topk_agree(rt["logits"][:, :n], got["logits"][:, :n])
        out["numpy_topk_s"] = (time.perf_counter() - t) * a.shape[1] / n
        out["numpy_topk_note"] = f"timed on {n} of {a.shape[1]} rows, scaled"
    from workbench import parity_metrics as M
    g = M.device_forward(m, a, P.DEFAULT_TAPS)
    M.ready(m, list(g.values()))
    t = time.perf_counter()
    g = M.device_forward(m, a, P.DEFAULT_TAPS)
    M.ready(m, list(g.values()))
    out["forward_device_taps_s"] = time.perf_counter() - t
    refs = M.RefCache(rt)
    M.tap_metrics(rt, g, refs=refs)                    # the reference's upload, once
    t = time.perf_counter()
    M.tap_metrics(rt, g, refs=refs)
    out["device_metrics_s"] = time.perf_counter() - t
    return out


def phase_stats(ck, ids, backend: str = "torch:cuda", dtype: str = "bfloat16") -> dict:
    """One target's statistics per phase (prefill: every tap at --tokens positions; decode: the 4 steps' taps),
    taps left on the device: ``tap_metrics`` the one-tap way (``batch=False``, the route before the runs) and in
    runs, the first call of a comparison (the reference's upload, RefCache.upload_s) and warm (best of 3)."""
    import numpy as np

    import workbench as wb
    from workbench import parity as P
    from workbench import parity_metrics as M
    a = np.asarray(ids)[None]
    T, D = a.shape[1], 4
    ref = wb.load(str(ck), backend="torch:cpu", dtype="float64", progress=False)
    ro = ref.forward(a, taps=P.DEFAULT_TAPS)
    rt = dict(ro.taps, logits=ro.logits)
    del ref
    m = wb.load(str(ck), backend=backend, dtype=dtype, progress=False)
    pre = M.device_forward(m, a, P.DEFAULT_TAPS)
    cache = m.new_cache(batch=1, max_len=T)
    M.device_forward(m, a[:, :T - D], [], cache)
    dec = M.concat_steps([M.device_forward(m, a[:, t:t + 1], P.DEFAULT_TAPS, cache) for t in range(T - D, T)])
    M.ready(m, list(pre.values()) + list(dec.values()))
    out = {"upload_ways": upload_ways(rt)} if pre["logits"].device.type == "cuda" else {}
    for batch in (False, True):
        refs = M.RefCache(rt)
        for phase, taps, pos in (("prefill", pre, None), ("decode", dec, slice(T - D, T))):
            for part, tp in (("all", taps), ("no logits", {k: v for k, v in taps.items() if k != "logits"})):
                u0 = refs.upload_s
                t = time.perf_counter()
                M.tap_metrics(rt, tp, positions=pos, refs=refs, batch=batch)
                first = time.perf_counter() - t
                best = math.inf
                for _ in range(3):
                    t = time.perf_counter()
                    M.tap_metrics(rt, tp, positions=pos, refs=refs, batch=batch)
                    best = min(best, time.perf_counter() - t)
                out[f"{'runs' if batch else 'one-tap'}|{phase}|{part}"] = dict(
                    first_s=first, upload_s=refs.upload_s - u0, warm_s=best, taps=len(tp))
    return out


def upload_ways(rt: dict, device: str = "cuda") -> dict:
    """The first target's reference upload, three ways (seconds, synchronised): the 56 same-size taps copied
    into the rows of one device tensor (what RefCache.stacked does), concatenated on the host then one transfer,
    and per tap; the logits (float64) from pageable memory, and through a pinned copy (its pinning counted)."""
    import numpy as np
    import torch
    names = [k for k in rt if k != "logits"]
    rs = [np.ascontiguousarray(rt[k], dtype=np.float64) for k in names]
    N = rs[0].size
    out = {}

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn):
        sync()
        t = time.perf_counter()
        r = fn()
        sync()
        return time.perf_counter() - t, r

    def rows():
        o = torch.empty((len(rs), N), dtype=torch.float64, device=device)
        for i, a in enumerate(rs):
            o[i].copy_(torch.from_numpy(a).reshape(-1))
        return o

    def host_cat():
        h = np.empty((len(rs), N))
        for i, a in enumerate(rs):
            h[i] = a.reshape(-1)
        return torch.from_numpy(h).to(device)

    for _ in range(2):      # the second time: the allocator warm
        out["taps_rows_s"], _ = timed(rows)
        out["taps_host_concat_s"], _ = timed(host_cat)
        out["taps_per_tap_s"], _ = timed(lambda: [torch.from_numpy(a).to(device) for a in rs])
    lg = np.ascontiguousarray(rt["logits"], dtype=np.float64)
    out["taps_bytes"], out["logits_bytes"] = sum(a.nbytes for a in rs), lg.nbytes
    out["logits_pageable_s"], _ = timed(lambda: torch.from_numpy(lg).to(device))
    if device.startswith("cuda"):
        out["logits_pinned_s"], _ = timed(lambda: torch.from_numpy(lg).pin_memory().to(device, non_blocking=True))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--backends", default="torch:cuda,torch:cuda:0",
                    help="comma list; the default names the one card twice: 4 targets with --dtypes")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--anchor", action="store_true", help="run the HF float64 anchor too (CPU; slow at 600 tokens)")
    ap.add_argument("--budget", type=float, default=130.0,
                    help="hard wall-clock limit in seconds (the coordinator allows 150; a long C call delays SIGALRM)")
    ap.add_argument("--profile", action="store_true", help="a third compare under cProfile (instead of the old route)")
    ap.add_argument("--work", default="/tmp/wb-decode")
    ap.add_argument("--out", default=os.environ.get("OUT", str(db.ROOT / "out")))
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db.OUTFILE = out / "paritycost.md"
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(args.budget)))
    rc = 0
    try:
        import numpy as np
        import torch
        backends = [b for b in args.backends.split(",") if b]
        if not torch.cuda.is_available():
            backends = [b for b in backends if not b.startswith("torch:cuda")] or ["torch:cpu"]
        dtypes = [d for d in args.dtypes.split(",") if d]
        say(f"# Parity run cost on {db.card()}; torch {torch.__version__}; {os.cpu_count()} CPU cores; "
            f"{args.tokens} tokens, targets {backends} x {dtypes}, anchor {'on' if args.anchor else 'off'}")
        RESULT.update(card=db.card(), torch=torch.__version__, tokens=args.tokens, backends=backends, dtypes=dtypes)
        if torch.cuda.is_available():
            try:
                sc = self_check()
                RESULT["self_check"] = sc
                say(f"\ndevice self-check (CUDA float64 statistics vs numpy metrics()): max rel deviation "
                    f"{sc['max_rel_dev']:.1e} -> {'OK' if sc['ok'] else 'MISMATCH ' + json.dumps(sc['bad'])}")
            except OutOfTime:
                raise
            except Exception:   # noqa: BLE001 - say what broke and go on to the compare
                RESULT["self_check"] = dict(ok=False, error=traceback.format_exc())
                say("\ndevice self-check FAILED:\n```\n" + traceback.format_exc() + "```")
        ck = db.make("gemma3-270m", pathlib.Path(args.work) / "g270m")
        say(f"<!-- {time.perf_counter() - T0:.0f} s so far -->")
        ids = [int(i) for i in np.random.default_rng(1).integers(100, 262000, size=args.tokens)]
        r1 = one_compare(ck, ids, backends, dtypes, args.anchor)
        RESULT["cold"] = r1
        report("cold (first run in the process)", r1)
        dump(out)
        if left(args.budget) > 1.3 * r1["compare_wall_s"] + 5:
            r2 = one_compare(ck, ids, backends, dtypes, args.anchor)
            RESULT["warm"] = r2
            report("warm (the same again)", r2)
            dump(out)
        else:
            say(f"\n(no warm run: {left(args.budget):.0f} s left)")
        if args.profile and left(args.budget) > 1.5 * r1["compare_wall_s"] + 5:
            import cProfile
            import io
            import pstats
            pr = cProfile.Profile()
            pr.enable()
            one_compare(ck, ids, backends, dtypes, args.anchor)
            pr.disable()
            for key in ("tottime", "cumulative"):
                buf = io.StringIO()
                pstats.Stats(pr, stream=buf).sort_stats(key).print_stats(28)
                say(f"\n### cProfile of a third (warm) compare, by {key}\n```\n" + buf.getvalue()[-7000:] + "```")
        if torch.cuda.is_available() and left(args.budget) > 30:
            ps = phase_stats(ck, ids)
            RESULT["phase_stats_bf16"] = ps
            say("\n### statistics per phase, one target (torch:cuda bfloat16), taps on the device: one-tap route "
                "(before the runs) vs runs\n")
            say("| route | phase | taps | first call s (of it reference upload s) | warm s |\n|---|---|---|---|---|")
            up = ps.pop("upload_ways", None)
            for key, v in ps.items():
                route, phase, part = key.split("|")
                say(f"| {route} | {phase} ({part}) | {v['taps']} | {v['first_s']:.4f} ({v['upload_s']:.4f}) | "
                    f"{v['warm_s']:.4f} |")
            if up:
                RESULT["upload_ways"] = up
                say(f"\nreference upload ({up['taps_bytes'] / 1e6:.0f} MB of 56 taps): rows of one device tensor "
                    f"{up['taps_rows_s']:.4f} s, host concatenation + one transfer {up['taps_host_concat_s']:.4f} s, "
                    f"per tap {up['taps_per_tap_s']:.4f} s; logits ({up['logits_bytes'] / 1e6:.0f} MB float64): "
                    f"pageable {up['logits_pageable_s']:.4f} s, pinned copy first {up['logits_pinned_s']:.4f} s")
            dump(out)
        if torch.cuda.is_available() and left(args.budget) > 30 and not args.profile:
            lg = legacy(ck, ids, args.budget)
            RESULT["legacy_bf16_prefill"] = lg
            say("\n### the old host route beside the device route (torch:cuda bfloat16, prefill taps only, warm)\n")
            say("| | forward s | statistics s |\n|---|---|---|")
            topk = (f" + {lg['numpy_topk_s']:.2f} top-k ({lg['numpy_topk_note']})" if "numpy_topk_s" in lg
                    else " (top-k not timed: budget)")
            say(f"| old: numpy taps + parity.metrics (+ _topk_agree) | {lg['forward_with_host_taps_s']:.3f} | "
                f"{lg['numpy_metrics_s']:.2f}{topk} |")
            say(f"| new: taps on the device + parity_metrics | {lg['forward_device_taps_s']:.3f} | "
                f"{lg['device_metrics_s']:.3f} |")
    except OutOfTime as e:
        say(f"\nSTOPPED: {e} after {time.perf_counter() - T0:.0f} s; the numbers above are complete as printed")
        RESULT["stopped"] = str(e)
        rc = 3
    except Exception:   # noqa: BLE001 - one shot on the card: print what broke, keep what was measured
        tb = traceback.format_exc()
        say("\nFAILED:\n```\n" + tb + "```")
        RESULT["error"] = tb
        rc = 1
    finally:
        signal.alarm(0)
        say(f"<!-- {time.perf_counter() - T0:.0f} s in all -->")
        dump(out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
