"""Backends: ``available()``, ``parse()``, ``get_ops()``. See base.py and factory.py."""
from .base import (DTYPES, Availability, BackendError, BackendSpec, all_backends, available, check_dtype,  # noqa
                   parse, require, status)
from .factory import get_ops  # noqa: F401
