"""The kept-quantised decode step in one C call (decode route ``cpu quant step``).

``wb.load(gguf, backend="torch:cpu", quant="keep" | "keep-exact")`` keeps the GGUF's blocks (:mod:`quant`). The
eager static step runs them through one ctypes call per product plus ~20 torch ops per layer (norms, RoPE, cache
writes, attention, residuals): on the project's 2-core box that was 8.6 ms of a 22 ms step in Python and torch
dispatch, and another few ms in per-product pool round trips. :class:`CpuQuantStep` hands the whole step — the
embedding row, every layer, the final norm, the head and (greedy) the argmax — to ``wb_qstep`` (C source in
:mod:`cpu_step_c`, compiled with :mod:`cpu_gemv`'s kernels into one library), which reads the
:class:`~workbench.decode.plan.DecodePlan`'s weights and cache buffers in place: the same block dot products and
8-bit activation quantisation per product as ``wb_q_gemv``, float32 for everything else, and the pool's helpers
kept busy from one product to the next. Each step runs on 1 thread or on all (the CPUs this process may use),
whichever its measured step times say is faster: on a shared CPU a helper that is often descheduled makes two
threads slower than one (:meth:`CpuQuantStep.threads` reports the choice).

It runs Gemma 1-3 text models (what :func:`base.fused_decode_unsupported` allows) at batch 1 in float32 with
weights that are GGUF blocks (``QuantWeight``, up to 4 row segments) or float32 tensors; anything else keeps
the eager step (:func:`unsupported` says why; ``WORKBENCH_CPU_STEP=0`` asks for it).
"""
from __future__ import annotations

import ctypes
import operator

import numpy as np

from . import cpu_gemv
from .base import fused_decode_unsupported
from .quant import TYPES, QuantError, QuantWeight

_I, _P, _D = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
MAXSEG = 4
_ERRORS = {-1: "a ggml type the kernel does not implement", -2: "row segments that do not add up to the matrix",
           -3: "shapes that do not fit the model", -4: "out of memory", -5: "token id outside the vocabulary",
           -6: "position outside the cache / RoPE table"}


class _Seg(ctypes.Structure):
    _fields_ = [("t", _I), ("w", _P), ("row_bytes", _I), ("rows", _I)]


class _Mat(ctypes.Structure):
    _fields_ = [("nseg", _I), ("N", _I), ("K", _I), ("seg", _Seg * MAXSEG)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Mat), ("o", _Mat), ("gate_up", _Mat), ("down", _Mat),
                ("input_norm", _P), ("post_attn_norm", _P), ("pre_ff_norm", _P), ("post_ff_norm", _P),
                ("q_norm", _P), ("k_norm", _P), ("k", _P), ("v", _P), ("kpos", _P), ("cos", _P), ("sin", _P),
                ("hd", _I), ("kvh", _I), ("F", _I), ("window", _I), ("slots", _I), ("ring", _I), ("rope_len", _I),
                ("scale", _D)]


class _Model(ctypes.Structure):
    _fields_ = [("L", _I), ("D", _I), ("H", _I), ("V", _I), ("act8", _I), ("nthreads", _I),
                ("eps", _D), ("embed_scale", _D), ("attn_softcap", _D), ("final_softcap", _D),
                ("embed", _Mat), ("head", _Mat), ("final_norm", _P), ("layers", ctypes.POINTER(_Layer))]


def unsupported(cfg, ops, cache=None) -> str | None:
    """Why the fused step can't run this model on these ops (None: it can)."""
    if ops.framework != "torch" or ops.device.type != "cpu":
        return f"not torch:cpu ({ops.spec.name})"
    if not getattr(ops, "quant", None):
        return "weights not kept quantised (quant=None)"
    if ops.dtype != "float32":
        return f"dtype {ops.dtype} (float32 only)"
    if cpu_gemv.kernel() is None:
        return f"no C kernel: {cpu_gemv._state.get('why')}"
    odd = [i for i in range(cfg.num_hidden_layers) if cfg.head_dim(i) % 2]
    return fused_decode_unsupported(cfg, ops, cache) or (f"layer {odd[0]}: odd head_dim" if odd else None)


def _f32(t, what: str, n: int | None = None):
    """A float32 contiguous CPU tensor's address (None stays None)."""
    if t is None:
        return None
    import torch
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device.type != "cpu" or \
            not t.is_contiguous() or (n is not None and t.numel() != n):
        got = f"{type(t).__name__} {getattr(t, 'dtype', '')} {tuple(getattr(t, 'shape', ()))}"
        raise QuantError(f"fused CPU step: {what} must be a contiguous float32 CPU tensor"
                         + (f" of {n} values" if n is not None else "") + f", got {got}")
    return t.data_ptr()


