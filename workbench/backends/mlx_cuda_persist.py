"""The MLX decode step on a CUDA GPU as ONE persistent kernel per token (``mx.fast.cuda_kernel``).

Why: MLX's CUDA backend pays several µs of host time for every primitive (the five-kernel step of
:mod:`.mlx_cuda_decode` has ~8 per layer with the cache updates). Here the whole step — every layer, the final norm
and the head — is one launch: one block per SM, 256 threads, the phases of a layer separated by grid-wide barriers
(an atomic counter; every block is resident, so the spin cannot deadlock). On the H200 a grid barrier costs about
1.3 µs (``tests/tools/gpu/barrier_bench.py``) against tens of µs for an MLX primitive.

A layer is five phases, each spread over every warp of the grid:

1. the previous layer's residual update (post-FFN norm + add) and this layer's input RMSNorm, which every block
   recomputes from the 1-row vectors into shared memory, then the fused q/k/v rows (a warp per row or two);
2. attention, an item per (query head, chunk of slots): q/k RMSNorm and RoPE of the new token, the cache write at
   ``pos % slots`` (in place: see below), one-query attention over the chunk (a warp per slot, online softmax),
   the chunk's partial stored; the last item of a head to finish (a counter) combines the partials;
3. the o projection; 4. post-attention norm + residual + pre-FFN norm, then gate and up rows with GELU(gate)·up;
5. the down projection. After the last layer: the last residual update, the final norm and the head (Gemma 2's
   final softcap), with each block's argmax; the last block to finish resets the counters.

Roundings follow the plain path (after each norm, product, residual add, GELU), sums in float32, as the five-kernel
step (tested against the generic step on the card).

The cache is written in place. MLX arrays are immutable to its graph, but the static cache's buffers are owned by
the cache object and only read by these launches, which run one after another on one stream: each launch takes the
previous launch's ``seq`` output as an input, so MLX's graph orders them even where nothing else does (teacher-forced
steps), and a compiled engine step is ordered by its token. The scratch vectors (q/k/v, residuals, partials, the
barrier counters) are buffers of this object, written the same way.

Supported: what :mod:`.mlx_cuda_decode` supports with one head_dim and kv-head count for every layer, the grid no
larger than the SM count (read from the CUDA driver); :func:`unsupported` says why not, and the route falls back to
the five-kernel step.
"""
from __future__ import annotations

import ctypes
import os

from .mlx_cuda_decode import _HEADER
from .mlx_cuda_decode import unsupported as _unsupported_5

NT = 256                 # threads a block (8 warps)

