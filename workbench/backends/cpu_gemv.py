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

GGUF blocks kept quantised (``wb.load(gguf, quant="keep")``, :mod:`workbench.backends.quant`): ``wb_q_gemv``
(Q8_0, Q5_0, Q4_0, Q4_K, Q6_K; 8-bit activations as llama.cpp's CPU kernels — with AVX-512 VNNI where the CPU has
it, bit-identical to the AVX2 code — or exact float32 x), ``wb_q_gemm`` (a short prompt's few rows) and
``wb_q_dequant``, on a small pthread pool whose chunks are claimed by CAS (OpenMP's barrier waits for a
descheduled thread: 5x slower decode on this shared box at load 6). The same library holds the fused decode step
of :mod:`workbench.backends.cpu_step` (source: :mod:`workbench.backends.cpu_step_c`).

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

from . import cpu_step_c

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

/* one float32 row (y may be x): the float32 case of wb_rms_norm, and the fused decode step's norms */
static inline void rms_row_f32(const float *x, const float *w, float *y, int64_t D, float eps) {
    float ss = 0.f;
    #pragma omp simd reduction(+:ss)
    for (int64_t d = 0; d < D; d++) ss += x[d] * x[d];
    float inv = 1.0f / sqrtf(ss / (float)D + eps);
    for (int64_t d = 0; d < D; d++) { float v = x[d] * inv; y[d] = w ? v * w[d] : v; }
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
            rms_row_f32((const float *)xv + r * D, w, (float *)yv + r * D, D, eps);
        }
    }
}
/* ---------------------------------------------------------------------------------------------------------
   GGUF block-quantised weights (Q8_0, Q5_0, Q4_K, Q6_K), used in their own blocks: no dequantised copy.

   Block layouts are ggml's (ggml-common.h). The "q8" products follow llama.cpp's CPU kernels
   (ggml-cpu/arch/x86/quants.c, MIT licence, (c) the ggml authors): x is quantised once per product to 8-bit
   blocks (Q8_0-like blocks of 32 for Q8_0/Q5_0 weights, Q8_K super-blocks of 256 with 16-element sums for
   the k-quants) and each block's dot product is integer (_mm256_maddubs_epi16 / _mm256_madd_epi16), scaled
   once per block in float32. The "exact" products keep x in float32 and dequantise each weight block into a
   small buffer (L1) before a float32 dot product: the only error then is the weights' own quantisation.
   --------------------------------------------------------------------------------------------------------- */
enum { WQ_Q4_0 = 2, WQ_Q5_0 = 6, WQ_Q8_0 = 8, WQ_Q4_K = 12, WQ_Q6_K = 14 };

static inline float h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        if (m == 0) u = s;
        else { e = 113; while (!(m & 0x400)) { m <<= 1; e--; } u = s | (e << 23) | ((m & 0x3ff) << 13); }
    } else if (e == 31) u = s | 0x7f800000u | (m << 13);
    else u = s | ((e + 112) << 23) | (m << 13);
    float f; memcpy(&f, &u, 4); return f;
#endif
}
static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* bytes per block and elements per block */
static int qblock(int t, int *elems) {
    switch (t) {
        case WQ_Q4_0: *elems = 32; return 18;
        case WQ_Q5_0: *elems = 32; return 22;
        case WQ_Q8_0: *elems = 32; return 34;
        case WQ_Q4_K: *elems = 256; return 144;
        case WQ_Q6_K: *elems = 256; return 210;
    }
    *elems = 0; return 0;
}

