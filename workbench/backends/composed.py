"""Ops that are compositions of other ops, written once for every backend (a mixin of the backends' classes,
before :class:`~workbench.backends.protocol.Ops` in their bases): slicing, comparisons, unary minus and the
backend's own ``concat`` behave alike on torch tensors and MLX arrays."""
from __future__ import annotations

import math


def clamp_bounds(lo, hi):
    """``clamp``'s bounds with "no bound" as None: None, -inf below and +inf above are none."""
    return (None if lo is None or (math.isinf(lo) and lo < 0) else lo,
            None if hi is None or (math.isinf(hi) and hi > 0) else hi)


class ComposedOps:
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
