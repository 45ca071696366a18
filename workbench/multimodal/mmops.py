"""Extra ops the Gemma 4 vision and audio towers need, beyond ``workbench.backends`` (``ops``).

Each function takes the backend's ``ops`` object first and dispatches on ``ops.framework`` ("torch" or
"mlx"); arrays are the backend's own. Layout conventions follow the backends: activations [B, T, D],
attention heads [B, H, T, D]. Candidates to move into ``workbench.backends`` (see the report): ``conv2d``,
``layer_norm``, ``linear_bias``, ``clamp``, ``silu``/``sigmoid``/``relu``, ``pad``, ``take``,
``where``, ``rope_2d`` (positions per batch row).
"""
from __future__ import annotations

import math

import numpy as np


def _is_torch(ops) -> bool:
    return ops.framework == "torch"


def _mx():
    import mlx.core as mx
    return mx


def _torch():
    import torch
    return torch


# ------------------------------------------------------------------------------------------------ elementwise
def linear_bias(ops, x, w, b=None):
    y = ops.linear(x, w)
    return y if b is None else y + b


def clamp(ops, x, lo=None, hi=None):
    """Clamp to [lo, hi]; lo/hi are python floats (±inf or None = no bound)."""
    if lo is not None and math.isinf(lo) and lo < 0:
        lo = None
    if hi is not None and math.isinf(hi) and hi > 0:
        hi = None
    if lo is None and hi is None:
        return x
    if _is_torch(ops):
        return x.clamp(min=lo, max=hi)
    mx = _mx()
    if lo is not None:
        x = mx.maximum(x, mx.array(lo, dtype=x.dtype))
    if hi is not None:
        x = mx.minimum(x, mx.array(hi, dtype=x.dtype))
    return x


def silu(ops, x):
    if _is_torch(ops):
        return _torch().nn.functional.silu(x)
    mx = _mx()
    return x * mx.sigmoid(x)


def sigmoid(ops, x):
    if _is_torch(ops):
        return _torch().sigmoid(x)
    return _mx().sigmoid(x)


def relu(ops, x):
    if _is_torch(ops):
        return _torch().relu(x)
    return _mx().maximum(x, 0)


def tanh(ops, x):
    if _is_torch(ops):
        return _torch().tanh(x)
    return _mx().tanh(x)


def where(ops, cond, a, b):
    """cond: backend bool array (or numpy bool, converted); a/b arrays or python scalars."""
    if isinstance(cond, np.ndarray):
        cond = ops.asmask(cond)
    if _is_torch(ops):
        torch = _torch()
        ref = a if isinstance(a, torch.Tensor) else b
        if not isinstance(a, torch.Tensor):
            a = torch.tensor(a, dtype=ref.dtype, device=ref.device)
        if not isinstance(b, torch.Tensor):
            b = torch.tensor(b, dtype=ref.dtype, device=ref.device)
        return torch.where(cond, a, b)
    mx = _mx()
    ref = a if isinstance(a, mx.array) else b
    if not isinstance(a, mx.array):
        a = mx.array(a, dtype=ref.dtype)
    if not isinstance(b, mx.array):
        b = mx.array(b, dtype=ref.dtype)
    return mx.where(cond, a, b)


def to_acc(ops, x):
    """Cast to the accumulation dtype (float32; float64 for the float64 reference)."""
    return ops.cast(x, "float64" if ops.dtype == "float64" else "float32")


def matmul(ops, a, b):
    return a @ b


# ------------------------------------------------------------------------------------------------ shape
def pad(ops, x, axis: int, before: int, after: int, value: float = 0.0):
    """Constant-pad one axis."""
    if before == 0 and after == 0:
        return x
    axis = axis % len(x.shape)
    if _is_torch(ops):
        torch = _torch()
        spec = []
        for ax in range(len(x.shape) - 1, -1, -1):
            spec += [before, after] if ax == axis else [0, 0]
        return torch.nn.functional.pad(x, spec, value=value)
    mx = _mx()
    widths = [(0, 0)] * len(x.shape)
    widths[axis] = (before, after)
    return mx.pad(x, widths, constant_values=value)