/* ---- dequantisation of one block (ggml's dequantize_row_*) ---- */
static inline void deq_q8_0(const uint8_t *b, float *y) {
    float d = h2f(rd16(b)); const int8_t *q = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = d * q[j];
}
static inline void deq_q4_0(const uint8_t *b, float *y) {
    float d = h2f(rd16(b)); const uint8_t *q = b + 2;
    for (int j = 0; j < 16; j++) { y[j] = d * ((q[j] & 15) - 8); y[j + 16] = d * ((q[j] >> 4) - 8); }
}
static inline void deq_q5_0(const uint8_t *b, float *y) {
    float d = h2f(rd16(b)); uint32_t qh; memcpy(&qh, b + 2, 4); const uint8_t *q = b + 6;
    for (int j = 0; j < 16; j++) {
        int x0 = (q[j] & 15) | (((qh >> j) & 1) << 4), x1 = (q[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (x0 - 16); y[j + 16] = d * (x1 - 16);
    }
}
static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) { *d = q[j] & 63; *m = q[j + 4] & 63; }
    else { *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}
static inline void deq_q4_k(const uint8_t *b, float *y) {
    float d = h2f(rd16(b)), dmin = h2f(rd16(b + 2)); const uint8_t *sc = b + 4, *q = b + 16;
    int is = 0; uint8_t s, m;
    for (int j = 0; j < 256; j += 64) {
        scale_min_k4(is, sc, &s, &m); float d1 = d * s, m1 = dmin * m;
        scale_min_k4(is + 1, sc, &s, &m); float d2 = d * s, m2 = dmin * m;
        for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
        q += 32; is += 2;
    }
}
static inline void deq_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128; const int8_t *sc = (const int8_t *)(b + 192); float d = h2f(rd16(b + 208));
    for (int n = 0; n < 256; n += 128) {
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is] * q1; y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3; y[l + 96] = d * sc[is + 6] * q4;
        }
        y += 128; ql += 64; qh += 32; sc += 8;
    }
}
static inline void deq_block(int t, const uint8_t *b, float *y) {
    switch (t) {
        case WQ_Q8_0: deq_q8_0(b, y); break;
        case WQ_Q4_0: deq_q4_0(b, y); break;
        case WQ_Q5_0: deq_q5_0(b, y); break;
        case WQ_Q4_K: deq_q4_k(b, y); break;
        case WQ_Q6_K: deq_q6_k(b, y); break;
    }
}

/* rows [R] of a quantised matrix (row_bytes each, K elements) -> float32 out [R, K] */
/* ---- exact products: float32 x, each weight block dequantised into a buffer, float32 dot ---- */
static float dot_exact(int t, const uint8_t *w, int bs, int qk, int64_t nb, const float *x) {
    float buf[256] __attribute__((aligned(32)));
    float acc = 0.f;
    for (int64_t i = 0; i < nb; i++) {
        deq_block(t, w + i * bs, buf);
        acc += dot_f32(buf, x + i * qk, qk);
    }
    return acc;
}

/* ---- a small thread pool for the quantised products (pthreads, not OpenMP). OpenMP's barrier waits for every
   thread of the team, so on a shared, busy CPU a descheduled thread stalls each product by a scheduler slice
   (measured here: 5x slower decode at load 6 on 2 cores). Here chunks of rows are claimed with a CAS on
   (generation, next chunk): whichever thread runs does the work, and the caller waits only for chunks a helper
   has actually claimed. Helpers spin ~100 us for the next product (decode issues them back to back), then sleep. */
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

typedef void (*wq_chunk_fn)(const void *job, int64_t c);
static struct {
    pthread_mutex_t mu; pthread_cond_t cv;
    _Atomic uint64_t ctr;                 /* generation << 32 | next chunk */
    _Atomic int64_t done; _Atomic int sleeping;
    wq_chunk_fn fn; const void *job; int64_t nchunks;
    int nhelpers; int started;
} wq = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER };

static double wq_spin_us = 100.0;       /* helpers' spin before sleeping (wb_q_set_spin) */
void wb_q_set_spin(double us) { wq_spin_us = us; }
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}
static double now_us(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }

