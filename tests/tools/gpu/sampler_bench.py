#!/usr/bin/env python3
"""The sampled decode step on the card (issue 13: ``m.generate`` sampled >= 0.8x ``workbench bench`` decode).

    python3 tests/tools/gpu/sampler_bench.py [--out DIR] [--parts decode,tokens,micro] [--dtypes bfloat16,float32]

* micro (last by default): the sampler alone on [1, 262144] logits (random, bfloat16 and float32), each variant
  replayed from a CUDA graph (20 calls a graph, median of 30 replays): the torch sampler (``sampler.torch_sampler``:
  two-stage torch.topk, compiled logsumexp / cumsum / Gumbel) and its parts, against the Triton sampler
  (``triton_decode.TritonSampler``: block partials + one selection kernel; in the Triton step the partials come from
  the head's epilogue, so only the selection kernel is extra) and its parts, for a few launch settings of the
  selection kernel (WORKBENCH_TRITON_TUNE sample=RB,warps,chunk,sieve); and the tokens of both against ``sample_np``
  for 32 positions.
* decode: a random checkpoint of the Gemma 3 270M config; for torch:cuda bf16 / f32: ``wb.bench`` decode tok/s,
  ``m.generate`` greedy, sampled (temperature 0.8, top-p 0.95, seed 0) with the Triton sampler (default tune and
  --e2e-tunes) and with the torch sampler (WORKBENCH_TRITON_SAMPLER=0), the ratios to bench and the sampling cost
  per token in µs.
* tokens: 64 sampled tokens, new route == old route == plain route (WORKBENCH_DECODE=plain), for top-p, top-k and
  whole-vocabulary sampling (bf16), and top-p in f32.

Writes DIR/sampler.md (default $OUT or ./out) as it goes.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import decode_bench as db  # noqa: E402  (the same checkpoint, card name, output and generate-rate helpers)

say = db.say


def graph_us(fn, inner=20, reps=30):
    """µs per call of fn, replayed from a CUDA graph of ``inner`` calls (median of ``reps`` replays)."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1000.0 / inner)
    return statistics.median(ts)


def part_micro(args):
    import numpy as np
    import torch

    from workbench.backends import triton_decode as td
    from workbench.decode import sampler
    say("\n## (a) The sampler alone, [1, 262144] logits, CUDA graph (µs per call)\n")
    V = 262144
    dev = torch.device("cuda")
    s = sampler.make(temperature=0.8, top_p=0.95, seed=0)
    rng = np.random.default_rng(0)
    base = (rng.normal(size=V) * 2.5).astype(np.float32)
    say("| dtype | variant | µs/call |")
    say("|---|---|---|")
    for dn in args.dtypes.split(","):
        dt = getattr(torch, dn)
        lg = torch.tensor(base, device=dev).to(dt)[None].contiguous()
        pos = torch.tensor([127], device=dev)
        try:
            t0 = time.perf_counter()
            old = sampler.torch_sampler(s, V, dev, dtype=dt)
            say(f"| {dn} | torch sampler (old; {old.note}, setup {time.perf_counter() - t0:.0f} s) | "
                f"{graph_us(lambda: old(lg, pos)):.1f} |")
            say(f"| {dn} | . its two-stage torch.topk (256) | {graph_us(lambda: sampler._topk_t(lg, 256)):.1f} |")
            inv = torch.ones((1, 1), device=dev)
            lse = torch.compile(lambda x, i: torch.logsumexp(x.float() * i, dim=-1, keepdim=True), fullgraph=True)
            lse(lg, inv)
            say(f"| {dn} | . its full-vocabulary logsumexp (compiled) | {graph_us(lambda: lse(lg, inv)):.1f} |")
        except Exception as e:
            say(f"| {dn} | torch sampler: ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]} | |")
            traceback.print_exc()
        for label, sp in (("top-p 0.95", s), ("top-k 50", sampler.make(temperature=1.0, top_k=50, seed=0)),
                          ("whole vocabulary", sampler.make(temperature=0.8, seed=0))):
            try:
                prm = sampler.TorchParams(dev, sp)
                ts = td.TritonSampler(sp, V, dev, prm)
                st = ts.stats(lg, pos)
                say(f"| {dn} | Triton sampler, {label}: stats + selection (standalone) | "
                    f"{graph_us(lambda: ts(lg, pos)):.1f} |")
                say(f"| {dn} | . block partials over the logits (in the step: the head's epilogue) | "
                    f"{graph_us(st):.1f} |")
                tunes = [""] if not sp.candidates(V) else args.sample_tunes.split(";") if sp is s else [",".join(
                    map(str, td.TUNE["sample"]))]
                for tune in tunes:
                    old_env = os.environ.get("WORKBENCH_TRITON_TUNE")
                    if tune:
                        os.environ["WORKBENCH_TRITON_TUNE"] = f"sample={tune}"
                    try:
                        fin = ts.finish(lg, ts.token, pos)
                    finally:
                        if old_env is None:
                            os.environ.pop("WORKBENCH_TRITON_TUNE", None)
                        else:
                            os.environ["WORKBENCH_TRITON_TUNE"] = old_env
                    what = f"selection kernel (sample={tune or td.TUNE['sample']})" if tune else "final argmax kernel"
                    say(f"| {dn} | . {what} — the only extra kernel in the step | {graph_us(fin):.1f} |")
                if sp is s:
                    for ph, what in ((1, "block selection only"), (2, "block selection + top C")):
                        fin = ts.finish(lg, ts.token, pos, phases=ph)
                        say(f"| {dn} | . . its phase: {what} (default tune) | {graph_us(fin):.1f} |")
            except Exception as e:
                say(f"| {dn} | Triton sampler {label}: ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]} | |")
                traceback.print_exc()
        # tokens: old == new == numpy
        try:
            for label, sp in (("top-p", s), ("top-k 50", sampler.make(temperature=1.0, top_k=50, seed=3)),
                              ("top-k 300 + top-p 0.9", sampler.make(temperature=1.1, top_k=300, top_p=0.9, seed=4)),
                              ("whole vocabulary", sampler.make(temperature=0.8, seed=5))):
                old = sampler.torch_sampler(sp, V, dev, dtype=dt)
                ts = td.TritonSampler(sp, V, dev, sampler.TorchParams(dev, sp))
                ref_lg = lg.float().cpu().numpy()[0]
                agree_old = agree_new = 0
                n = 32
                for p in range(n):
                    pt = torch.tensor([p], device=dev)
                    r = sampler.sample_np(ref_lg, sp, p + 1)
                    agree_old += int(old(lg, pt)) == r
                    agree_new += int(ts(lg, pt)) == r
                say(f"| {dn} | tokens vs sample_np, {label}: old {agree_old}/{n}, new {agree_new}/{n} | |")
        except Exception as e:
            say(f"| {dn} | token check: ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]} | |")
            traceback.print_exc()


