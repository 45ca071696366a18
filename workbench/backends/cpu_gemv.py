"""Matrix-vector products for decoding on the CPU.

Decoding one token reads every weight once, so on a CPU its speed is the memory bandwidth that y = W x
reaches. The frameworks' own kernels leave much of it unused on x86 without AVX-512: on the project's 2-core
AMD EPYC (Zen 3) box, for the Gemma 3 270M's matrices,

====================  ==================  =====================  ===========================
one decode step        torch (MKL/oneDNN)  MLX (CPU)              this module
====================  ==================  =====================  ===========================
float32, tied head     11-12 GB/s          3 GB/s                 23 GB/s (C kernel / BLAS)
bfloat16, tied head    14-16 GB/s          1.8 GB/s               20 GB/s (C kernel)
bfloat16, 18 layers    7-10 GB/s                                  18 GB/s (C kernel)
====================  ==================  =====================  ===========================

So the torch:cpu and mlx:cpu backends send one-row products (the decode step; prefill keeps the frameworks'
GEMMs) here. Same math as the frameworks: every output is one dot product accumulated in float32 (float64
for float64 weights), rounded once to the model dtype by the framework; only the summation order differs.

Three routes, best first:

* ``kernel``: a small C file compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``;
  ``-O3 -march=native``, OpenMP threads over output rows) into ``~/.cache/gemma-workbench/kernels`` (written
  atomically; keyed by source, flags and CPU). float32 and bfloat16 weights, float32 x and y.
* ``blas``: numpy's BLAS (OpenBLAS in the PyPI wheels) ``sgemv``/``dgemv`` on the arrays' own memory; float32
  and float64 only. Used where the kernel can't be built and for float64.
* the framework's own kernel otherwise (float16, no compiler).

``WORKBENCH_CPU_GEMV`` = ``auto`` (default), ``blas`` (no C kernel) or ``off`` (the frameworks' kernels
only) picks; :func:`describe` says what is in use (``workbench bench`` prints it).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* y[n] = sum_k W[n, k] * x[k]; W row-major [N, K]; accumulation in float32 */
void wb_gemv_bf16(const uint16_t *restrict W, const float *restrict x, float *restrict y,
                  int64_t N, int64_t K, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *w = W + n * K;
        float acc = 0.f;
        #pragma omp simd reduction(+:acc)
        for (int64_t k = 0; k < K; k++) acc += bf16_to_f32(w[k]) * x[k];
        y[n] = acc;
    }
}

void wb_gemv_f32(const float *restrict W, const float *restrict x, float *restrict y,
                 int64_t N, int64_t K, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *w = W + n * K;
        float acc = 0.f;
        #pragma omp simd reduction(+:acc)
        for (int64_t k = 0; k < K; k++) acc += w[k] * x[k];
        y[n] = acc;
    }
}
"""

_lock = threading.Lock()
_state: dict = {}


def mode() -> str:
    m = os.environ.get("WORKBENCH_CPU_GEMV", "auto").strip().lower()
    if m in ("torch", "mlx", "native", "framework", "0", "no", "none"):
        m = "off"
    if m not in ("auto", "blas", "off"):
        raise ValueError(f"WORKBENCH_CPU_GEMV={m!r}: expected auto, blas or off")
    return m


def _cpu_key() -> str:
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        flags += platform.processor()
    return flags


def _cache_dir() -> Path:
    base = os.environ.get("WORKBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gemma-workbench")
    return Path(base) / "kernels"


def _compiler() -> str | None:
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return c
    return None


def _build() -> tuple[ctypes.CDLL | None, str]:
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (set CC, or install gcc/clang)"
    attempts = [["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native", "-fopenmp-simd"], ["-O3"]]
    errors = []
    for flags in attempts:
        key = hashlib.sha256("\0".join([_SOURCE, cc, *flags, _cpu_key(), sys.platform]).encode()).hexdigest()[:16]
        out = _cache_dir() / f"gemv-{key}.so"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as td:
                src = Path(td) / "gemv.c"
                src.write_text(_SOURCE)
                tmp = Path(td) / "gemv.so"
                p = subprocess.run([cc, *flags, "-shared", "-fPIC", str(src), "-o", str(tmp)],
                                   capture_output=True, text=True, timeout=120)
                if p.returncode != 0:
                    errors.append(f"{cc} {' '.join(flags)}: {p.stderr.strip().splitlines()[-1:] or p.returncode}")
                    continue
                part = out.with_suffix(f".{os.getpid()}.part")
                shutil.copyfile(tmp, part)
                os.replace(part, out)          # atomic: another process never loads half a file
        try:
            lib = ctypes.CDLL(str(out))
        except OSError as e:
            errors.append(f"loading {out}: {e}")
            continue
        for name in ("wb_gemv_bf16", "wb_gemv_f32"):
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_int]
            fn.restype = None
        threads = "OpenMP" if "-fopenmp" in flags else "1 thread"
        return lib, f"C kernel ({cc} {' '.join(flags)}; {threads})"
    return None, "C kernel not built: " + "; ".join(errors)


def kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (see :func:`describe`)."""
    with _lock:
        if "lib" not in _state:
            if mode() != "auto":
                _state["lib"], _state["why"] = None, f"C kernel off (WORKBENCH_CPU_GEMV={mode()})"
            else:
                try:
                    _state["lib"], _state["why"] = _build()
                except Exception as e:  # a broken toolchain must not break the model: fall back
                    _state["lib"], _state["why"] = None, f"C kernel not built: {type(e).__name__}: {e}"
        return _state["lib"]


def threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def describe(dtype: str) -> str:
    """What one-row products of this dtype use on the CPU."""
    m = mode()
    if m == "off":
        return "framework kernels (WORKBENCH_CPU_GEMV=off)"
    lib = kernel()
    if lib is not None and dtype in ("float32", "bfloat16"):
        return _state["why"] + f", {threads()} threads"
    if dtype in ("float32", "float64"):
        return f"numpy BLAS gemv ({_blas_name()})" + ("" if lib is not None else f"; {_state['why']}")
    return "framework kernels" + ("" if lib is not None else f"; {_state['why']}")


def _blas_name() -> str:
    try:
        cfg = np.show_config(mode="dicts")
        return cfg["Build Dependencies"]["blas"]["name"]
    except Exception:
        return "BLAS"


def gemv_np(w: np.ndarray, x: np.ndarray, wdtype: str) -> np.ndarray | None:
    """y = w @ x for C-contiguous numpy views. ``w`` float32/float64, or uint16 holding bfloat16 bits
    (``wdtype='bfloat16'``); ``x`` float32 (float64 for float64 w). Returns float32/float64 y, or None where
    no route here applies (the caller uses its framework's kernel)."""
    m = mode()
    if m == "off":
        return None
    lib = kernel() if m == "auto" else None
    N, K = w.shape
    if lib is not None and wdtype in ("float32", "bfloat16"):
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty(N, dtype=np.float32)
        fn = lib.wb_gemv_bf16 if wdtype == "bfloat16" else lib.wb_gemv_f32
        fn(w.ctypes.data, x.ctypes.data, y.ctypes.data, N, K, threads())
        return y
    if wdtype in ("float32", "float64"):
        return np.dot(w, x.astype(w.dtype, copy=False))
    return None
