"""Backend strings and availability (``get_ops`` is in factory.py); the ops interface is ``protocol.Ops`` (re-exported).

A backend string is ``<framework>:<device>`` — ``torch:cpu``, ``torch:cuda``, ``torch:cuda:1``, ``torch:mps``,
``mlx:cpu``, ``mlx:gpu``. ``parse()`` validates it; ``available()`` says which work here and why the others
do not; ``get_ops(backend, dtype)`` gives the ops object the model runs on.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .protocol import Ops  # noqa: F401  the interface the model is written against (a typing.Protocol)

DTYPES = ("float32", "bfloat16", "float16", "float64")
FRAMEWORKS = ("torch", "mlx")


class BackendError(ValueError):
    """Unknown backend/dtype, or a backend that is not usable on this machine."""


@dataclass(frozen=True)
class BackendSpec:
    framework: str       # "torch" | "mlx"
    device: str          # "cpu" | "cuda" | "mps" | "gpu"
    index: int | None = None

    @property
    def name(self) -> str:
        return f"{self.framework}:{self.device}" + (f":{self.index}" if self.index is not None else "")

    @property
    def kind(self) -> str:
        """Key into the tolerance table: torch:cpu, torch:cuda, torch:mps, mlx:cpu, mlx:gpu."""
        return f"{self.framework}:{self.device}"

    def __str__(self) -> str:
        return self.name


def parse(backend: str) -> BackendSpec:
    if isinstance(backend, BackendSpec):
        return backend
    parts = str(backend).strip().lower().split(":")
    fw = parts[0]
    if fw not in FRAMEWORKS or len(parts) < 2 or len(parts) > 3:
        raise BackendError(f"unknown backend {backend!r}; use one of torch:cpu, torch:cuda[:N], torch:mps, "
                           "mlx:cpu, mlx:gpu")
    dev = parts[1]
    idx = None
    if len(parts) == 3:
        if not parts[2].isdigit():
            raise BackendError(f"backend {backend!r}: device index {parts[2]!r} is not a number")
        idx = int(parts[2])
    ok = {"torch": ("cpu", "cuda", "mps"), "mlx": ("cpu", "gpu")}[fw]
    if dev not in ok:
        raise BackendError(f"unknown backend {backend!r}: {fw} devices are {', '.join(ok)}")
    if idx is not None and not (fw == "torch" and dev == "cuda"):
        raise BackendError(f"backend {backend!r}: only torch:cuda takes a device index")
    return BackendSpec(fw, dev, idx)


def check_dtype(dtype: str, spec: BackendSpec) -> str:
    dtype = str(dtype).replace("torch.", "")
    aliases = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
               "half": "float16", "fp64": "float64", "f64": "float64", "double": "float64"}
    dtype = aliases.get(dtype, dtype)
    if dtype not in DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype == "float64" and spec.kind != "torch:cpu":
        raise BackendError(f"float64 runs on torch:cpu only (the numerical reference); {spec.name} has no float64 "
                           "kernels — use float32 there")
    return dtype


def _status(spec: BackendSpec) -> tuple[bool, str]:
    if spec.framework == "torch":
        if importlib.util.find_spec("torch") is None:
            return False, "torch is not installed (pip install 'gemma-workbench[torch]')"
        import torch
        if spec.device == "cpu":
            return True, f"torch {torch.__version__}"
        if spec.device == "cuda":
            if not torch.cuda.is_available():
                why = "this torch build has no CUDA/ROCm" if torch.version.cuda is None and \
                    getattr(torch.version, "hip", None) is None else "no CUDA/ROCm device visible"
                return False, why
            n = torch.cuda.device_count()
            i = spec.index or 0
            if i >= n:
                return False, f"cuda:{i} requested but only {n} device(s)"
            kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
            return True, f"{kind} {torch.cuda.get_device_name(i)}"
        if spec.device == "mps":
            if not torch.backends.mps.is_available():
                return False, "MPS needs macOS on Apple silicon" if not torch.backends.mps.is_built() else \
                    "MPS built but not available on this machine"
            return True, "mps"
    if spec.framework == "mlx":
        if importlib.util.find_spec("mlx") is None:
            return False, "mlx is not installed (pip install 'mlx[cpu]' on Linux, 'mlx' on macOS)"
        try:
            import mlx.core as mx
        except Exception as e:  # pragma: no cover - broken installs
            return False, f"mlx failed to import: {e}"
        if spec.device == "cpu":
            return True, f"mlx {mx.__version__} cpu"
        try:
            ok = mx.is_available(mx.gpu) if hasattr(mx, "is_available") else mx.default_device() == mx.gpu
        except Exception:
            ok = False
        if not ok:
            return False, "mlx has no GPU backend here (Metal on macOS, or mlx[cuda] on Linux with an NVIDIA GPU)"
        return True, f"mlx {mx.__version__} gpu"
    return False, "unknown"


def status(backend: str) -> tuple[bool, str]:
    return _status(parse(backend))


def all_backends() -> list[str]:
    out = ["torch:cpu"]
    try:
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        n = 0
    out += ["torch:cuda"] + [f"torch:cuda:{i}" for i in range(1, n)]
    out += ["torch:mps", "mlx:cpu", "mlx:gpu"]
    return out


class Availability(list):
    """``available()`` result: a list of usable backend strings, with ``.reasons`` for all of them."""

    reasons: dict[str, str]

    def __repr__(self) -> str:
        lines = [f"{'OK ' if b in self else '-- '} {b:12s} {r}" for b, r in self.reasons.items()]
        return "\n".join(lines)


def available() -> Availability:
    res = Availability()
    res.reasons = {}
    for b in all_backends():
        ok, why = _status(parse(b))
        res.reasons[b] = why
        if ok:
            res.append(b)
    return res


def require(backend: str) -> BackendSpec:
    spec = parse(backend)
    ok, why = _status(spec)
    if not ok:
        raise BackendError(f"backend {spec.name} is not available here: {why}. "
                           f"Available: {', '.join(available()) or 'none'}")
    return spec


def fused_decode_unsupported(cfg, ops, cache=None) -> str | None:
    """What keeps a model off the hand-written batch-1 decode kernels (Triton on torch:cuda, CUDA C on mlx:gpu):
    they implement Gemma 1-3 text layers in float32/bfloat16/float16 — None when this model is one."""
    if ops.dtype not in ("float32", "bfloat16", "float16"):
        return f"dtype {ops.dtype} (float32, bfloat16, float16 only)"
    if cache is not None and cache.batch != 1:
        return "batch > 1"
    if cfg.hidden_activation == "gelu":
        return "exact (erf) GELU"
    if cfg.has_ple or cfg.has_layer_scalar or cfg.has_v_norm or not cfg.causal:
        return "Gemma 4 features (PLE, layer scalar, V norm, bidirectional)"
    if cfg.arch == "gemma4" and cfg.enable_moe_block:
        return "MoE"
    for i in range(cfg.num_hidden_layers):
        if cfg.kv_shared(i) or cfg.k_eq_v(i):
            return f"layer {i}: KV sharing / k=v"
    return None
