"""The one decode engine (see engine.py): route (which step runs, and why), plan (what kernels see), sampler
(greedy / seeded sampling on the device), capture (parity of the fast route)."""
from .capture import capture_decode  # noqa: F401
from .engine import DecodeEngine, session  # noqa: F401
from .plan import DecodePlan, LayerPlan  # noqa: F401
from .route import Route, pick, switches  # noqa: F401
from .sampler import Sampling, sample_np  # noqa: F401
