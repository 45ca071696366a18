"""Backends: ``available()``, ``parse()``, ``get_ops()``. See base.py."""
from .base import (DTYPES, Availability, BackendError, BackendSpec, all_backends, available, check_dtype,  # noqa
                   get_ops, parse, require, status)
