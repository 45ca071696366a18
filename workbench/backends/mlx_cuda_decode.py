"""The MLX decode step on a CUDA GPU as a few custom kernels per layer (``mx.fast.cuda_kernel``).

MLX's CUDA backend pays several µs of host time per primitive (measured on an H100: ~9 µs for a trivial custom
kernel in a chain); the generic decode step has hundreds of them per token. Here one layer is:

* ``norm_gemv`` (q/k/v): the previous layer's residual update (post-FFN norm + add) and the input RMSNorm computed
  once per block into shared memory, then one warp per output row (16-byte loads);
* ``attn``: one block per query head — q/k RMSNorm and RoPE (rows of the cache's tables) of the new token, one-query
  attention over every slot of the cache (the slot written this step taken from registers), warps combined in
  shared memory; it also returns the new k and v rows, which MLX writes into the cache (two slice updates, and the
  slot's position);
* ``norm_gemv`` (o), ``norm_gemv`` (gate/up: post-attention norm + residual + pre-FFN norm, GELU·up), ``norm_gemv``
  (down).

The head is ``norm_gemv`` with the last residual update and the final norm (and Gemma 2's final softcap); the
argmax is MLX's. Roundings follow the plain path (after each norm, product, residual add, GELU), sums in float32.
Supported: Gemma 1-3 text layers with head_dim a multiple of 32, batch 1, float32/bfloat16/float16;
:func:`unsupported` says why not otherwise and the generic compiled step runs instead.
"""
from __future__ import annotations

from .base import fused_decode_unsupported

_HEADER = r"""
template <typename T> __device__ __forceinline__ float rnd(float x) { return static_cast<float>(static_cast<T>(x)); }
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <int NT> __device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  __syncthreads();
  if (l == 0) red[w] = v;
  __syncthreads();
  float t = (threadIdx.x < NT / 32) ? red[threadIdx.x] : 0.f;
  if (w == 0) { t = warp_sum(t); if (l == 0) red[0] = t; }
  __syncthreads();
  return red[0];
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* f) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat16* b = reinterpret_cast<const __nv_bfloat16*>(&u);
  #pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = __bfloat162float(b[i]);
}
__device__ __forceinline__ void load8(const __half* p, float* f) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half* b = reinterpret_cast<const __half*>(&u);
  #pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = __half2float(b[i]);
}
__device__ __forceinline__ void load8(const float* p, float* f) {
  float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ float tanh_f(float x) { return tanhf(x); }
// a product row's output from its sums: PAIR, GELU(gate) * up (s, s2 the gate and up sums); cap > 0, the softcap
template <typename T, bool PAIR> __device__ __forceinline__ float gemv_out(float s, float s2, float cap) {
  float y = s;
  if (PAIR) {
    float g = rnd<T>(s), u = rnd<T>(s2);
    g = rnd<T>(0.5f * g * (1.f + tanh_f(0.7978845608028654f * (g + 0.044715f * g * g * g))));
    y = g * u;
  }
  if (cap > 0.f) y = tanh_f(rnd<T>(y) / cap) * cap;
  return y;
}
// the new token's q (one head) and k (its kv head) in shared memory: RMSNorm with their weights (QKN), then RoPE
// from row p of the tables, rounded as the plain path rounds; all NT threads of the block take part
template <typename T, int HD, int NT, bool QKN, typename TQ, typename TC>
__device__ __forceinline__ void qk_norm_rope(float* q, float* k, const TQ* qw, const TQ* kw, const TC* cs,
                                             const TC* sn, int p, float* red, float eps) {
  constexpr int HALF = HD / 2;
  const int tid = threadIdx.x;
  if (QKN) {
    float a = 0.f, b = 0.f;
    for (int d = tid; d < HD; d += NT) { a += q[d] * q[d]; b += k[d] * k[d]; }
    const float qr = rsqrtf(block_sum<NT>(a, red) / HD + eps);
    const float kr = rsqrtf(block_sum<NT>(b, red) / HD + eps);
    for (int d = tid; d < HD; d += NT) {
      q[d] = rnd<T>(q[d] * qr * static_cast<float>(qw[d]));
      k[d] = rnd<T>(k[d] * kr * static_cast<float>(kw[d]));
    }
    __syncthreads();
  }
  for (int d = tid; d < HALF; d += NT) {
    const size_t r = (size_t)p * HD;
    const float c1 = static_cast<float>(cs[r + d]), c2 = static_cast<float>(cs[r + HALF + d]);
    const float s1 = static_cast<float>(sn[r + d]), s2 = static_cast<float>(sn[r + HALF + d]);
    const float x1 = q[d], x2 = q[d + HALF], k1 = k[d], k2 = k[d + HALF];
    q[d] = rnd<T>(x1 * c1 - x2 * s1); q[d + HALF] = rnd<T>(x2 * c2 + x1 * s2);
    k[d] = rnd<T>(k1 * c1 - k2 * s1); k[d + HALF] = rnd<T>(k2 * c2 + k1 * s2);
  }
  __syncthreads();
}
"""