def _mat(w, what: str, N: int, K: int, keep: list) -> _Mat:
    """A matrix as row segments: a QuantWeight's own, or one float32 segment."""
    m = _Mat()
    if isinstance(w, QuantWeight):
        segs = [(TYPES[t][0] if t != "F32" else 0, raw) for t, raw in w.segments]
        shape = w.shape
    else:
        _f32(w, what)
        segs = [(0, w)]
        shape = tuple(w.shape)
    if tuple(shape) != (N, K):
        raise QuantError(f"fused CPU step: {what} is {list(shape)}, expected [{N}, {K}]")
    if len(segs) > MAXSEG:
        raise QuantError(f"fused CPU step: {what} has {len(segs)} row segments of different types (at most {MAXSEG})")
    m.nseg, m.N, m.K = len(segs), N, K
    for s, (t, raw) in enumerate(segs):
        if isinstance(raw, np.ndarray):
            m.seg[s] = _Seg(t, raw.ctypes.data, raw.strides[0] if raw.ndim == 2 else 4 * K, raw.shape[0])
            if not raw.flags.c_contiguous:
                raise QuantError(f"fused CPU step: {what} segment {s} is not contiguous")
        else:
            m.seg[s] = _Seg(0, raw.data_ptr(), 4 * K, raw.shape[0])
        keep.append(raw)
    return m


