#!/usr/bin/env python3
"""Prefill on the card (issue 19, item 1): workbench torch:cuda against HF transformers, same checkpoint, same process.

    python3 tests/tools/gpu/prefill_bench.py [--lens 512,4096] [--dtypes float32,bfloat16] [--mlx] [--out DIR]

* A random checkpoint of the Gemma 3 270M config (``workbench make-random gemma3-270m``; decode_bench's helper).
* workbench: ``m.generate(ids, max_new_tokens=1)``'s ``stats['prefill_s']`` (the public path: ``wb.bench`` and
  ``m.generate`` time the same loop), plus variants through the same loop on the decoder: the prompt in one
  chunk / in chunks of 512, ``WORKBENCH_ATTN=dense`` (one dense mask per layer, the old attention), ``=band`` (the
  banded pass wherever a window applies), ``WORKBENCH_SDPA_GQA=expand`` (K/V heads repeated before SDPA, as HF).
* HF: ``Gemma3ForCausalLM`` (attn_implementation eager and sdpa), one forward of the prompt with a DynamicCache and
  ``logits_to_keep=1`` — what its ``generate`` does before the first token (a lower bound on its prefill time).
* Every figure: median of --reps timed runs after a warm-up, the device synchronised around each.
* A parity line per dtype: our last-position logits against HF sdpa's (max |diff| / max |HF|) and the plain path's
  variants against each other (planned vs dense attention).
* torch.profiler: top-15 CUDA kernels of our pp4096 bfloat16 prefill (and HF sdpa's top-8), kernel counts.
* --mlx: mlx:gpu bfloat16 ``m.generate`` prefill against mlx-lm's (``generate_step`` to the first token).

Writes DIR/prefill.md (default $OUT or ./out) as it goes.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import decode_bench as db  # noqa: E402  (say, card, make; puts the checkout on sys.path)

say = db.say


@contextlib.contextmanager
def env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: v for k, v in kv.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


DEV = "cuda"


def sync():
    import torch
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def ours_loop(dec, ids, chunk):
    """generate's prefill loop on the decoder: chunks into a KV cache, last-position logits."""
    cache = dec.new_cache(batch=1, max_len=ids.shape[1] + 8)
    lg = None
    for a in range(0, ids.shape[1], chunk):
        lg = dec.forward(ids[:, a:a + chunk], cache=cache, last_only=True).logits
    return lg


def gen_prefill(m, ids, reps, **kw):
    m.generate(ids[0].tolist(), max_new_tokens=1, ignore_eos=True, **kw)
    ts = [m.generate(ids[0].tolist(), max_new_tokens=1, ignore_eos=True, **kw).stats["prefill_s"]
          for _ in range(reps)]
    return statistics.median(ts)


def kernel_table(prof, n):
    """The top-n device kernels (on a CPU smoke run: the top-n CPU ops by self time)."""
    from torch.autograd import DeviceType
    rows = []
    want = DeviceType.CUDA if DEV == "cuda" else DeviceType.CPU
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != want:
            continue
        t = (getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)) if DEV == "cuda" \
            else e.self_cpu_time_total
        if t:
            rows.append((t, e.count, e.key))
    rows.sort(reverse=True)
    tot = sum(r[0] for r in rows)
    out = [f"{DEV} kernel time {tot / 1e3:.2f} ms in {sum(r[1] for r in rows)} launches; top {n}:", "",
           "| µs total | calls | % | kernel |", "|---|---|---|---|"]
    for t, c, k in rows[:n]:
        out.append(f"| {t:.0f} | {c} | {100 * t / max(tot, 1e-9):.1f} | `{k[:110]}` |")
    return out