def part_decode(ckpt, args):
    import numpy as np

    import workbench as wb
    say("\n## (b) Gemma 3 270M shape (random weights): bench decode vs m.generate greedy / sampled\n")
    say(f"prompt {args.prompt_len}, {args.gen_len} new tokens, EOS ignored; bench: wb.bench ({args.repeats} repeats, "
        f"median); generate: median of {args.repeats} after a warm-up; sampled: temperature 0.8, top-p 0.95, seed 0; "
        "new = Triton sampler (head epilogue + selection kernel), old = WORKBENCH_TRITON_SAMPLER=0 (torch sampler)\n")
    say("| backend | dtype | route | bench decode tok/s | greedy tok/s | ratio | sampler | sampled tok/s | ratio | "
        "sampling µs/token (over greedy) |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    ids = np.random.default_rng(0).integers(100, 262000, size=args.prompt_len).tolist()
    b = "torch:cuda"
    for d in args.dtypes.split(","):
        try:
            t0 = time.perf_counter()
            bench_tps, m = db.bench_then_load(ckpt, b, d, args)
            if m is None:
                continue
            kw = dict(temperature=0.8, top_p=0.95, seed=0)
            g_tps, st, _ = db.gen_rate(m, ids, args.gen_len + 1, reps=args.repeats)
            us = lambda v: 1e6 / v  # noqa: E731
            variants = [("new (default tune)", {}), ("old (WORKBENCH_TRITON_SAMPLER=0)",
                                                     {"WORKBENCH_TRITON_SAMPLER": "0"})]
            variants += [(f"new, sample={t}", {"WORKBENCH_TRITON_TUNE": f"sample={t}"})
                         for t in args.e2e_tunes.split(";") if t]
            for label, env in variants:
                getattr(m, "decoder", m).__dict__.pop("_decode_engines", None)   # a fresh engine (the tune is
                #                                  read when it is built; the engines live on the text decoder)
                os.environ.update(env)
                try:
                    s_tps, sst, _ = db.gen_rate(m, ids, args.gen_len + 1, reps=args.repeats, **kw)
                finally:
                    for k in env:
                        del os.environ[k]
                say(f"| {b} | {d} | {st['route']} | {bench_tps:.0f} | {g_tps:.0f} | {g_tps / bench_tps:.2f} | "
                    f"{label}: {sst.get('sampler')} | {s_tps:.0f} | {s_tps / bench_tps:.2f} | "
                    f"{us(s_tps) - us(g_tps):.0f} (greedy step {us(g_tps):.0f} µs) |")
            say(f"<!-- {d}: {time.perf_counter() - t0:.0f} s -->")
            del m
        except Exception as e:
            say(f"| {b} | {d} | ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]} |")
            traceback.print_exc()


def part_steps(ckpt, args):
    """Each kernel kind of the captured decode step, greedy against sampled (where do the sampled µs go?)."""
    import numpy as np
    import torch

    import workbench as wb
    say("\n## (d) The decode step's kernels, greedy vs sampled (µs: each kind's launches of one step replayed "
        "from a CUDA graph, 20 steps' worth a graph)\n")
    ids = np.random.default_rng(0).integers(100, 262000, size=args.prompt_len).tolist()
    for d in args.dtypes.split(","):
        try:
            m = wb.load(str(ckpt), backend="torch:cuda", dtype=d, progress=False)
            dec = getattr(m, "decoder", m)
            cols = None
            for label, kw in (("greedy", {}), ("sampled top-p", dict(temperature=0.8, top_p=0.95, seed=0))):
                m.generate(ids, max_new_tokens=8, ignore_eos=True, **kw)
                eng = [e for e in dec.__dict__["_decode_engines"].values()
                       if e.sampling.greedy == (label == "greedy")][-1]
                k = eng.kernel
                tok = torch.zeros((1, 1), dtype=torch.long, device="cuda")
                pos = torch.tensor([args.prompt_len + 2], device="cuda")
                plan = k.plan(tok, pos)
                groups = {}
                for name, fn in plan:
                    groups.setdefault(name, []).append(fn)
                row = {name: graph_us(lambda fns=fns: [f() for f in fns]) for name, fns in groups.items()}
                row["whole step"] = graph_us(lambda: [f() for _, f in plan])
                if cols is None:
                    cols = list(row)
                    say("| dtype | step | " + " | ".join(cols) + " |")
                    say("|---|---|" + "---|" * len(cols))
                say(f"| {d} | {label} | " + " | ".join(f"{row.get(c, float('nan')):.1f}" for c in cols) +
                    " | " + " ".join(f"{n}={v:.1f}" for n, v in row.items() if n not in cols))
            del m
        except Exception as e:
            say(f"| {d} | ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]} |")
            traceback.print_exc()


def part_tokens(ckpt, args):
    import numpy as np

    import workbench as wb
    say("\n## (c) Sampled tokens: new route == old route == plain route (64 tokens)\n")
    ids = np.random.default_rng(0).integers(100, 262000, size=args.prompt_len).tolist()
    cases = [("bfloat16", dict(temperature=0.8, top_p=0.95, seed=0)),
             ("bfloat16", dict(temperature=1.0, top_k=50, seed=1)),
             ("bfloat16", dict(temperature=0.8, seed=2)),
             ("float32", dict(temperature=0.8, top_p=0.95, seed=0))]
    ms = {}
    for d, kw in cases:
        if d not in args.dtypes.split(","):
            continue
        try:
            m = ms.get(d) or ms.setdefault(d, wb.load(str(ckpt), backend="torch:cuda", dtype=d, progress=False))
            got = {}
            for name, env in (("new", {}), ("old", {"WORKBENCH_TRITON_SAMPLER": "0"}),
                              ("plain", {"WORKBENCH_DECODE": "plain"})):
                os.environ.update(env)
                try:
                    g = m.generate(ids, max_new_tokens=64, ignore_eos=True, **kw)
                finally:
                    for k in env:
                        del os.environ[k]
                got[name] = (g.token_ids, g.stats.get("sampler"))
            first = lambda a, c: next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), len(a))  # noqa: E731
            n_o, n_p = first(got["new"][0], got["old"][0]), first(got["new"][0], got["plain"][0])
            ok = n_o == 64 and n_p == 64
            say(f"- {d} {kw}: new == old for {n_o}/64, new == plain for {n_p}/64 -> {'SAME' if ok else 'DIFFER'} "
                f"(new sampler: {got['new'][1]}; first tokens {got['new'][0][:8]})")
        except Exception as e:
            say(f"- {d} {kw}: ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            traceback.print_exc()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="decode,tokens,micro", help="in this order")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample-tunes", default="2,16,64,0;1,16,64,0;2,8,64,0;2,16,64,1024;1,16,64,1024;2,16,128,0",
                    help="selection-kernel settings (radix bits, warps, pairwise chunk, sieve) timed in the micro part")
    ap.add_argument("--e2e-tunes", default="1,16,64,0;2,16,64,1024",
                    help="selection-kernel settings also timed in m.generate (besides the default)")
    ap.add_argument("--work", default="/tmp/wb-decode")
    ap.add_argument("--out", default=os.environ.get("OUT", str(db.ROOT / "out")))
    args = ap.parse_args(argv)
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    db.OUTFILE = pathlib.Path(args.out) / "sampler.md"
    import subprocess

    import torch
    if not torch.cuda.is_available():
        say("no CUDA device")
        return 2
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=db.ROOT).stdout.strip()
    import triton
    say(f"# Sampled decode on {db.card()}; torch {torch.__version__}, triton {triton.__version__}; git {head}")
    t0 = time.perf_counter()
    parts = args.parts.split(",")
    if "decode" in parts or "tokens" in parts or "steps" in parts:
        ck = db.make("gemma3-270m", pathlib.Path(args.work) / "g270m")
    for part in parts:                                  # in the order given
        if part == "micro":
            part_micro(args)
        elif part == "decode":
            part_decode(ck, args)
        elif part == "tokens":
            part_tokens(ck, args)
        elif part == "steps":
            part_steps(ck, args)
        else:
            say(f"unknown part {part!r} (micro, decode, tokens, steps)")
            continue
        say(f"<!-- {time.perf_counter() - t0:.0f} s so far (after {part}) -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
