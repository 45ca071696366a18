#!/usr/bin/env python3
"""Op conformance on the card: every op of the ops protocol (and the towers' mmops) on torch:cuda, mlx:gpu (and
torch:mps where it exists) x float32 / bfloat16 / float16, against the float64 numpy references, with the one
tolerance table of ``tests/test_ops_conformance.py`` (the same cases, imported from there).

    .venv/bin/python tests/tools/gpu/ops_conformance.py [--out ops_table_gpu.md] [--with-cpu] [--backends torch:cuda,...]

On the GPU backends the decode ops also run inside torch.compile / mx.compile (``[..., compiled]`` rows: on CUDA
the torch ops take their fused-reduction branches only there). Prints a markdown op x (backend, dtype) table (relative max error; ``✗`` where it exceeds the tolerance), the
device and the numerics switches that matter (TF32), and exits 1 if any op failed (2 if no GPU backend was
available). Needs numpy, pytest (the test module is imported) and torch and/or mlx.
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

GPU_BACKENDS = ("torch:cuda", "mlx:gpu", "torch:mps")
DTYPES = ("float32", "bfloat16", "float16")


def _load_cases():
    path = ROOT / "tests" / "test_ops_conformance.py"
    spec = importlib.util.spec_from_file_location("ops_conformance_cases", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except ImportError as e:
        sys.exit(f"cannot import {path}: {e} (pip install pytest numpy; run from the repo's venv)")
    return mod


def _header(bk, backends) -> list[str]:
    lines = [f"- host: {platform.node()} ({platform.machine()}, Python {platform.python_version()})"]
    for b in backends:
        ok, why = bk.status(b)
        lines.append(f"- {b}: {'available' if ok else 'not available'} — {why}")
    try:
        import torch
        lines.append(f"- torch {torch.__version__}; matmul TF32 {torch.backends.cuda.matmul.allow_tf32}, "
                     f"cuDNN TF32 {torch.backends.cudnn.allow_tf32}, float32 matmul precision "
                     f"{torch.get_float32_matmul_precision()}")
    except Exception:
        pass
    try:
        import mlx.core as mx
        lines.append(f"- mlx {mx.__version__}")
    except Exception:
        pass
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="ops_table_gpu.md", help="markdown file to write (default %(default)s)")
    ap.add_argument("--backends", default=",".join(GPU_BACKENDS), help="comma-separated (default %(default)s)")
    ap.add_argument("--with-cpu", action="store_true", help="also run torch:cpu and mlx:cpu, for comparison")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the decode ops under torch.compile / mx.compile (run on the GPU backends by default)")
    a = ap.parse_args(argv)

    C = _load_cases()
    from workbench.backends import base as bk

    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if a.with_cpu:
        backends += ["torch:cpu", "mlx:cpu"]
    header = _header(bk, backends)
    print("\n".join(header), flush=True)
    ran_gpu = False
    for b in backends:
        ok, why = bk.status(b)
        if not ok:
            print(f"[ops] {b}: skipped ({why})", flush=True)
            continue
        ran_gpu |= b in GPU_BACKENDS
        for d in DTYPES + (("float64",) if b == "torch:cpu" else ()):
            t0 = time.perf_counter()
            try:
                res = C.run(b, d, compiled=b in GPU_BACKENDS and not a.no_compile)
            except Exception as e:       # an op that raises is a result too: record it, keep going
                C._RESULTS[(b, d)] = {"_skip": f"raised {type(e).__name__}: {e}"}
                print(f"[ops] {b} {d}: RAISED {type(e).__name__}: {e}", flush=True)
                continue
            if "_skip" in res:
                print(f"[ops] {b} {d}: {res['_skip']}", flush=True)
                continue
            bad = C.failures(res)
            print(f"[ops] {b} {d}: {len(res) - 1 - len(bad)} ok, {len(bad)} over tolerance "
                  f"({time.perf_counter() - t0:.1f} s){': ' + '; '.join(bad) if bad else ''}", flush=True)
    table = C.markdown(C._RESULTS)
    text = "\n".join(["# Op conformance (relative max error vs float64 numpy; ✗ = over the tolerance)", ""] +
                     header + ["", table, ""])
    print("\n" + text)
    pathlib.Path(a.out).write_text(text, encoding="utf-8")
    print(f"[ops] wrote {a.out}")
    if not ran_gpu:
        print("[ops] no GPU backend was available", file=sys.stderr)
        return 2
    raised = [k for k, v in C._RESULTS.items() if "_skip" in v and v["_skip"].startswith("raised")]
    failed = any(C.failures(v) for v in C._RESULTS.values() if "_skip" not in v)
    return 1 if failed or raised else 0


if __name__ == "__main__":
    sys.exit(main())
