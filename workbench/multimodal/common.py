"""Shared pieces of the Gemma 4 media towers: errors, weight access, clipped linears."""
from __future__ import annotations

import math

import numpy as np

from ..model.gemma import InputError, WeightError


class MediaError(InputError):
    """Bad media input: an unreadable or corrupt image, a non-WAV or empty audio file, a placeholder count
    that does not match the media given."""


class MediaWeights:
    """The tensors of one tower (canonical names, e.g. ``vision_tower.``), with checks that name the tensor."""

    def __init__(self, tensors: dict[str, np.ndarray], prefix: str, where: str):
        self.t = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.prefix = prefix
        self.where = where
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.t

    def get(self, name: str, shape: tuple | None = None) -> np.ndarray:
        if name not in self.t:
            raise WeightError(f"{self.where}: tensor {self.prefix + name!r} is missing (the config has a "
                              f"{self.prefix.rstrip('.')} but the checkpoint lacks its weights)")
        v = np.asarray(self.t[name])
        if shape is not None and tuple(v.shape) != tuple(shape):
            raise WeightError(f"{self.where}: tensor {self.prefix + name!r} has shape {tuple(v.shape)}, expected "
                              f"{tuple(shape)} from the config")
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all() and not name.endswith(
                ("input_min", "input_max", "output_min", "output_max")):
            raise WeightError(f"{self.where}: tensor {self.prefix + name!r} contains NaN or inf")
        self.used.add(name)
        return v

    def unused(self) -> list[str]:
        return sorted(set(self.t) - self.used)


class ClippedLinear:
    """HF ``Gemma4ClippableLinear``: clamp(input) -> Linear (no bias) -> clamp(output), bounds from the
    checkpoint buffers (``input_min`` ... ``output_max``) when ``use_clipped_linears`` is set."""

    def __init__(self, ops, wts: MediaWeights, name: str, shape: tuple, clipped: bool):
        self.w = ops.asarray(wts.get(name + ".linear.weight", shape))
        self.bounds = (None, None, None, None)
        if clipped:
            keys = ("input_min", "input_max", "output_min", "output_max")
            have = [wts.has(f"{name}.{k}") for k in keys]
            if all(have):
                self.bounds = tuple(float(np.asarray(wts.get(f"{name}.{k}")).reshape(-1)[0]) for k in keys)
            elif any(have):
                raise WeightError(f"{wts.where}: {wts.prefix}{name} has only some of its clipping bounds "
                                  f"{[k for k, h in zip(keys, have) if h]}")
            # none present: transformers leaves them at -inf/+inf, i.e. no clipping

    def __call__(self, ops, x):
        lo, hi, olo, ohi = self.bounds
        x = ops.clamp(x, lo, hi)
        y = ops.linear(x, self.w)
        return ops.clamp(y, olo, ohi)


class TowerConfig:
    """A media tower's config: the fields of HF's ``vision_config`` / ``audio_config`` with Gemma 4's defaults
    (``DEFAULTS``: name -> default; a value read from the checkpoint takes its default's type, None keeps the
    default, other keys are not read). Subclasses derive fields and check constraints in ``check``."""
    DEFAULTS: dict = {}

    def __init__(self, **values):
        unknown = sorted(set(values) - set(self.DEFAULTS))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown field(s) {unknown}; known: {sorted(self.DEFAULTS)}")
        for k, v in {**self.DEFAULTS, **values}.items():
            setattr(self, k, list(v) if isinstance(v, list) else v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.DEFAULTS) + ")"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config"):
        c = cls()
        for k, v in d.items():
            if k in cls.DEFAULTS and v is not None:
                cur = cls.DEFAULTS[k]
                setattr(c, k, list(v) if isinstance(cur, list) else type(cur)(v))
        c.check(d, where)
        return c

    def check(self, d: dict, where: str) -> None:
        """Derived fields and constraints, from the raw dict ``d`` (a ConfigError names ``where``)."""


def norm_weight(ops, wts: MediaWeights, name: str, dim: int):
    """RMSNorm / LayerNorm weight, stored in the accumulation dtype like the text model's norms."""
    acc = "float64" if ops.dtype == "float64" else "float32"
    return ops.asarray(wts.get(name, (dim,)).astype(np.float64), dtype=acc)


def finite_max(dtype: str) -> float:
    return {"float16": 65504.0, "bfloat16": 3.3895313892515355e38}.get(dtype, np.finfo(np.float32).max
                                                                        if dtype == "float32" else math.inf)
