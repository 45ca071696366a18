"""``Ops``: the whole interface between the model code and a backend, as a ``typing.Protocol``.

Everything ``workbench/model``, the KV cache, the multimodal towers, generate and bench call on an ops object is
declared here, with its contract; nothing else may be called (``tests/test_ops_conformance.py`` checks both: every
backend class implements every member with a compatible signature, and a static scan of ``workbench/`` finds no
``ops.X`` / ``self.ops.X`` / ``model.ops.X`` outside this list). ``tests/test_ops_conformance.py`` also runs every op
on every backend and dtype against a float64 numpy reference (``tests/tools/gpu/ops_conformance.py`` on the GPUs).

Conventions. Arrays ("A") are the backend's own (``torch.Tensor``, ``mx.array``); numpy crosses the boundary only
through ``asarray``/``asids``/``asmask`` (in) and ``numpy`` (out). Layouts: activations [B, T, D]; attention heads
[B, H, T, hd] (K/V: [B, Hkv, S, hd], Hkv divides H: grouped-query attention); weights [out, in] (``linear``
computes x @ w.T). "The dtype" is the model's (``self.dtype``); "acc" is float32, or float64 for a float64 model:
norms, softmax and RoPE angles are computed in acc and rounded once to the dtype. Positions are absolute token
indices. A dtype argument is a name from ``base.DTYPES`` ("float32", "bfloat16", "float16", "float64"); None means
the model's dtype.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

A = Any     # a backend array


@dataclass(frozen=True)
class CausalMask:
    """A causal attention mask described instead of materialised, for ``Ops.attention``: the S keys are consecutive
    positions ending at the last query's, so query t of T sits at key index t + S - T ("lower-right" alignment); it
    attends keys s <= t + S - T and, with a ``window``, only those with (t + S - T) - s < window (HF's sliding
    window: W keys including the query itself). Backends run it on their fastest exact kernel (flash / is_causal,
    a banded pass for windows much shorter than T) and build a dense mask only where they must, on the device."""
    window: int | None = None

    def dense(self, T: int, S: int) -> np.ndarray:
        """The same mask as a numpy bool [T, S] (True = attend)."""
        d = (np.arange(T)[:, None] + (S - T)) - np.arange(S)[None, :]
        ok = d >= 0
        return ok & (d < self.window) if self.window is not None else ok


@runtime_checkable
class Ops(Protocol):
    # ------------------------------------------------------------------------------------------ identity
    spec: Any           # base.BackendSpec: framework, device, index; .name "torch:cuda:1", .kind "torch:cuda"
    dtype: str          # the model's dtype name
    framework: str      # "torch" | "mlx"
    device: Any         # the framework's device object (torch.device / mx.Device), for arrays made outside ops
    quant: str | None   # None, or "keep" / "keep-exact": a GGUF's matrices kept in their blocks (torch:cpu only)
    quant_act8: bool    # with kept blocks: x quantised to 8 bits per product (llama.cpp's numerics), else float32

    # ------------------------------------------------------------------------------------------ data movement
    def asarray(self, a: np.ndarray, dtype: str | None = None) -> A:
        """numpy (or a backend array) -> a backend array in ``dtype`` (None: the model's), same shape; values
        rounded once to the dtype (round to nearest even)."""

    def asids(self, a: np.ndarray) -> A:
        """Integer ids/positions (any shape) -> a backend integer array, values unchanged (int64 / int32)."""

    def asmask(self, m: np.ndarray) -> A:
        """A numpy bool array (any shape) -> a backend bool array (True = attend / keep)."""

    def zeros(self, shape: Sequence[int], dtype: str | None = None) -> A:
        """A zero-filled array of ``shape`` in ``dtype`` (None: the model's)."""

    def numpy(self, x: A) -> np.ndarray:
        """A backend array -> numpy, same shape: float32 for bfloat16/float16, the array's own dtype otherwise
        (float32, float64, integers, bool). Waits for the value."""

    def cast(self, x: A, dtype: str | None = None) -> A:
        """``x`` converted to ``dtype`` (None: the model's), rounded to nearest even; same shape."""

    def synchronize(self) -> None:
        """Wait until all queued work on the device has finished (for timing)."""

    def peak_memory(self) -> int | None:
        """Peak bytes allocated on the device so far, or None where the backend cannot say (torch:cpu)."""

    # ------------------------------------------------------------------------------------------ shape
    def reshape(self, x: A, shape: Sequence[int]) -> A:
        """Same elements in row-major order, new ``shape``."""

    def transpose(self, x: A, axes: Sequence[int]) -> A:
        """Axes permuted as numpy ``transpose(x, axes)``."""

    def concat(self, xs: Sequence[A], axis: int) -> A:
        """Arrays of equal shape except along ``axis``, joined along it."""

    def take_rows(self, w: A, ids: A) -> A:
        """Embedding lookup: ``w`` [V, D], integer ``ids`` [...] (from ``asids``) -> [..., D] = w[ids], exact."""

    # ------------------------------------------------------------------------------------------ math
    def linear(self, x: A, w: A) -> A:
        """x [..., K] @ w[N, K].T -> [..., N] in x's dtype; products summed in acc (or wider), rounded once."""

    def rms_norm(self, x: A, w: A | None, eps: float) -> A:
        """x / sqrt(mean(x**2, -1) + eps) * w over the last axis, computed in acc, rounded once to x's dtype.
        ``w`` [D] (the model passes it in acc with Gemma's 1 + w offset already folded in), [G, D] for x [..., G, D]
        (one weight row per group: Gemma's q and k norms in one call), or None (no scale)."""

    def gelu(self, x: A, approximate: bool = True) -> A:
        """GELU, elementwise, x's dtype: the tanh approximation (``gelu_pytorch_tanh``) or, approximate=False,
        the exact erf form."""

    def softcap(self, x: A, cap: float) -> A:
        """tanh(x / cap) * cap, elementwise, x's dtype (Gemma 2 attention and final logits)."""

    def scale(self, x: A, s: float) -> A:
        """x * s with ``s`` first rounded to x's dtype (as HF multiplies the embeddings by sqrt(D))."""

    def softmax_f32(self, x: A) -> A:
        """Softmax over the last axis, computed and returned in acc (float32; float64 for a float64 model)."""

    def topk(self, x: A, k: int) -> tuple[A, A]:
        """The ``k`` largest entries of the last axis: (values [..., k] in x's dtype, descending; their integer
        indices [..., k])."""

    def argmax_last(self, logits: A) -> A:
        """logits [B, V] -> integer [B, 1]: the index of each row's maximum (greedy decoding)."""

    # ------------------------------------------------------------------------------------------ RoPE
    def rope(self, x: A, inv_freq: np.ndarray, start: int) -> A:
        """Rotary embedding of x [B, H, T, hd] at positions start .. start+T-1 (NeoX/HF pairing: i with
        i + hd/2); angles pos * inv_freq (numpy [hd/2]) in acc, cos/sin rounded to the dtype."""

    def rope_table(self, inv_freq: np.ndarray, n: int) -> tuple[A, A]:
        """(cos, sin) [n, hd] for positions 0..n-1, each row [angles, angles]; angles in acc, rounded to the
        model's dtype. The static decode step reads rows of it at device-side positions."""

    def rope_rows(self, table: tuple[A, A], pos: A) -> tuple[A, A]:
        """Rows of a ``rope_table`` at integer device positions ``pos`` [S] (-1 = an empty slot: row 0) ->
        (cos, sin) [S, hd]."""

    def rope_apply(self, x: A, cs: tuple[A, A]) -> A:
        """x * cos + rotate_half(x) * sin with (cos, sin) from ``rope_rows`` broadcast over x [B, H, S, hd]."""

    def rope_at(self, x: A, table: tuple[A, A], pos: A) -> A:
        """``rope_apply(x, rope_rows(table, pos))``: x [B, H, S, hd] at device positions ``pos`` [S]."""

    # ------------------------------------------------------------------------------------------ attention
    def attention(self, q: A, k: A, v: A, mask: A | None, scale: float, softcap: float | None,
                  want_probs: bool) -> tuple[A, A | None]:
        """softmax(softcap(q @ k.T * scale) masked) @ v. q [B, H, T, hd]; k, v [B, Hkv, S, hd]; mask bool
        [T, S] (or broadcastable to [B, H, T, S]; True = attend), a :class:`CausalMask` (S >= T), or None (all).
        Returns (out [B, H, T, hd] in q's dtype, probabilities [B, H, T, S] when ``want_probs`` else None). Softmax in
        acc."""

    def decode_mask(self, kpos: A, pos: A, window: int | None) -> A:
        """The one-query mask of the static decode step: slot positions ``kpos`` [S] (-1 = empty), the query's
        position ``pos`` [1] (device integers) -> bool [1, 1, 1, S]: filled, not after pos, and within
        ``window`` keys (pos - kpos < window) when a window is given."""

    def decode_attention(self, q: A, k: A, v: A, mask: A | None, scale: float, softcap: float | None) -> A:
        """``attention`` for one query per head against the whole cache: q [B, H, 1, hd], k/v [B, Hkv, S, hd],
        mask from ``decode_mask`` (or None) -> [B, H, 1, hd] in q's dtype; no probabilities."""

    # ------------------------------------------------------------------------------------------ media towers
    # (Gemma 4 vision and audio; the framework-free compositions of these live in multimodal/mmops.py)
    def clamp(self, x: A, lo: float | None = None, hi: float | None = None) -> A:
        """min(max(x, lo), hi) elementwise, x's dtype; a bound that is None (or -inf below, +inf above) is none."""

    def silu(self, x: A) -> A:
        """x * sigmoid(x), elementwise, x's dtype."""

    def sigmoid(self, x: A) -> A:
        """1 / (1 + exp(-x)), elementwise, x's dtype."""

    def relu(self, x: A) -> A:
        """max(x, 0), elementwise, x's dtype."""

    def tanh(self, x: A) -> A:
        """tanh(x), elementwise, x's dtype."""

    def where(self, cond: A | np.ndarray, a: A | float, b: A | float) -> A:
        """a where ``cond`` else b, broadcast. ``cond``: a backend or numpy bool array; a/b: arrays or python
        scalars (at least one an array, whose dtype the result has)."""

    def layer_norm(self, x: A, w: A | None, b: A | None, eps: float) -> A:
        """(x - mean) / sqrt(var + eps) * w + b over the last axis (HF nn.LayerNorm), x's dtype; w/b [D] or None."""

    def pad(self, x: A, axis: int, before: int, after: int, value: float = 0.0) -> A:
        """``x`` with ``before``/``after`` entries of ``value`` added along ``axis`` (numpy ``pad``, one axis)."""

    def take(self, x: A, idx: np.ndarray, axis: int) -> A:
        """numpy ``take(x, idx, axis)``: a numpy integer index array of any shape replaces ``axis``."""

    def conv2d_weight(self, w_oihw: np.ndarray) -> A:
        """A numpy conv2d weight [out, in, kh, kw] (torch's layout) -> a backend array in the layout ``conv2d``
        takes (the model's dtype)."""

    def conv2d(self, x: A, w: A, stride: int, padding: int) -> A:
        """2-D cross-correlation, no bias, of channels-last x [B, H, W, C] with ``w`` from ``conv2d_weight``, zero
        padding on both spatial axes -> [B, H', W', out] in x's dtype."""

    # ------------------------------------------------------------------------------------------ collectives
    def all_reduce(self, x: A) -> A:
        """Tensor parallelism (``workbench.distributed``): the elementwise sum of ``x`` over the ranks, same shape
        and dtype, on every rank. One process (every backend here): ``x`` itself."""

    def all_gather(self, x: A, dim: int) -> A:
        """Tensor parallelism: the ranks' ``x`` concatenated along ``dim`` in rank order, on every rank. One
        process: ``x`` itself."""


def _unimplemented(fn):
    """A backend that subclasses ``Ops`` but lacks a method gets this instead of the docstring stub (which would
    return None): calling it says which backend lacks which op."""
    @functools.wraps(fn)
    def missing(self, *a, **k):
        raise NotImplementedError(f"{type(self).__name__} does not implement Ops.{fn.__name__} "
                                  "(workbench/backends/protocol.py lists every op with its contract)")
    missing.protocol_stub = True
    return missing


for _n, _f in list(vars(Ops).items()):
    if callable(_f) and not _n.startswith("_"):
        setattr(Ops, _n, _unimplemented(_f))
del _n, _f

# The only framework-specific members, for code that has already branched on ``ops.framework`` (the decode engine's
# torch and MLX paths); the generic model code uses ``Ops`` alone.
FRAMEWORK_MEMBERS: dict[str, dict[str, str]] = {
    "torch": {
        "tdtype": "the torch.dtype of the model's dtype (for buffers the decode engine allocates itself)",
        "fused_reductions": "bool, set by the decode route: under torch.compile on CUDA, one-row products and "
                            "one-query attention are written as float32 reductions inductor fuses (False: cuBLAS)",
    },
    "mlx": {
        "mdtype": "the mx.Dtype of the model's dtype",
        "traceable": "a context manager: within it no op leaves MLX (the CPU route's numpy products are off), so "
                     "mx.compile can trace the step",
    },
}

MEMBERS: tuple[str, ...] = tuple(n for n in list(Ops.__annotations__) + [
    k for k, v in vars(Ops).items() if callable(v) and not k.startswith("_")])
"""Every name of the protocol: attributes first, then methods, in declaration order."""
