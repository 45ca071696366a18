"""``get_ops(backend, dtype)``: the ops object the model runs on. It sits above the implementations (torch.py,
mlx.py), which import their spec and protocol from base.py, so the backends' import graph has no cycle."""
from __future__ import annotations

from .base import check_dtype, require
from .protocol import Ops


def get_ops(backend: str, dtype: str) -> Ops:
    spec = require(backend)
    dtype = check_dtype(dtype, spec)
    if spec.framework == "torch":
        from .torch import TorchOps
        return TorchOps(spec, dtype)
    from .mlx import MLXOps
    return MLXOps(spec, dtype)
