#!/usr/bin/env python3
"""MLX on the card: the one-launch decode step (``workbench.backends.mlx_cuda_persist``) against the five-kernel step
and the generic step — parity per step, the cache it writes in place, and raw step rates (issue 19, item 3).

    python3 tests/tools/gpu/mlxpersist_bench.py [--out DIR] [--dtypes bfloat16,float32] [--steps 256]

For each dtype, a random Gemma 3 270M checkpoint on mlx:gpu, a 128-token prompt, then 8 teacher-forced steps through
(a) the generic ``decode_step`` (b) ``MLXCudaDecodeStep`` (c) ``MLXCudaPersistentStep``: each step's logits against
(a) (max relative error, argmax agreement), (c)'s in-kernel token against the argmax of its logits, the per-layer
residuals of (c) against (b), and the K/V rows (c) wrote into the cache against (a)'s. Then each free-running
greedy (its own token fed back, ``mx.async_eval`` one step ahead) for --steps tokens: tok/s.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import decode_bench as db  # noqa: E402

say = db.say


def rel(a, b):
    import numpy as np
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def run_forced(m, ids, kind, toks, max_len):
    import mlx.core as mx
    import numpy as np

    from workbench.backends import mlx_cuda_decode, mlx_cuda_persist
    c = m.new_cache(max_len=max_len)
    m.forward(ids, cache=c, last_only=True)
    c.begin_static()
    plan = m.decode_plan(c)
    st = {"five": lambda: mlx_cuda_decode.MLXCudaDecodeStep(plan),
          "persist": lambda: mlx_cuda_persist.MLXCudaPersistentStep(plan)}.get(kind, lambda: None)()
    P = ids.shape[1]
    lgs, caps, ktoks = [], [], []
    for j, t in enumerate(toks):
        tk = mx.array([[t]], dtype=mx.int32)
        pos = mx.array([P + j], dtype=mx.int32)
        cap = []
        if st is None:
            lg = m.decode_step(tk, pos, c)
        else:
            lg = st(tk, pos, capture=cap)
        mx.eval(lg)
        lgs.append(np.array(lg.astype(mx.float32)).reshape(-1))
        if cap:
            caps.append(np.array(mx.stack(cap).astype(mx.float32)))
        if kind == "persist":
            ktoks.append(int(np.array(st.token)[0]))
    lay = plan.layers
    kv = [(np.array(lp.kv.k.astype(mx.float32))[0, :, P:P + len(toks)] if lp.kv.k is not None else None,
           np.array(lp.kv.v.astype(mx.float32))[0, :, P:P + len(toks)]) for lp in lay]
    return np.stack(lgs), caps, ktoks, kv


def rate(m, ids, kind, n, max_len):
    import mlx.core as mx

    from workbench.backends import mlx_cuda_decode, mlx_cuda_persist
    c = m.new_cache(max_len=max_len)
    m.forward(ids, cache=c, last_only=True)
    c.begin_static()
    plan = m.decode_plan(c)
    st = (mlx_cuda_persist.MLXCudaPersistentStep(plan) if kind == "persist"
          else mlx_cuda_decode.MLXCudaDecodeStep(plan))
    P = ids.shape[1]
    tok = mx.array([[7]], dtype=mx.int32)
    pos = mx.array([P], dtype=mx.int32)
    out = []

    def one(tok, pos):
        lg = st(tok, pos)
        nt = st.token.reshape(1, 1) if kind == "persist" else mx.argmax(lg, axis=-1, keepdims=True).astype(mx.int32)
        return nt, pos + 1

    for _ in range(4):                 # warm-up (the compile of the kernels)
        tok, pos = one(tok, pos)
        mx.eval(tok)
    t0 = time.perf_counter()
    for _ in range(n):
        tok, pos = one(tok, pos)
        mx.async_eval(tok)
        out.append(tok)
    mx.eval(out)
    return n / (time.perf_counter() - t0)


def queued_us(m, ids, blocks, parts, n=200):
    """µs a launch of the one-launch step (or a part of it: (layers, head)), n launches queued back to back (each
    fed the last one's token, so MLX orders them; no host round trip between them), evaluated at the end."""
    import mlx.core as mx

    from workbench.backends import mlx_cuda_persist
    c = m.new_cache(max_len=1024)
    m.forward(ids, cache=c, last_only=True)
    c.begin_static()
    st = mlx_cuda_persist.MLXCudaPersistentStep(m.decode_plan(c), blocks=blocks)
    st._parts = parts
    P = ids.shape[1]
    tok = mx.array([[7]], dtype=mx.int32)
    st.chain = False

    def f(t, p):
        st(t, p)
        return st.token.reshape(1, 1)
    fn = mx.compile(f)
    pos = mx.array([P], dtype=mx.int32)
    for _ in range(3):
        tok = fn(tok, pos)
        mx.eval(tok)
    t0 = time.perf_counter()
    outs = []
    for _ in range(n):
        tok = fn(tok, pos)
        outs.append(tok)
    mx.eval(outs)
    dt = (time.perf_counter() - t0) / n * 1e6
    st.check()
    return dt


def part_hazard(m, d, ids):
    """Launches MLX may run at once (compiled, the same token, nothing ordering them): the step must not hang —
    its barriers time out, check() raises — and then work again."""
    import mlx.core as mx

    from workbench.backends import mlx_cuda_persist
    c = m.new_cache(max_len=1024)
    m.forward(ids, cache=c, last_only=True)
    c.begin_static()
    st = mlx_cuda_persist.MLXCudaPersistentStep(m.decode_plan(c), chain=False)
    fn = mx.compile(lambda t, p: st(t, p))
    tok, pos = mx.array([[7]], dtype=mx.int32), mx.array([ids.shape[1]], dtype=mx.int32)
    t0 = time.perf_counter()
    mx.eval([fn(tok, pos) for _ in range(8)])
    try:
        st.check()
        verdict = "no timeout (MLX ran them one after another)"
    except RuntimeError as e:
        verdict = f"check() raised: {str(e)[:90]}..."
    dt = time.perf_counter() - t0
    st2 = mlx_cuda_persist.MLXCudaPersistentStep(m.decode_plan(c))
    st.chain = True
    lg = st(tok, pos)
    lg2 = st2(tok, pos)
    mx.eval(lg, lg2)
    st.check()
    same = bool(mx.array_equal(lg, lg2).item())
    say(f"| {d} | 8 unordered compiled launches: {verdict} ({dt:.1f} s) | the same step afterwards = a fresh step's "
        f"logits: {same} |")


def part_profile(m, d, ids, reps=20):
    """Block 0's clock after every grid barrier (the step built with _stamps): µs per phase kind, median of reps
    steps (eager, ordered)."""
    import mlx.core as mx
    import numpy as np

    from workbench.backends import mlx_cuda_persist
    c = m.new_cache(max_len=1024)
    m.forward(ids, cache=c, last_only=True)
    c.begin_static()
    st = mlx_cuda_persist.MLXCudaPersistentStep(m.decode_plan(c))
    st._stamps = True
    tok, pos = mx.array([[7]], dtype=mx.int32), mx.array([ids.shape[1]], dtype=mx.int32)
    rows = []
    for _ in range(reps + 2):
        st(tok, pos)
        mx.eval(st.stamps)
        rows.append(np.array(st.stamps).astype(np.int64))
    a = np.stack(rows[2:])
    dif = np.diff(a, axis=1) / 1e3                    # µs, [reps, 5L + 1]
    L = (a.shape[1] - 2) // 5
    kinds = ["qkv", "attn", "o", "gu", "down"]
    per = {k: float(np.median(dif[:, i:5 * L:5].sum(1))) for i, k in enumerate(kinds)}
    per["head"] = float(np.median(dif[:, 5 * L]))
    tot = float(np.median((a[:, -1] - a[:, 0]) / 1e3))
    say(f"| {d} | block 0's clock, µs a step (sum over {L} layers): " + ", ".join(f"{k} {v:.1f}" for k, v in per.items())
        + f"; first stamp to head end {tot:.1f} µs |")
    st.check()


def part_split(m, d, ids):
    rows = []
    for blocks in (132,):
        for parts in ((18, True), (18, False), (0, True), (1, False), (0, False)):
            try:
                rows.append(f"{queued_us(m, ids, blocks, parts):.0f}")
            except Exception as e:  # noqa: BLE001
                rows.append(f"ERR {type(e).__name__}")
        say(f"| {d} | {blocks} | " + " | ".join(rows[-5:]) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--parts", default="forced,split")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db.OUTFILE = out / "mlxpersist.md"
    import mlx.core as mx
    import numpy as np

    import workbench as wb
    from workbench.backends import mlx_cuda_persist as mp
    say(f"# MLX one-launch decode step on {db.card()}; mlx {mx.__version__}; SMs {mp.sm_count()}\n")
    ckpt = db.make("gemma3-270m", pathlib.Path("/tmp/wb-decode/g270m"))
    ids = np.random.default_rng(0).integers(100, 262000, size=(1, 128))
    toks = [5, 900, 70000, 12, 262000, 3, 44, 100000]
    for d in args.dtypes.split(","):
        try:
            m = wb.load(str(ckpt), backend="mlx:gpu", dtype=d, progress=False)
            why = mp.unsupported(m.config, m.ops)
            say(f"## {d}: unsupported() -> {why}")
            if "split" in args.parts and d == args.dtypes.split(",")[0]:
                say("\nµs a launch, 200 queued (prompt 512; compiled call): | dtype | blocks | whole step | 18 layers, "
                    "no head | head only | 1 layer | empty (launch + tail) |\n|---|---|---|---|---|---|---|")
                part_split(m, d, np.random.default_rng(0).integers(100, 262000, size=(1, 512)))
                part_profile(m, d, np.random.default_rng(0).integers(100, 262000, size=(1, 512)))
            if "hazard" in args.parts and d == args.dtypes.split(",")[0]:
                part_hazard(m, d, np.random.default_rng(0).integers(100, 262000, size=(1, 128)))
            if "forced" not in args.parts:
                continue
            t = time.perf_counter()
            G, _, _, kvG = run_forced(m, ids, "generic", toks, 512)
            F, capF, _, kvF = run_forced(m, ids, "five", toks, 512)
            t = time.perf_counter()
            Pp, capP, ktok, kvP = run_forced(m, ids, "persist", toks, 512)
            say(f"persist: first 8 steps incl. build {time.perf_counter() - t:.1f} s")
            say(f"| {d} | logits vs generic: five {rel(F, G):.2e}, persist {rel(Pp, G):.2e}; persist vs five "
                f"{rel(Pp, F):.2e} | argmax = generic: five {(F.argmax(1) == G.argmax(1)).sum()}/8, persist "
                f"{(Pp.argmax(1) == G.argmax(1)).sum()}/8 | in-kernel token = argmax of its logits: "
                f"{sum(int(a == b) for a, b in zip(ktok, Pp.argmax(1)))}/8 | finite {np.isfinite(Pp).all()} |")
            if capF and capP:
                per = [rel(np.stack([c[i] for c in capP]), np.stack([c[i] for c in capF]))
                       for i in range(capP[0].shape[0])]
                say(f"resid per layer, persist vs five: max {max(per):.2e} (layers: "
                    + " ".join(f"{x:.1e}" for x in per) + ")")
            ke = max(rel(a[0], b[0]) if a[0] is not None else 0.0 for a, b in zip(kvP, kvG))
            ve = max(rel(a[1], b[1]) for a, b in zip(kvP, kvG))
            say(f"cache rows written (8 steps, every layer) vs generic: K {ke:.2e}, V {ve:.2e}")
            for kind in ("five", "persist"):
                r = rate(m, ids, kind, args.steps, 512)
                say(f"| {d} | {kind} | free-running greedy {r:.0f} tok/s ({args.steps} steps, prompt 128) |")
            del m
        except Exception as e:  # noqa: BLE001
            say(f"| {d} | ERROR {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} |")
            traceback.print_exc()
            say("```\n" + traceback.format_exc()[-3000:] + "\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