/* claim and run chunks of generation g until none is left */
static void wq_drain(uint32_t g) {
    for (;;) {
        uint64_t v = atomic_load_explicit(&wq.ctr, memory_order_acquire);
        if ((uint32_t)(v >> 32) != g || (int64_t)(uint32_t)v >= wq.nchunks) return;
        if (!atomic_compare_exchange_weak_explicit(&wq.ctr, &v, v + 1, memory_order_acq_rel, memory_order_relaxed))
            continue;
        wq.fn(wq.job, (int64_t)(uint32_t)v);          /* params stable: the caller waits for this chunk */
        atomic_fetch_add_explicit(&wq.done, 1, memory_order_release);
    }
}
static void *wq_helper(void *arg) {
    (void)arg;
    uint32_t seen = (uint32_t)(atomic_load(&wq.ctr) >> 32);
    for (;;) {
        double t0 = now_us(); int k = 0;
        uint32_t g;
        while ((g = (uint32_t)(atomic_load_explicit(&wq.ctr, memory_order_acquire) >> 32)) == seen) {
            cpu_relax();
            if (++k % 256 == 0 && now_us() - t0 > wq_spin_us) {
                pthread_mutex_lock(&wq.mu);
                atomic_fetch_add(&wq.sleeping, 1);
                while ((uint32_t)(atomic_load(&wq.ctr) >> 32) == seen) pthread_cond_wait(&wq.cv, &wq.mu);
                atomic_fetch_sub(&wq.sleeping, 1);
                pthread_mutex_unlock(&wq.mu);
                t0 = now_us();
            }
        }
        seen = g;
        wq_drain(g);
    }
    return NULL;
}
/* run fn(job, c) for c in [0, nchunks) on the caller and nthreads - 1 helpers */
static pthread_mutex_t wq_caller = PTHREAD_MUTEX_INITIALIZER;   /* one product at a time uses the helpers */
static void wq_run(wq_chunk_fn fn, const void *job, int64_t nchunks, int nthreads) {
    if (nthreads <= 1 || nchunks <= 1 || pthread_mutex_trylock(&wq_caller) != 0) {
        for (int64_t c = 0; c < nchunks; c++) fn(job, c);
        return;
    }
    if (!wq.started) {
        int n = nthreads - 1;
        for (int i = 0; i < n; i++) {
            pthread_t t;
            if (pthread_create(&t, NULL, wq_helper, NULL) == 0) { pthread_detach(t); wq.nhelpers++; }
        }
        wq.started = 1;
    }
    uint32_t g = (uint32_t)(atomic_load(&wq.ctr) >> 32);
    atomic_store(&wq.ctr, ((uint64_t)g << 32) | 0x7fffffffu);   /* nothing of the last product can be claimed */
    wq.fn = fn; wq.job = job; wq.nchunks = nchunks;
    atomic_store(&wq.done, 0);
    g++;
    atomic_store(&wq.ctr, (uint64_t)g << 32);                   /* publish (seq_cst: then read `sleeping`) */
    if (atomic_load(&wq.sleeping)) { pthread_mutex_lock(&wq.mu); pthread_cond_broadcast(&wq.cv); pthread_mutex_unlock(&wq.mu); }
    wq_drain(g);
    while (atomic_load_explicit(&wq.done, memory_order_acquire) < nchunks) cpu_relax();
    pthread_mutex_unlock(&wq_caller);
}

/* ---- 8-bit activations ---- */
typedef struct { float d; int8_t qs[32]; } xq8_32;                     /* per 32: x ~ d * qs */
typedef struct { float d; int8_t qs[256]; int16_t bsums[16]; } xq8_k;  /* per 256, and the sums per 16 */

static inline int nearest(float f) { return (int)lrintf(f); }