_PHEADER = r"""
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long gtimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// every block arrives (release) and waits until all have (acquire); gen counts the arrivals expected so far.
// Never a hang: a wait past 0.2 s (some block is not running — two launches at once) sets the sticky error flag,
// and every block then stops waiting; the host raises (MLXCudaPersistentStep.check).
__device__ __forceinline__ void grid_sync(unsigned* bar, unsigned& gen, int* err) {
  __syncthreads();
  gen += gridDim.x;
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(bar, 1u);
    const unsigned long long t0 = gtimer();
    while (ld_acquire(bar) < gen) {
      if (*reinterpret_cast<volatile int*>(err)) break;
      if (gtimer() - t0 > 200000000ull) { atomicExch(err, 1); break; }
    }
  }
  __syncthreads();
}
// data another block wrote in this launch: read through L2 (L1 is not coherent)
template <typename T> __device__ __forceinline__ float ldc(const T* p) { return static_cast<float>(__ldcg(p)); }

// xs = rms_norm(r) * NW with r = R (EMB: R is the embedding row, times esc) (+ post_norm(Y) * PW); block 0
// stores r to rout. Every block computes it (K entries), then the products read xs from shared memory.
template <typename T, int K, bool HAS_Y, bool POST, bool EMB, typename TR, typename TP, typename TN>
__device__ __noinline__ void build_x(const TR* R, const T* Y, const TP* PW, const TN* NW, T* rout, float* xs, float* red,
                        float eps, float esc) {
  constexpr int NTB = 256;
  const int tid = threadIdx.x;
  float rs_y = 1.f;
  if (HAS_Y && POST) {
    float a = 0.f;
    for (int k = tid; k < K; k += NTB) { const float y = ldc(Y + k); a += y * y; }
    rs_y = rsqrtf(block_sum<NTB>(a, red) / K + eps);
  }
  float a2 = 0.f;
  for (int k = tid; k < K; k += NTB) {
    float r = EMB ? rnd<T>(static_cast<float>(R[k]) * esc) : ldc(R + k);
    if (HAS_Y) {
      float y = ldc(Y + k);
      if (POST) y = rnd<T>(y * rs_y * static_cast<float>(PW[k]));
      r = rnd<T>(r + y);
    }
    xs[k] = r;
    a2 += r * r;
    if (blockIdx.x == 0) rout[k] = static_cast<T>(r);
  }
  const float rs = rsqrtf(block_sum<NTB>(a2, red) / K + eps);
  for (int k = tid; k < K; k += NTB) xs[k] = rnd<T>(xs[k] * rs * static_cast<float>(NW[k]));
  __syncthreads();
}

template <typename T, int K> __device__ __noinline__ void load_x(const T* X, float* xs) {
  for (int k = threadIdx.x; k < K; k += 256) xs[k] = ldc(X + k);
  __syncthreads();
}

// out[n] = W[n, :] . xs for rows n spread over every warp of the grid, RPW consecutive rows a warp at a time
// (all their loads issued first). PAIR: rows n and N + n give GELU(gate) * up. CAP > 0: cap * tanh(y / cap).
// ARG: the warp's largest stored output and its row (first on ties) -> best / bi.
template <typename T, int K, int RPW, bool PAIR, bool ARG, typename TW>
__device__ __noinline__ void gemv_rows(const TW* W, int N, const float* xs, T* out, float cap, float& best, int& bi) {
  constexpr int C8 = K / 8, CPL = (C8 + 31) / 32;
  const int lane = threadIdx.x & 31;
  const int gw = blockIdx.x * 8 + (threadIdx.x >> 5);
  const int nwarps = gridDim.x * 8;
  const float4* x4 = reinterpret_cast<const float4*>(xs);
  for (int n0 = gw * RPW; n0 < N; n0 += nwarps * RPW) {
    float f[RPW][CPL][8];
    float g2[PAIR ? RPW : 1][CPL][8];
    #pragma unroll
    for (int j = 0; j < RPW; ++j) {
      #pragma unroll
      for (int i = 0; i < CPL; ++i) {
        const int c = lane + 32 * i;
        if (c < C8 && n0 + j < N) {
          load8(W + (size_t)(n0 + j) * K + c * 8, f[j][i]);
          if (PAIR) load8(W + (size_t)(n0 + j + N) * K + c * 8, g2[PAIR ? j : 0][i]);
        } else {
          #pragma unroll
          for (int e = 0; e < 8; ++e) { f[j][i][e] = 0.f; if (PAIR) g2[PAIR ? j : 0][i][e] = 0.f; }
        }
      }
    }
    #pragma unroll
    for (int j = 0; j < RPW; ++j) {
      float s = 0.f, s2 = 0.f;
      #pragma unroll
      for (int i = 0; i < CPL; ++i) {
        const int c = lane + 32 * i;
        if (c < C8) {
          const float4 a = x4[2 * c], b = x4[2 * c + 1];
          const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
          #pragma unroll
          for (int e = 0; e < 8; ++e) {
            s += f[j][i][e] * xv[e];
            if (PAIR) s2 += g2[PAIR ? j : 0][i][e] * xv[e];
          }
        }
      }
      s = warp_sum(s);
      if (PAIR) s2 = warp_sum(s2);
      const int n = n0 + j;
      if (n < N) {
        const float y = gemv_out<T, PAIR>(s, s2, cap);
        if (lane == 0) out[n] = static_cast<T>(y);
        if (ARG) {
          const float yv = rnd<T>(y);
          if (yv > best) { best = yv; bi = n; }
        }
      }
    }
  }
}

// one-query attention of layer's new token, items (query head h, chunk) spread over the blocks; see module doc
template <typename T, int HD, int H, int HKV, bool QKN, typename TQ, typename TC, typename TK>
__device__ __noinline__ void attn_phase(const T* qkv, const TQ* qw, const TQ* kw, const TC* cs, const TC* sn, const T* Kc_in,
                           const T* Vc_in, const TK* kpos_in, int S, int WIN, bool ring, float scale, float capa, float eps, int p, int nsplit,
                           int chunk, float* OP, float* MP, float* LP, int* cnt, T* z, float* sq, float* sk,
                           float* sv, float* red, float* wm, float* wl, float* wacc, int* flag, float* cbuf) {
  constexpr int NTB = 256, NWARP = 8, G = H / HKV, PL = HD / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slot = p % S;
  T* Kc = const_cast<T*>(Kc_in);          // the cache, written in place (module doc)
  T* Vc = const_cast<T*>(Vc_in);
  TK* kpos = const_cast<TK*>(kpos_in);
  for (int it = blockIdx.x; it < H * nsplit; it += gridDim.x) {
    const int h = it % H, c = it / H, kvh = h / G;
    const int start = c * chunk, lim = min(start + chunk, S);
    for (int d = tid; d < HD; d += NTB) {
      sq[d] = ldc(qkv + h * HD + d);
      sk[d] = ldc(qkv + H * HD + kvh * HD + d);
      sv[d] = ldc(qkv + (H + HKV) * HD + kvh * HD + d);
    }
    __syncthreads();
    qk_norm_rope<T, HD, NTB, QKN>(sq, sk, qw, kw, cs, sn, p, red, eps);
    const size_t base = (size_t)kvh * S * HD;
    if (h % G == 0 && slot >= start && slot < lim) {     // this chunk holds the new slot: write it
      for (int d = tid; d < HD; d += NTB) {
        Kc[base + (size_t)slot * HD + d] = static_cast<T>(sk[d]);
        Vc[base + (size_t)slot * HD + d] = static_cast<T>(sv[d]);
      }
      if (kvh == 0 && tid == 0) kpos[slot] = static_cast<TK>(p);
    }
    int end = lim;
    if (!ring) end = min(end, p + 1);                   // slot == position: later slots are empty
    float ql[PL], acc[PL];
    #pragma unroll
    for (int i = 0; i < PL; ++i) { ql[i] = sq[lane + 32 * i]; acc[i] = 0.f; }
    float m = -INFINITY, l = 0.f;
    constexpr int U = 4;                               // a warp's slots U at a time: every load issued first
    for (int s0 = start + warp; s0 < end; s0 += NWARP * U) {
      float kk[U][PL], vv[U][PL];
      int kps[U];
      #pragma unroll
      for (int u = 0; u < U; ++u) {
        const int s = s0 + u * NWARP;
        const bool in = s < end, cur = s == slot;
        kps[u] = !in ? -1 : cur ? p : static_cast<int>(kpos[s]);
        #pragma unroll
        for (int i = 0; i < PL; ++i) {
          const size_t o = base + (size_t)s * HD + lane + 32 * i;
          kk[u][i] = (!in || cur) ? sk[lane + 32 * i] : static_cast<float>(Kc[o]);
          vv[u][i] = (!in || cur) ? sv[lane + 32 * i] : static_cast<float>(Vc[o]);
        }
      }
      #pragma unroll
      for (int u = 0; u < U; ++u) {
        const int kp = kps[u];
        const bool ok = kp >= 0 && kp <= p && (WIN == 0 || p - kp < WIN);
        float dot = 0.f;
        #pragma unroll
        for (int i = 0; i < PL; ++i) dot += ql[i] * kk[u][i];
        dot = warp_sum(dot) * scale;
        if (capa > 0.f) dot = tanh_f(dot / capa) * capa;
        if (!ok) continue;
        const float mn = fmaxf(m, dot);
        const float alpha = expf(m - mn), pr = expf(dot - mn);
        l = l * alpha + pr;
        #pragma unroll
        for (int i = 0; i < PL; ++i) acc[i] = acc[i] * alpha + pr * vv[u][i];
        m = mn;
      }
    }
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
    #pragma unroll
    for (int i = 0; i < PL; ++i) wacc[warp * HD + lane + 32 * i] = acc[i];
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < NWARP; ++w) M = fmaxf(M, wm[w]);
    const int pi = c * H + h;
    for (int d = tid; d < HD; d += NTB) {
      float num = 0.f;
      for (int w = 0; w < NWARP; ++w) num += (wm[w] == -INFINITY) ? 0.f : expf(wm[w] - M) * wacc[w * HD + d];
      OP[(size_t)pi * HD + d] = num;
    }
    if (tid == 0) {
      float den = 0.f;
      for (int w = 0; w < NWARP; ++w) den += (wm[w] == -INFINITY) ? 0.f : expf(wm[w] - M) * wl[w];
      MP[pi] = M;
      LP[pi] = den;
    }
    __syncthreads();                                    // the partial stored by every thread ...
    if (tid == 0) {
      __threadfence();                                  // ... and visible before the count
      flag[0] = atomicAdd(cnt + h, 1) == nsplit - 1;
    }
    __syncthreads();
    if (flag[0]) {                                      // the last chunk of head h: combine
      __threadfence();
      float* cm = cbuf;
      float* ce = cbuf + nsplit;
      float* cl = cbuf + 2 * nsplit;
      for (int j = tid; j < nsplit; j += NTB) { cm[j] = __ldcg(MP + j * H + h); cl[j] = __ldcg(LP + j * H + h); }
      __syncthreads();
      float MM = -INFINITY;
      for (int j = 0; j < nsplit; ++j) MM = fmaxf(MM, cm[j]);
      for (int j = tid; j < nsplit; j += NTB) ce[j] = (cm[j] == -INFINITY) ? 0.f : expf(cm[j] - MM);
      __syncthreads();
      float den = 0.f;
      for (int j = 0; j < nsplit; ++j) den += ce[j] * cl[j];
      for (int d = tid; d < HD; d += NTB) {
        float num = 0.f;
        #pragma unroll 8
        for (int j = 0; j < nsplit; ++j) num += ce[j] * __ldcg(OP + (size_t)(j * H + h) * HD + d);
        z[h * HD + d] = static_cast<T>(num / den);
      }
      if (tid == 0) cnt[h] = 0;
    }
    __syncthreads();
  }
}
"""

