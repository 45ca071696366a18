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

So the torch:cpu and mlx:cpu backends send one-row products (the decode step) here; prefill keeps the
frameworks' GEMMs, except float32 on mlx:cpu, whose products go to numpy's BLAS sgemm (MLX's CPU matmul is
~20x slower there). Same math as the frameworks: every output is one dot product accumulated in float32 (float64
for float64 weights), rounded once to the model dtype by the framework; only the summation order differs.

Three routes, best first:

* ``kernel``: a small C file compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``;
  ``-O3 -march=native``, OpenMP threads over output rows) into ``~/.cache/gemma-workbench/kernels`` (written
  atomically; keyed by source, flags and CPU). float32 and bfloat16 weights, float32 x and y.
* ``blas``: numpy's BLAS (OpenBLAS in the PyPI wheels) ``sgemv``/``dgemv`` on the arrays' own memory; float32
  and float64 only. Used where the kernel can't be built and for float64.
* the framework's own kernel otherwise (float16, no compiler).

``WORKBENCH_CPU_GEMV`` = ``auto`` (default: all of the above on x86-64, the frameworks' kernels elsewhere —
only x86-64 was measured), ``kernel`` (the C kernel on any CPU), ``blas`` (no C kernel) or ``off`` (the
frameworks' kernels only) picks; :func:`describe` says what is in use (``workbench bench`` prints it).
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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {     /* round to nearest even, as torch and MLX do */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* dot products accumulated in float32. With AVX2+FMA: four independent 8-wide accumulators (one chain
   would be FMA-latency bound below the memory bandwidth); elsewhere the compiler's vectorisation. */
#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    return _mm_cvtss_f32(h);
}
#define BF8(v) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
static inline float dot_bf16(const uint16_t *w, const float *x, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256i r0 = _mm256_loadu_si256((const __m256i *)(w + k));
        __m256i r1 = _mm256_loadu_si256((const __m256i *)(w + k + 16));
        a0 = _mm256_fmadd_ps(BF8(_mm256_castsi256_si128(r0)), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(BF8(_mm256_extracti128_si256(r0, 1)), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(BF8(_mm256_castsi256_si128(r1)), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(BF8(_mm256_extracti128_si256(r1, 1)), _mm256_loadu_ps(x + k + 24), a3);
    }
    float acc = hsum8(a0, a1, a2, a3);
    for (; k < K; k++) acc += bf16_to_f32(w[k]) * x[k];
    return acc;
}
static inline float dot_f32(const float *w, const float *x, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    float acc = hsum8(a0, a1, a2, a3);
    for (; k < K; k++) acc += w[k] * x[k];
    return acc;
}
#else
static inline float dot_bf16(const uint16_t *w, const float *x, int64_t K) {
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int64_t k = 0; k < K; k++) acc += bf16_to_f32(w[k]) * x[k];
    return acc;
}
static inline float dot_f32(const float *w, const float *x, int64_t K) {
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int64_t k = 0; k < K; k++) acc += w[k] * x[k];
    return acc;
}
#endif

/* y[n] = sum_k W[n, k] * x[k]; W row-major [N, K] */
void wb_gemv_bf16(const uint16_t *restrict W, const float *restrict x, float *restrict y,
                  int64_t N, int64_t K, int nthreads) {
    #pragma omp parallel for if(nthreads > 1) num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) y[n] = dot_bf16(W + n * K, x, K);
}

/* the same with bfloat16 x and y (y rounded once from the float32 sum) */
void wb_gemv_bf16_io(const uint16_t *restrict W, const uint16_t *restrict x16, uint16_t *restrict y,
                     int64_t N, int64_t K, int nthreads) {
    float stackbuf[8192];
    float *x = K <= 8192 ? stackbuf : (float *)malloc(sizeof(float) * K);
    if (!x) return;
    for (int64_t k = 0; k < K; k++) x[k] = bf16_to_f32(x16[k]);
    #pragma omp parallel for if(nthreads > 1) num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) y[n] = f32_to_bf16(dot_bf16(W + n * K, x, K));
    if (x != stackbuf) free(x);
}

void wb_gemv_f32(const float *restrict W, const float *restrict x, float *restrict y,
                 int64_t N, int64_t K, int nthreads) {
    #pragma omp parallel for if(nthreads > 1) num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) y[n] = dot_f32(W + n * K, x, K);
}

/* RMSNorm of R rows of D: y = x * rsqrt(mean(x^2) + eps) * w (w float32, or NULL), in float32;
   x and y bfloat16 (is_bf16) or float32 */
void wb_rms_norm(const void *restrict xv, const float *restrict w, void *restrict yv, int64_t R, int64_t D,
                 float eps, int is_bf16) {
    for (int64_t r = 0; r < R; r++) {
        float ss = 0.f;
        if (is_bf16) {
            const uint16_t *x = (const uint16_t *)xv + r * D;
            #pragma omp simd reduction(+:ss)
            for (int64_t d = 0; d < D; d++) { float v = bf16_to_f32(x[d]); ss += v * v; }
            float inv = 1.0f / sqrtf(ss / (float)D + eps);
            uint16_t *y = (uint16_t *)yv + r * D;
            for (int64_t d = 0; d < D; d++) {
                float v = bf16_to_f32(x[d]) * inv;
                y[d] = f32_to_bf16(w ? v * w[d] : v);
            }
        } else {
            const float *x = (const float *)xv + r * D;
            #pragma omp simd reduction(+:ss)
            for (int64_t d = 0; d < D; d++) ss += x[d] * x[d];
            float inv = 1.0f / sqrtf(ss / (float)D + eps);
            float *y = (float *)yv + r * D;
            for (int64_t d = 0; d < D; d++) { float v = x[d] * inv; y[d] = w ? v * w[d] : v; }
        }
    }
}
"""

_lock = threading.Lock()
_state: dict = {}


# measured on x86-64 (AVX2); on Apple silicon / ARM the frameworks use Accelerate or NEON kernels that this
# module has not been measured against, so "auto" leaves them alone there ("kernel" forces it)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "x64")


def mode() -> str:
    """The effective route: ``auto`` (C kernel, else BLAS), ``blas`` or ``off``, from WORKBENCH_CPU_GEMV."""
    m = os.environ.get("WORKBENCH_CPU_GEMV", "auto").strip().lower()
    if m in ("torch", "mlx", "native", "framework", "0", "no", "none"):
        m = "off"
    if m not in ("auto", "kernel", "blas", "off"):
        raise ValueError(f"WORKBENCH_CPU_GEMV={m!r}: expected auto, kernel, blas or off")
    if m == "auto" and not _X86:
        return "off"
    return "auto" if m == "kernel" else m


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
                p = subprocess.run([cc, *flags, "-shared", "-fPIC", str(src), "-o", str(tmp), "-lm"],
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
        for name in ("wb_gemv_bf16", "wb_gemv_bf16_io", "wb_gemv_f32"):
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_int]
            fn.restype = None
        lib.wb_rms_norm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_float, ctypes.c_int]
        lib.wb_rms_norm.restype = None
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
    """Threads the kernel uses: the CPUs this process may run on (1 in a forked child)."""
    if "threads" not in _state:
        try:
            _state["threads"] = max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # macOS
            _state["threads"] = max(1, os.cpu_count() or 1)
    return _state["threads"]


def _threads() -> int:
    return _state.get("threads") or threads()


def _after_fork_in_child() -> None:
    # GNU libgomp's thread pool does not survive fork: a forked child that enters a parallel region of the
    # parent's pool hangs. Children run the kernel on one thread (no OpenMP team), as torch does.
    _state["threads"] = 1
    _state["forked"] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def describe(dtype: str) -> str:
    """What one-row products of this dtype use on the CPU."""
    m = mode()
    if m == "off":
        if not _X86 and os.environ.get("WORKBENCH_CPU_GEMV", "auto").strip().lower() == "auto":
            return f"framework kernels (not x86-64: {platform.machine()}; WORKBENCH_CPU_GEMV=kernel tries the C one)"
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


def gemv_ptr(kind: str, w: int, x: int, y: int, N: int, K: int) -> None:
    """Raw-pointer call for callers that already checked :func:`kernel` (the torch backend): ``kind`` is
    ``bf16_io`` (bfloat16 W, x, y), ``bf16`` (bfloat16 W, float32 x and y) or ``f32``."""
    getattr(_state["lib"], "wb_gemv_" + kind)(w, x, y, N, K, _threads())


def rms_norm_ptr(x: int, w: int | None, y: int, R: int, D: int, eps: float, is_bf16: bool) -> None:
    _state["lib"].wb_rms_norm(x, w, y, R, D, eps, int(is_bf16))


def gemv_np(w: np.ndarray, x: np.ndarray, wdtype: str) -> np.ndarray | None:
    """y = w @ x for C-contiguous numpy views. ``w`` float32/float64, or 16-bit integers holding bfloat16
    bits (``wdtype='bfloat16'``). ``x`` float32/float64 gives a float32/float64 y; for bfloat16, ``x`` may
    also be bfloat16 bits (16-bit integers), and then y is bfloat16 bits too (int16), rounded once from the
    float32 sum. Returns None where no route here applies (the caller uses its framework's kernel)."""
    m = mode()
    if m == "off":
        return None
    lib = kernel() if m == "auto" else None
    N, K = w.shape
    if lib is not None and wdtype in ("float32", "bfloat16"):
        if wdtype == "bfloat16" and x.dtype.itemsize == 2:
            x = np.ascontiguousarray(x)
            y = np.empty(N, dtype=np.int16)
            lib.wb_gemv_bf16_io(w.ctypes.data, x.ctypes.data, y.ctypes.data, N, K, threads())
            return y
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty(N, dtype=np.float32)
        fn = lib.wb_gemv_bf16 if wdtype == "bfloat16" else lib.wb_gemv_f32
        fn(w.ctypes.data, x.ctypes.data, y.ctypes.data, N, K, threads())
        return y
    if wdtype in ("float32", "float64") and x.dtype.kind == "f":
        return np.dot(w, x.astype(w.dtype, copy=False))
    return None
