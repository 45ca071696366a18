"""Gemma Workbench: one Gemma 1-4 implementation over torch and MLX, compared layer by layer."""
from . import backends, runs  # noqa: F401
from .bench import bench  # noqa: F401  (the function shadows the submodule name on the package)
from .diverge import diverge  # noqa: F401
from .loader import load  # noqa: F401
from .comparison import compare  # noqa: F401  (parity.compare with against= / world= resolved)

__version__ = "0.1.0"