class CpuQuantStep:
    """``step(tok, pos)`` -> logits [1, V] (a buffer reused by the next call); ``step.greedy(tok, pos)`` -> the
    argmax token [1, 1] (int64, reused); ``capture=`` a float32 [L, D] array/tensor that receives each layer's
    residual (``blocks.{i}.hook_resid_post``). tok: [1, 1] and pos: [1] int64 CPU tensors."""

    def __init__(self, plan):
        import torch
        ops = plan.ops
        cache = plan.cache
        if cache is None or not cache.static:
            raise ValueError("fused CPU step: the plan needs a static cache (cache.begin_static())")
        if cache.batch != 1:
            raise ValueError(f"fused CPU step: batch {cache.batch} (batch 1 only)")
        self.lib = cpu_gemv.kernel()
        if self.lib is None:
            raise RuntimeError(f"fused CPU step: no C kernel: {cpu_gemv._state.get('why')}")
        self.plan = plan
        D, H, V, L = plan.hidden, plan.n_heads, plan.vocab, len(plan.layers)
        self.L, self.D, self.V = L, D, V
        keep: list = []
        layers = (_Layer * L)()
        self._bufs = []
        for i, lp in enumerate(plan.layers):
            hd, kvh, F = lp.head_dim, lp.kv_heads, lp.intermediate
            kv = lp.kv
            if kv is None or getattr(kv, "one_tensor", False):
                raise ValueError(f"fused CPU step: layer {i} has no K/V cache of its own (KV sharing / k=v)")
            shape = (1, kvh, kv.slots, hd)
            for nm, t in (("k", kv.k), ("v", kv.v)):
                if tuple(t.shape) != shape:
                    raise ValueError(f"fused CPU step: layer {i} cache {nm} is {tuple(t.shape)}, expected {shape}")
            kpos = kv.kpos_dev
            if kpos.dtype != torch.int64 or kpos.numel() != kv.slots or not kpos.is_contiguous():
                raise ValueError(f"fused CPU step: layer {i} slot positions must be {kv.slots} contiguous int64")
            cos, sin = lp.rope
            if tuple(cos.shape) != tuple(sin.shape) or cos.shape[-1] != hd:
                raise ValueError(f"fused CPU step: layer {i} RoPE tables {tuple(cos.shape)}, expected [n, {hd}]")
            nm = f"layer {i} "
            lay = layers[i]
            lay.qkv = _mat(lp.qkv, nm + "qkv", (H + 2 * kvh) * hd, D, keep)
            lay.o = _mat(lp.o, nm + "o", D, H * hd, keep)
            lay.gate_up = _mat(lp.gate_up, nm + "gate_up", 2 * F, D, keep)
            lay.down = _mat(lp.down, nm + "down", D, F, keep)
            lay.input_norm = _f32(lp.input_norm, nm + "input_norm", D)
            lay.pre_ff_norm = _f32(lp.pre_ff_norm, nm + "pre_ff_norm", D)
            lay.post_attn_norm = _f32(lp.post_attn_norm, nm + "post_attn_norm", D)
            lay.post_ff_norm = _f32(lp.post_ff_norm, nm + "post_ff_norm", D)
            lay.q_norm = _f32(lp.q_norm, nm + "q_norm", hd)
            lay.k_norm = _f32(lp.k_norm, nm + "k_norm", hd)
            lay.k, lay.v = _f32(kv.k, nm + "cache k"), _f32(kv.v, nm + "cache v")
            lay.kpos = kpos.data_ptr()
            lay.cos, lay.sin = _f32(cos, nm + "RoPE cos"), _f32(sin, nm + "RoPE sin")
            lay.hd, lay.kvh, lay.F, lay.slots, lay.ring = hd, kvh, F, kv.slots, int(bool(kv.ring))
            lay.window = int(lp.window or 0)
            lay.rope_len = int(cos.shape[0])
            lay.scale = float(lp.scale)
            keep += [lp.input_norm, lp.pre_ff_norm, lp.post_attn_norm, lp.post_ff_norm, lp.q_norm, lp.k_norm,
                     cos, sin]
            self._bufs += [kv, kv.k, kv.v, kpos]
        m = _Model()
        m.L, m.D, m.H, m.V = L, D, H, V
        m.act8 = int(bool(ops.quant_act8))
        self._nt = cpu_gemv._threads()
        m.nthreads = self._nt
        m.eps, m.embed_scale = float(plan.eps), float(plan.embed_scale)
        m.attn_softcap = float(plan.attn_softcap or 0.0)
        m.final_softcap = float(plan.final_softcap or 0.0)
        m.embed = _mat(plan.embed, "embedding", V, D, keep)
        m.head = _mat(plan.head, "head", V, D, keep)
        m.final_norm = _f32(plan.final_norm, "final norm", D)
        keep.append(plan.final_norm)
        m.layers = layers
        err, where = ctypes.c_int(0), ctypes.c_int64(-1)
        h = self.lib.wb_qstep_new(ctypes.byref(m), ctypes.byref(err), ctypes.byref(where))
        if not h:
            at = f"layer {where.value}" if where.value >= 0 else "the model"
            raise QuantError(f"fused CPU step: the kernel refused {at}: {_ERRORS.get(err.value, err.value)}")
        self._h = h
        self._keep = (keep, layers, m)
        self.logits = torch.empty((1, V), dtype=torch.float32)
        self.token = torch.zeros((1, 1), dtype=torch.int64)
        self._lp, self._tp = self.logits.data_ptr(), self.token.data_ptr()
        self._free = self.lib.wb_qstep_free

    def __del__(self):
        h = getattr(self, "_h", None)
        if h:
            self._h = None
            self._free(h)

    def _check(self, tok, pos):
        import torch
        if tok.dtype != torch.int64 or pos.dtype != torch.int64 or tok.device.type != "cpu" or \
                tok.numel() != 1 or pos.numel() != 1:
            raise ValueError(f"fused CPU step: tok [1, 1] and pos [1] int64 CPU tensors, got {tok.dtype} "
                             f"{tuple(tok.shape)} and {pos.dtype} {tuple(pos.shape)}")
        # the cache still holds the buffers the kernel writes (a cache that re-allocated them needs a new step)
        cur = []
        for lp in self.plan.layers:
            kv = lp.kv
            cur += [kv, kv.k, kv.v, kv.kpos_dev]
        if len(cur) != len(self._bufs) or not all(map(operator.is_, cur, self._bufs)):
            raise RuntimeError("fused CPU step: the cache's buffers changed since the step was built")
        nt = cpu_gemv._threads()
        if nt != self._nt:                       # a forked child: one thread
            self.lib.wb_qstep_set_threads(self._h, nt)
            self._nt = nt

    def _run(self, tok, pos, nxt, capture):
        self._check(tok, pos)
        cap = None
        if capture is not None:
            import torch
            if isinstance(capture, torch.Tensor):
                ok = capture.dtype == torch.float32 and capture.is_contiguous() and capture.numel() == self.L * self.D
                cap = capture.data_ptr()
            else:
                ok = capture.dtype == np.float32 and capture.flags.c_contiguous and capture.size == self.L * self.D
                cap = capture.ctypes.data
            if not ok:
                raise ValueError(f"fused CPU step: capture must be a contiguous float32 [{self.L}, {self.D}]")
        rc = self.lib.wb_qstep(self._h, tok.data_ptr(), pos.data_ptr(), self._lp, nxt, cap)
        if rc:
            raise ValueError(f"fused CPU step: token {int(tok.reshape(-1)[0])} at position {int(pos.reshape(-1)[0])}: "
                             f"{_ERRORS.get(rc, rc)} (vocabulary {self.V}, cache {self.plan.cache.max_len})")

    def __call__(self, tok, pos, capture=None):
        self._run(tok, pos, None, capture)
        return self.logits

    def greedy(self, tok, pos, capture=None):
        self._run(tok, pos, self._tp, capture)
        return self.token

    def threads(self) -> tuple[int, float | None, float | None]:
        """(threads of the last step, average step ms with 1 thread, with all): the step picks the faster."""
        out = (ctypes.c_double * 2)()
        n = self.lib.wb_qstep_threads(self._h, out)
        return int(n), *(None if v < 0 else v / 1e3 for v in out)

    def profile(self, on: bool = True) -> tuple[float, float, float, float]:
        """(the layers' products, attention, the rest, the head) seconds since the last call; on: keep timing."""
        out = (ctypes.c_double * 4)()
        self.lib.wb_qstep_profile(self._h, int(on), out)
        return tuple(out)