static void quant_x32(const float *x, xq8_32 *q, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float *v = x + 32 * i; float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
        float d = amax / 127.f, id = d ? 1.f / d : 0.f;
        q[i].d = d;
        for (int j = 0; j < 32; j++) q[i].qs[j] = (int8_t)nearest(v[j] * id);
    }
}
static void quant_xk(const float *x, xq8_k *q, int64_t nb) {   /* ggml's quantize_row_q8_K */
    for (int64_t i = 0; i < nb; i++) {
        const float *v = x + 256 * i; float amax = 0.f, mx = 0.f;
        for (int j = 0; j < 256; j++) { float a = fabsf(v[j]); if (a > amax) { amax = a; mx = v[j]; } }
        if (!amax) { q[i].d = 0.f; memset(q[i].qs, 0, 256); memset(q[i].bsums, 0, 32); continue; }
        float is = -127.f / mx;
        for (int j = 0; j < 256; j++) { int v8 = nearest(is * v[j]); q[i].qs[j] = (int8_t)(v8 > 127 ? 127 : v8); }
        for (int j = 0; j < 16; j++) { int s = 0; for (int l = 0; l < 16; l++) s += q[i].qs[16 * j + l]; q[i].bsums[j] = (int16_t)s; }
        q[i].d = 1.f / is;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum_f8(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
/* AVX-512 VNNI (+VL, BW): vpdpbusd and byte masks on 256-bit registers (the same integer sums, one instruction) */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define WQ_VNNI 1
#else
#define WQ_VNNI 0
#endif
/* 32 signed x 32 signed bytes -> 8 float sums of 4 products (llama.cpp's mul_sum_i8_pairs_float) */
static inline __m256 mul_sum_i8(__m256i a, __m256i b) {
    __m256i ax = _mm256_sign_epi8(a, a), sy = _mm256_sign_epi8(b, a);
#if WQ_VNNI
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy));
#else
    __m256i dot = _mm256_maddubs_epi16(ax, sy);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)));
#endif
}
static inline __m256i bytes_from_bits_32(const uint8_t *x) {
    uint32_t x32; memcpy(&x32, x, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}
static inline __m256i bytes_from_nibbles_32(const uint8_t *p) {
    __m128i lo = _mm_loadu_si128((const __m128i *)p);
    __m256i b = _mm256_insertf128_si256(_mm256_castsi128_si256(lo), _mm_srli_epi16(lo, 4), 1);
    return _mm256_and_si256(b, _mm256_set1_epi8(0xF));
}
static float dot_q8_0(const uint8_t *w, const xq8_32 *y, int64_t nb) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    int64_t i = 0;
    for (; i + 1 < nb; i += 2) {
        const uint8_t *b0 = w + 34 * i, *b1 = b0 + 34;
        __m256 q0 = mul_sum_i8(_mm256_loadu_si256((const __m256i *)(b0 + 2)), _mm256_loadu_si256((const __m256i *)y[i].qs));
        __m256 q1 = mul_sum_i8(_mm256_loadu_si256((const __m256i *)(b1 + 2)), _mm256_loadu_si256((const __m256i *)y[i + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(rd16(b0)) * y[i].d), q0, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(rd16(b1)) * y[i + 1].d), q1, acc1);
    }
    for (; i < nb; i++) {
        const uint8_t *b0 = w + 34 * i;
        __m256 q0 = mul_sum_i8(_mm256_loadu_si256((const __m256i *)(b0 + 2)), _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(rd16(b0)) * y[i].d), q0, acc0);
    }
    return hsum_f8(_mm256_add_ps(acc0, acc1));
}
static float dot_q5_0(const uint8_t *w, const xq8_32 *y, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
#if WQ_VNNI
    const __m256i m4 = _mm256_set1_epi8(0xF), s16 = _mm256_set1_epi8(16), sh = _mm256_set_epi64x(4, 4, 0, 0);
#endif
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = w + 22 * i;
#if WQ_VNNI     /* the nibbles: 16 bytes in both halves, the upper half shifted by 4; bit 4 from a byte mask */
        uint32_t qh; memcpy(&qh, b + 2, 4);
        __m256i nib = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(b + 6)));
        nib = _mm256_and_si256(_mm256_srlv_epi64(nib, sh), m4);
        __m256i qx = _mm256_mask_mov_epi8(_mm256_sub_epi8(nib, s16), _cvtu32_mask32(qh), nib);
#else
        __m256i qx = bytes_from_nibbles_32(b + 6);
        __m256i hi = _mm256_andnot_si256(bytes_from_bits_32(b + 2), _mm256_set1_epi8((char)0xF0));
        qx = _mm256_or_si256(qx, hi);          /* nibble | bit 4 << 4, minus 16, as signed bytes */