# inputs: R, Y, PW, NW, W; outputs: out [N], rout [K or 1]. 128 threads, RPW rows per warp.
_GEMV = r"""
  constexpr int NT = 128;
  __shared__ float xs[K_];
  __shared__ float red[32];
  const int tid = threadIdx.x;
  if (HAS_NORM_) {
    float rs_y = 1.f;
    if (HAS_Y_ && POST_) {
      float a = 0.f;
      for (int k = tid; k < K_; k += NT) { float y = static_cast<float>(Y[k]); a += y * y; }
      rs_y = rsqrtf(block_sum<NT>(a, red) / K_ + EPS_);
    }
    float a2 = 0.f;
    for (int k = tid; k < K_; k += NT) {
      float r = static_cast<float>(R[k]);
      if (HAS_Y_) {
        float y = static_cast<float>(Y[k]);
        if (POST_) y = rnd<T_>(y * rs_y * static_cast<float>(PW[k]));
        r = rnd<T_>(r + y);
      }
      xs[k] = r;
      a2 += r * r;
      if (WRITE_R_ && blockIdx.x == 0) rout[k] = static_cast<T_>(r);
    }
    const float rs = rsqrtf(block_sum<NT>(a2, red) / K_ + EPS_);
    for (int k = tid; k < K_; k += NT) xs[k] = rnd<T_>(xs[k] * rs * static_cast<float>(NW[k]));
  } else {
    for (int k = tid; k < K_; k += NT) xs[k] = static_cast<float>(R[k]);
  }
  __syncthreads();
  const int warp = tid / 32, lane = tid % 32;
  for (int j = 0; j < RPW_; ++j) {
    const int n = (blockIdx.x * (NT / 32) + warp) * RPW_ + j;
    if (n >= N_) break;
    float s = 0.f, s2 = 0.f, f[8];
    const auto* w = W + (size_t)n * K_;
    for (int k8 = lane; k8 < K_ / 8; k8 += 32) {
      load8(w + k8 * 8, f);
      #pragma unroll
      for (int i = 0; i < 8; ++i) s += f[i] * xs[k8 * 8 + i];
    }
    if (PAIR_) {
      const auto* w2 = W + (size_t)(n + N_) * K_;
      for (int k8 = lane; k8 < K_ / 8; k8 += 32) {
        load8(w2 + k8 * 8, f);
        #pragma unroll
        for (int i = 0; i < 8; ++i) s2 += f[i] * xs[k8 * 8 + i];
      }
      s2 = warp_sum(s2);
    }
    s = warp_sum(s);
    if (lane == 0) out[n] = static_cast<T_>(gemv_out<T_, PAIR_ != 0>(s, s2, CAP_));
  }
"""

