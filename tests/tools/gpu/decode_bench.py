#!/usr/bin/env python3
"""The one decode engine on the card (issue 13): ``workbench bench`` decode beside ``m.generate`` greedy and sampled,
the fast route's per-layer parity against float64, and Gemma 4 E2B-shaped decode beside HF transformers.

    python3 tests/tools/gpu/decode_bench.py [--parts 270m,parity,gemma4] [--backends torch:cuda,mlx:gpu] [--out DIR]

* 270m: a random checkpoint of the Gemma 3 270M config (``workbench make-random gemma3-270m``); for torch:cuda
  bfloat16 / float32 and mlx:gpu bfloat16: ``wb.bench`` decode tok/s (prompt 128, 256 tokens, 3 repeats), then
  ``m.generate`` greedy and sampled (temperature 0.8, top-p 0.95) tok/s over 256 new tokens (median of 3 after a
  warm-up), the ratios, the route; and the fast route's first 64 greedy tokens against the plain route's.
* parity: ``workbench.decode.capture_decode`` (teacher-forced, 8 steps after a 24-token prefill) on torch:cuda and
  mlx:gpu float32 against torch:cpu float64 per layer (resid_post, logits): max relative error, pass at 1e-4; then a
  RoPE sign flipped in layer 5's plan and layer 9's gate/up weights x1.05: the first layer over 1e-4 must be theirs.
  Also ``wb.compare(..., decode="fast")`` where parity supports it.
* gemma4: a random checkpoint of the released Gemma 4 E2B config; ``m.generate`` greedy tok/s through the engine
  (its route named) on torch:cuda / mlx:gpu bfloat16 beside HF transformers' ``generate`` (bfloat16, same weights).

Writes DIR/decode.md (default $OUT or ./out) as it goes; every number printed with the card's name.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

LINES: list[str] = []
OUTFILE = None


def say(s=""):
    print(s, flush=True)
    LINES.append(s)
    if OUTFILE is not None:
        OUTFILE.write_text("\n".join(LINES) + "\n")


def card() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return "no CUDA device"


def make(name: str, out: pathlib.Path) -> pathlib.Path:
    if (out / "config.json").exists():
        return out
    t = time.perf_counter()
    from workbench import make_random
    make_random.make_random(name, out, seed=0, dtype="bfloat16", progress=False)
    say(f"made {name} random checkpoint in {time.perf_counter() - t:.0f} s -> {out}")
    return out


def bench_then_load(ckpt, b, d, args):
    """``wb.bench``'s decode tok/s of one target, then the model loaded for ``m.generate``: (tok/s, model), or
    (None, None) after printing the skip row."""
    import workbench as wb
    res = wb.bench(str(ckpt), backends=[b], dtypes=[d], prompt_len=args.prompt_len, gen_len=args.gen_len,
                   repeats=args.repeats, store=False, progress=False)
    row = [r for r in res.rows if r["impl"] == "workbench"][0]
    if row["status"] != "ok":
        say(f"| {b} | {d} | skipped: {row.get('reason')} |")
        return None, None
    return row["decode_tok_s"], wb.load(str(ckpt), backend=b, dtype=d, progress=False)


def gen_rate(m, ids, n, reps=3, **kw):
    m.generate(ids, max_new_tokens=n, ignore_eos=True, **kw)             # warm-up: compile / capture
    rates, st = [], None
    for _ in range(reps):
        g = m.generate(ids, max_new_tokens=n, ignore_eos=True, **kw)
        rates.append(g.stats["gen_tok_s"])
        st = g.stats
    return statistics.median(rates), st, g.token_ids


def part_270m(ckpt, backends, args):
    import numpy as np

    import workbench as wb
    say("\n## Gemma 3 270M shape (random weights): bench decode vs m.generate\n")
    say(f"prompt {args.prompt_len}, {args.gen_len} new tokens, EOS ignored; bench: wb.bench ({args.repeats} repeats, "
        f"median); generate: median of {args.repeats} after a warm-up; sampled: temperature 0.8, top-p 0.95, seed 0\n")
    say(f"model {ckpt}\n")
    say("| backend | dtype | route | bench decode tok/s | generate greedy tok/s | ratio | generate sampled tok/s | "
        "ratio | fast == plain (greedy tokens) |")
    say("|---|---|---|---|---|---|---|---|---|")
    targets = [(b, d) for b in backends for d in (args.dtypes.split(",") if args.dtypes else
                                                  (("bfloat16",) if b == "mlx:gpu" else ("bfloat16", "float32")))]
    ids = np.random.default_rng(0).integers(100, 262000, size=args.prompt_len).tolist()
    for b, d in targets:
        try:
            t0 = time.perf_counter()
            bench_tps, m = bench_then_load(ckpt, b, d, args)
            if m is None:
                continue
            g_tps, st, fast_toks = gen_rate(m, ids, args.gen_len + 1, reps=args.repeats)
            s_tps, sst, _ = gen_rate(m, ids, args.gen_len + 1, reps=args.repeats, temperature=0.8, top_p=0.95, seed=0)
            k = args.check_tokens
            agree = "-"
            if k:
                fast = m.generate(ids, max_new_tokens=k, ignore_eos=True).token_ids
                os.environ["WORKBENCH_DECODE"] = "plain"
                try:
                    plain = m.generate(ids, max_new_tokens=k, ignore_eos=True).token_ids
                finally:
                    del os.environ["WORKBENCH_DECODE"]
                same = next((i for i, (a, c) in enumerate(zip(fast, plain)) if a != c), len(fast))
                agree = f"all {k}" if same == k else f"first {same} of {k} (then a near-tie in {d}?)"
            f = (lambda v: f"{v:.0f}" if v >= 100 else f"{v:.2f}")  # noqa: E731
            say(f"| {b} | {d} | {st['route']} ({st['route_reason']}) | {f(bench_tps)} | {f(g_tps)} | "
                f"{g_tps / bench_tps:.2f} | {f(s_tps)} | {s_tps / bench_tps:.2f} | {agree} |")
            say(f"<!-- {b} {d}: sampled route {sst['route']}, sampler {sst.get('sampler')}; setup (compile/capture) "
                f"of the first call "
                f"excluded, this block took {time.perf_counter() - t0:.0f} s -->")
            del m
        except Exception as e:
            say(f"| {b} | {d} | ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]} |")
            traceback.print_exc()


def part_parity(ckpt, backends, args):
    import numpy as np

    import workbench as wb
    from workbench.decode import capture_decode
    say("\n## Fast-route parity (teacher-forced decode, float32 vs torch:cpu float64, per layer)\n")
    ids = np.random.default_rng(1).integers(100, 262000, size=(1, 32))
    P = 24
    ref = wb.load(str(ckpt), backend="torch:cpu", dtype="float64", progress=False)
    r = ref.forward(ids, taps=["blocks.*.hook_resid_post"])
    L = ref.config.num_hidden_layers
    refd = {k: v[:, P:] for k, v in r.taps.items()}
    refd["logits"] = r.logits[:, P:]
    del ref

    def errs(got):
        out = []
        for i in range(L):
            k = f"blocks.{i}.hook_resid_post"
            out.append(float(np.abs(got[k] - refd[k]).max() / np.abs(refd[k]).max()))
        lg = float(np.abs(got["logits"] - refd["logits"]).max() / np.abs(refd["logits"]).max()) \
            if "logits" in got else float("nan")
        return out, lg
    for b in backends:
        try:
            m = wb.load(str(ckpt), backend=b, dtype="float32", progress=False)
            got, route = capture_decode(m, ids, P)
            e, lg = errs(got)
            # the parity table's float32 tolerance: mlx:gpu's prefill (which fills the cache) is TF32-grade
            tol = 1e-2 if b.startswith("mlx:gpu") else 1e-4
            ok = max(e) <= tol and lg <= tol and all(np.isfinite(e))
            say(f"- {b} float32, route **{route}**: resid_post max rel err per layer "
                f"{', '.join(f'{x:.1e}' for x in e)}; logits {lg:.1e} -> {'PASS' if ok else 'FAIL'} (tol {tol:g})")
            for label, fault, layer in (("RoPE sign flipped in layer 5's plan", lambda p: p.flip_rope(5), 5),
                                        ("layer 9 gate/up weights x1.05 in the plan",
                                         lambda p: p.scale_weight(9, "gate_up", 1.05), 9)):
                g2, _ = capture_decode(m, ids, P, plan_fault=fault)
                e2, _ = errs(g2)
                # located: the first layer whose error jumps past 10x the clean run's there (and past 1e-4)
                first = next((i for i, (x, x0) in enumerate(zip(e2, e)) if x > max(1e-4, 10 * x0)), None)
                there = e2[first] if first is not None else 0.0
                say(f"  - fault: {label}: first layer over max(1e-4, 10x clean) = {first} "
                    f"({'located' if first == layer else 'NOT located'}; error there {there:.1e})")
            del m
        except Exception as e:
            say(f"- {b}: ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            traceback.print_exc()
    import inspect
    if "decode" in inspect.signature(wb.compare).parameters:
        try:
            rep = wb.compare(str(ckpt), backends=backends, dtypes=["float32"], prompt=ids[0].tolist(),
                             decode="fast", references=(), store=False, progress=False)
            say("\nwb.compare(..., decode='fast'):\n")
            say("```\n" + str(rep)[:6000] + "\n```")
        except Exception as e:
            say(f"wb.compare(decode='fast'): ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            traceback.print_exc()
    else:
        say("wb.compare has no decode= parameter yet in this checkout")


def part_gemma4(backends, args):
    import numpy as np

    import workbench as wb
    say("\n## Gemma 4 E2B shape (released config, random weights): decode through the engine vs HF transformers\n")
    ck = make("gemma4-e2b", pathlib.Path(args.work) / "g4e2b")
    ids = np.random.default_rng(2).integers(1000, 200000, size=args.prompt_len).tolist()
    n = args.g4_tokens
    say(f"prompt {args.prompt_len}, {n} new tokens, bfloat16, EOS ignored\n")
    say("| impl | backend | route | decode tok/s |")
    say("|---|---|---|---|")
    for b in backends:
        try:
            t0 = time.perf_counter()
            m = wb.load(str(ck), backend=b, dtype="bfloat16", progress=False)
            tps, st, _ = gen_rate(m, ids, n + 1, reps=2)
            say(f"| workbench m.generate | {b} | {st['route']} ({st['route_reason']}) | {tps:.1f} |")
            say(f"<!-- load+warm-up+2 runs {time.perf_counter() - t0:.0f} s -->")
            del m
        except Exception as e:
            say(f"| workbench | {b} | ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]} | |")
            traceback.print_exc()
        if b.startswith("torch"):
            try:
                from workbench.references.hf import HFReference
                ref = HFReference(str(ck), dtype="bfloat16", device="cuda")
                r = ref.bench_decode(args.prompt_len, n, 2, static_cache_compile=False)
                say(f"| HF transformers generate | torch:cuda | eager, dynamic cache | {r['decode_tok_s']:.1f} |")
                del ref
            except Exception as e:
                say(f"| HF transformers | torch:cuda | ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]} | |")
                traceback.print_exc()


def main(argv=None) -> int:
    global OUTFILE
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="270m,parity,gemma4")
    ap.add_argument("--backends", default=None)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--g4-tokens", type=int, default=64)
    ap.add_argument("--g4-backends", default=None, help="backends for the Gemma 4 part (default: --backends)")
    ap.add_argument("--model", default=None, help="a source for the 270m part (default: the random 270M shape; "
                                                   "'gemma3-270m' is the real one)")
    ap.add_argument("--dtypes", default=None, help="comma list for the 270m part")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check-tokens", type=int, default=64, help="fast vs plain greedy tokens compared (0: skip)")
    ap.add_argument("--work", default="/tmp/wb-decode")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "out")))
    args = ap.parse_args(argv)
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    OUTFILE = pathlib.Path(args.out) / "decode.md"
    from workbench.backends import base
    av = list(base.available())
    backends = args.backends.split(",") if args.backends else [b for b in ("torch:cuda", "mlx:gpu") if b in av]
    try:
        sm = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    except Exception:
        sm = ""
    import platform

    import torch
    dev = card()
    if not any(b.startswith(("torch:cuda", "mlx:gpu")) for b in backends):
        from workbench.runs import machine_info
        dev = f"CPU {machine_info().get('cpu') or platform.processor()}, {os.cpu_count()} cores"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    say(f"# Decode engine on {dev} ({sm}); torch {torch.__version__}; backends {backends}; git {head.strip()}")
    if not backends:
        say("no GPU backend here")
        return 2
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    if "270m" in parts or "parity" in parts:
        ck = args.model or make("gemma3-270m", pathlib.Path(args.work) / "g270m")
    if "270m" in parts:
        part_270m(ck, backends, args)
        say(f"<!-- {time.perf_counter() - t0:.0f} s so far -->")
    if "parity" in parts:
        part_parity(ck, backends, args)
        say(f"<!-- {time.perf_counter() - t0:.0f} s so far -->")
    if "gemma4" in parts:
        part_gemma4(args.g4_backends.split(",") if args.g4_backends else backends, args)
        say(f"<!-- {time.perf_counter() - t0:.0f} s in all -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