#endif
        __m256 q = mul_sum_i8(qx, _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(rd16(b)) * y[i].d), q, acc);
    }
    return hsum_f8(acc);
}
static float dot_q4_0(const uint8_t *w, const xq8_32 *y, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = w + 18 * i;
        __m256i qx = _mm256_sub_epi8(bytes_from_nibbles_32(b + 2), _mm256_set1_epi8(8));
        __m256 q = mul_sum_i8(qx, _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(rd16(b)) * y[i].d), q, acc);
    }
    return hsum_f8(acc);
}
static float dot_q4_k(const uint8_t *w, const xq8_k *y, int64_t nb) {
    const uint32_t km1 = 0x3f3f3f3f, km2 = 0x0f0f0f0f, km3 = 0x03030303;
    const __m256i m4 = _mm256_set1_epi8(0xF);
    __m256 acc = _mm256_setzero_ps();
    __m128 acc_m = _mm_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = w + 144 * i;
        const float d = y[i].d * h2f(rd16(b)), dmin = -y[i].d * h2f(rd16(b + 2));
        uint32_t u[4]; memcpy(u, b + 4, 12);
        u[3] = ((u[2] >> 4) & km2) | (((u[1] >> 6) & km3) << 4);
        const uint32_t ua = u[1] & km1;
        u[1] = (u[2] & km2) | (((u[0] >> 6) & km3) << 4);
        u[2] = ua;
        u[0] &= km1;
        const __m256i ms = _mm256_cvtepu8_epi16(_mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]));
        const __m256i q8sums = _mm256_loadu_si256((const __m256i *)y[i].bsums);
        const __m128i q8s = _mm_hadd_epi16(_mm256_extracti128_si256(q8sums, 0), _mm256_extracti128_si256(q8sums, 1));
        const __m128i prod = _mm_madd_epi16(_mm256_extracti128_si256(ms, 1), q8s);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);
        const __m128i sc128 = _mm256_extracti128_si256(ms, 0);
        const __m256i scales = _mm256_set_m128i(sc128, sc128);
        const uint8_t *q4 = b + 16; const int8_t *q8 = y[i].qs;
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i sl = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)(((4 * j + 1) << 8) | (4 * j))));
            const __m256i sh = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)(((4 * j + 3) << 8) | (4 * j + 2))));
            const __m256i bits = _mm256_loadu_si256((const __m256i *)q4); q4 += 32;
            const __m256i ql = _mm256_and_si256(bits, m4), qh = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            __m256i pl = _mm256_maddubs_epi16(ql, _mm256_loadu_si256((const __m256i *)q8)); q8 += 32;
            __m256i ph = _mm256_maddubs_epi16(qh, _mm256_loadu_si256((const __m256i *)q8)); q8 += 32;
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(_mm256_madd_epi16(sl, pl), _mm256_madd_epi16(sh, ph)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));
    return hsum_f8(acc) + _mm_cvtss_f32(acc_m);
}
static float dot_q6_k(const uint8_t *w, const xq8_k *y, int64_t nb) {
    const __m256i m4 = _mm256_set1_epi8(0xF), m2 = _mm256_set1_epi8(3), m32s = _mm256_set1_epi8(32);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = w + 210 * i;
        const float d = y[i].d * h2f(rd16(b + 208));
        const uint8_t *q4 = b, *qh = b + 128; const int8_t *q8 = y[i].qs;
        const __m128i scales = _mm_loadu_si128((const __m128i *)(b + 192));
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 2; j++) {
            __m128i s[4];
            for (int k = 0; k < 4; k++) {
                int is = 4 * j + k;   /* bytes 2 is (x8), 2 is + 1 (x8) */
                s[k] = _mm_shuffle_epi8(scales, _mm_set_epi64x(0x0101010101010101LL * (2 * is + 1), 0x0101010101010101LL * (2 * is)));
            }
            const __m256i b1 = _mm256_loadu_si256((const __m256i *)q4); q4 += 32;
            const __m256i b2 = _mm256_loadu_si256((const __m256i *)q4); q4 += 32;
            const __m256i bh = _mm256_loadu_si256((const __m256i *)qh); qh += 32;
            const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(bh, m2), 4);
            const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 2), m2), 4);
            const __m256i h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 4), m2), 4);
            const __m256i h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 6), m2), 4);
            const __m256i x0 = _mm256_or_si256(_mm256_and_si256(b1, m4), h0);
            const __m256i x1 = _mm256_or_si256(_mm256_and_si256(b2, m4), h1);
            const __m256i x2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m4), h2);
            const __m256i x3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b2, 4), m4), h3);
            const __m256i y0 = _mm256_loadu_si256((const __m256i *)q8), y1 = _mm256_loadu_si256((const __m256i *)(q8 + 32));
            const __m256i y2 = _mm256_loadu_si256((const __m256i *)(q8 + 64)), y3 = _mm256_loadu_si256((const __m256i *)(q8 + 96));
            q8 += 128;
            __m256i p0 = _mm256_sub_epi16(_mm256_maddubs_epi16(x0, y0), _mm256_maddubs_epi16(m32s, y0));
            __m256i p1 = _mm256_sub_epi16(_mm256_maddubs_epi16(x1, y1), _mm256_maddubs_epi16(m32s, y1));
            __m256i p2 = _mm256_sub_epi16(_mm256_maddubs_epi16(x2, y2), _mm256_maddubs_epi16(m32s, y2));
            __m256i p3 = _mm256_sub_epi16(_mm256_maddubs_epi16(x3, y3), _mm256_maddubs_epi16(m32s, y3));
            p0 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(s[0]), p0);
            p1 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(s[1]), p1);
            p2 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(s[2]), p2);
            p3 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(s[3]), p3);
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(_mm256_add_epi32(p0, p1), _mm256_add_epi32(p2, p3)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_f8(acc);
}
#define WQ_SIMD 1
#else
/* portable: the same 8-bit x, the weight block dequantised (same products up to float32 rounding) */
static float dot_q_generic(int t, const uint8_t *w, int bs, int qk, const void *y, int64_t nb) {
    float buf[256]; float acc = 0.f;
    for (int64_t i = 0; i < nb; i++) {
        const int8_t *qs; float d;
        if (qk == 32) { const xq8_32 *b = (const xq8_32 *)y + i; qs = b->qs; d = b->d; }
        else { const xq8_k *b = (const xq8_k *)y + i; qs = b->qs; d = b->d; }
        deq_block(t, w + i * bs, buf);
        float s = 0.f;
        for (int j = 0; j < qk; j++) s += buf[j] * qs[j];
        acc += s * d;
    }
    return acc;
}
#define WQ_SIMD 0
#endif