# the kernel body's fixed part: shared memory, scratch views; the layers and the head are generated after it
_BODY_HEAD = r"""
  constexpr int NWARP = 8;
  __shared__ __align__(16) float xs[KMAX_];
  __shared__ float red[32];
  __shared__ float sq[HD_], sk[HD_], sv[HD_];
  __shared__ float wm[NWARP], wl[NWARP];
  __shared__ float wacc[NWARP * HD_];
  __shared__ float bb[NWARP];
  __shared__ int bbi[NWARP];
  __shared__ int flag[1];
  __shared__ float cbuf[3 * NSPLIT_];
  T_* ts = const_cast<T_*>(TS);
  T_* qkvb = ts;
  T_* yo = qkvb + NQ_;
  T_* mid = yo + D_;
  T_* yd = mid + D_;
  T_* p0 = yd + D_;
  T_* act = p0 + D_;
  T_* z = act + F_;
  float* fs = const_cast<float*>(FS);
  float* OP = fs;
  float* MP = OP + NSPLIT_ * H_ * HD_;
  float* LP = MP + NSPLIT_ * H_;
  float* BMAX = LP + NSPLIT_ * H_;
  int* is = const_cast<int*>(IS);
  unsigned* bar = reinterpret_cast<unsigned*>(is);
  int* exitc = is + 1;
  int* cnt = is + 2;
  int* BIDX = cnt + H_;
  int* errf = BIDX + gridDim.x;          // sticky: a barrier timed out (never reset here)
  unsigned gen = 0;
  const int p = static_cast<int>(pos[0]);
  const int tk = static_cast<int>(tok[0]);
  float best = -INFINITY;
  int bi = 0;
  if (threadIdx.x == 0 && blockIdx.x == 0) seq[0] = SEQ_IN[0] + 1;
"""

