"""torch ops: CPU, CUDA (and ROCm, which torch exposes as cuda), MPS. Attention goes through SDPA unless
the probabilities are tapped or a softcap is needed (Gemma 2), where the explicit path runs."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from . import attn_plan, cpu_gemv
from . import quant
from .quant import QuantWeight
from .base import BackendSpec, Ops
from .composed import ComposedOps
from .torch_media import TorchMediaOps

_TD = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_FUSED_GEMV_MAX = 1 << 24     # larger matrices (a 262k-vocabulary head) stay with cuBLAS
_GEMV_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def _cpu_gemv(x, w):
    """One-row x [..., K] times w [N, K]^T on the CPU through :mod:`cpu_gemv` (faster kernels for decode);
    None where it does not apply. Result in x's dtype, accumulated in float32 (float64) like F.linear.
    Under torch.compile it is the custom op ``workbench::cpu_gemv`` (an opaque call inductor keeps)."""
    name = _GEMV_DTYPES.get(w.dtype)
    if name is None or w.requires_grad or x.requires_grad or not w.is_contiguous():
        return None
    if torch.compiler.is_compiling():
        return _gemv_op(x.reshape(-1), w).reshape(*x.shape[:-1], w.shape[0])
    return _cpu_gemv_eager(x, w, name)


@torch.library.custom_op("workbench::cpu_gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = _cpu_gemv_eager(x, w, _GEMV_DTYPES[w.dtype])
    return F.linear(x, w) if y is None else y


@_gemv_op.register_fake
def _(x, w):
    return x.new_empty((w.shape[0],))


def _cpu_gemv_eager(x, w, name):
    if name == "float64" or cpu_gemv.kernel() is None:      # numpy's BLAS, or None
        wn = w.view(torch.int16).numpy() if name == "bfloat16" else w.numpy()
        xn = x.detach().reshape(-1).to(torch.float64 if name == "float64" else torch.float32).numpy()
        y = cpu_gemv.gemv_np(wn, xn, name)
        return None if y is None else torch.from_numpy(y).to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
    # the C kernel on the tensors' own memory: no numpy round trip
    N, K = w.shape
    xc = x.detach().contiguous()
    y = torch.empty(x.shape[:-1] + (N,), dtype=x.dtype)
    cpu_gemv.gemv_ptr("bf16_io" if name == "bfloat16" else "f32", w.data_ptr(), xc.data_ptr(), y.data_ptr(), N, K)
    return y


def _cpu_rms_norm(x, w, eps):
    """RMSNorm of a few rows (decode) on the CPU through the C kernel; None where it does not apply."""
    if x.dtype not in (torch.float32, torch.bfloat16) or x.numel() > 16 * x.shape[-1] or x.requires_grad or \
            (w is not None and (w.dtype != torch.float32 or w.requires_grad or not w.is_contiguous())) or \
            torch.compiler.is_compiling() or cpu_gemv.kernel() is None:
        return None
    xc = x.detach().contiguous()
    y = torch.empty_like(xc)
    D = x.shape[-1]
    cpu_gemv.rms_norm_ptr(xc.data_ptr(), None if w is None else w.data_ptr(), y.data_ptr(), xc.numel() // D, D,
                          eps, x.dtype == torch.bfloat16)
    return y


class TorchOps(TorchMediaOps, ComposedOps, attn_plan.PlannedAttention, Ops):
    framework = "torch"

    def __init__(self, spec: BackendSpec, dtype: str):
        self._identity(spec, dtype)
        self.tdtype = _TD[dtype]
        dev = spec.device if spec.index is None else f"{spec.device}:{spec.index}"
        self.device = torch.device(dev)
        # norms and softmax accumulate in float32 (float64 for the reference), as HF does
        self.acc = torch.float64 if dtype == "float64" else torch.float32
        self._rope_cache: dict = {}
        # one-row products (decode) on the CPU: faster kernels, see cpu_gemv
        self._cpu_gemv = self.device.type == "cpu" and cpu_gemv.mode() != "off"
        # the compiled GPU decode step writes one-row products and one-query attention as float32 reductions
        # inductor fuses; the decode route sets it False for WORKBENCH_GPU_DECODE=cublas (the library kernels)
        self.fused_reductions = True

    # ------------------------------------------------------------ data movement
    def asarray(self, a, dtype=None):
        if isinstance(a, QuantWeight):      # GGUF blocks kept quantised (quant.py): the ops below take it as is
            return a
        if isinstance(a, torch.Tensor):
            return a.to(self.device, _TD[dtype] if dtype else self.tdtype)
        a = np.ascontiguousarray(a)
        if not a.flags.writeable:
            a = a.copy()
        t = torch.from_numpy(a)
        return t.to(device=self.device, dtype=_TD[dtype] if dtype else self.tdtype)

    def zeros(self, shape, dtype=None):
        return torch.zeros(shape, dtype=_TD[dtype] if dtype else self.tdtype, device=self.device)

    def asids(self, a):
        return torch.as_tensor(np.asarray(a, dtype=np.int64), device=self.device)

    def asmask(self, m: np.ndarray):
        return torch.as_tensor(m, device=self.device)

    def numpy(self, x):
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.cpu().numpy()

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def peak_memory(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None

    # ------------------------------------------------------------ shape
    def reshape(self, x, shape):
        return x.reshape(shape)

    def transpose(self, x, axes):
        return x.permute(*axes)

    def concat(self, xs, axis):
        if axis == 0 and any(isinstance(x, QuantWeight) for x in xs):   # a fused projection of quantised matrices
            return QuantWeight.concat(xs)
        return torch.cat(xs, dim=axis)

    def take_rows(self, w, ids):
        if isinstance(w, QuantWeight):      # the looked-up rows dequantised (quant.py)
            return quant.torch_rows(w, ids).to(self.tdtype)
        return F.embedding(ids, w)

    # ------------------------------------------------------------ math
    def linear(self, x, w):
        if isinstance(w, QuantWeight):      # GGUF blocks: the quantised GEMV (one row), chunked dequant + GEMM
            return quant.torch_linear(x, w, self.quant_act8)
        if x.numel() == x.shape[-1] and w.dtype == x.dtype:
            if self._cpu_gemv:
                y = _cpu_gemv(x, w)     # decode on the CPU: see cpu_gemv
                if y is not None:
                    return y
            elif self.device.type == "cuda" and self.fused_reductions and w.numel() <= _FUSED_GEMV_MAX and \
                    torch.compiler.is_compiling():
                # compiled decode on a GPU: written as a float32 reduction, inductor makes it one Triton
                # kernel (with the casts and neighbouring elementwise work fused) instead of a cuBLAS GEMV
                # that costs ~4 µs of launch latency for a 1-5 MB matrix. Same math as F.linear: products
                # and sum in float32, one rounding to the dtype.
                return (x.to(self.acc).unsqueeze(-2) * w.to(self.acc)).sum(-1).to(x.dtype)
        return F.linear(x, w)

    def rms_norm(self, x, w, eps):
        if w is not None and w.dim() > 1:     # [G, D] for x [..., G, D]: the norm, then the weight rows, in acc
            return (F.rms_norm(x.to(self.acc), (x.shape[-1],), None, eps) * w).to(x.dtype)
        if self._cpu_gemv:
            y = _cpu_rms_norm(x, w, eps)   # decode (a few rows) on the CPU: see cpu_gemv
            if y is not None:
                return y
        if x.dtype == self.acc:      # float32/float64 models: torch's fused kernel, same math
            return F.rms_norm(x, (x.shape[-1],), w, eps)
        # bfloat16/float16: the same fused kernel in acc, one rounding (3 kernels instead of 7)
        return F.rms_norm(x.to(self.acc), (x.shape[-1],), w, eps).to(x.dtype)

    def gelu(self, x, approximate=True):
        return F.gelu(x, approximate="tanh" if approximate else "none")

    def softcap(self, x, cap):
        return torch.tanh(x / cap) * cap

    def scale(self, x, s: float):
        """x * s with s rounded to x's dtype first (as HF does for the embedding scale)."""
        if torch.compiler.is_compiling():
            return x * torch.tensor(s, dtype=x.dtype, device=x.device)
        # rounded on the host: a device scalar from Python is a host-to-device copy (a stream sync on CUDA)
        return x * float(torch.tensor(s, dtype=x.dtype))

    def _cos_sin(self, inv_freq: np.ndarray, start: int, T: int):
        key = (inv_freq.tobytes(), start, T)
        hit = self._rope_cache.get(key)
        if hit is not None:
            return hit
        pos = torch.arange(start, start + T, dtype=self.acc, device=self.device)
        inv = torch.as_tensor(inv_freq, dtype=self.acc, device=self.device)
        ang = pos[:, None] * inv[None, :]
        emb = torch.cat([ang, ang], dim=-1)
        h = ang.shape[-1]
        sin = emb.sin().to(self.tdtype)
        sin[:, :h] = -sin[:, :h]     # rotate_half's minus folded into the table (exact: a sign)
        cs = (emb.cos().to(self.tdtype), sin)
        if len(self._rope_cache) > 64:
            self._rope_cache.clear()
        self._rope_cache[key] = cs
        return cs

    def rope(self, x, inv_freq, start):
        # x: [B, H, T, D]; NeoX rotate_half pairing (i, i + D/2) as HF's apply_rotary_pos_emb
        T = x.shape[2]
        cos, sin = self._cos_sin(inv_freq, start, T)    # sin's first half negated
        h = x.shape[-1] // 2
        rot = torch.cat([x[..., h:], x[..., :h]], dim=-1)
        return x * cos + rot * sin

    def rope_table(self, inv_freq, n: int):
        pos = torch.arange(n, dtype=self.acc, device=self.device)
        inv = torch.as_tensor(inv_freq, dtype=self.acc, device=self.device)
        ang = pos[:, None] * inv[None, :]
        emb = torch.cat([ang, ang], dim=-1)
        return emb.cos().to(self.tdtype), emb.sin().to(self.tdtype)

    def rope_rows(self, table, pos):
        """The (cos, sin) rows of a rope table at device-side positions (-1 = empty slot)."""
        cos, sin = table
        idx = pos.clamp(min=0)
        return cos[idx], sin[idx]


    def decode_attention(self, q, k, v, mask, scale, softcap):
        """One query per head against the whole cache, written out so inductor fuses it (cuDNN/flash SDPA
        kernels cost ~16 µs each for a single query): GQA by grouping query heads per KV head, no copies."""
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        if self.device.type == "cpu" and softcap is None:
            # CPU: SDPA in float32 (float64) beats the written-out bfloat16 matmuls ~5x for one query
            o = F.scaled_dot_product_attention(
                q.to(self.acc), k.to(self.acc), v.to(self.acc), scale=scale, enable_gqa=H != Hkv,
                attn_mask=None if mask is None else mask.reshape(1, 1, 1, -1))
            return o.to(q.dtype)
        qg = q.reshape(B, Hkv, (H // Hkv) * T, D)
        if self.device.type == "cuda" and self.fused_reductions and torch.compiler.is_compiling():
            # as in linear(): reductions inductor fuses with the mask and softmax, no cuBLAS launches
            s = (qg.to(self.acc).unsqueeze(-2) * k.to(self.acc).unsqueeze(-3)).sum(-1) * scale
            if softcap is not None:
                s = torch.tanh(s / softcap) * softcap
            if mask is not None:
                s = s.masked_fill(~mask.reshape(1, 1, 1, -1), float("-inf"))
            p = torch.softmax(s, dim=-1)
            o = (p.unsqueeze(-1) * v.to(self.acc).unsqueeze(-3)).sum(-2)
            return o.to(q.dtype).reshape(B, H, T, D)
        s = torch.matmul(qg, k.transpose(-1, -2)) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if mask is not None:
            s = s.masked_fill(~mask.reshape(1, 1, 1, -1), float("-inf"))
        p = torch.softmax(s.to(self.acc), dim=-1).to(q.dtype)
        return torch.matmul(p, v).reshape(B, H, T, D)

    def argmax_last(self, logits):
        """argmax over a large vocabulary in two parallel stages (a single-block reduction over 262k
        entries is slow on GPU)."""
        B, V = logits.shape
        if V % 1024 or V < 65536:
            return logits.argmax(-1, keepdim=True)
        vals, idx = logits.view(B, V // 1024, 1024).max(-1)
        blk = vals.argmax(-1, keepdim=True)
        return blk * 1024 + torch.gather(idx, 1, blk)

    def _sdpa(self, q, k, v, mask, scale, causal=False):
        """SDPA (flash / memory-efficient / CPU flash); causal: lower-right aligned (torch's is_causal is top-left:
        the same when T == S, else the mask is built)."""
        H, Hkv = q.shape[1], k.shape[1]
        if causal and q.shape[2] != k.shape[2]:
            mask, causal = self._causal_mask(q.shape[2], k.shape[2], None), False
        if H != Hkv and self.device.type == "cuda" and os.environ.get("WORKBENCH_SDPA_GQA", "native") == "expand":
            # A/B switch: repeated K/V heads, as HF's sdpa attention does with a mask (torch 2.11 on the H200: the
            # masked and float32 kernels take grouped K/V as they are, ~10% faster at pp4096 without the copies)
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=k.shape[1] != H)

    def _explicit_attention(self, q, k, v, mask, scale, softcap):
        # written out (a softcap, or the probabilities wanted); mask: bool [T, S] (True = attend) or None
        H, Hkv = q.shape[1], k.shape[1]
        if H != Hkv:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s.to(self.acc), dim=-1).to(q.dtype)
        return torch.matmul(p, v), p

    def softmax_f32(self, x):
        return torch.softmax(x.to(self.acc), dim=-1)

    def topk(self, x, k):
        vals, idx = torch.topk(x, k, dim=-1)
        return vals, idx

    def cast(self, x, dtype: str | None = None):
        return x.to(_TD[dtype] if dtype else self.tdtype)
