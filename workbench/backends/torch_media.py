"""The media towers' ops on torch (Gemma 4 vision and audio): a mixin of :class:`~workbench.backends.torch.TorchOps`.
Contracts in :mod:`workbench.backends.protocol` ("media towers")."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .composed import clamp_bounds as _bounds


class TorchMediaOps:
    # sigmoid / relu / tanh / where: composed.ComposedOps, one call each of these
    ELEMENTWISE = dict(sigmoid=torch.sigmoid, relu=torch.relu, tanh=torch.tanh, where=torch.where)

    def clamp(self, x, lo=None, hi=None):
        lo, hi = _bounds(lo, hi)
        return x if lo is None and hi is None else x.clamp(min=lo, max=hi)

    def silu(self, x):
        return F.silu(x)

    def layer_norm(self, x, w, b, eps):
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)

    def pad(self, x, axis, before, after, value=0.0):
        if before == 0 and after == 0:
            return x
        axis = axis % x.dim()
        spec = []
        for ax in range(x.dim() - 1, -1, -1):       # F.pad lists the last axis first
            spec += [before, after] if ax == axis else [0, 0]
        return F.pad(x, spec, value=value)

    def take(self, x, idx, axis):
        idx = np.asarray(idx)
        axis = axis % x.dim()
        flat = torch.as_tensor(idx.reshape(-1), dtype=torch.long, device=x.device)
        y = torch.index_select(x, axis, flat)
        return y.reshape(tuple(x.shape[:axis]) + idx.shape + tuple(x.shape[axis + 1:]))

    def conv2d_weight(self, w_oihw):
        return self.asarray(w_oihw)                  # torch's own layout [out, in, kh, kw]

    def conv2d(self, x, w, stride, padding):
        y = F.conv2d(x.permute(0, 3, 1, 2), w, stride=stride, padding=padding)
        return y.permute(0, 2, 3, 1)
