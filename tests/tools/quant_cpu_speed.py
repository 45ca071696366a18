"""Kept-quantised decode on this CPU against llama.cpp, in one process (rerun on an idle box for the README).

Per repeat, alternating: llama.cpp (llama-cpp-python, n_threads=2) and ``m.generate`` of workbench torch:cpu
float32 ``quant="keep"`` (the route users run: the fused C step, ``cpu quant step``) on the same GGUF, the same
prompt token ids (a fixed text, tokenised, --prompt-len ids) and the same number of generated tokens (EOS ignored);
medians and the ratio. ``--eager`` adds the eager static step (WORKBENCH_CPU_STEP=0) as a third column. Then a
per-step profile of the fused step (products / attention / the rest, from its own clock) and of the head alone.
Usage: .venv/bin/python tests/tools/quant_cpu_speed.py [--model gemma3-270m] [--repeats 3] [--gen 128] [--eager]"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import workbench as wb
from workbench.decode import engine as E
from workbench.decode import sampler as S
from workbench.references.llamacpp import LlamaCppReference

TEXT = ("The history of the Roman Empire spans many centuries, beginning with the founding of the city and "
        "ending with the fall of Constantinople. Historians divide it into the Republic, the Principate and the "
        "Dominate, each with its own institutions, armies, taxes, roads and cities. ")


def prompt_ids(tok, n: int) -> list[int]:
    ids = tok.encode(TEXT)
    while len(ids) < n:
        ids += tok.encode(TEXT)[1:]
    return ids[:n]


def ours(m, ids, gen: int, env: str) -> float:
    os.environ["WORKBENCH_CPU_STEP"] = env
    g = m.generate(list(ids), max_new_tokens=gen, ignore_eos=True)
    assert len(g.token_ids) == gen, len(g.token_ids)
    return g.stats["decode_steps"] / g.stats["decode_s"], g.stats["route"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--eager", action="store_true", help="also the eager static step (WORKBENCH_CPU_STEP=0)")
    a = ap.parse_args()
    m = wb.load(a.model, backend="torch:cpu", dtype="float32", quant="keep", progress=False)
    ids = prompt_ids(m.tokenizer, a.prompt_len)
    ref = LlamaCppReference(str(m.source_path), n_ctx=a.prompt_len + a.gen + 16, n_threads=2)
    ref.bench(8, 4, 1)                                   # builds its bench context
    cols = ["llama.cpp", "workbench keep"] + (["workbench keep (eager step)"] if a.eager else [])
    res = {k: [] for k in cols}
    ours(m, ids, 8, "1")                                 # warm-up (engine, kernel)
    route = None
    for rep in range(a.repeats):
        load = os.getloadavg()[0]
        _, d = ref._timed(list(ids), a.gen)
        res["llama.cpp"].append(1.0 / d)
        r, route = ours(m, ids, a.gen, "1")
        res["workbench keep"].append(r)
        if a.eager:
            res["workbench keep (eager step)"].append(ours(m, ids, a.gen, "0")[0])
        print(f"repeat {rep + 1} (load {load:.1f}): " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in res.items()),
              flush=True)
    os.environ["WORKBENCH_CPU_STEP"] = "1"
    med = {k: float(np.median(v)) for k, v in res.items()}
    print(f"pp{a.prompt_len} tg{a.gen}, route {route!r}; medians: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items())
          + f"; ratio {med['workbench keep'] / med['llama.cpp']:.2f}x")
    # per-step profile of the fused step (its own clock around each part)
    dec = m.decoder
    eng = E.session(dec, a.prompt_len + a.gen + 8, S.Sampling())
    dec.forward(np.asarray([ids]), cache=eng.cache)
    eng.run(5, 4)
    k = getattr(eng, "kernel", None)
    if k is None or not hasattr(k, "profile"):
        print(f"no fused step on this route ({eng.route})")
        return
    eng.cache.reset()
    dec.forward(np.asarray([ids]), cache=eng.cache)
    n = min(64, a.gen)
    k.profile(True)
    t0 = time.perf_counter()
    eng.run(5, n)
    tot = (time.perf_counter() - t0) / n
    prod, attn, rest, hd = (v / n for v in k.profile(False))
    print(f"profile (load {os.getloadavg()[0]:.1f}): {tot * 1e3:.2f} ms/step ({1 / tot:.1f} tok/s): head "
          f"{hd * 1e3:.2f} ms, the layers' products {prod * 1e3:.2f}, attention {attn * 1e3:.2f}, the rest in C "
          f"{rest * 1e3:.2f}, outside the C step (Python, engine) {(tot - prod - attn - rest - hd) * 1e3:.2f}")
    nt, t1, tn = k.threads()
    print(f"  threads of the last step: {nt} (average step: 1 thread {t1 or float('nan'):.2f} ms, "
          f"all {tn or float('nan'):.2f} ms)")
    head = m.decoder.decode_plan(eng.cache).head
    x = np.random.default_rng(0).standard_normal(head.K).astype(np.float32)
    y = np.empty(head.N, np.float32)
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        head.gemv_ptr(x.ctypes.data, y.ctypes.data, True)
        ts.append(time.perf_counter() - t0)
    print(f"  head alone ({head.types}, {head.nbytes / 1e6:.0f} MB): {np.median(ts) * 1e3:.2f} ms "
          f"({head.nbytes / np.median(ts) / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