# inputs: qkv, qw, kw, cs, sn, pos, Kc, Vc, kpos; outputs: z [H*HD], knew, vnew [HKV*HD]. One block per q head.
_ATTN = r"""
  constexpr int NT = 1024, NWARP = NT / 32, PL = HD_ / 32;
  __shared__ float q[HD_], kn[HD_], vn[HD_];
  __shared__ float red[32], wm[NWARP], wl[NWARP];
  __shared__ float wacc[NWARP][HD_];
  const int h = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int kvh = h / G_;
  const int p = pos[0];
  const int slot = p % S_;
  for (int d = tid; d < HD_; d += NT) {
    q[d] = static_cast<float>(qkv[h * HD_ + d]);
    kn[d] = static_cast<float>(qkv[H_ * HD_ + kvh * HD_ + d]);
    vn[d] = static_cast<float>(qkv[(H_ + HKV_) * HD_ + kvh * HD_ + d]);
  }
  __syncthreads();
  qk_norm_rope<T_, HD_, NT, QKN_ != 0>(q, kn, qw, kw, cs, sn, p, red, EPS_);
  if (h % G_ == 0) {
    for (int d = tid; d < HD_; d += NT) {
      knew[kvh * HD_ + d] = static_cast<T_>(kn[d]);
      vnew[kvh * HD_ + d] = static_cast<T_>(vn[d]);
    }
  }
  float ql[PL], acc[PL];
  #pragma unroll
  for (int i = 0; i < PL; ++i) { ql[i] = q[lane + 32 * i]; acc[i] = 0.f; }
  float m = -INFINITY, l = 0.f;
  const size_t base = (size_t)kvh * S_ * HD_;
  for (int s = warp; s < S_; s += NWARP) {
    const int kp = (s == slot) ? p : kpos[s];
    const bool ok = kp >= 0 && kp <= p && (WIN_ == 0 || p - kp < WIN_);
    if (!ok) continue;
    float dot = 0.f;
    if (s == slot) {
      #pragma unroll
      for (int i = 0; i < PL; ++i) dot += ql[i] * kn[lane + 32 * i];
    } else {
      #pragma unroll
      for (int i = 0; i < PL; ++i) dot += ql[i] * static_cast<float>(Kc[base + (size_t)s * HD_ + lane + 32 * i]);
    }
    dot = warp_sum(dot) * SCALE_;
    if (CAP_ > 0.f) dot = tanh_f(dot / CAP_) * CAP_;
    const float mn = fmaxf(m, dot);
    const float alpha = expf(m - mn), pr = expf(dot - mn);
    l = l * alpha + pr;
    #pragma unroll
    for (int i = 0; i < PL; ++i) {
      const float v = (s == slot) ? vn[lane + 32 * i] : static_cast<float>(Vc[base + (size_t)s * HD_ + lane + 32 * i]);
      acc[i] = acc[i] * alpha + pr * v;
    }
    m = mn;
  }
  if (lane == 0) { wm[warp] = m; wl[warp] = l; }
  #pragma unroll
  for (int i = 0; i < PL; ++i) wacc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < NWARP; ++w) M = fmaxf(M, wm[w]);
  for (int d = tid; d < HD_; d += NT) {
    float num = 0.f, den = 0.f;
    for (int w = 0; w < NWARP; ++w) {
      const float e = (wm[w] == -INFINITY) ? 0.f : expf(wm[w] - M);
      num += e * wacc[w][d];
      den += e * wl[w];
    }
    z[h * HD_ + d] = static_cast<T_>(num / den);
  }
"""


def unsupported(cfg, ops, cache=None) -> str | None:
    """Why the custom-kernel step can't run a model of this config on these ops (None: it can)."""
    if ops.framework != "mlx" or getattr(ops.spec, "device", "") != "gpu":
        return "not mlx:gpu"
    try:
        import mlx.core as mx
        if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
            return "MLX is not on a CUDA GPU (Metal keeps the generic compiled step)"
    except Exception as e:  # pragma: no cover
        return f"mlx: {e}"
    why = fused_decode_unsupported(cfg, ops, cache)
    if why:
        return why
    D = cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        if cfg.head_dim(i) % 32 or cfg.head_dim(i) > 256 or D % 8 or cfg.intermediate(i) % 8:
            return (f"layer {i}: head_dim {cfg.head_dim(i)} (a multiple of 32 up to 256 needed), hidden and "
                    "intermediate sizes multiples of 8")
    return None