def take(ops, x, idx: np.ndarray, axis: int):
    """Gather along ``axis`` with a numpy integer index array of any shape (numpy ``take`` semantics)."""
    idx = np.asarray(idx)
    if _is_torch(ops):
        torch = _torch()
        flat = torch.as_tensor(idx.reshape(-1), dtype=torch.long, device=x.device)
        axis = axis % x.dim()
        y = torch.index_select(x, axis, flat)
        return y.reshape(tuple(x.shape[:axis]) + idx.shape + tuple(x.shape[axis + 1:]))
    mx = _mx()
    return mx.take(x, mx.array(idx.astype(np.int32)), axis=axis)


# ------------------------------------------------------------------------------------------------ norms
def layer_norm(ops, x, w, b, eps: float):
    """LayerNorm over the last axis (HF nn.LayerNorm), computed in float32 like torch does on CPU."""
    if _is_torch(ops):
        F = _torch().nn.functional
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)
    mx = _mx()
    return mx.fast.layer_norm(x, w, b, eps)


# ------------------------------------------------------------------------------------------------ convolutions
def prep_conv2d(ops, w_oihw: np.ndarray):
    """Conv2d weight [out, in, kh, kw] (torch layout) -> the backend's layout."""
    if _is_torch(ops):
        return ops.asarray(w_oihw)
    return ops.asarray(np.ascontiguousarray(np.transpose(w_oihw, (0, 2, 3, 1))))   # MLX: [out, kh, kw, in]


def conv2d_nhwc(ops, x, w, stride: int, padding: int):
    """2-D convolution (cross-correlation, no bias) on channels-last x [B, H, W, C]; w from ``prep_conv2d``.
    Returns [B, H', W', out]."""
    if _is_torch(ops):
        F = _torch().nn.functional
        y = F.conv2d(x.permute(0, 3, 1, 2), w, stride=stride, padding=padding)
        return y.permute(0, 2, 3, 1)
    mx = _mx()
    return mx.conv2d(x, w, stride=stride, padding=padding)


def causal_depthwise_conv1d(ops, x, w: list, K: int):
    """Depthwise causal conv over time: x [B, T, C], ``w`` the K per-tap weight rows ([C] each, as backend
    arrays); y[t] = sum_k w[k] * x[t - (K-1) + k] with zeros before t=0 (HF pads K-1 on the left)."""
    T = x.shape[1]
    xp = pad(ops, x, 1, K - 1, 0)
    y = None
    for k in range(K):
        term = xp[:, k:k + T] * w[k]
        y = term if y is None else y + term
    return y


# ------------------------------------------------------------------------------------------------ rope
def rope_tables_2d(positions: np.ndarray, head_dim: int, theta: float):
    """Axial 2-D RoPE tables as HF's Gemma4VisionRotaryEmbedding builds them: ``positions`` [B, P, 2] (x, y);
    inv_freq over head_dim//2 (step 2); layout [x-freqs, x-freqs, y-freqs, y-freqs]. Returns numpy
    (cos, sin) [B, P, head_dim] in float64."""
    spatial = head_dim // 2
    inv = 1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float64) / spatial))
    pos = positions.astype(np.float64)
    fx = pos[..., 0:1] * inv
    fy = pos[..., 1:2] * inv
    ang = np.concatenate([fx, fx, fy, fy], axis=-1)
    return np.cos(ang), np.sin(ang)


def apply_rope_2d(ops, x, cos, sin):
    """HF ``apply_multidimensional_rope`` with two spatial axes. x [B, H, P, D]; cos/sin backend arrays
    [B, 1, P, D]. The first half of D rotates (rotate_half within the half) with the x angles, the second
    half with the y angles."""
    D = x.shape[-1]
    h = D // 2
    q = h // 2
    parts = []
    for a in range(2):
        xa = x[..., a * h:(a + 1) * h]
        ca = cos[..., a * h:(a + 1) * h]
        sa = sin[..., a * h:(a + 1) * h]
        rot = ops.concat([-xa[..., q:], xa[..., :q]], -1)
        parts.append(xa * ca + rot * sa)
    return ops.concat(parts, -1)
