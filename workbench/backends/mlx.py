"""MLX ops (CPU, Metal, CUDA) with MLX's fast kernels: mx.fast.rms_norm, mx.fast.rope,
mx.fast.scaled_dot_product_attention."""
from __future__ import annotations

import contextlib
import functools
import math

import mlx.core as mx
import numpy as np

from . import attn_plan, cpu_gemv
from .base import BackendSpec, Ops
from .composed import ComposedOps
from .mlx_media import MLXMediaOps

_MD = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_GEMV_NAMES = {mx.float32: "float32", mx.bfloat16: "bfloat16"}


@functools.partial(mx.compile, shapeless=True)
def _gelu_tanh(x):
    """The tanh GELU as one fused kernel (mlx.nn.gelu_approx's formula and compilation)."""
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


class MLXOps(MLXMediaOps, ComposedOps, attn_plan.PlannedAttention, Ops):
    framework = "mlx"

    def __init__(self, spec: BackendSpec, dtype: str):
        self._identity(spec, dtype)
        self.mdtype = _MD[dtype]
        self.device = mx.gpu if spec.device == "gpu" else mx.cpu
        mx.set_default_device(self.device)
        self._freqs_cache: dict = {}
        self._wcast: dict = {}      # id(norm weight) -> (weight, weight in the dtype): one cast per weight, not per call
        self._cpu_gemv = spec.device == "cpu" and cpu_gemv.mode() != "off"

    @contextlib.contextmanager
    def traceable(self):
        """Within the block no op leaves MLX (the numpy products of the CPU route can't run inside mx.compile)."""
        saved, self._cpu_gemv = self._cpu_gemv, False
        try:
            yield
        finally:
            self._cpu_gemv = saved

    # ------------------------------------------------------------ data movement
    def asarray(self, a, dtype=None):
        if isinstance(a, mx.array):
            return a.astype(_MD[dtype] if dtype else self.mdtype)
        a = np.asarray(a)
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        return mx.array(a).astype(_MD[dtype] if dtype else self.mdtype)

    def zeros(self, shape, dtype=None):
        return mx.zeros(shape, dtype=_MD[dtype] if dtype else self.mdtype)

    def asids(self, a):
        return mx.array(np.asarray(a, dtype=np.int32))

    def asmask(self, m: np.ndarray):
        return mx.array(m)

    def numpy(self, x):
        if x.dtype in (mx.bfloat16, mx.float16):
            x = x.astype(mx.float32)
        return np.array(x)

    def synchronize(self):
        mx.synchronize() if hasattr(mx, "synchronize") else None

    def peak_memory(self) -> int | None:
        try:
            return int(mx.get_peak_memory())
        except Exception:
            return None

    # ------------------------------------------------------------ shape
    def reshape(self, x, shape):
        return x.reshape(shape)

    def transpose(self, x, axes):
        return x.transpose(axes)

    def concat(self, xs, axis):
        return mx.concatenate(xs, axis=axis)

    def take_rows(self, w, ids):
        return w[ids]

    # ------------------------------------------------------------ math
    def linear(self, x, w):
        if self._cpu_gemv and w.dtype == x.dtype:
            if x.size == x.shape[-1]:
                y = self._gemv(x, w)     # decode on the CPU: see cpu_gemv
                if y is not None:
                    return y
            elif w.dtype == mx.float32:
                # prefill on the CPU, float32: numpy's BLAS sgemm (MLX's CPU matmul reaches ~3 GB/s / a few
                # GFLOP/s here: 18 s to prefill 128 tokens of the 270M, under 1 s this way). Same math.
                wn = np.array(w, copy=False)
                if wn.flags.c_contiguous:
                    xn = np.array(x, copy=False).reshape(-1, x.shape[-1])
                    return mx.array(xn @ wn.T).reshape(*x.shape[:-1], w.shape[0])
        return x @ w.T

    def _gemv(self, x, w):
        name = _GEMV_NAMES.get(w.dtype)
        if name is None:
            return None
        # zero-copy numpy views of the evaluated arrays (bfloat16 as its uint16 bits)
        wn = np.array(w.view(mx.uint16) if name == "bfloat16" else w, copy=False)
        if not wn.flags.c_contiguous:
            return None
        y = cpu_gemv.gemv_np(wn, np.array(x.reshape(-1).astype(mx.float32), copy=False), name)
        if y is None:
            return None
        return mx.array(y).astype(x.dtype).reshape(*x.shape[:-1], w.shape[0])

    def rms_norm(self, x, w, eps):
        if w is None:
            return mx.fast.rms_norm(x, None, eps)
        if w.dtype != x.dtype:
            hit = self._wcast.get(id(w))
            if hit is None or hit[0] is not w or hit[1].dtype != x.dtype:
                hit = self._wcast[id(w)] = (w, w.astype(x.dtype))
            w = hit[1]
        if w.ndim > 1:          # [G, D] for x [..., G, D]: one weight row per group
            return mx.fast.rms_norm(x, None, eps) * w
        return mx.fast.rms_norm(x, w, eps)

    def gelu(self, x, approximate=True):
        if approximate:
            return _gelu_tanh(x)
        return x * (1 + mx.erf(x / math.sqrt(2))) / 2

    def softcap(self, x, cap):
        return mx.tanh(x / cap) * cap

    def scale(self, x, s: float):
        return x * mx.array(s, dtype=x.dtype)

    def _freqs(self, inv_freq: np.ndarray):
        key = inv_freq.tobytes()
        f = self._freqs_cache.get(key)
        if f is None:
            with np.errstate(divide="ignore"):
                periods = np.where(inv_freq > 0, 1.0 / np.where(inv_freq > 0, inv_freq, 1.0), np.inf)
            f = mx.array(periods.astype(np.float32))
            self._freqs_cache[key] = f
        return f

    def rope(self, x, inv_freq, start):
        D = x.shape[-1]
        return mx.fast.rope(x, D, traditional=False, base=None, scale=1.0, offset=int(start),
                            freqs=self._freqs(inv_freq))

    def rope_table(self, inv_freq, n: int):
        ang = np.arange(n, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
        emb = np.concatenate([ang, ang], -1)
        return (mx.array(np.cos(emb).astype(np.float32)).astype(self.mdtype),
                mx.array(np.sin(emb).astype(np.float32)).astype(self.mdtype))

    def rope_rows(self, table, pos):
        cos, sin = table
        idx = mx.maximum(pos, 0)
        return cos[idx], sin[idx]


    def decode_attention(self, q, k, v, mask, scale, softcap):
        if softcap is None:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return self.attention(q, k, v, mask, scale, softcap, False)[0]

    def argmax_last(self, logits):
        return mx.argmax(logits, axis=-1, keepdims=True)

    def _sdpa(self, q, k, v, mask, scale, causal=False):
        """mx.fast SDPA; its "causal" mask is lower-right aligned, as a CausalMask's."""
        if causal and q.shape[2] > 1:
            mask = "causal"
        if self._cpu_gemv and q.dtype == mx.float32 and q.shape[2] > 1:
            return self._np_sdpa(q, k, v, mask, scale)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def _np_sdpa(self, q, k, v, mask, scale):
        """mlx:cpu float32 prefill attention with numpy's BLAS for the two products (MLX's CPU SDPA takes ~0.8 s for
        512 queries x 4 heads of the 270M; this ~0.1 s), grouped query heads without copies, query rows in blocks of
        ~256 MB of scores. Scores, softmax and P @ V in float64, rounded once to float32: in float32 BLAS's
        summation order drifted 1.2e-5 from HF on the saturating gemma4_bidir fixture (mx.fast: 0.9e-5)."""
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        g = H // Hkv
        qn = np.asarray(q).astype(np.float64).reshape(B, Hkv, g, T, D)
        kt = np.asarray(k).astype(np.float64).transpose(0, 1, 3, 2)[:, :, None]
        vn = np.asarray(v).astype(np.float64)[:, :, None]
        mn = attn_plan.dense(T, S, None) if isinstance(mask, str) else None if mask is None else np.asarray(mask)
        if mn is not None and mn.ndim == 4:     # [B|1, H|1, T, S] -> the grouped layout [B|1, Hkv|1, g|1, T, S]
            mn = mn.reshape(mn.shape[0], Hkv, g, T, S) if mn.shape[1] == H else mn[:, :, None]
        out = np.empty((B, Hkv, g, T, D), np.float32)
        step = max(1, (1 << 25) // max(1, B * H * S))
        for a in range(0, T, step):
            sc = np.matmul(qn[:, :, :, a:a + step], kt) * float(scale)
            if mn is not None:
                sc = np.where(mn[..., a:a + step, :], sc, -np.inf)
            sc -= sc.max(-1, keepdims=True)
            np.exp(sc, out=sc)
            sc /= sc.sum(-1, keepdims=True)
            out[:, :, :, a:a + step] = np.matmul(sc, vn)
        return mx.array(out.reshape(B, H, T, D))

    def _explicit_attention(self, q, k, v, mask, scale, softcap):
        H, Hkv = q.shape[1], k.shape[1]
        if H != Hkv:
            k = mx.repeat(k, H // Hkv, axis=1)
            v = mx.repeat(v, H // Hkv, axis=1)
        s = (q @ k.swapaxes(-1, -2)) * scale
        if softcap is not None:
            s = mx.tanh(s / softcap) * softcap
        if mask is not None:
            s = mx.where(mask, s, mx.array(-mx.inf, dtype=s.dtype))
        p = mx.softmax(s.astype(mx.float32), axis=-1).astype(q.dtype)
        return p @ v, p

    def softmax_f32(self, x):
        return mx.softmax(x.astype(mx.float32), axis=-1)

    def topk(self, x, k):
        idx = mx.argsort(-x, axis=-1)[..., :k]
        return mx.take_along_axis(x, idx, axis=-1), idx

    def cast(self, x, dtype: str | None = None):
        return x.astype(_MD[dtype] if dtype else self.mdtype)
