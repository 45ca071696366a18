"""The media towers' ops on MLX (Gemma 4 vision and audio): a mixin of :class:`~workbench.backends.mlx.MLXOps`.
Contracts in :mod:`workbench.backends.protocol` ("media towers")."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from .composed import clamp_bounds as _bounds


class MLXMediaOps:
    # sigmoid / relu / tanh / where: composed.ComposedOps, one call each of these
    ELEMENTWISE = dict(sigmoid=mx.sigmoid, relu=lambda x: mx.maximum(x, 0), tanh=mx.tanh, where=mx.where)

    def clamp(self, x, lo=None, hi=None):
        lo, hi = _bounds(lo, hi)
        if lo is not None:
            x = mx.maximum(x, mx.array(lo, dtype=x.dtype))
        if hi is not None:
            x = mx.minimum(x, mx.array(hi, dtype=x.dtype))
        return x

    def silu(self, x):
        return x * mx.sigmoid(x)

    def layer_norm(self, x, w, b, eps):
        return mx.fast.layer_norm(x, w, b, eps)

    def pad(self, x, axis, before, after, value=0.0):
        if before == 0 and after == 0:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis % x.ndim] = (before, after)
        return mx.pad(x, widths, constant_values=value)

    def take(self, x, idx, axis):
        return mx.take(x, mx.array(np.asarray(idx).astype(np.int32)), axis=axis)

    def conv2d_weight(self, w_oihw):
        return self.asarray(np.ascontiguousarray(np.transpose(w_oihw, (0, 2, 3, 1))))   # MLX: [out, kh, kw, in]

    def conv2d(self, x, w, stride, padding):
        return mx.conv2d(x, w, stride=stride, padding=padding)