class MLXCudaDecodeStep:
    """``step(tok [1, 1], pos [1]) -> logits [1, V]`` on mlx:gpu (CUDA) for one
    :class:`~workbench.decode.plan.DecodePlan` (weights by role, per-layer flags, the static cache's buffers);
    pure MLX graph (custom kernels + slice updates of the cache), so ``mx.compile`` can trace it. The route checks
    :func:`unsupported` first."""

    def __init__(self, plan):
        import mlx.core as mx
        self.mx = mx
        self.plan = plan
        self.eps = float(plan.eps)
        self._k: dict = {}
        self.dt = plan.ops.mdtype

    def _kernel(self, kind, **defs):
        key = (kind,) + tuple(sorted(defs.items()))
        k = self._k.get(key)
        if k is None:
            mx = self.mx
            head = _HEADER + "".join(f"#define {n} {v!r}f\n" if isinstance(v, float) else f"#define {n} {v}\n"
                                     for n, v in defs.items())
            name = f"wb_{kind}_{abs(hash(key)) % 10**10}"
            if kind == "gemv":
                k = mx.fast.cuda_kernel(name=name, input_names=["R", "Y", "PW", "NW", "W"],
                                        output_names=["out", "rout"], source=_GEMV, header=head)
            else:
                k = mx.fast.cuda_kernel(name=name, input_names=["qkv", "qw", "kw", "cs", "sn", "pos", "Kc", "Vc",
                                                                "kpos"],
                                        output_names=["z", "knew", "vnew"], source=_ATTN, header=head)
            self._k[key] = k
        return k

    def _gemv(self, N, K, W, R, Y=None, PW=None, NW=None, write_r=False, pair=False, cap=0.0, rpw=None):
        mx = self.mx
        rpw = rpw or (8 if N >= 65536 else 2)
        k = self._kernel("gemv", EPS_=self.eps, CAP_=float(cap or 0.0))
        one = mx.zeros((1,), dtype=mx.float32)
        blocks = -(-N // (4 * rpw))
        out, rout = k(inputs=[R, Y if Y is not None else R, PW if PW is not None else one,
                              NW if NW is not None else one, W],
                      template=[("T_", self.dt), ("K_", K), ("N_", N), ("RPW_", rpw),
                                ("HAS_NORM_", int(NW is not None)), ("HAS_Y_", int(Y is not None)),
                                ("POST_", int(PW is not None)), ("WRITE_R_", int(write_r)), ("PAIR_", int(pair))],
                      grid=(blocks * 128, 1, 1), threadgroup=(128, 1, 1),
                      output_shapes=[(N,), (K,) if write_r else (1,)], output_dtypes=[self.dt, self.dt])
        return out, rout

    def __call__(self, tok, pos, capture=None):
        """capture: a list that gets each layer's residual after the layer (hook_resid_post, [D]) — the kernels'
        own residual outputs (parity)."""
        mx, plan = self.mx, self.plan
        D, H = plan.hidden, plan.n_heads
        x0 = (plan.embed[tok.reshape(-1)] * mx.array(plan.embed_scale, dtype=self.dt)).reshape(D)
        R, Y, PW = x0, None, None
        capa = float(plan.attn_softcap or 0.0)
        for i, lp in enumerate(plan.layers):
            hd, kvh, lc = lp.head_dim, lp.kv_heads, lp.kv
            qkv, resid = self._gemv((H + 2 * kvh) * hd, D, lp.qkv, R, Y, PW, lp.input_norm, write_r=True)
            if capture is not None and i > 0:
                capture.append(resid)
            cos, sin = lp.rope
            qn, kn = lp.q_norm, lp.k_norm
            one = mx.zeros((1,), dtype=mx.float32)
            ak = self._kernel("attn", EPS_=self.eps, CAP_=capa, SCALE_=float(lp.scale))
            z, knew, vnew = ak(
                inputs=[qkv, qn if qn is not None else one, kn if kn is not None else one, cos, sin,
                        pos.astype(mx.int32), lc.k, lc.v, lc.kpos_dev.astype(mx.int32)],
                template=[("T_", self.dt), ("H_", H), ("HKV_", kvh), ("HD_", hd), ("G_", H // kvh),
                          ("S_", lc.slots), ("QKN_", int(qn is not None)), ("WIN_", int(lp.window or 0))],
                grid=(H * 1024, 1, 1), threadgroup=(1024, 1, 1),
                output_shapes=[(H * hd,), (kvh * hd,), (kvh * hd,)], output_dtypes=[self.dt] * 3)
            lc.update_static(knew.reshape(1, kvh, 1, hd), vnew.reshape(1, kvh, 1, hd), pos)
            yo, _ = self._gemv(D, H * hd, lp.o, z)
            F = lp.intermediate
            a, mid = self._gemv(F, D, lp.gate_up, resid, yo, lp.post_attn_norm, lp.pre_ff_norm, write_r=True,
                                pair=True)
            yd, _ = self._gemv(D, F, lp.down, a)
            R, Y, PW = mid, yd, lp.post_ff_norm
        head = plan.head
        logits, last = self._gemv(head.shape[0], D, head, R, Y, PW, plan.final_norm, write_r=capture is not None,
                                  cap=plan.final_softcap or 0.0)
        if capture is not None:
            capture.append(last)
        return logits.reshape(1, -1)