int wb_q_simd(void) { return WQ_SIMD; }
#ifndef WQ_VNNI
#define WQ_VNNI 0
#endif
int wb_q_vnni(void) { return WQ_VNNI; }

typedef struct {
    int t, bs, qk, act8; const uint8_t *W; int64_t row_bytes, N, nb, rows; const float *x; const void *xq; float *y;
} wq_job;

/* one row's product: t a ggml type (0: float32 row of K values), nb blocks of qk, x float32 (exact) or xq its
   8-bit blocks (act8) of the type's block size. Shared by wb_q_gemv and the fused decode step (cpu_step). */
static inline float wq_row_dot(int t, const uint8_t *w, int bs, int qk, int64_t nb, int64_t K, int act8,
                               const float *x, const void *xq) {
    if (t == 0) return dot_f32((const float *)w, x, K);
    if (!act8) return dot_exact(t, w, bs, qk, nb, x);
#if WQ_SIMD
    switch (t) {
        case WQ_Q8_0: return dot_q8_0(w, (const xq8_32 *)xq, nb);
        case WQ_Q5_0: return dot_q5_0(w, (const xq8_32 *)xq, nb);
        case WQ_Q4_0: return dot_q4_0(w, (const xq8_32 *)xq, nb);
        case WQ_Q4_K: return dot_q4_k(w, (const xq8_k *)xq, nb);
        case WQ_Q6_K: return dot_q6_k(w, (const xq8_k *)xq, nb);
    }
    return 0.f;
#else
    (void)K;
    return dot_q_generic(t, w, bs, qk, xq, nb);
#endif
}

