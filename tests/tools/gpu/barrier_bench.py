#!/usr/bin/env python3
"""What a kernel boundary costs on the card against a grid barrier inside one persistent kernel (issue 19, item 3).

    python3 tests/tools/gpu/barrier_bench.py [--out DIR] [--phases 90]

The Triton decode step is ~92 kernels a token; each kind's kernels replayed back to back from a CUDA graph cost
~3 µs apiece even when they move 1-2 MB (the H200 moves 2 MB in 0.4 µs). The question before writing one
persistent kernel per step: is a grid-wide barrier (atomic counter, spin) cheaper than a kernel boundary?

For P phases, each a GEMV ``y_p = W_p x_{p-1}`` (W_p [N, K] in the dtype, distinct weights per phase so they come
from DRAM, x ping-ponged between two buffers):

* chain: one kernel per phase (grid = the row tiles), P launches in a CUDA graph, with and without programmatic
  dependent launch (PDL; the weights loaded before the wait);
* persistent: one kernel of NPROG programs (one per SM) looping over the phases, the rows of a phase split over
  the programs, a grid barrier between phases; the weights of phase p+1 are loaded before its barrier (poll: an
  atomic read, or a volatile load then one acquiring atomic).

Prints µs per phase for each, and checks every variant's result against torch's float32 GEMV chain.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents as _go
    from triton.language.extra.cuda import gdc_wait as _wait
except Exception:  # pragma: no cover
    _go = _wait = None

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sampler_bench import graph_us as _graph_us  # noqa: E402  (the same CUDA-graph timer)

OUT = pathlib.Path(os.environ.get("OUT", "out"))
LINES = []


def say(s=""):
    print(s, flush=True)
    LINES.append(s)


@triton.jit
def _chain_gemv(W, X, Y, N, K: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr, KP: tl.constexpr):
    if PDL:
        _go()
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    ko = tl.arange(0, KP)
    km = ko < K
    w = tl.load(W + rows[:, None] * K + ko[None, :], mask=(rows < N)[:, None] & km[None, :], other=0.0).to(tl.float32)
    if PDL:
        _wait()
    x = tl.load(X + ko, mask=km, other=0.0).to(tl.float32)
    tl.store(Y + rows, tl.sum(w * x[None, :], 1).to(Y.dtype.element_ty), mask=rows < N)


@triton.jit
def _barrier(BAR, target, POLL: tl.constexpr):
    tl.debug_barrier()                                   # every thread's stores issued ...
    tl.atomic_add(BAR, 1, sem="release", scope="gpu")    # ... and released with the count
    if POLL == 0:
        c = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
        while c < target:
            c = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    else:
        c = tl.load(BAR, volatile=True)
        while c < target:
            c = tl.load(BAR, volatile=True)
        tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _persist_gemv(W, XA, XB, BAR, P, N, NPROG, K: tl.constexpr, BN: tl.constexpr, TPP: tl.constexpr,
                  POLL: tl.constexpr, KP: tl.constexpr):
    """Phase p: rows of tile t = pid + j * NPROG (j < TPP) of y_p = W_p x; x alternates XA -> XB -> XA ..."""
    pid = tl.program_id(0)
    ko = tl.arange(0, KP)
    km = ko < K
    for p in range(P):
        src = XA if p % 2 == 0 else XB
        dst = XB if p % 2 == 0 else XA
        for j in tl.static_range(TPP):
            rows = (pid + j * NPROG) * BN + tl.arange(0, BN)
            rm = rows < N
            w = tl.load(W + p * N * K + rows[:, None] * K + ko[None, :], mask=rm[:, None] & km[None, :],
                        other=0.0).to(tl.float32)
            if j == 0:
                if p > 0:
                    _barrier(BAR, p * NPROG, POLL)
            x = tl.load(src + ko, mask=km, other=0.0, cache_modifier=".cg").to(tl.float32)
            tl.store(dst + rows, tl.sum(w * x[None, :], 1).to(dst.dtype.element_ty), mask=rm)


def graph_us(fn, P, reps=20):
    """µs a phase: one call of fn (P phases) replayed from a CUDA graph (sampler_bench's timer), median of reps."""
    return _graph_us(fn, inner=1, reps=reps) / P


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--phases", type=int, default=90)
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    nsm = props.multi_processor_count
    say(f"# Kernel boundary vs grid barrier on {props.name} ({nsm} SMs); torch {torch.__version__}, "
        f"triton {triton.__version__}\n")
    say("| dtype | N x K | MB/phase | chain (no PDL) µs | chain (PDL) µs | persistent NPROG, poll | µs/phase | "
        "max err vs torch |")
    say("|---|---|---|---|---|---|---|---|")
    P = args.phases
    for dt in (torch.bfloat16, torch.float32):
        for N, K in ((1536, 640), (4096, 640), (640, 640), (32, 32)):
            W = (torch.randn(P, N, K, device=dev) / K ** 0.5).to(dt)
            Kx = N                   # N >= K: phase p+1 reads the first K of phase p's N outputs
            xa = torch.randn(Kx, device=dev).to(dt)
            xb = torch.zeros(Kx, device=dev, dtype=dt)
            x0 = xa.clone()
            ref = x0.float()
            cur = x0.clone()
            for p in range(P):       # the reference chain (float32 products of the dtype's values)
                y = (W[p].float() @ cur[:K].float()).to(dt)
                cur = y
            ref = cur.float()
            res = {}
            for pdl in (False, True):
                BN = 8 if N >= 1024 else 4
                if pdl and _wait is None:
                    res[pdl] = float("nan")
                    continue
                kw = {"launch_pdl": True} if pdl else {}

                def chain(pdl=pdl, BN=BN, kw=kw):
                    xa.copy_(x0)
                    bufs = (xa, xb)
                    for p in range(P):
                        src, dst = bufs[p % 2], bufs[(p + 1) % 2]
                        _chain_gemv[(triton.cdiv(N, BN),)](W[p], src, dst, N, K=K, BN=BN, PDL=pdl, KP=triton.next_power_of_2(K), num_warps=4,
                                                           **kw)
                us = graph_us(chain, P)
                fin = (xa if P % 2 == 0 else xb).float()
                err = (fin[:N] - ref[:N]).abs().max().item() / max(ref[:N].abs().max().item(), 1e-30)
                res[pdl] = us
            say(f"| {str(dt)[6:]} | {N}x{K} | {N * K * W.element_size() / 1e6:.2f} | {res[False]:.2f} | "
                f"{res[True]:.2f} | (chain) | | {err:.1e} |")
            for nprog in (nsm, 2 * nsm):
                for poll in (0, 1):
                    BN = 8 if N >= 1024 else 4
                    tiles = triton.cdiv(N, BN)
                    if tiles < nprog:
                        BN = max(1, triton.next_power_of_2(triton.cdiv(N, nprog)))
                        tiles = triton.cdiv(N, BN)
                    tpp = triton.cdiv(tiles, nprog)
                    bar = torch.zeros(1, dtype=torch.int32, device=dev)

                    def persist(nprog=nprog, poll=poll, BN=BN, tpp=tpp, bar=bar):
                        xa.copy_(x0)
                        bar.zero_()
                        _persist_gemv[(nprog,)](W, xa, xb, bar, P, N, nprog, K=K, BN=BN, TPP=tpp, POLL=poll, KP=triton.next_power_of_2(K),
                                                num_warps=8)
                    try:
                        us = graph_us(persist, P)
                        fin = (xa if P % 2 == 0 else xb).float()
                        err = (fin[:N] - ref[:N]).abs().max().item() / max(ref[:N].abs().max().item(), 1e-30)
                        say(f"| {str(dt)[6:]} | {N}x{K} | | | | {nprog}, {'atomic' if poll == 0 else 'volatile'}"
                            f" (BN {BN}, {tpp} tiles) | {us:.2f} | {err:.1e} |")
                    except Exception as e:  # noqa: BLE001
                        say(f"| {str(dt)[6:]} | {N}x{K} | | | | {nprog}, poll {poll} | ERROR "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:120]} | |")
            del W
    (out / "barrier.md").write_text("\n".join(LINES) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