_BODY_TAIL = r"""
  // the block's argmax, then the grid's in the last block to finish (which also resets the counters)
  if ((threadIdx.x & 31) == 0) { bb[threadIdx.x >> 5] = best; bbi[threadIdx.x >> 5] = bi; }
  __syncthreads();
  if (threadIdx.x == 0) {
    float b = bb[0]; int j = bbi[0];
    for (int w = 1; w < NWARP; ++w) if (bb[w] > b || (bb[w] == b && bbi[w] < j)) { b = bb[w]; j = bbi[w]; }
    BMAX[blockIdx.x] = b;
    BIDX[blockIdx.x] = j;
    __threadfence();
    flag[0] = atomicAdd(exitc, 1) == (int)gridDim.x - 1;
    if (flag[0]) {
      __threadfence();
      float B = __ldcg(BMAX);
      int J = __ldcg(BIDX);
      for (int q = 1; q < (int)gridDim.x; ++q) {
        const float v = __ldcg(BMAX + q);
        const int jj = __ldcg(BIDX + q);
        if (v > B || (v == B && jj < J)) { B = v; J = jj; }
      }
      token[0] = J;
      *bar = 0u;
      *exitc = 0;
    }
  }
"""


def sm_count() -> int | None:
    """Streaming multiprocessors of CUDA device 0, from the driver (None if it can't be asked)."""
    try:
        cu = ctypes.CDLL("libcuda.so.1")
        if cu.cuInit(0) != 0:
            return None
        dev = ctypes.c_int()
        if cu.cuDeviceGet(ctypes.byref(dev), 0) != 0:
            return None
        v = ctypes.c_int()
        if cu.cuDeviceGetAttribute(ctypes.byref(v), 16, dev) != 0:     # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
            return None
        return int(v.value)
    except Exception:
        return None


