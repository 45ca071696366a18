"""The ops protocol is the interface, and every backend implements it correctly (llama.cpp ``test-backend-ops``).

1. Structure: every backend class here implements every member of :class:`workbench.backends.protocol.Ops`
   itself (not the protocol's raising stub) with a compatible signature; and a static scan of ``workbench/``
   finds no ``ops.X`` / ``self.ops.X`` / ``model.ops.X`` (nor ``getattr(ops, "X")``) that the protocol does not
   declare — a call added without declaring it fails here.
2. Numerics: every op on every available backend x dtype, on random inputs of the model's shapes (Gemma 3 270M:
   D 640, 4 query heads on 1 KV head of 256, F 2048; a 262,144-entry vocabulary for the argmax), against a float64
   numpy reference written here (never by calling a backend). Inputs are rounded to the dtype in numpy first, so
   the error measured is the op's own. NaN/inf are checked before any norm; the error is the relative max error
   max|got - ref| / max|ref|; the tolerances are the one table :data:`TOL`. The multimodal towers' extra ops
   (the protocol's "media towers" ops; ``mm.*`` rows: ``multimodal/mmops.py``'s compositions) are checked the
   same way.

Prints an op x dtype x backend table (and writes it to $WORKBENCH_OPS_TABLE, default /tmp/notes/ops_table.md when
/tmp/notes exists). ``tests/tools/gpu/ops_conformance.py`` runs the same cases on torch:cuda / mlx:gpu.
"""
from __future__ import annotations

import ast
import inspect
import math
import os
import pathlib
import time

import numpy as np
import pytest

import workbench.backends as _bk
from workbench.backends import protocol as _proto

ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16", "float16", "float64")
CPU_BACKENDS = ("torch:cpu", "mlx:cpu")

# ================================================================================================ tolerances
# relative max error allowed per (op, dtype): (float32, bfloat16, float16, float64). 0 = bit-exact.
# u (unit roundoff): float32 6.0e-8, bfloat16 3.9e-3, float16 4.9e-4, float64 1.1e-16. An op that rounds its
# result once is within u of max|ref|; products/reductions over K terms in float32 add ~sqrt(K) u32; low-precision
# composites (attention: probabilities rounded to the dtype before P @ V; MLX's gelu written as several rounded
# elementwise ops; MLX rounding the norm weight to the dtype) a few u. RoPE angles are computed in float32
# (float64 for the float64 model), as HF does: at position p the angle carries ~p * 6e-8 rad, so tables over
# 8k positions are within ~1e-3 in float32 — that is the method, not an error of a backend.
_EXACT = (0.0, 0.0, 0.0, 0.0)
TOL: dict[str, tuple[float, float, float, float]] = {
    # data movement and shape: exact (inputs are representable in the dtype)
    "asarray": _EXACT, "asarray[round]": (6.0e-8, 3.91e-3, 4.89e-4, 0.0), "asids": _EXACT, "asmask": _EXACT,
    "zeros": _EXACT, "cast[to acc]": _EXACT, "cast[to dtype]": _EXACT, "reshape": _EXACT, "transpose": _EXACT,
    "concat": _EXACT, "take_rows": _EXACT,
    # math
    "linear": (2e-6, 8e-3, 1e-3, 1e-13),
    "linear[1 row]": (2e-6, 8e-3, 1e-3, 1e-13),
    "rms_norm": (2e-6, 1.6e-2, 2e-3, 1e-13),
    "rms_norm[1 row]": (2e-6, 1.6e-2, 2e-3, 1e-13),
    "rms_norm[no weight]": (2e-6, 1.6e-2, 2e-3, 1e-13),
    "rms_norm[grouped weight]": (2e-6, 1.6e-2, 2e-3, 1e-13),
    "gelu[tanh]": (2e-6, 1.6e-2, 2e-3, 1e-13),
    "gelu[erf]": (2e-6, 1.6e-2, 2e-3, 1e-13),
    "softcap": (2e-6, 1.2e-2, 1.5e-3, 1e-13),
    "scale": (2e-7, 8e-3, 1e-3, 1e-15),
    "softmax_f32": (2e-6, 2e-6, 2e-6, 1e-13),
    "topk": _EXACT,
    "argmax_last": _EXACT,
    "argmax_last[262k]": _EXACT,
    # RoPE
    "rope": (1e-5, 1.6e-2, 2e-3, 1e-13),
    "rope[partial]": (1e-5, 1.6e-2, 2e-3, 1e-13),
    "rope_table[8k]": (2e-3, 8e-3, 2e-3, 1e-12),
    "rope_rows": _EXACT,
    "rope_apply": (2e-7, 8e-3, 1e-3, 1e-15),
    "rope_at": (2e-7, 8e-3, 1e-3, 1e-15),
    # attention
    "attention": (4e-6, 2.4e-2, 3e-3, 1e-13),
    "attention[softcap]": (4e-6, 2.4e-2, 3e-3, 1e-13),
    "attention[probs]": (4e-6, 2.4e-2, 3e-3, 1e-13),
    "attention[probs].p": (2e-6, 8e-3, 1e-3, 1e-13),
    "attention[CausalMask]": (4e-6, 2.4e-2, 3e-3, 1e-13),
    "attention[CausalMask, window]": (4e-6, 2.4e-2, 3e-3, 1e-13),
    "attention[CausalMask, band]": (4e-6, 2.4e-2, 3e-3, 1e-13),
    "attention[CausalMask, square]": (4e-6, 2.4e-2, 3e-3, 1e-13),
    "attention[CausalMask, softcap]": (4e-6, 2.4e-2, 3e-3, 1e-13),
    "decode_mask": _EXACT,
    "decode_mask[window]": _EXACT,
    "decode_attention": (4e-6, 2.4e-2, 3e-3, 1e-13),
    "decode_attention[softcap]": (4e-6, 2.4e-2, 3e-3, 1e-13),
    # the same under torch.compile / mx.compile (GPU tool only)
    "linear[1 row, compiled]": (2e-6, 8e-3, 1e-3, 1e-13),
    "rms_norm[1 row, compiled]": (2e-6, 1.6e-2, 2e-3, 1e-13),
    "decode_attention[compiled]": (4e-6, 2.4e-2, 3e-3, 1e-13),
    "decode_attention[softcap, compiled]": (4e-6, 2.4e-2, 3e-3, 1e-13),
    # media towers (Gemma 4 vision and audio): protocol ops, then multimodal/mmops.py's compositions of them
    "layer_norm": (4e-6, 1.6e-2, 2e-3, 1e-13),
    "conv2d": (4e-6, 8e-3, 1e-3, 1e-13),
    "silu": (2e-6, 8e-3, 1e-3, 1e-13),
    "sigmoid": (2e-6, 8e-3, 1e-3, 1e-13),
    "relu": _EXACT,
    "tanh": (2e-6, 8e-3, 1e-3, 1e-13),
    "clamp": _EXACT,
    "clamp[inf bounds]": _EXACT,
    "pad": _EXACT,
    "take": _EXACT,
    "where": _EXACT,
    "mm.depthwise_conv1d": (4e-7, 1.6e-2, 2e-3, 1e-15),
    "mm.rope_2d": (2e-7, 8e-3, 1e-3, 1e-15),
    "mm.linear_bias": (2e-6, 8e-3, 1e-3, 1e-13),
}