static void wq_gemv_chunk(const void *jv, int64_t c) {
    const wq_job *j = (const wq_job *)jv;
    int64_t n0 = c * j->rows, n1 = n0 + j->rows < j->N ? n0 + j->rows : j->N;
    for (int64_t n = n0; n < n1; n++)
        j->y[n] = wq_row_dot(j->t, j->W + n * j->row_bytes, j->bs, j->qk, j->nb, j->nb * j->qk, j->act8, j->x, j->xq);
}

static void wq_dequant_chunk(const void *jv, int64_t c) {
    const wq_job *j = (const wq_job *)jv;
    int64_t r0 = c * j->rows, r1 = r0 + j->rows < j->N ? r0 + j->rows : j->N;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t i = 0; i < j->nb; i++) deq_block(j->t, j->W + r * j->row_bytes + i * j->bs, j->y + (r * j->nb + i) * j->qk);
}

#define WQ_GEMM_MAX 16       /* rows of x wb_q_gemm takes (more: chunks dequantised for torch's GEMM) */

/* rows per chunk: ~32 KiB of weights (at least 8 rows); a product under 64 KiB runs on the caller alone */
static int64_t wq_rows(int64_t N, int64_t row_bytes, int *nthreads) {
    if (N * row_bytes < 65536) *nthreads = 1;
    int64_t r = 32768 / (row_bytes ? row_bytes : 1);
    return r < 8 ? 8 : r;
}

/* y[n] = sum_k W[n, k] x[k] for a quantised W [N, K] (row_bytes per row); act8: x quantised to 8 bits
   (llama.cpp's way) or kept float32 (exact). Returns 0, or -1 for an unsupported type / shape. */
int wb_q_gemv(int t, const uint8_t *restrict W, int64_t row_bytes, const float *restrict x, float *restrict y,
              int64_t N, int64_t K, int act8, int nthreads) {
    int qk, bs = qblock(t, &qk);
    if (!bs || K % qk || row_bytes != (K / qk) * bs) return -1;
    wq_job j = { t, bs, qk, act8, W, row_bytes, N, K / qk, 0, x, NULL, y };
    void *xq = NULL;
    if (act8) {
        xq = malloc(qk == 32 ? sizeof(xq8_32) * j.nb : sizeof(xq8_k) * j.nb);
        if (!xq) return -2;
        if (qk == 32) quant_x32(x, (xq8_32 *)xq, j.nb); else quant_xk(x, (xq8_k *)xq, j.nb);
        j.xq = xq;
    }
    j.rows = wq_rows(N, row_bytes, &nthreads);
    wq_run(wq_gemv_chunk, &j, (N + j.rows - 1) / j.rows, nthreads);
    free(xq);
    return 0;
}

/* a few rows of x at once (prefill of a short prompt): Y[m, n] = sum_k W[n, k] X[m, k] for m < M, each weight block
   dequantised once into L1 and dotted with every row of X in float32 (per row the same sums as the exact one-row
   product); ldy: Y's row stride */
