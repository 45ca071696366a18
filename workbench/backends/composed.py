"""Ops that are compositions of other ops, written once for every backend (a mixin of the backends' classes,
before :class:`~workbench.backends.protocol.Ops` in their bases): slicing, comparisons, unary minus and the
backend's own ``concat`` behave alike on torch tensors and MLX arrays."""
from __future__ import annotations

import math

import numpy as np


def clamp_bounds(lo, hi):
    """``clamp``'s bounds with "no bound" as None: None, -inf below and +inf above are none."""
    return (None if lo is None or (math.isinf(lo) and lo < 0) else lo,
            None if hi is None or (math.isinf(hi) and hi > 0) else hi)


class ComposedOps:
    def _identity(self, spec, dtype: str):
        """The protocol's identity members every backend sets the same way (kept-quantised blocks: the loader sets
        ``quant`` / ``quant_act8`` on torch:cpu; 8-bit activations in one-row products (quant="keep") or float32)."""
        self.spec = spec
        self.dtype = dtype
        self.quant, self.quant_act8 = None, True

    def rope_apply(self, x, cs):
        c, s_ = cs
        h = x.shape[-1] // 2
        return x * c + self.concat([-x[..., h:], x[..., :h]], -1) * s_

    def rope_at(self, x, table, pos):
        """RoPE at device-side positions ``pos`` [T] (or the slot positions of a cache, -1 = empty)."""
        return self.rope_apply(x, self.rope_rows(table, pos))

    def decode_mask(self, kpos, pos, window):
        ok = (kpos >= 0) & (kpos <= pos)
        if window is not None:
            ok = ok & ((pos - kpos) < window)
        return ok[None, None, None, :]

    # elementwise ops that are one framework call each, written once: the backend's ELEMENTWISE table names the
    # framework's function ({"sigmoid": torch.sigmoid, ...}, in its *_media mixin)
    ELEMENTWISE: dict = {}

    def sigmoid(self, x):
        return self.ELEMENTWISE["sigmoid"](x)

    def relu(self, x):
        return self.ELEMENTWISE["relu"](x)

    def tanh(self, x):
        return self.ELEMENTWISE["tanh"](x)

    def where(self, cond, a, b):
        if isinstance(cond, np.ndarray):
            cond = self.asmask(cond)
        return self.ELEMENTWISE["where"](cond, a, b)    # a Python scalar is weakly typed: the array's dtype wins

    # collectives: one process (workbench.distributed's TPOps overrides them for tensor parallelism)
    def all_reduce(self, x):
        return x

    def all_gather(self, x, dim: int):
        return x
