from .cache import ContextOverflow, KVCache  # noqa: F401
from .gemma import ForwardOutput, Gemma, InputError, WeightError, expected_shapes  # noqa: F401
from .taps import point_names  # noqa: F401
