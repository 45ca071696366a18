"""Kept-quantised decode on this CPU against llama.cpp, in one process (rerun on an idle box for the README):
alternating per repeat llama.cpp (n_threads=2) and workbench torch:cpu float32 quant="keep" on the same GGUF,
pp128 / tg128, medians; then a per-step profile of the quantised products (time per matrix type, the head, and
everything else). Usage: .venv/bin/python tests/tools/quant_cpu_speed.py [--model gemma3-270m] [--repeats 3]"""
from __future__ import annotations

import argparse
import collections
import os
import time

import numpy as np

import workbench as wb
from workbench.backends import quant as Q
from workbench.bench import bench_model
from workbench.decode import engine as E
from workbench.decode import sampler as S
from workbench.references.llamacpp import LlamaCppReference


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    m = wb.load(a.model, backend="torch:cpu", dtype="float32", quant="keep", progress=False)
    ref = LlamaCppReference(str(m.source_path), n_ctx=128 + 128 + 16, n_threads=2)
    res = {"llama.cpp": [], "workbench keep": []}
    for rep in range(a.repeats):
        load = os.getloadavg()[0]
        res["llama.cpp"].append(ref.bench(128, 128, 1)["decode_tok_s"])
        res["workbench keep"].append(bench_model(m, 128, 128, 1, fast=True, compile=False, progress=False,
                                                 label="keep")["decode_tok_s"])
        print(f"repeat {rep + 1} (load {load:.1f}): " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in res.items()))
    med = {k: float(np.median(v)) for k, v in res.items()}
    print("medians: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()) +
          f"; ratio {med['workbench keep'] / med['llama.cpp']:.2f}x")
    # per-step profile
    acc = collections.defaultdict(list)
    orig = Q.QuantWeight.gemv_ptr

    def timed(self, x, y, act8):
        t0 = time.perf_counter()
        orig(self, x, y, act8)
        acc["head " + self.types[0] if self.N > 100_000 else "+".join(self.types)].append(time.perf_counter() - t0)
    dec = m.decoder
    eng = E.session(dec, 256, S.Sampling())
    dec.forward(np.arange(2, 130)[None], cache=eng.cache)
    eng.run(5, 8)
    eng.cache.reset()
    dec.forward(np.arange(2, 130)[None], cache=eng.cache)
    Q.QuantWeight.gemv_ptr = timed
    try:
        t0 = time.perf_counter()
        eng.run(5, 64)
        tot = (time.perf_counter() - t0) / 64
    finally:
        Q.QuantWeight.gemv_ptr = orig
    g = 0.0
    print(f"profile (load {os.getloadavg()[0]:.1f}): {tot * 1e3:.2f} ms/step ({1 / tot:.1f} tok/s)")
    for k, v in sorted(acc.items()):
        per = sum(v) / 64
        g += per
        print(f"  {k:22s} {len(v) // 64:3d} calls/step {per * 1e3:7.3f} ms/step (median call {np.median(v) * 1e6:.0f} us)")
    print(f"  GEMV {g * 1e3:.2f} ms/step; everything else (attention, norms, torch ops, Python) {(tot - g) * 1e3:.2f}")


if __name__ == "__main__":
    main()
