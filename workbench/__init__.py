"""Gemma Workbench: one Gemma 1-4 implementation over torch and MLX, compared layer by layer."""
from . import backends, runs  # noqa: F401
from .loader import load  # noqa: F401

__version__ = "0.1.0"


def compare(*args, **kwargs):
    from .parity import compare as _compare
    return _compare(*args, **kwargs)


def bench(*args, **kwargs):
    from .bench import bench as _bench
    return _bench(*args, **kwargs)