def tol(op: str, dtype: str) -> float:
    return TOL[op][DTYPES.index(dtype)]


# ================================================================================================ the references
def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` rounded (to nearest even) to ``dtype``, held in float32 (float64 for float64): exactly representable."""
    a = np.asarray(a, np.float64)
    if dtype == "float64":
        return a
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    f = a.astype(np.float32)
    if dtype == "float32":
        return f
    b = f.view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32)


def ref_rms_norm(x, w, eps):
    y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    return y if w is None else y * w


def ref_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def ref_gelu_erf(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def ref_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def ref_cos_sin(inv_freq, positions):
    ang = np.asarray(positions, np.float64)[:, None] * np.asarray(inv_freq, np.float64)[None, :]
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang), np.sin(ang)


def ref_rope(x, inv_freq, positions):
    c, s = ref_cos_sin(inv_freq, positions)
    return x * c + ref_rotate_half(x) * s


def ref_attention(q, k, v, mask, scale, softcap):
    H, Hkv = q.shape[1], k.shape[1]
    k = np.repeat(k, H // Hkv, axis=1)
    v = np.repeat(v, H // Hkv, axis=1)
    s = q @ np.swapaxes(k, -1, -2) * scale
    if softcap is not None:
        s = np.tanh(s / softcap) * softcap
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    p = ref_softmax(s)
    return p @ v, p


def ref_layer_norm(x, w, b, eps):
    m = x.mean(-1, keepdims=True)
    var = ((x - m) ** 2).mean(-1, keepdims=True)
    y = (x - m) / np.sqrt(var + eps)
    y = y * w if w is not None else y
    return y + b if b is not None else y


def ref_conv2d_nhwc(x, w_oihw, stride, padding):
    B, Hh, Ww, C = x.shape
    O, I, KH, KW = w_oihw.shape
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    Ho = (Hh + 2 * padding - KH) // stride + 1
    Wo = (Ww + 2 * padding - KW) // stride + 1
    y = np.zeros((B, Ho, Wo, O))
    for i in range(KH):
        for j in range(KW):
            patch = xp[:, i:i + stride * Ho:stride, j:j + stride * Wo:stride, :]     # [B, Ho, Wo, C]
            y += patch @ w_oihw[:, :, i, j].T
    return y


def ref_rope_2d(x, cos, sin):
    """Two axes: the first half of the head dim rotates with the x angles, the second with the y angles,
    rotate_half within each half."""
    h = x.shape[-1] // 2
    out = []
    for a in range(2):
        sl = slice(a * h, (a + 1) * h)
        out.append(x[..., sl] * cos[..., sl] + ref_rotate_half(x[..., sl]) * sin[..., sl])
    return np.concatenate(out, -1)


# ================================================================================================ the cases
# Gemma 3 270M shapes
D, H, HKV, HD, FF, V = 640, 4, 1, 256, 2048, 262144
THETA = 10000.0


class Inputs:
    def __init__(self, seed: int, dtype: str):
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype

    def x(self, shape, scale=1.0, dtype=None):
        """Normal values times ``scale``, rounded to the dtype: what the op receives, exactly."""
        return round_to(self.rng.standard_normal(shape) * scale, dtype or self.dtype)

    def acc(self):
        return "float64" if self.dtype == "float64" else "float32"


def _inv_freq(hd=HD, theta=THETA, partial=1.0):
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    n_rot = int(round(len(inv) * partial))
    inv[n_rot:] = 0.0               # Gemma 4's proportional RoPE: the tail of the head dim is not rotated
    return inv


def _causal(T, S, start):
    q = np.arange(start, start + T)[:, None]
    k = np.arange(S)[None, :]
    return k <= q


def _window(T, S, start, W):
    q = np.arange(start, start + T)[:, None]
    k = np.arange(S)[None, :]
    return (k <= q) & (q - k < W)


def _data(ops, dtype, r):
    A, N, acc = ops.asarray, ops.numpy, r.acc()
    x = r.x((2, 9, D))
    yield "asarray", N(A(x)), x
    x64 = r.rng.standard_normal((9, D))
    yield "asarray[round]", N(A(x64)), x64
    ids = r.rng.integers(0, V, size=(2, 9))
    yield "asids", N(ops.asids(ids)), ids
    m = r.rng.random((9, 14)) < 0.5
    yield "asmask", N(ops.asmask(m)), m
    yield "zeros", N(ops.zeros((2, 3, 5))), np.zeros((2, 3, 5))
    yield "cast[to acc]", N(ops.cast(A(x), acc)), x
    xf = r.x((9, D), dtype="float32" if dtype != "float64" else "float64")
    yield "cast[to dtype]", N(ops.cast(A(xf, dtype="float32" if dtype != "float64" else "float64"), None)), \
        round_to(xf, dtype)



def _shape(ops, dtype, r):
    A, N, acc = ops.asarray, ops.numpy, r.acc()
    x4 = r.x((2, 9, H, 16))
    yield "reshape", N(ops.reshape(A(x4), (2, 9, H * 16))), x4.reshape(2, 9, H * 16)
    yield "transpose", N(ops.transpose(A(x4), (0, 2, 1, 3))), x4.transpose(0, 2, 1, 3)
    x5 = r.x((2, 3, H, 16))
    yield "concat", N(ops.concat([A(x4), A(x5)], 1)), np.concatenate([x4, x5], 1)
    emb = r.x((4096, D))
    tid = r.rng.integers(0, 4096, size=(2, 9))
    yield "take_rows", N(ops.take_rows(A(emb), ops.asids(tid))), emb[tid]



def _math(ops, dtype, r):
    A, N, acc = ops.asarray, ops.numpy, r.acc()
    w = r.x((FF, D), scale=D ** -0.5)
    x = r.x((1, 9, D))
    yield "linear", N(ops.linear(A(x), A(w))), x @ w.T
    x1 = r.x((1, 1, D))
    yield "linear[1 row]", N(ops.linear(A(x1), A(w))), x1 @ w.T
    nw = round_to(1.0 + 0.1 * r.rng.standard_normal(D), acc)     # Gemma's 1 + w, folded, in acc
    xr = r.x((1, 64, D), scale=3.0)
    yield "rms_norm", N(ops.rms_norm(A(xr), A(nw, dtype=acc), 1e-6)), ref_rms_norm(xr, nw, 1e-6)
    yield "rms_norm[1 row]", N(ops.rms_norm(A(xr[:, :1]), A(nw, dtype=acc), 1e-6)), \
        ref_rms_norm(xr[:, :1], nw, 1e-6)
    yield "rms_norm[no weight]", N(ops.rms_norm(A(xr), None, 1e-6)), ref_rms_norm(xr, None, 1e-6)
    # one weight row per group (the q and k norms of a layer in one call): x [1, T, G, hd], w [G, hd]
    xq = r.x((1, 9, 5, 16), scale=3.0)
    wg = round_to(1.0 + 0.1 * r.rng.standard_normal((5, 16)), acc)
    yield "rms_norm[grouped weight]", N(ops.rms_norm(A(xq), A(wg, dtype=acc), 1e-6)), ref_rms_norm(xq, wg, 1e-6)
    xg = r.x((1, 9, FF), scale=2.0)
    yield "gelu[tanh]", N(ops.gelu(A(xg), approximate=True)), ref_gelu_tanh(xg)
    yield "gelu[erf]", N(ops.gelu(A(xg), approximate=False)), ref_gelu_erf(xg)
    xc = r.x((1, 9, 512), scale=40.0)
    yield "softcap", N(ops.softcap(A(xc), 30.0)), np.tanh(xc / 30.0) * 30.0
    yield "scale", N(ops.scale(A(x), math.sqrt(D))), x * math.sqrt(D)
    xs = r.x((1, H, 9, 64), scale=4.0)
    got = ops.softmax_f32(A(xs))
    sm = N(got)
    assert sm.dtype == np.dtype(acc), f"softmax_f32 returned {sm.dtype}, the contract says {acc}"
    yield "softmax_f32", sm, ref_softmax(xs)
    xt = r.x((9, 128))
    vals, idx = ops.topk(A(xt), 8)
    vals, idx = N(vals), N(idx).astype(np.int64)
    ref_vals = -np.sort(-xt, -1)[:, :8]
    if not np.array_equal(np.take_along_axis(xt, idx, -1), vals):
        vals = vals + np.inf        # indices that do not point at the values returned: reported as non-finite
    yield "topk", vals, ref_vals
    lg = r.x((3, 1000), scale=3.0)
    want = r.rng.integers(0, 1000, size=3)
    lg[np.arange(3), want] = np.abs(lg).max() + 1.0      # a unique maximum (ties are left to the backend)
    yield "argmax_last", N(ops.argmax_last(A(lg))).astype(np.int64), want[:, None]
    lg = r.x((2, V), scale=3.0)
    want = r.rng.integers(0, V, size=2)
    lg[np.arange(2), want] = np.abs(lg).max() + 1.0
    yield "argmax_last[262k]", N(ops.argmax_last(A(lg))).astype(np.int64), want[:, None]



def _rope(ops, dtype, r):
    A, N, acc = ops.asarray, ops.numpy, r.acc()
    inv = _inv_freq()
    start, T = 37, 9
    xq = r.x((1, H, T, HD))
    pos = np.arange(start, start + T)
    yield "rope", N(ops.rope(A(xq), inv, start)), ref_rope(xq, inv, pos)
    invp = _inv_freq(theta=1e6, partial=0.25)
    yield "rope[partial]", N(ops.rope(A(xq), invp, start)), ref_rope(xq, invp, pos)
    n = 8192
    tab = ops.rope_table(inv, n)
    c_ref, s_ref = ref_cos_sin(inv, np.arange(n))
    yield "rope_table[8k]", np.stack([N(tab[0]), N(tab[1])]), np.stack([c_ref, s_ref])
    # rows / apply / at on a table of dtype-rounded values, so these see exactly the reference's cos/sin
    c_t, s_t = round_to(c_ref[:64], dtype), round_to(s_ref[:64], dtype)
    table = (A(c_t), A(s_t))
    kpos = np.array([40, 41, 42, -1, 44, -1, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55])
    crow, srow = ops.rope_rows(table, ops.asids(kpos))
    kp0 = np.maximum(kpos, 0)
    yield "rope_rows", np.stack([N(crow), N(srow)]), np.stack([c_t[kp0], s_t[kp0]])
    xk = r.x((1, HKV, len(kpos), HD))
    ref = xk * c_t[kp0] + ref_rotate_half(xk) * s_t[kp0]
    yield "rope_apply", N(ops.rope_apply(A(xk), (A(c_t[kp0]), A(s_t[kp0])))), ref
    yield "rope_at", N(ops.rope_at(A(xk), table, ops.asids(kpos))), ref



def _attention(ops, dtype, r):
    A, N, acc = ops.asarray, ops.numpy, r.acc()
    scale = HD ** -0.5
    start, T = 37, 9
    S = start + T
    q = r.x((1, H, T, HD))
    k = r.x((1, HKV, S, HD))
    v = r.x((1, HKV, S, HD))
    mask = _causal(T, S, start)
    out, p = ops.attention(A(q), A(k), A(v), ops.asmask(mask), scale, None, want_probs=False)
    yield "attention", N(out), ref_attention(q, k, v, mask, scale, None)[0]
    out, p = ops.attention(A(q), A(k), A(v), ops.asmask(mask), scale, 50.0, want_probs=False)
    yield "attention[softcap]", N(out), ref_attention(q, k, v, mask, scale, 50.0)[0]
    out, p = ops.attention(A(q), A(k), A(v), ops.asmask(mask), scale, None, want_probs=True)
    o_ref, p_ref = ref_attention(q, k, v, mask, scale, None)
    yield "attention[probs]", N(out), o_ref
    yield "attention[probs].p", N(p), p_ref
    # the same masks described (CausalMask: keys are consecutive positions ending at the last query's), built here
    # independently from positions; the band case (T >= 3 windows) runs the blocked pass
    win = _window(T, S, start, 12)
    yield "attention[CausalMask]", N(ops.attention(A(q), A(k), A(v), _proto.CausalMask(), scale, None, False)[0]), \
        ref_attention(q, k, v, mask, scale, None)[0]
    yield "attention[CausalMask, window]", \
        N(ops.attention(A(q), A(k), A(v), _proto.CausalMask(12), scale, None, False)[0]), \
        ref_attention(q, k, v, win, scale, None)[0]
    yield "attention[CausalMask, softcap]", \
        N(ops.attention(A(q), A(k), A(v), _proto.CausalMask(12), scale, 50.0, False)[0]), \
        ref_attention(q, k, v, win, scale, 50.0)[0]
    Tb, Sb = 40, 45
    qb, kb, vb = r.x((2, H, Tb, HD)), r.x((2, HKV, Sb, HD)), r.x((2, HKV, Sb, HD))
    yield "attention[CausalMask, band]", \
        N(ops.attention(A(qb), A(kb), A(vb), _proto.CausalMask(8), scale, None, False)[0]), \
        ref_attention(qb, kb, vb, _window(Tb, Sb, Sb - Tb, 8), scale, None)[0]
    yield "attention[CausalMask, square]", \
        N(ops.attention(A(qb), A(kb[:, :, :Tb]), A(vb[:, :, :Tb]), _proto.CausalMask(), scale, None, False)[0]), \
        ref_attention(qb, kb[:, :, :Tb], vb[:, :, :Tb], _causal(Tb, Tb, 0), scale, None)[0]
    slots = 32
    kpos = np.where(np.arange(slots) < 27, np.arange(slots), -1)
    kpos[[3, 11]] = -1                                    # empty slots inside the ring
    p_now = 26
    dm = N(ops.decode_mask(ops.asids(kpos), ops.asids(np.array([p_now])), None))
    yield "decode_mask", dm, ((kpos >= 0) & (kpos <= p_now))[None, None, None, :]
    dmw = N(ops.decode_mask(ops.asids(kpos), ops.asids(np.array([p_now])), 8))
    ok = (kpos >= 0) & (kpos <= p_now) & (p_now - kpos < 8)
    yield "decode_mask[window]", dmw, ok[None, None, None, :]
    q1 = r.x((1, H, 1, HD))
    kc = r.x((1, HKV, slots, HD))
    vc = r.x((1, HKV, slots, HD))
    m4 = ok[None, None, None, :]
    yield "decode_attention", N(ops.decode_attention(A(q1), A(kc), A(vc), ops.asmask(m4), scale, None)), \
        ref_attention(q1, kc, vc, m4, scale, None)[0]
    yield "decode_attention[softcap]", \
        N(ops.decode_attention(A(q1), A(kc), A(vc), ops.asmask(m4), scale, 50.0)), \
        ref_attention(q1, kc, vc, m4, scale, 50.0)[0]


def _contract(ops, dtype, r):
    """Ops whose contract is a type, not a value."""
    assert ops.synchronize() is None
    pm = ops.peak_memory()
    assert pm is None or (isinstance(pm, int) and pm >= 0), f"peak_memory() returned {pm!r}"
    return
    yield


def _media(ops, dtype, r):
    """The media towers' ops (protocol) and multimodal/mmops.py's compositions of them (``mm.`` rows)."""
    from workbench.multimodal import mmops
    A, N = ops.asarray, ops.numpy
    # audio: LayerNorm over channels after the subsampling conv; vision/audio widths
    x = r.x((2, 24, 128), scale=2.0)
    w, b = r.x((128,), scale=0.2) + 1.0, r.x((128,), scale=0.1)
    w, b = round_to(w, dtype), round_to(b, dtype)
    yield "layer_norm", N(ops.layer_norm(A(x), A(w), A(b), 1e-6)), ref_layer_norm(x, w, b, 1e-6)
    # audio subsampling: 3x3 stride-2 conv on [B, T, F, C] (channels last)
    xi = r.x((2, 20, 32, 8))
    wc = r.x((16, 8, 3, 3), scale=(8 * 9) ** -0.5)
    got = ops.conv2d(A(xi), ops.conv2d_weight(wc), stride=2, padding=1)
    yield "conv2d", N(got), ref_conv2d_nhwc(xi, wc, 2, 1)
    # audio conformer: causal depthwise conv over time, K taps
    K = 5
    xd = r.x((2, 17, 64))
    taps = [r.x((64,), scale=0.5) for _ in range(K)]
    ref = np.zeros_like(xd)
    for t in range(xd.shape[1]):
        for kk in range(K):
            s = t - (K - 1) + kk
            if s >= 0:
                ref[:, t] += taps[kk] * xd[:, s]
    yield "mm.depthwise_conv1d", N(mmops.causal_depthwise_conv1d(ops, A(xd), [A(t) for t in taps], K)), ref
    xe = r.x((2, 9, 256), scale=4.0)
    yield "silu", N(ops.silu(A(xe))), xe / (1.0 + np.exp(-xe))
    yield "sigmoid", N(ops.sigmoid(A(xe))), 1.0 / (1.0 + np.exp(-xe))
    yield "relu", N(ops.relu(A(xe))), np.maximum(xe, 0.0)
    yield "tanh", N(ops.tanh(A(xe))), np.tanh(xe)
    xsp = r.x((2, 9, 256), scale=12.0)
    yield "clamp", N(ops.clamp(A(xsp), -10.0, 10.0)), np.clip(xsp, -10.0, 10.0)
    yield "clamp[inf bounds]", np.stack([N(ops.clamp(A(xsp), -math.inf, 5.0)), N(ops.clamp(A(xsp), None, None))]), \
        np.stack([np.minimum(xsp, 5.0), xsp])
    yield "pad", N(ops.pad(A(xd), 1, 3, 2)), np.pad(xd, ((0, 0), (3, 2), (0, 0)))
    idx = r.rng.integers(0, 17, size=(4, 6))
    yield "take", N(ops.take(A(xd), idx, 1)), np.take(xd, idx, axis=1)
    cond = r.rng.random((2, 17, 64)) < 0.3
    yield "where", N(ops.where(cond, 0.0, A(xd))), np.where(cond, 0.0, xd)
    # vision: axial 2-D RoPE on [B, H, P, hd] with per-patch (x, y) positions
    P, hd = 12, 64
    posxy = r.rng.integers(0, 8, size=(2, P, 2))
    cos, sin = mmops.rope_tables_2d(posxy, hd, 100.0)
    cos, sin = round_to(cos[:, None], dtype), round_to(sin[:, None], dtype)
    xv = r.x((2, 3, P, hd))
    yield "mm.rope_2d", N(mmops.apply_rope_2d(ops, A(xv), A(cos), A(sin))), ref_rope_2d(xv, cos, sin)
    wl, bl = r.x((96, 128), scale=128 ** -0.5), r.x((96,), scale=0.1)
    yield "mm.linear_bias", N(mmops.linear_bias(ops, A(x), A(wl), A(bl))), x @ wl.T + bl


def _compiled(ops, dtype, r):
    """The decode ops inside the framework's compiler (torch.compile / mx.compile): on CUDA the torch ops take
    their fused-reduction branches there, which eager calls never reach. Only on request (the GPU tool)."""
    if ops.framework == "torch":
        import torch
        comp = lambda f: torch.compile(f, dynamic=False, fullgraph=False)  # noqa: E731
        with torch.no_grad():
            yield from _compiled_cases(ops, r, comp)
    else:
        import mlx.core as mx
        with ops.traceable():          # the MLX CPU route's numpy products cannot be traced
            yield from _compiled_cases(ops, r, mx.compile)


def _compiled_cases(ops, r, comp):
    A, N = ops.asarray, ops.numpy
    w = r.x((FF, D), scale=D ** -0.5)
    x1 = r.x((1, 1, D))
    yield "linear[1 row, compiled]", N(comp(lambda x, w: ops.linear(x, w))(A(x1), A(w))), x1 @ w.T
    acc = r.acc()
    nw = round_to(1.0 + 0.1 * r.rng.standard_normal(D), acc)
    xr = r.x((1, 1, D), scale=3.0)
    yield "rms_norm[1 row, compiled]", N(comp(lambda x, w: ops.rms_norm(x, w, 1e-6))(A(xr), A(nw, dtype=acc))), \
        ref_rms_norm(xr, nw, 1e-6)
    scale, slots = HD ** -0.5, 32
    kpos = np.where(np.arange(slots) < 27, np.arange(slots), -1)
    m4 = ((kpos >= 0) & (kpos <= 26))[None, None, None, :]
    q1, kc, vc = r.x((1, H, 1, HD)), r.x((1, HKV, slots, HD)), r.x((1, HKV, slots, HD))
    for cap, name in ((None, "decode_attention[compiled]"), (50.0, "decode_attention[softcap, compiled]")):
        f = comp(lambda q, k, v, m: ops.decode_attention(q, k, v, m, scale, cap))
        yield name, N(f(A(q1), A(kc), A(vc), ops.asmask(m4))), ref_attention(q1, kc, vc, m4, scale, cap)[0]


GROUPS = (_data, _shape, _math, _rope, _attention, _contract, _media)


def cases(ops, dtype: str, compiled: bool = False):
    """Yield (op, got as numpy, float64 reference) for every op of the protocol (and mmops) on ``ops``."""
    for i, g in enumerate(GROUPS + ((_compiled,) if compiled else ())):
        yield from g(ops, dtype, Inputs(1234 + i, dtype))


# ================================================================================================ the runner
def compare(got, ref) -> tuple[float, str]:
    """(relative max error, note). NaN/inf first: a non-finite value where the reference is finite (or a
    different inf) is an error of inf whatever the norm says; shapes must match."""
    got = np.asarray(got)
    ref = np.asarray(ref)
    if got.shape != ref.shape:
        return math.inf, f"shape {got.shape}, expected {ref.shape}"
    if got.dtype == bool or ref.dtype == bool or np.issubdtype(ref.dtype, np.integer):
        bad = int((got.astype(np.int64) != ref.astype(np.int64)).sum())
        return (0.0, "") if bad == 0 else (bad / max(ref.size, 1), f"{bad} of {ref.size} differ")
    g = got.astype(np.float64)
    f = ref.astype(np.float64)
    fin = np.isfinite(f)
    nan = int(np.isnan(g).sum())
    if nan or not np.array_equal(np.isfinite(g), fin) or not np.array_equal(g[~fin], f[~fin]):
        return math.inf, f"{nan} NaN, {int(np.isinf(g).sum())} inf (reference: {int((~fin).sum())} non-finite)"
    scale = np.abs(f[fin]).max() if fin.any() else 0.0
    err = np.abs(g[fin] - f[fin]).max() if fin.any() else 0.0
    return float(err / scale if scale > 0 else err), ""


_RESULTS: dict[tuple[str, str], dict] = {}


def run(backend: str, dtype: str, compiled: bool = False) -> dict:
    """{op: (error, tolerance, ok, note)} for one backend and dtype, or {"_skip": reason}. Cached. ``compiled``
    adds the decode ops under the framework's compiler."""
    key = (backend, dtype)
    if key in _RESULTS:
        return _RESULTS[key]
    try:
        ops = _bk.get_ops(backend, dtype)
    except _bk.BackendError as e:
        _RESULTS[key] = {"_skip": str(e)}
        return _RESULTS[key]
    out: dict = {}
    t0 = time.perf_counter()
    for i, g in enumerate(GROUPS + ((_compiled,) if compiled else ())):
        try:
            for op, got, ref in g(ops, dtype, Inputs(1234 + i, dtype)):
                if op not in TOL:
                    raise KeyError(f"op {op!r} has no row in TOL ({__file__})")
                err, note = compare(got, ref)
                t = tol(op, dtype)
                out[op] = (err, t, err <= t, note)
        except KeyError:
            raise
        except Exception as e:      # an op that raises (or breaks a type contract) fails its group; the rest run
            # (named without the group's leading underscore: failures() skips "_" keys, which hid these)
            out[f"{g.__name__.lstrip('_')} raised"] = (math.inf, 0.0, False, f"{type(e).__name__}: {e}")
    out["_seconds"] = time.perf_counter() - t0
    _RESULTS[key] = out
    return out


def markdown(results: dict[tuple[str, str], dict]) -> str:
    """The op x (backend, dtype) table: relative max error, ✗ where it exceeds the tolerance; tolerances in the
    last columns."""
    cols = [k for k in results if "_skip" not in results[k]]
    ops = [op for op in TOL if any(op in results[c] for c in cols)]
    ops += sorted({op for c in cols for op in results[c] if not op.startswith("_") and op not in TOL})
    head = "| op | " + " | ".join(f"{b} {d}" for b, d in cols) + " | tol f32 / bf16 / f16 / f64 |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for op in ops:
        cells = []
        for c in cols:
            r = results[c].get(op)
            if r is None:
                cells.append("")
                continue
            err, t, ok, note = r
            s = "0" if err == 0 else ("inf" if math.isinf(err) else f"{err:.1e}")
            cells.append(s if ok else f"**{s} ✗**" + (f" ({note})" if note else ""))
        tl = " / ".join("0" if x == 0 else f"{x:.2g}" for x in TOL[op]) if op in TOL else ""
        lines.append(f"| {op} | " + " | ".join(cells) + f" | {tl} |")
    skipped = [f"{b} {d}: {results[(b, d)]['_skip']}" for b, d in results if "_skip" in results[(b, d)]]
    if skipped:
        lines.append("")
        lines += [f"- not run: {s}" for s in skipped]
    return "\n".join(lines)


def failures(res: dict) -> list[str]:
    return [f"{op}: {err:.3g} > {t:.3g}{' (' + note + ')' if note else ''}"
            for op, (err, t, ok, note) in ((k, v) for k, v in res.items() if not k.startswith("_")) if not ok]


# ================================================================================================ tests: structure
def _impl_classes():
    out = []
    for b in CPU_BACKENDS:
        ok, why = _bk.status(b)
        if ok:
            out.append(pytest.param(b, id=b))
        else:
            out.append(pytest.param(b, id=b, marks=pytest.mark.skip(reason=f"{b} not available here: {why}")))
    return out


def _own(cls, name):
    """The implementation ``cls`` provides for ``name`` (None when only the protocol's stub is inherited)."""
    for k in cls.__mro__:
        if k is _proto.Ops or k.__module__ == "typing":
            return None
        if name in vars(k):
            return vars(k)[name]
    return None


def _signature_problem(proto_fn, impl_fn) -> str | None:
    ps = list(inspect.signature(proto_fn).parameters.values())[1:]
    try:
        is_ = list(inspect.signature(impl_fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL,) for p in is_) and any(p.kind == p.VAR_KEYWORD for p in is_):
        return None
    for i, p in enumerate(ps):
        if i >= len(is_) or is_[i].kind not in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY):
            return f"takes no positional parameter {i + 1} ({p.name!r})"
        q = is_[i]
        if q.name != p.name:
            return f"parameter {i + 1} is {q.name!r}, the protocol's is {p.name!r} (callers pass it by keyword)"
        if p.default is not p.empty and q.default is q.empty:
            return f"parameter {p.name!r} has no default; the protocol's is {p.default!r}"
    for q in is_[len(ps):]:
        if q.default is q.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD):
            return f"extra parameter {q.name!r} without a default (callers of the protocol never pass it)"
    return None


@pytest.mark.parametrize("backend", _impl_classes())
def test_backend_implements_every_protocol_member(backend):
    ops = _bk.get_ops(backend, "float32")
    cls = type(ops)
    problems = []
    for name in _proto.MEMBERS:
        proto = getattr(_proto.Ops, name, None)
        if not callable(proto):                              # a data member: set on the instance or class
            if not hasattr(ops, name):
                problems.append(f"attribute {name!r} missing")
            continue
        impl = _own(cls, name)
        if impl is None:
            problems.append(f"method {name}() not implemented (only the protocol's stub)")
            continue
        if not callable(getattr(ops, name)):
            problems.append(f"{name} is not callable")
            continue
        why = _signature_problem(proto, impl)
        if why:
            problems.append(f"{name}{inspect.signature(impl)}: {why}")
    extras = getattr(_proto, "FRAMEWORK_MEMBERS", {}).get(ops.framework, {})
    for name in extras:
        if not hasattr(ops, name):
            problems.append(f"framework member {name!r} ({ops.framework}) missing")
    assert isinstance(ops, _proto.Ops)
    assert not problems, f"{cls.__name__} vs workbench/backends/protocol.py: " + "; ".join(problems)


# the implementations themselves (they use their own class's internals) and the protocol
_SCAN_EXEMPT = {"workbench/backends/torch.py", "workbench/backends/mlx.py", "workbench/backends/protocol.py",
                "workbench/backends/triton_decode.py", "workbench/backends/mlx_cuda_decode.py",
                "workbench/backends/cpu_gemv.py", "workbench/backends/torch_media.py", "workbench/backends/mlx_media.py",
                "workbench/distributed.py"}     # defines TPOps (a TorchOps with collectives) and uses its own members


def _is_ops(node) -> bool:
    return (isinstance(node, ast.Name) and node.id == "ops") or (isinstance(node, ast.Attribute) and
                                                                    node.attr == "ops")


def ops_uses(root: pathlib.Path = ROOT) -> dict[str, list[str]]:
    """{attribute: ["path:line", ...]} of every ``ops.X`` / ``<anything>.ops.X`` and ``getattr/hasattr/setattr
    (ops, "X")`` in workbench/ outside the exempt files."""
    uses: dict[str, list[str]] = {}
    for p in sorted((root / "workbench").rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel in _SCAN_EXEMPT:
            continue
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"), filename=rel)):
            name = None
            if isinstance(n, ast.Attribute) and _is_ops(n.value):
                name = n.attr
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and \
                    n.func.id in ("getattr", "hasattr", "setattr") and len(n.args) >= 2 and _is_ops(n.args[0]) \
                    and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str):
                name = n.args[1].value
            if name is not None:
                uses.setdefault(name, []).append(f"{rel}:{n.lineno}")
    return uses


def test_callers_use_only_declared_ops():
    uses = ops_uses()
    declared = set(_proto.MEMBERS) | {n for m in getattr(_proto, "FRAMEWORK_MEMBERS", {}).values() for n in m}
    undeclared = {k: v for k, v in uses.items() if k not in declared}
    assert not undeclared, ("ops members used but not declared in workbench/backends/protocol.py (declare them "
                            "with a contract, and implement them on every backend): " +
                            "; ".join(f"{k} at {', '.join(v[:4])}" for k, v in sorted(undeclared.items())))
    unused = [m for m in _proto.MEMBERS if m not in uses]
    print(f"\n{len(uses)} ops members used across workbench/; declared but unused outside the backends: "
          f"{unused or 'none'}")


def test_scan_sees_what_it_claims(tmp_path):
    """The scanner on a made-up tree: every access form is found, with its line."""
    (tmp_path / "workbench" / "model").mkdir(parents=True)
    (tmp_path / "workbench" / "model" / "x.py").write_text(
        "def f(ops, model, self):\n"
        "    ops.linear(1, 2)\n"
        "    model.ops.brand_new(3)\n"
        "    self.ops.dtype\n"
        "    return hasattr(ops, 'peak_memory'), getattr(model.ops, 'sneaky', None)\n")
    u = ops_uses(tmp_path)
    assert u == {"linear": ["workbench/model/x.py:2"], "brand_new": ["workbench/model/x.py:3"],
                 "dtype": ["workbench/model/x.py:4"], "peak_memory": ["workbench/model/x.py:5"],
                 "sneaky": ["workbench/model/x.py:5"]}, u


def test_signature_check_catches_mismatches():
    class Wrong:
        def gelu(self, x, exact=False): ...              # renamed keyword: gelu(x, approximate=...) would break
        def attention(self, q, k, v, mask, scale, softcap): ...    # want_probs missing
        def clamp(self, x, lo, hi): ...                  # defaults dropped: clamp(x) would break
        def rms_norm(self, x, w, eps, fused): ...        # an extra required parameter
        def linear(self, x, w, bias=None): ...           # an extra optional one: fine
    probs = {n: _signature_problem(getattr(_proto.Ops, n), getattr(Wrong, n))
             for n in ("gelu", "attention", "clamp", "rms_norm", "linear")}
    assert probs["linear"] is None
    assert all(probs[n] for n in ("gelu", "attention", "clamp", "rms_norm")), probs


def test_protocol_stub_is_loud():
    class Half(_proto.Ops):
        framework = "none"
    with pytest.raises(NotImplementedError, match="Half does not implement Ops.linear"):
        Half().linear(None, None)


# ================================================================================================ tests: numerics
def test_references_are_right():
    """The float64 references against closed forms, so a wrong reference cannot pass a wrong backend."""
    assert abs(ref_gelu_erf(np.array([1.0]))[0] - 0.8413447460685429) < 1e-15
    assert abs(ref_gelu_tanh(np.array([1.0]))[0] - 0.8411919906082768) < 1e-15
    x = np.array([[1.0, 0.0, 0.0, 0.0]])      # rotate (1, 0) pair by angle 1 rad: (cos 1, sin 1)
    y = ref_rope(x[None, None], np.array([1.0, 0.0]), [1])[0, 0, 0]
    assert np.allclose(y, [math.cos(1), 0, math.sin(1), 0], atol=1e-15)
    assert np.array_equal(round_to(np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1.00001]), "bfloat16"),
                          np.array([1.0, 1 + 2 ** -6, 1.0], np.float32))     # ties to even; plain rounding
    q = np.ones((1, 2, 1, 4))
    o, p = ref_attention(q, np.zeros((1, 1, 3, 4)), np.arange(12.0).reshape(1, 1, 3, 4), None, 1.0, None)
    assert np.allclose(p, 1 / 3) and np.allclose(o[0, 0, 0], [4, 5, 6, 7])
    w = np.zeros((1, 1, 3, 3))
    w[0, 0, 1, 1] = 1.0                      # identity kernel, stride 1
    xi = np.arange(16.0).reshape(1, 4, 4, 1)
    assert np.array_equal(ref_conv2d_nhwc(xi, w, 1, 1), xi)
    assert compare(np.array([1.0, np.nan]), np.array([1.0, 2.0]))[0] == math.inf
    assert compare(np.array([1.0, 2.5]), np.array([1.0, 2.0]))[0] == 0.25


def test_planted_faults_are_caught():
    """Wrong ops on torch:cpu float32 — interleaved RoPE pairing, erf GELU where tanh was asked, a dropped
    attention scale, argmin for argmax, one NaN in softcap — fail exactly their own rows; nothing else moves."""
    pytest.importorskip("torch")
    import torch

    from workbench.backends.torch import TorchOps

    class Faulty(TorchOps):
        def rope(self, x, inv_freq, start):
            # GPT-J pairing (2i, 2i+1) instead of HF's (i, i + hd/2)
            y = super().rope(x.reshape(*x.shape[:-1], 2, -1).transpose(-1, -2).reshape(x.shape), inv_freq, start)
            return y.reshape(*x.shape[:-1], -1, 2).transpose(-1, -2).reshape(x.shape)

        def gelu(self, x, approximate=True):
            return super().gelu(x, approximate=False)

        def attention(self, q, k, v, mask, scale, softcap, want_probs):
            return super().attention(q, k, v, mask, 1.0, softcap, want_probs)

        def argmax_last(self, logits):
            return logits.argmin(-1, keepdim=True)

        def softcap(self, x, cap):
            y = super().softcap(x, cap).clone()
            y.view(-1)[7] = float("nan")
            return y

    ops = Faulty(_bk.parse("torch:cpu"), "float32")
    failed = {}
    with torch.no_grad():
        for op, got, ref in cases(ops, "float32"):
            err, note = compare(got, ref)
            if err > tol(op, "float32"):
                failed[op] = (err, note)
    assert set(failed) == {"rope", "rope[partial]", "gelu[tanh]", "attention", "attention[softcap]",
                           "attention[probs]", "attention[probs].p", "argmax_last", "argmax_last[262k]",
                           "softcap", "attention[CausalMask]", "attention[CausalMask, window]",
                           "attention[CausalMask, softcap]", "attention[CausalMask, band]",
                           "attention[CausalMask, square]"}, failed
    assert math.isinf(failed["softcap"][0]) and "1 NaN" in failed["softcap"][1]


def _numeric_params():
    out = []
    for b in CPU_BACKENDS:
        ok, why = _bk.status(b)
        for d in DTYPES:
            marks = [] if ok else [pytest.mark.skip(reason=f"{b} not available here: {why}")]
            out.append(pytest.param(b, d, id=f"{b}-{d}", marks=marks))
    return out


@pytest.mark.parametrize("backend,dtype", _numeric_params())
def test_ops_conform(backend, dtype):
    res = run(backend, dtype)
    if "_skip" in res:
        assert dtype == "float64" and backend != "torch:cpu", res["_skip"]    # only float64 off torch:cpu
        pytest.skip(res["_skip"])
    bad = failures(res)
    assert not bad, f"{backend} {dtype}: " + "; ".join(bad)


def test_print_table():
    """The whole table (runs whatever the parametrized tests did not), printed and written for the README."""
    for b in CPU_BACKENDS:
        if _bk.status(b)[0]:
            for d in DTYPES:
                run(b, d)
    res = {k: v for k, v in _RESULTS.items() if k[0] in CPU_BACKENDS}
    if not res:
        pytest.skip("no CPU backend available")
    table = markdown(res)
    print("\n" + table)
    path = os.environ.get("WORKBENCH_OPS_TABLE") or ("/tmp/notes/ops_table.md" if os.path.isdir("/tmp/notes")
                                                      else None)
    if path:
        pathlib.Path(path).write_text(table + "\n", encoding="utf-8")
    secs = sum(v.get("_seconds", 0.0) for v in res.values())
    assert secs < 60, f"the conformance cases took {secs:.0f} s; keep them under ~30 s"
