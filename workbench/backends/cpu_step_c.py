"""C source of the fused kept-quantised decode step (:mod:`workbench.backends.cpu_step` drives it).

Appended to :mod:`cpu_gemv`'s kernel source and compiled into the same library, so it uses that file's block dot
products (``wq_row_dot``: the same products ``wb_q_gemv`` computes), its 8-bit activation quantisers, its RMSNorm
row and its thread pool (``wq_run``: chunks claimed by CAS, helpers that spin between products). This module
holds only text (no imports), so the kernel's build needs nothing above it.

One ``wb_qstep`` call runs a whole decode step of a Gemma 1-3 text model — embedding row, per layer: RMSNorm,
q/k/v product, q/k norms, RoPE, the K/V cache write, attention over the cache (sliding window, GQA, softcap),
o product, post-norm and residual, pre-FF norm, gate/up product, GELU (tanh) x up, down product, post-norm and
residual; then the final norm, the head, the final softcap and (greedy) the argmax — with the pool's helpers
kept busy from one product to the next (one publish per product, no Python, no torch dispatch in between).
"""

SOURCE = r"""
/* ---------------------------------------------------------------------------------------------------------
   The fused kept-quantised decode step (workbench/backends/cpu_step.py). Matrices are lists of row segments
   (a ggml type, 0 = float32 rows); the model and layers are described by the structs below (mirrored by ctypes
   in cpu_step.py: every integer int64, every scalar double). Numerics are the eager route's: the same block dot
   products and activation quantisation per product, RMSNorm rows as wb_rms_norm, float32 everywhere else.
   --------------------------------------------------------------------------------------------------------- */
#define WQS_MAXSEG 4
typedef struct { int64_t t; const uint8_t *w; int64_t row_bytes, rows; } wqs_seg;
typedef struct { int64_t nseg, N, K; wqs_seg seg[WQS_MAXSEG]; } wqs_mat;
typedef struct {
    wqs_mat qkv, o, gate_up, down;
    const float *input_norm, *post_attn_norm, *pre_ff_norm, *post_ff_norm, *q_norm, *k_norm;
    float *k, *v; int64_t *kpos; const float *cos, *sin;
    int64_t hd, kvh, F, window, slots, ring, rope_len;
    double scale;
} wqs_layer;
typedef struct {
    int64_t L, D, H, V, act8, nthreads;
    double eps, embed_scale, attn_softcap, final_softcap;
    wqs_mat embed, head;
    const float *final_norm;
    const wqs_layer *layers;
} wqs_model;

typedef struct {
    wqs_model m;
    wqs_layer *layers;
    int64_t maxN, maxK, maxS, nchunk_max;
    float *x, *h, *y, *z, *a, *act, *sc, *pmax, *pm, *pl, *pz;
    int64_t *pidx;
    xq8_32 *x32; xq8_k *xk;
    double t_prod, t_attn, t_other, t_head;   /* profile (wb_qstep_profile) */
    /* threads per step, chosen from measured step times: on a shared CPU a helper that is often descheduled
       makes two threads slower than one (measured here under another job's load: 22.7 vs 19.3 ms/step), so
       the step keeps a moving average of its time with 1 and with nthreads threads, runs the faster, and
       tries the other now and then (every 16th step, every 64th when one is ahead by more than 15 %) */
    int nt;                                  /* threads of this step */
    double ema[2]; int64_t steps, ntsteps[2];
    int64_t profile;
} wqs_state;

/* errors (negative return codes of wb_qstep_new / wb_qstep) */
enum { WQS_EBADTYPE = -1, WQS_EROWS = -2, WQS_ESHAPE = -3, WQS_ENOMEM = -4, WQS_ETOKEN = -5, WQS_EPOS = -6 };

static int wqs_check_mat(const wqs_mat *m, int64_t N, int64_t K) {
    if (m->nseg < 1 || m->nseg > WQS_MAXSEG) return WQS_ESHAPE;
    if (m->N != N || m->K != K) return WQS_ESHAPE;
    int64_t rows = 0;
    for (int s = 0; s < m->nseg; s++) {
        const wqs_seg *g = &m->seg[s];
        if (!g->w || g->rows < 1) return WQS_EROWS;
        if (g->t == 0) { if (g->row_bytes != 4 * K) return WQS_EROWS; }
        else {
            int qk, bs = qblock((int)g->t, &qk);
            if (!bs) return WQS_EBADTYPE;
            if (K % qk || g->row_bytes != (K / qk) * bs) return WQS_EROWS;
        }
        rows += g->rows;
    }
    return rows == N ? 0 : WQS_EROWS;
}

/* ---- a product y = W x on the pool (all segments one job) ----
   Chunks: per segment, big ones first (~1/16 of a thread's share of the rows, so a 178 MB head is a few hundred
   claims, not thousands) and ~32 KiB ones for the last quarter (the threads finish together). Optionally the
   per-chunk argmax (the head) or a gated product: act[f] = gelu(gate row f . x) * (up row F + f . x), a chunk
   owning both rows of each f (no second pass over 2F outputs). */
typedef struct { int64_t c0, nbig, rbig, rsmall, r0, rows, base; } wqs_span;   /* a segment's chunks */
typedef struct {
    const wqs_mat *m; int act8; const float *x; const xq8_32 *x32; const xq8_k *xk; float *y;
    int nspan; wqs_span sp[WQS_MAXSEG + 1];
    float *pmax; int64_t *pidx;
    int64_t gated_F;                   /* > 0: y = act [F], rows f and F + f of m */
} wqs_prod;

static inline float wqs_row(const wqs_prod *j, int64_t r) {
    const wqs_mat *m = j->m;
    int s = 0;
    while (r >= m->seg[s].rows) { r -= m->seg[s].rows; s++; }
    const wqs_seg *g = &m->seg[s];
    int qk = 0, bs = 0;
    if (g->t) bs = qblock((int)g->t, &qk);
    return wq_row_dot((int)g->t, g->w + r * g->row_bytes, bs, qk, g->t ? m->K / qk : 0, m->K, j->act8, j->x,
                      qk == 32 ? (const void *)j->x32 : (const void *)j->xk);
}

/* GELU, tanh approximation, as torch's (0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))) */
static inline float wqs_gelu_tanh(float x) {
    const float kb = 0.7978845608028654f, kk = 0.044715f;
    float inner = kb * (x + kk * x * x * x);
    return 0.5f * x * (1.f + tanhf(inner));
}

static void wqs_prod_chunk(const void *jv, int64_t c) {
    const wqs_prod *j = (const wqs_prod *)jv;
    int s = 0;
    while (s + 1 < j->nspan && c >= j->sp[s + 1].c0) s++;
    const wqs_span *sp = &j->sp[s];
    int64_t k = c - sp->c0, a, n;
    if (k < sp->nbig) { a = k * sp->rbig; n = sp->rbig; }
    else { a = sp->nbig * sp->rbig + (k - sp->nbig) * sp->rsmall; n = sp->rsmall; }
    int64_t b = a + n < sp->rows ? a + n : sp->rows;
    a += sp->base; b += sp->base;                 /* rows of the whole matrix (or f of a gated product) */
    float *y = j->y;
    if (j->gated_F) {
        for (int64_t f = a; f < b; f++) y[f] = wqs_gelu_tanh(wqs_row(j, f)) * wqs_row(j, j->gated_F + f);
        return;
    }
    for (int64_t r = a; r < b; r++) y[r] = wqs_row(j, r);
    if (j->pmax) {                  /* first maximum (NaN counts as the largest, as torch.argmax) */
        float best = y[a]; int64_t bi = a;
        for (int64_t r = a + 1; r < b; r++) {
            float v = y[r];
            if (v > best || (v != v && best == best)) { best = v; bi = r; }
        }
        j->pmax[c] = best; j->pidx[c] = bi;
    }
}

static int64_t wqs_span_of(wqs_span *sp, int64_t c0, int64_t base, int64_t rows, int64_t row_bytes, int nt) {
    int64_t rs = 32768 / (row_bytes ? row_bytes : 1);
    if (rs < 8) rs = 8;
    int64_t rb = rows / (16 * (nt > 0 ? nt : 1));
    if (rb < rs) rb = rs;
    int64_t nbig = (rows * 3 / 4) / rb;
    sp->c0 = c0; sp->nbig = nbig; sp->rbig = rb; sp->rsmall = rs; sp->base = base; sp->rows = rows;
    return nbig + (rows - nbig * rb + rs - 1) / rs;
}

/* the job's chunk spans: one per segment, or (gated) one over f in [0, F) */
static int64_t wqs_layout(const wqs_mat *m, wqs_prod *j, int64_t gated_F, int nt) {
    int64_t c = 0, r = 0;
    if (gated_F) {
        j->nspan = 1;
        return wqs_span_of(&j->sp[0], 0, 0, gated_F, m->seg[0].row_bytes * 2, nt);
    }
    j->nspan = (int)m->nseg;
    for (int s = 0; s < m->nseg; s++) {
        c += wqs_span_of(&j->sp[s], c, r, m->seg[s].rows, m->seg[s].row_bytes, nt);
        r += m->seg[s].rows;
    }
    return c;
}

static int64_t wqs_bytes(const wqs_mat *m) {
    int64_t b = 0;
    for (int s = 0; s < m->nseg; s++) b += m->seg[s].rows * m->seg[s].row_bytes;
    return b;
}

/* y = W x (or the gated act): x quantised once per block size the segments use (wb_q_gemv does it per segment,
   with the same result); returns the number of chunks (the head's argmax partials) */
static int64_t wqs_gemv(wqs_state *st, const wqs_mat *m, const float *x, float *y, float *pmax, int64_t *pidx,
                        int64_t gated_F) {
    wqs_prod j;
    memset(&j, 0, sizeof j);
    j.m = m; j.act8 = (int)st->m.act8; j.x = x; j.y = y; j.x32 = st->x32; j.xk = st->xk; j.pmax = pmax; j.pidx = pidx;
    j.gated_F = gated_F;
    if (j.act8) {
        int need32 = 0, needk = 0;
        for (int s = 0; s < m->nseg; s++) {
            int qk = 0;
            if (m->seg[s].t) qblock((int)m->seg[s].t, &qk);
            need32 |= qk == 32; needk |= qk == 256;
        }
        if (need32) quant_x32(x, st->x32, m->K / 32);
        if (needk) quant_xk(x, st->xk, m->K / 256);
    }
    int nt = st->nt;
    if (wqs_bytes(m) < 65536) nt = 1;
    int64_t nc = wqs_layout(m, &j, gated_F, st->nt);
    wq_run(wqs_prod_chunk, &j, nc, nt);
    return nc;
}

/* s[t] = exp(s[t] - m) (0 where s[t] is -inf), returns their sum. AVX2: Cephes' expf polynomial on 8 lanes
   (range reduction by ln 2, degree 5; within 2 ulp of expf over the softmax's range, x <= 0) */
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 wqs_exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif
static float wqs_exp_shift(float *s, int64_t n, float m) {
    int64_t t = 0;
    float sum = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps(), mv = _mm256_set1_ps(m), ninf = _mm256_set1_ps(-INFINITY);
    for (; t + 8 <= n; t += 8) {
        __m256 v = _mm256_loadu_ps(s + t);
        __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(v, ninf, _CMP_EQ_OQ), wqs_exp8(_mm256_sub_ps(v, mv)));
        _mm256_storeu_ps(s + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum_f8(acc);
#endif
    for (; t < n; t++) {
        float e = s[t] == -INFINITY ? 0.f : expf(s[t] - m);
        s[t] = e;
        sum += e;
    }
    return sum;
}

/* out[u] = q_u . k for nh <= 4 query rows q_u = q + u * hd (one pass over k: four independent FMA chains) */
static inline void wqs_dots4(const float *q, int64_t hd, int64_t nh, const float *k, float *out) {
#if defined(__AVX2__) && defined(__FMA__)
    if (hd % 8 == 0) {
        const float *q1 = q + (nh > 1 ? 1 : 0) * hd, *q2 = q + (nh > 2 ? 2 : 0) * hd, *q3 = q + (nh > 3 ? 3 : 0) * hd;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < hd; d += 8) {
            __m256 kv = _mm256_loadu_ps(k + d);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), kv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + d), kv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + d), kv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + d), kv, a3);
        }
        __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        float o[4];
        _mm_storeu_ps(o, r);
        for (int64_t u = 0; u < nh; u++) out[u] = o[u];
        return;
    }
#endif
    for (int64_t u = 0; u < nh; u++) out[u] = dot_f32(q + u * hd, k, hd);
}

/* z[u][d] += sum over t in [t0, t1) of e[u][t] * V[t][d], for nh <= 4 weight rows (z[u] zeroed before): each
   value row read once for the group, the sums held in registers over a 16-wide slice of d */
static inline void wqs_weighted_rows4(const float *const *e, int64_t nh, const float *V, int64_t hd, int64_t t0,
                                      int64_t t1, float *const *z) {
#if defined(__AVX2__) && defined(__FMA__)
    if (hd % 16 == 0) {
        for (int64_t d = 0; d < hd; d += 16) {
            __m256 a[4][2];
            for (int u = 0; u < 4; u++) a[u][0] = a[u][1] = _mm256_setzero_ps();
            for (int64_t t = t0; t < t1; t++) {
                const __m256 v0 = _mm256_loadu_ps(V + t * hd + d), v1 = _mm256_loadu_ps(V + t * hd + d + 8);
                for (int u = 0; u < 4; u++) {
                    const __m256 w = _mm256_broadcast_ss(e[u] + t);
                    a[u][0] = _mm256_fmadd_ps(w, v0, a[u][0]);
                    a[u][1] = _mm256_fmadd_ps(w, v1, a[u][1]);
                }
            }
            for (int64_t u = 0; u < nh; u++) {
                _mm256_storeu_ps(z[u] + d, _mm256_add_ps(_mm256_loadu_ps(z[u] + d), a[u][0]));
                _mm256_storeu_ps(z[u] + d + 8, _mm256_add_ps(_mm256_loadu_ps(z[u] + d + 8), a[u][1]));
            }
        }
        return;
    }
#endif
    for (int64_t t = t0; t < t1; t++)
        for (int64_t u = 0; u < nh; u++) {
            const float w = e[u][t];
            if (w == 0.f) continue;
            for (int64_t d = 0; d < hd; d++) z[u][d] += w * V[t * hd + d];
        }
}

/* ---- attention: a chunk per (KV head, block of keys), all the group's query heads at once (each key and value
   row read once per group), partial softmax (max, sum, weighted values) merged afterwards (flash-decoding) ---- */
#define WQS_NBLK 16
typedef struct {
    const wqs_layer *l; const float *q; float *sc, *pm, *pl, *pz; int64_t pos, H, S, nblk, blk; float softcap;
} wqs_attn;

static void wqs_attn_chunk(const void *jv, int64_t c) {
    const wqs_attn *j = (const wqs_attn *)jv;
    const wqs_layer *l = j->l;
    const int64_t hd = l->hd, S = l->slots, G = j->H / l->kvh, g = c / j->nblk, b = c % j->nblk;
    const int64_t t0 = b * j->blk, t1 = t0 + j->blk < j->S ? t0 + j->blk : j->S, pos = j->pos, win = l->window;
    const float *K = l->k + g * S * hd, *V = l->v + g * S * hd;
    const float scale = (float)l->scale;
    float mx[64];
    for (int64_t h = 0; h < G; h++) mx[h] = -INFINITY;
    for (int64_t t = t0; t < t1; t++) {
        int64_t kp = l->kpos[t];
        int ok = !(kp < 0 || kp > pos || (win > 0 && pos - kp >= win));
        const float *kr = K + t * hd;
        for (int64_t h0 = 0; h0 < G; h0 += 4) {
            const int64_t nh = G - h0 < 4 ? G - h0 : 4;
            float v4[4];
            if (ok) wqs_dots4(j->q + (g * G + h0) * hd, hd, nh, kr, v4);
            for (int64_t u = 0; u < nh; u++) {
                const int64_t h = h0 + u;
                float *s = j->sc + (g * G + h) * S;
                if (!ok) { s[t] = -INFINITY; continue; }
                float v = v4[u] * scale;
                if (j->softcap > 0.f) v = tanhf(v / j->softcap) * j->softcap;
                s[t] = v;
                if (v > mx[h]) mx[h] = v;
            }
        }
    }
    /* the weights e = exp(s - max) in place (0 where masked), then each value row once for all the heads */
    float sum[64];
    for (int64_t h = 0; h < G; h++) {
        float *s = j->sc + (g * G + h) * S;
        sum[h] = 0.f;
        if (mx[h] == -INFINITY) { for (int64_t t = t0; t < t1; t++) s[t] = 0.f; }
        else sum[h] = wqs_exp_shift(s + t0, t1 - t0, mx[h]);
        float *z = j->pz + ((g * G + h) * j->nblk + b) * hd;
        for (int64_t d = 0; d < hd; d++) z[d] = 0.f;
    }
    for (int64_t h0 = 0; h0 < G; h0 += 4) {
        const int64_t nh = G - h0 < 4 ? G - h0 : 4;
        const float *e[4];
        float *z[4];
        for (int64_t u = 0; u < 4; u++) {
            const int64_t h = h0 + (u < nh ? u : 0);
            e[u] = j->sc + (g * G + h) * S;
            z[u] = j->pz + ((g * G + h) * j->nblk + b) * hd;
        }
        wqs_weighted_rows4(e, nh, V, hd, t0, t1, z);
    }
    for (int64_t h = 0; h < G; h++) {
        const int64_t pi = (g * G + h) * j->nblk + b;
        j->pm[pi] = mx[h]; j->pl[pi] = sum[h];
    }
}

/* z [H, hd] from the chunks' partials */
static void wqs_attn_merge(const wqs_attn *j, float *z, int64_t hd) {
    for (int64_t h = 0; h < j->H; h++) {
        float M = -INFINITY, L = 0.f;
        for (int64_t b = 0; b < j->nblk; b++) if (j->pm[h * j->nblk + b] > M) M = j->pm[h * j->nblk + b];
        float *zo = z + h * hd;
        for (int64_t d = 0; d < hd; d++) zo[d] = 0.f;
        for (int64_t b = 0; b < j->nblk; b++) {
            const int64_t pi = h * j->nblk + b;
            if (j->pm[pi] == -INFINITY) continue;
            float w = expf(j->pm[pi] - M);
            L += w * j->pl[pi];
            const float *pz = j->pz + pi * hd;
            for (int64_t d = 0; d < hd; d++) zo[d] += w * pz[d];
        }
        float inv = 1.f / L;
        for (int64_t d = 0; d < hd; d++) zo[d] *= inv;
    }
}

/* RoPE, NeoX pairing (i, i + hd/2) as the torch ops' rope_apply: x * cos + rotate_half(x) * sin */
/* (each product rounded before the sum, as the separate torch ops round them: no FMA contraction here) */
__attribute__((optimize("fp-contract=off")))
static void wqs_rope(float *x, const float *c, const float *s, int64_t hd) {
    const int64_t h = hd / 2;
    for (int64_t d = 0; d < h; d++) {
        float a = x[d], b = x[d + h];
        x[d] = a * c[d] + (-b) * s[d];
        x[d + h] = b * c[d + h] + a * s[d + h];
    }
}


static void wqs_embed_row(const wqs_mat *m, int64_t row, float *out) {
    int64_t r0 = 0;
    for (int s = 0; s < m->nseg; s++) {
        const wqs_seg *g = &m->seg[s];
        if (row < r0 + g->rows) {
            const uint8_t *w = g->w + (row - r0) * g->row_bytes;
            if (g->t == 0) { memcpy(out, w, 4 * m->K); return; }
            int qk, bs = qblock((int)g->t, &qk);
            for (int64_t i = 0; i < m->K / qk; i++) deq_block((int)g->t, w + i * bs, out + i * qk);
            return;
        }
        r0 += g->rows;
    }
}

void wb_qstep_free(void *hv) {
    wqs_state *st = (wqs_state *)hv;
    if (!st) return;
    free(st->layers); free(st->x); free(st->h); free(st->y); free(st->z); free(st->a); free(st->act); free(st->sc);
    free(st->pmax); free(st->pidx); free(st->x32); free(st->xk); free(st->pm); free(st->pl); free(st->pz);
    free(st);
}

/* a step over the model described by m (copied; the weights, caches and tables it points to must outlive it).
   *err: 0, or a negative code and in *where the layer (-1: model-wide) */
void *wb_qstep_new(const wqs_model *m, int *err, int64_t *where) {
    *err = 0; *where = -1;
    const int64_t D = m->D, H = m->H;
    int e = 0;
    if (m->L < 1 || D < 1 || H < 1 || m->V < 1) { *err = WQS_ESHAPE; return NULL; }
    if ((e = wqs_check_mat(&m->embed, m->V, D)) || (e = wqs_check_mat(&m->head, m->V, D))) { *err = e; return NULL; }
    int64_t maxN = m->V, maxK = D, maxS = 1, maxZ = D, maxhd = 2;
    for (int64_t i = 0; i < m->L; i++) {
        const wqs_layer *l = &m->layers[i];
        *where = i;
        if (l->hd < 2 || l->hd % 2 || l->kvh < 1 || H % l->kvh || l->slots < 1 || l->F < 1 || !l->k || !l->v ||
            !l->kpos || !l->cos || !l->sin || !l->input_norm || !l->pre_ff_norm || H / l->kvh > 64) {
            *err = WQS_ESHAPE; return NULL;
        }
        if ((e = wqs_check_mat(&l->qkv, (H + 2 * l->kvh) * l->hd, D)) || (e = wqs_check_mat(&l->o, D, H * l->hd)) ||
            (e = wqs_check_mat(&l->gate_up, 2 * l->F, D)) || (e = wqs_check_mat(&l->down, D, l->F))) {
            *err = e; return NULL;
        }
        if (l->qkv.N > maxN) maxN = l->qkv.N;
        if (2 * l->F > maxN) maxN = 2 * l->F;
        if (H * l->hd > maxK) maxK = H * l->hd;
        if (l->F > maxK) maxK = l->F;
        if (H * l->hd > maxZ) maxZ = H * l->hd;
        if (l->slots > maxS) maxS = l->slots;
        if (l->hd > maxhd) maxhd = l->hd;
    }
    *where = -1;
    wqs_state *st = (wqs_state *)calloc(1, sizeof *st);
    if (!st) { *err = WQS_ENOMEM; return NULL; }
    st->m = *m;
    st->layers = (wqs_layer *)malloc(sizeof(wqs_layer) * m->L);
    st->nchunk_max = 1;                         /* the head's chunks, at most (all small ones) */
    for (int s = 0; s < m->head.nseg; s++) {
        int64_t rs = 32768 / m->head.seg[s].row_bytes;
        if (rs < 8) rs = 8;
        st->nchunk_max += m->head.seg[s].rows / rs + 1;
    }
    st->maxN = maxN; st->maxK = maxK; st->maxS = maxS;
    st->x = (float *)malloc(4 * D); st->h = (float *)malloc(4 * (D > maxK ? D : maxK));
    st->y = (float *)malloc(4 * maxN); st->z = (float *)malloc(4 * maxZ); st->a = (float *)malloc(4 * D);
    st->act = (float *)malloc(4 * maxK); st->sc = (float *)malloc(4 * H * maxS);
    st->pmax = (float *)malloc(4 * st->nchunk_max); st->pidx = (int64_t *)malloc(8 * st->nchunk_max);
    st->pm = (float *)malloc(4 * H * WQS_NBLK); st->pl = (float *)malloc(4 * H * WQS_NBLK);
    st->pz = (float *)malloc(4 * H * WQS_NBLK * maxhd);
    st->x32 = (xq8_32 *)malloc(sizeof(xq8_32) * (maxK / 32 + 1));
    st->xk = (xq8_k *)malloc(sizeof(xq8_k) * (maxK / 256 + 1));
    if (!st->layers || !st->x || !st->h || !st->y || !st->z || !st->a || !st->act || !st->sc || !st->pmax ||
        !st->pidx || !st->x32 || !st->xk || !st->pm || !st->pl || !st->pz) { wb_qstep_free(st); *err = WQS_ENOMEM; return NULL; }
    memcpy(st->layers, m->layers, sizeof(wqs_layer) * m->L);
    st->m.layers = st->layers;
    return st;
}

void wb_qstep_set_threads(void *hv, int64_t n) {
    wqs_state *st = (wqs_state *)hv;
    st->m.nthreads = n < 1 ? 1 : n;
    st->ntsteps[0] = st->ntsteps[1] = 0;
}
/* out2: the moving averages of the step time (us) with 1 and with nthreads threads; returns this step's threads */
int64_t wb_qstep_threads(void *hv, double *out2) {
    wqs_state *st = (wqs_state *)hv;
    if (out2) { out2[0] = st->ntsteps[0] ? st->ema[0] : -1.0; out2[1] = st->ntsteps[1] ? st->ema[1] : -1.0; }
    return st->nt;
}

/* seconds spent since the last call in the layers' products / attention / the rest / the head (with its argmax
   partials); on = 1 turns timing on */
void wb_qstep_profile(void *hv, int64_t on, double *out4) {
    wqs_state *st = (wqs_state *)hv;
    if (out4) { out4[0] = st->t_prod; out4[1] = st->t_attn; out4[2] = st->t_other; out4[3] = st->t_head; }
    st->t_prod = st->t_attn = st->t_other = st->t_head = 0.0;
    st->profile = on;
}

#define WQS_T0() double _t0 = st->profile ? now_us() : 0.0
#define WQS_T1(acc) \
    do { if (st->profile) { double _t1 = now_us(); st->acc += (_t1 - _t0) * 1e-6; _t0 = _t1; } } while (0)

static void wqs_add_normed(float *x, float *a, const float *w, int64_t D, float eps) {
    if (w) rms_row_f32(a, w, a, D, eps);
    for (int64_t d = 0; d < D; d++) x[d] = x[d] + a[d];
}

/* one decode step: token tok[0] at position pos[0]. logits [V] (always written); next: the argmax (or NULL);
   capture: [L, D] the residual after each layer (or NULL). Returns 0 or a negative code. */
int wb_qstep(void *hv, const int64_t *tok, const int64_t *posp, float *logits, int64_t *next, float *capture) {
    wqs_state *st = (wqs_state *)hv;
    const wqs_model *m = &st->m;
    const int64_t D = m->D, H = m->H, token = tok[0], pos = posp[0];
    const float eps = (float)m->eps;
    if (token < 0 || token >= m->V) return WQS_ETOKEN;
    for (int64_t i = 0; i < m->L; i++) {
        const wqs_layer *l = &st->layers[i];
        if (pos < 0 || pos >= l->rope_len || (!l->ring && pos >= l->slots)) return WQS_EPOS;
    }
    /* threads for this step: the faster of 1 and nthreads so far, the other tried now and then */
    const int many = (int)(m->nthreads > 1 ? m->nthreads : 1);
    int pick = 1;
    if (many == 1) pick = 0;
    else if (st->ntsteps[0] < 2 || st->ntsteps[1] < 2) pick = st->ntsteps[1] <= st->ntsteps[0];
    else {
        pick = st->ema[1] <= st->ema[0];
        double lo = st->ema[pick], hi = st->ema[!pick];
        if (st->steps % (hi > 1.15 * lo ? 64 : 16) == 15) pick = !pick;
    }
    st->nt = pick ? many : 1;
    const double t_step = now_us();
    WQS_T0();
    float *x = st->x, *h = st->h, *y = st->y, *z = st->z, *a = st->a, *act = st->act;
    wqs_embed_row(&m->embed, token, x);
    const float es = (float)m->embed_scale;
    for (int64_t d = 0; d < D; d++) x[d] = x[d] * es;
    for (int64_t i = 0; i < m->L; i++) {
        const wqs_layer *l = &st->layers[i];
        const int64_t hd = l->hd, kvh = l->kvh, F = l->F;
        rms_row_f32(x, l->input_norm, h, D, eps);
        WQS_T1(t_other);
        wqs_gemv(st, &l->qkv, h, y, NULL, NULL, 0);
        WQS_T1(t_prod);
        float *q = y, *k = y + H * hd, *v = y + (H + kvh) * hd;
        const float *c = l->cos + pos * hd, *s = l->sin + pos * hd;
        for (int64_t g = 0; g < H; g++) {
            if (l->q_norm) rms_row_f32(q + g * hd, l->q_norm, q + g * hd, hd, eps);
            wqs_rope(q + g * hd, c, s, hd);
        }
        const int64_t slot = pos % l->slots;
        for (int64_t g = 0; g < kvh; g++) {
            if (l->k_norm) rms_row_f32(k + g * hd, l->k_norm, k + g * hd, hd, eps);
            wqs_rope(k + g * hd, c, s, hd);
            memcpy(l->k + (g * l->slots + slot) * hd, k + g * hd, 4 * hd);
            memcpy(l->v + (g * l->slots + slot) * hd, v + g * hd, 4 * hd);
        }
        l->kpos[slot] = pos;
        WQS_T1(t_other);
        /* keys that can be valid: a full-length cache holds positions 0..pos in slots 0..pos */
        const int64_t S = l->ring ? l->slots : pos + 1;
        int64_t nblk = (S + 31) / 32;
        if (nblk > WQS_NBLK) nblk = WQS_NBLK;
        wqs_attn aj = { l, q, st->sc, st->pm, st->pl, st->pz, pos, H, S, nblk, (S + nblk - 1) / nblk,
                        (float)m->attn_softcap };
        wq_run(wqs_attn_chunk, &aj, kvh * nblk, S * hd * kvh * 8 < 65536 ? 1 : st->nt);
        wqs_attn_merge(&aj, z, hd);
        WQS_T1(t_attn);
        wqs_gemv(st, &l->o, z, a, NULL, NULL, 0);
        WQS_T1(t_prod);
        wqs_add_normed(x, a, l->post_attn_norm, D, eps);
        rms_row_f32(x, l->pre_ff_norm, h, D, eps);
        WQS_T1(t_other);
        wqs_gemv(st, &l->gate_up, h, act, NULL, NULL, F);      /* act = gelu(gate) * up */
        wqs_gemv(st, &l->down, act, a, NULL, NULL, 0);
        WQS_T1(t_prod);
        wqs_add_normed(x, a, l->post_ff_norm, D, eps);
        if (capture) memcpy(capture + i * D, x, 4 * D);
    }
    rms_row_f32(x, m->final_norm, h, D, eps);
    WQS_T1(t_other);
    const float cap = (float)m->final_softcap;
    const int64_t nc = wqs_gemv(st, &m->head, h, logits, next && cap <= 0.f ? st->pmax : NULL, st->pidx, 0);
    WQS_T1(t_head);
    if (cap > 0.f)
        for (int64_t n = 0; n < m->V; n++) logits[n] = tanhf(logits[n] / cap) * cap;
    if (next) {
        if (cap > 0.f) {
            float best = logits[0]; int64_t bi = 0;
            for (int64_t n = 1; n < m->V; n++) {
                float v = logits[n];
                if (v > best || (v != v && best == best)) { best = v; bi = n; }
            }
            *next = bi;
        } else {                    /* the chunks' partial maxima, in row order: the first maximum overall */
            float best = st->pmax[0]; int64_t bi = st->pidx[0];
            for (int64_t c2 = 1; c2 < nc; c2++) {
                float v = st->pmax[c2];
                if (v > best || (v != v && best == best)) { best = v; bi = st->pidx[c2]; }
            }
            *next = bi;
        }
    }
    WQS_T1(t_other);
    if (many > 1) {
        double dt = now_us() - t_step;
        st->ema[pick] = st->ntsteps[pick] ? 0.75 * st->ema[pick] + 0.25 * dt : dt;
        st->ntsteps[pick]++;
    }
    st->steps++;
    return 0;
}
"""