def part_torch(ck, args):
    import numpy as np
    import torch
    from transformers import DynamicCache, Gemma3ForCausalLM

    import workbench as wb
    lens = [int(x) for x in args.lens.split(",")]
    rng = np.random.default_rng(0)
    say("\n## torch:cuda prefill: workbench vs HF transformers (same checkpoint, same process)\n")
    say(f"random Gemma 3 270M ({ck}); medians of {args.reps} after a warm-up; tok/s = prompt tokens / prefill time\n")
    say("| dtype | pp | workbench m.generate | wb 1 chunk | wb chunks of 512 | wb ATTN=dense | wb ATTN=band | "
        "wb GQA expand | HF eager | HF sdpa | wb / best HF | wb / HF sdpa | wb / HF eager |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    prof_ids = None
    for d in args.dtypes.split(","):
        tdt = getattr(torch, d)
        try:
            m = wb.load(str(ck), backend=f"torch:{DEV}", dtype=d, progress=False)
            dec = getattr(m, "decoder", m)
            hfs = {}
            for impl in ("eager", "sdpa"):
                hfs[impl] = Gemma3ForCausalLM.from_pretrained(str(ck), dtype=tdt, attn_implementation=impl).to(
                    DEV).eval()
            for T in lens:
                ids = rng.integers(100, 262000, size=(1, T))
                ids[0, 0] = 2
                r = {}
                with torch.inference_mode():
                    r["gen"] = gen_prefill(m, ids, args.reps)
                    r["one"] = timed(lambda: ours_loop(dec, ids, T), args.reps)
                    r["c512"] = timed(lambda: ours_loop(dec, ids, 512), args.reps) if T > 512 else r["one"]
                    with env(WORKBENCH_ATTN="dense"):
                        r["dense"] = timed(lambda: ours_loop(dec, ids, T), args.reps)
                    with env(WORKBENCH_ATTN="band"):
                        r["band"] = timed(lambda: ours_loop(dec, ids, T), args.reps)
                    with env(WORKBENCH_SDPA_GQA="expand"):
                        r["expand"] = timed(lambda: ours_loop(dec, ids, T), args.reps)
                    x = torch.from_numpy(ids).to(DEV)
                    for impl, hf in hfs.items():
                        r[impl] = timed(lambda hf=hf: hf(x, past_key_values=DynamicCache(config=hf.config),
                                                         use_cache=True, logits_to_keep=1), args.reps)
                f = {k: T / v for k, v in r.items()}
                best = max(f["eager"], f["sdpa"])
                say(f"| {d} | {T} | **{f['gen']:.0f}** | {f['one']:.0f} | {f['c512']:.0f} | {f['dense']:.0f} | "
                    f"{f['band']:.0f} | {f['expand']:.0f} | {f['eager']:.0f} | {f['sdpa']:.0f} | **{f['gen'] / best:.2f}x** | "
                    f"{f['gen'] / f['sdpa']:.2f}x | {f['gen'] / f['eager']:.2f}x |")
                # parity: last-position logits, ours (planned / dense attention) vs HF sdpa, same dtype
                try:
                    with torch.inference_mode():
                        a = ours_loop(dec, ids, T)[0, -1]
                        with env(WORKBENCH_ATTN="dense"):
                            b = ours_loop(dec, ids, T)[0, -1]
                        with env(WORKBENCH_ATTN="band"):
                            bb = ours_loop(dec, ids, T)[0, -1]
                        c = ours_loop(dec, ids, 512)[0, -1]
                        h = hfs["sdpa"](x, logits_to_keep=1).logits[0, -1].float().cpu().numpy()
                    sc = float(np.abs(h).max())
                    say(f"<!-- {d} pp{T} last logits, max|diff|/max|HF sdpa|: planned {np.abs(a - h).max() / sc:.2e}, "
                        f"dense {np.abs(b - h).max() / sc:.2e}, chunks-512 {np.abs(c - h).max() / sc:.2e}; planned vs "
                        f"dense {np.abs(a - b).max() / sc:.2e}, band vs dense {np.abs(bb - b).max() / sc:.2e}; argmax ours {int(a.argmax())} HF {int(h.argmax())} -->")
                except Exception as e:
                    say(f"<!-- parity {d} pp{T}: {type(e).__name__}: {e} -->")
                if d == "bfloat16" and T == max(lens):
                    prof_ids = ids
            if prof_ids is not None and d == "bfloat16":
                profile(dec, hfs["sdpa"], prof_ids)
            del m, dec, hfs
            if DEV == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:
            say(f"| {d} | ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]} |")
            traceback.print_exc()


def profile(dec, hf, ids):
    import torch
    from torch.profiler import ProfilerActivity, profile as tprof
    from transformers import DynamicCache
    T = ids.shape[1]
    say(f"\n### torch.profiler: workbench pp{T} bfloat16 (one chunk, generate's loop on the decoder)\n")
    with torch.inference_mode():
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
        ours_loop(dec, ids, T)
        sync()
        t = time.perf_counter()
        with tprof(activities=acts) as p:
            ours_loop(dec, ids, T)
            sync()
        say(f"wall {1e3 * (time.perf_counter() - t):.1f} ms under the profiler\n")
        for line in kernel_table(p, 15):
            say(line)
        say(f"\n### HF sdpa pp{T} bfloat16\n")
        x = torch.from_numpy(ids).to(DEV)
        with tprof(activities=acts) as p:
            hf(x, past_key_values=DynamicCache(config=hf.config), use_cache=True, logits_to_keep=1)
            sync()
        for line in kernel_table(p, 8):
            say(line)


def part_mlx(ck, args):
    import numpy as np
    say("\n## mlx:gpu prefill: workbench vs mlx-lm (bfloat16)\n")
    try:
        import mlx_lm  # noqa: F401
        from workbench.backends import base
        if "mlx:gpu" not in base.available():
            say(f"mlx:gpu not available: {base.available().reasons.get('mlx:gpu')}")
            return
    except Exception as e:
        say(f"skipped: {type(e).__name__}: {e}")
        return
    import workbench as wb
    from workbench.references.mlxlm import MlxLmReference
    say("| pp | workbench m.generate tok/s | mlx-lm tok/s | ratio |")
    say("|---|---|---|---|")
    try:
        m = wb.load(str(ck), backend="mlx:gpu", dtype="bfloat16", progress=False)
        ref = MlxLmReference(str(ck), dtype="bfloat16")
        for T in [int(x) for x in args.lens.split(",")]:
            ids = np.random.default_rng(0).integers(100, 262000, size=(1, T))
            ours = gen_prefill(m, ids, args.reps)
            ref._timed(ids[0], 1)
            theirs = statistics.median(ref._timed(ids[0], 1)[0] for _ in range(args.reps))
            say(f"| {T} | {T / ours:.0f} | {T / theirs:.0f} | **{theirs / ours:.2f}x** |")
    except Exception as e:
        say(f"| ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]} |")
        traceback.print_exc()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="512,4096")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--mlx", action="store_true", help="also mlx:gpu vs mlx-lm (if mlx_lm imports)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--work", default="/tmp/wb-prefill")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the same script off the card")
    ap.add_argument("--out", default=os.environ.get("OUT", str(db.ROOT / "out")))
    args = ap.parse_args(argv)
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    db.OUTFILE = pathlib.Path(args.out) / "prefill.md"
    import subprocess

    import torch
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=db.ROOT).stdout.strip()
    import transformers
    say(f"# Prefill on {db.card()}; torch {torch.__version__}, transformers {transformers.__version__}; git {head}")
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        say("no CUDA device")
        return 2
    t0 = time.perf_counter()
    ck = db.make("gemma3-270m", pathlib.Path(args.work) / "g270m")
    if not args.no_torch:
        part_torch(ck, args)
        say(f"<!-- {time.perf_counter() - t0:.0f} s so far -->")
    if args.mlx:
        part_mlx(ck, args)
    say(f"<!-- {time.perf_counter() - t0:.0f} s in all -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