typedef struct { const wq_job *j; const float *X; float *Y; int64_t M, ldy; } wq_gemm_job;
static void wq_gemm_chunk(const void *jv, int64_t c) {
    const wq_gemm_job *g = (const wq_gemm_job *)jv;
    const wq_job *j = g->j;
    int64_t n0 = c * j->rows, n1 = n0 + j->rows < j->N ? n0 + j->rows : j->N;
    const int64_t K = j->nb * j->qk;
    float buf[256] __attribute__((aligned(32)));
    float acc[WQ_GEMM_MAX];
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t m = 0; m < g->M; m++) acc[m] = 0.f;
        const uint8_t *w = j->W + n * j->row_bytes;
        for (int64_t i = 0; i < j->nb; i++) {
            deq_block(j->t, w + i * j->bs, buf);
            for (int64_t m = 0; m < g->M; m++) acc[m] += dot_f32(buf, g->X + m * K + i * j->qk, j->qk);
        }
        for (int64_t m = 0; m < g->M; m++) g->Y[m * g->ldy + n] = acc[m];
    }
}
int wb_q_gemm(int t, const uint8_t *restrict W, int64_t row_bytes, const float *restrict X, float *restrict Y,
              int64_t N, int64_t K, int64_t M, int64_t ldy, int nthreads) {
    int qk, bs = qblock(t, &qk);
    if (!bs || K % qk || row_bytes != (K / qk) * bs) return -1;
    if (M < 1 || M > WQ_GEMM_MAX) return -2;
    wq_job j = { t, bs, qk, 0, W, row_bytes, N, K / qk, 0, NULL, NULL, NULL };
    j.rows = wq_rows(N, row_bytes, &nthreads);
    wq_gemm_job g = { &j, X, Y, M, ldy };
    wq_run(wq_gemm_chunk, &g, (N + j.rows - 1) / j.rows, nthreads);
    return 0;
}

/* rows [R] of a quantised matrix (row_bytes each, K elements) -> float32 out [R, K] */
int wb_q_dequant(int t, const uint8_t *restrict W, int64_t row_bytes, float *restrict out, int64_t R, int64_t K,
                 int nthreads) {
    int qk, bs = qblock(t, &qk);
    if (!bs || K % qk || row_bytes != (K / qk) * bs) return -1;
    wq_job j = { t, bs, qk, 0, W, row_bytes, R, K / qk, 0, NULL, NULL, out };
    j.rows = wq_rows(R, row_bytes, &nthreads);
    wq_run(wq_dequant_chunk, &j, (R + j.rows - 1) / j.rows, nthreads);
    return 0;
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
    source = _SOURCE + cpu_step_c.SOURCE      # the fused kept-quantised decode step (cpu_step.py) beside the products
    attempts = [["-O3", "-march=native", "-fopenmp", "-pthread"], ["-O3", "-march=native", "-fopenmp-simd", "-pthread"],
                ["-O3", "-pthread"]]
    errors = []
    for flags in attempts:
        key = hashlib.sha256("\0".join([source, cc, *flags, _cpu_key(), sys.platform]).encode()).hexdigest()[:16]
        out = _cache_dir() / f"gemv-{key}.so"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as td:
                src = Path(td) / "gemv.c"
                src.write_text(source)
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
        lib.wb_q_gemv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        lib.wb_q_gemv.restype = ctypes.c_int
        lib.wb_q_gemm.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        lib.wb_q_gemm.restype = ctypes.c_int
        lib.wb_q_dequant.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_int]
        lib.wb_q_dequant.restype = ctypes.c_int
        lib.wb_q_simd.restype = ctypes.c_int
        lib.wb_q_vnni.restype = ctypes.c_int
        lib.wb_q_set_spin.argtypes = [ctypes.c_double]
        lib.wb_q_set_spin.restype = None
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.wb_qstep_new.argtypes = [vp, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(i64)]
        lib.wb_qstep_new.restype = vp
        lib.wb_qstep_free.argtypes = [vp]
        lib.wb_qstep_free.restype = None
        lib.wb_qstep.argtypes = [vp, vp, vp, vp, vp, vp]
        lib.wb_qstep.restype = ctypes.c_int
        lib.wb_qstep_set_threads.argtypes = [vp, i64]
        lib.wb_qstep_set_threads.restype = None
        lib.wb_qstep_threads.argtypes = [vp, vp]
        lib.wb_qstep_threads.restype = i64
        lib.wb_qstep_profile.argtypes = [vp, i64, vp]
        lib.wb_qstep_profile.restype = None
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
