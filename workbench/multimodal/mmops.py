"""Compositions of ops the Gemma 4 vision and audio towers share — framework-free: each takes the backend's
``ops`` first and uses only its protocol (:mod:`workbench.backends.protocol`, whose "media towers" section holds
the primitives: clamp, silu, sigmoid, relu, tanh, where, layer_norm, pad, take, conv2d_weight, conv2d).
Layouts follow the backends: activations [B, T, D], attention heads [B, H, T, D].
"""
from __future__ import annotations

import numpy as np


def linear_bias(ops, x, w, b=None):
    y = ops.linear(x, w)
    return y if b is None else y + b


def to_acc(ops, x):
    """Cast to the accumulation dtype (float32; float64 for the float64 reference)."""
    return ops.cast(x, "float64" if ops.dtype == "float64" else "float32")


def matmul(ops, a, b):
    return a @ b


def causal_depthwise_conv1d(ops, x, w: list, K: int):
    """Depthwise causal conv over time: x [B, T, C], ``w`` the K per-tap weight rows ([C] each, as backend
    arrays); y[t] = sum_k w[k] * x[t - (K-1) + k] with zeros before t=0 (HF pads K-1 on the left)."""
    T = x.shape[1]
    xp = ops.pad(x, 1, K - 1, 0)
    y = None
    for k in range(K):
        term = xp[:, k:k + T] * w[k]
        y = term if y is None else y + term
    return y


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