def unsupported(cfg, ops, cache=None) -> str | None:
    """Why the one-kernel step can't run this model here (None: it can)."""
    if os.environ.get("WORKBENCH_MLX_PERSIST", "1") == "0":
        return "WORKBENCH_MLX_PERSIST=0"
    why = _unsupported_5(cfg, ops, cache)
    if why:
        return why
    L = cfg.num_hidden_layers
    hds = {cfg.head_dim(i) for i in range(L)}
    kvs = {cfg.num_kv_heads(i) for i in range(L)}
    if len(hds) != 1 or len(kvs) != 1:
        return f"layers differ in head_dim {sorted(hds)} or kv heads {sorted(kvs)}"
    if sm_count() is None:
        return "the CUDA driver's SM count could not be read (the grid must fit the GPU at once)"
    return None


class MLXCudaPersistentStep:
    """``step(tok [1, 1], pos [1]) -> logits [1, V]`` on mlx:gpu (CUDA): one launch a token (module doc).
    ``token`` after a call: the step's greedy token [1] (int32, the first row on ties), computed in the launch."""

    def __init__(self, plan, blocks: int | None = None, chain: bool = True):
        import mlx.core as mx
        self.mx = mx
        self.plan = plan
        self.dt = plan.ops.mdtype
        lay = plan.layers
        self.L = len(lay)
        self.H = plan.n_heads
        self.hd = lay[0].head_dim
        self.kvh = lay[0].kv_heads
        self.D = plan.hidden
        self.F = max(lp.intermediate for lp in lay)
        self.nq = (self.H + 2 * self.kvh) * self.hd
        # one block per SM at most: 256 threads x ~130 registers leave no room for a second block on an SM, and a
        # block that is not resident would never reach the barrier the others spin on
        sms = sm_count()
        self.nb = int(min(blocks or sms or 16, sms or blocks or 16))
        # chunks of slots a head (attention items H x nsplit, at most one per block), per layer
        self.split = []
        for lp in lay:
            S = lp.kv.slots
            ns = max(1, min(self.nb // self.H, -(-S // 8)))
            chunk = -(-S // ns)
            self.split.append((-(-S // chunk), chunk))
        self.nsplit = max(n for n, _ in self.split)
        f32, i32 = mx.float32, mx.int32
        self.ts = mx.zeros((self.nq + 4 * self.D + self.F + self.H * self.hd,), dtype=self.dt)
        self.fs = mx.zeros((self.nsplit * self.H * (self.hd + 2) + self.nb,), dtype=f32)
        self.is_ = mx.zeros((3 + self.H + self.nb,), dtype=i32)     # counters, block argmax rows, error flag
        self.seq = mx.zeros((1,), dtype=i32)
        self.one = mx.zeros((1,), dtype=f32)
        mx.eval(self.ts, self.fs, self.is_, self.seq, self.one)
        self.token = None
        self.chain = chain      # each launch waits on the last one's seq (False: the caller orders them)
        self._parts = (self.L, True)
        self._stamps = False    # (profiling: block 0's clock after every barrier -> the stamps output)
        self._kernel = None

    def check(self):
        """Raise if a launch of this step timed out at a grid barrier (its outputs are then garbage): launches must
        run one after another — eagerly (each takes the last one's ``seq``), or each fed the last one's token (the
        engine). The counters are reset, so the step can be used again."""
        import numpy as np
        mx = self.mx
        mx.synchronize()
        if int(np.array(self.is_)[-1]):
            self.is_ = mx.zeros(self.is_.shape, dtype=mx.int32)
            mx.eval(self.is_)
            raise RuntimeError("mlx_cuda_persist: a grid barrier of the one-launch decode step timed out (two launches "
                               "ran at once, or a block never started); its outputs are invalid. Order the calls "
                               "(eager calls, or feed each step the last one's token) or set WORKBENCH_MLX_PERSIST=0")

    def _names(self):
        n = ["tok", "pos", "SEQ_IN", "TS", "FS", "IS", "EMB", "HEADW", "FNORM"]
        for i in range(self.L):
            n += [f"{r}{i}" for r in ("qkv", "ow", "gu", "dn", "nin", "npa", "npre", "npf", "qn", "kn", "cs", "sn",
                                       "kc", "vc", "kp")]
        return n

    def _source(self):
        plan = self.plan
        post = plan.layers[0].post_attn_norm is not None
        qkn = plan.layers[0].q_norm is not None
        capa = float(plan.attn_softcap or 0.0)
        fcap = float(plan.final_softcap or 0.0)
        D, F, HQ = self.D, self.F, self.H * self.hd
        P = "true" if post else "false"
        src = [_BODY_HEAD]
        ns = [0]

        def stamp():
            if not self._stamps:
                return ""
            ns[0] += 1
            return f"  if (blockIdx.x == 0 && threadIdx.x == 0) stamps[{ns[0] - 1}] = (int64_t)gtimer();\n"
        src.append(stamp())
        R, Y, PW = "EMB + (size_t)tk * D_", None, None
        n_lay, with_head = self._parts          # (timing runs only: the first n layers, the head or not)
        for i, lp in enumerate(plan.layers[:n_lay]):
            nsp, chunk = self.split[i]
            pb = "p0" if i == 0 else f"(resid + {(i - 1) * D})"
            emb = "true" if i == 0 else "false"
            hy = "false" if Y is None else "true"
            post_y = P if Y is not None else "false"
            Fi = lp.intermediate
            src.append(f"""
  // ---- layer {i}
  build_x<T_, D_, {hy}, {post_y}, {emb}>({R}, {Y or 'yd'}, {PW or 'npf0'}, nin{i}, {pb}, xs, red, EPS_, ESC_);
  gemv_rows<T_, D_, 2, false, false>(qkv{i}, NQ_, xs, qkvb, 0.f, best, bi);
  grid_sync(bar, gen, errf);
{stamp()}  attn_phase<T_, HD_, H_, HKV_, {'true' if qkn else 'false'}>(qkvb, qn{i}, kn{i}, cs{i}, sn{i},
      kc{i}, vc{i}, kp{i},
      {lp.kv.slots}, {int(lp.window or 0)}, {'true' if lp.kv.ring else 'false'}, {float(lp.scale)!r}f, {capa!r}f, EPS_, p,
      {nsp}, {chunk}, OP, MP, LP, cnt, z, sq, sk, sv, red, wm, wl, wacc, flag, cbuf);
  grid_sync(bar, gen, errf);
{stamp()}  load_x<T_, {HQ}>(z, xs);
  gemv_rows<T_, {HQ}, 1, false, false>(ow{i}, D_, xs, yo, 0.f, best, bi);
  grid_sync(bar, gen, errf);
{stamp()}  build_x<T_, D_, true, {P}, false>({pb}, yo, npa{i}, npre{i}, mid, xs, red, EPS_, 1.f);
  gemv_rows<T_, D_, 2, true, false>(gu{i}, {Fi}, xs, act, 0.f, best, bi);
  grid_sync(bar, gen, errf);
{stamp()}  load_x<T_, {Fi}>(act, xs);
  gemv_rows<T_, {Fi}, 1, false, false>(dn{i}, D_, xs, yd, 0.f, best, bi);
  grid_sync(bar, gen, errf);
{stamp()}""")
            R, Y, PW = "mid", "yd", f"npf{i}"
        if with_head and n_lay == self.L:
            src.append(f"""
  // ---- the last residual update, final norm, head with each warp's argmax
  build_x<T_, D_, true, {P}, false>(mid, yd, {PW}, FNORM, resid + {(self.L - 1) * D}, xs, red, EPS_, 1.f);
  gemv_rows<T_, D_, 4, false, true>(HEADW, V_, xs, logits, {fcap!r}f, best, bi);
{stamp()}""")
        elif with_head:          # (timing: the head alone, on whatever the scratch holds)
            src.append(f"""
  load_x<T_, D_>(mid, xs);
  gemv_rows<T_, D_, 4, false, true>(HEADW, V_, xs, logits, {fcap!r}f, best, bi);
""")
        src.append(_BODY_TAIL)
        defs = dict(KMAX_=max(D, F, HQ), HD_=self.hd, H_=self.H, HKV_=self.kvh, D_=D, F_=F, NQ_=self.nq,
                    NSPLIT_=self.nsplit, V_=plan.head.shape[0])
        head = _HEADER + _PHEADER + "".join(f"#define {k} {v}\n" for k, v in defs.items())
        head += f"#define EPS_ {float(plan.eps)!r}f\n"
        return head, "".join(src)

    def _build(self):
        mx = self.mx
        head, body = self._source()
        esc = float(mx.array(self.plan.embed_scale, dtype=self.dt).astype(mx.float32).item())
        head += f"#define ESC_ {esc!r}f\n"
        name = f"wb_persist_{abs(hash((head, body))) % 10**10}"
        self._kernel = mx.fast.cuda_kernel(name=name, input_names=self._names(),
                                           output_names=["logits", "resid", "token", "seq", "stamps"], source=body,
                                           header=head)

    def _inputs(self, tok, pos):
        mx, plan = self.mx, self.plan
        one = self.one
        ins = [tok.reshape(-1).astype(mx.int32), pos.reshape(-1).astype(mx.int32), self.seq, self.ts, self.fs,
               self.is_, plan.embed, plan.head, plan.final_norm]
        for lp in plan.layers:
            cos, sin = lp.rope
            ins += [lp.qkv, lp.o, lp.gate_up, lp.down, lp.input_norm,
                    lp.post_attn_norm if lp.post_attn_norm is not None else one,
                    lp.pre_ff_norm, lp.post_ff_norm if lp.post_ff_norm is not None else one,
                    lp.q_norm if lp.q_norm is not None else one, lp.k_norm if lp.k_norm is not None else one,
                    cos, sin, lp.kv.k, lp.kv.v, lp.kv.kpos_dev]
        return ins

    def __call__(self, tok, pos, capture=None):
        """capture: a list that gets each layer's residual after the layer (hook_resid_post, [D])."""
        mx = self.mx
        if self._kernel is None:
            self._build()
        V = self.plan.head.shape[0]
        logits, resid, token, seq, stamps = self._kernel(
            inputs=self._inputs(tok, pos), template=[("T_", self.dt)],
            grid=(self.nb * NT, 1, 1), threadgroup=(NT, 1, 1),
            output_shapes=[(V,), (self.L, self.D), (1,), (1,), (5 * self.L + 2,)],
            output_dtypes=[self.dt, self.dt, mx.int32, mx.int32, mx.int64])
        self.stamps = stamps              # (written only when built with _stamps: block 0's clock, ns)
        if self.chain:
            self.seq = seq                # the next launch waits on this one (module doc)
        self.token = token
        if capture is not None:
            capture.extend(resid[i] for i in range(self.L))
        return logits.reshape(1, -1)
