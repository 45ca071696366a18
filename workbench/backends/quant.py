"""GGUF weights kept in their own quantised blocks on the CPU (``wb.load(gguf, backend="torch:cpu", quant=...)``).

A :class:`QuantWeight` is a matrix [N, K] held as the GGUF's raw blocks (Q8_0, Q5_0, Q4_0 in blocks of 32;
Q4_K, Q6_K in super-blocks of 256), never as a dequantised copy. The torch:cpu ops use it through
:mod:`cpu_gemv`'s C kernel:

* one-row products (decode, the head included): ``wb_q_gemv`` on the blocks. Two numerics:
  ``quant="keep"`` — x quantised to 8 bits once per product and integer block dot products (llama.cpp's
  CPU method, the fast one); ``quant="keep-exact"`` — x stays float32 and each weight block is dequantised
  into an L1 buffer before a float32 dot product (the only error is the weights' own quantisation).
  Comparing the two against float64 on the dequantised weights separates quantisation error from 8-bit
  activation error.
* several rows (prefill, forward): up to ``GEMM_MAX`` (16) rows on the kernel's pool (``wb_q_gemm``: each block
  dequantised once into L1, dotted with every row in float32 — on the shared 2-core box torch's 2-thread GEMM of
  6 rows took 16 ms per 4096 x 640 matrix under load, 1.4 ms on 1 thread); more rows: the matrix dequantised a
  chunk of rows at a time (a few MiB) and multiplied with torch's GEMM in float32. Exact numerics in both modes,
  no persistent float copy.
* embedding lookups: the rows asked for, dequantised.

A fused projection (q/k/v, gate/up) may mix types (Q4_K_M files store some attn_v as Q8_0 beside Q5_0 q/k):
it is a list of row segments, each of one type.
"""
from __future__ import annotations

import ctypes

import numpy as np

from . import cpu_gemv

# ggml type ids the C kernel implements (ggml.h: GGML_TYPE_*); value: (block bytes, elements per block)
TYPES = {"Q4_0": (2, 18, 32), "Q5_0": (6, 22, 32), "Q8_0": (8, 34, 32), "Q4_K": (12, 144, 256),
         "Q6_K": (14, 210, 256)}
MODES = {"keep": True, "keep-exact": False}    # quant option -> 8-bit activations in one-row products
_CHUNK_BYTES = 8 << 20                         # float32 rows dequantised at a time for several-row products
GEMM_MAX = 16                                  # up to this many rows: the kernel's own product (wb_q_gemm)


class QuantError(ValueError):
    """A tensor that cannot be kept quantised (type, shape), named with its type."""


def check_mode(quant) -> str | None:
    if quant in (None, "", "none", "off", "dequantise", "dequantize"):
        return None
    q = str(quant).strip().lower()
    if q not in MODES:
        raise ValueError(f"quant={quant!r}: expected 'keep' (GGUF blocks, 8-bit activations as llama.cpp), "
                         "'keep-exact' (GGUF blocks, float32 activations) or None (dequantise on load)")
    return q


class QuantWeight:
    """A [N, K] matrix as GGUF blocks: ``segments`` = [(type name, raw uint8 [rows, row_bytes])], rows stacked."""

    is_quantized = True
    dtype = np.dtype(np.uint8)      # not a float array (the model's NaN scan skips it)

    def __init__(self, segments, K: int, name: str = "?"):
        self.name = name
        self.K = int(K)
        merged: list = []
        for t, raw in segments:
            if t == "F32":          # float rows beside quantised ones in a fused projection (tiny test files)
                raw = np.ascontiguousarray(raw, dtype=np.float32).reshape(-1, self.K)
            elif t not in TYPES:
                raise QuantError(f"tensor {name!r}: ggml type {t} is not one the CPU kernels keep quantised "
                                 f"(kept: {', '.join(TYPES)}); load it without quant= to dequantise it")
            else:
                _, bs, qk = TYPES[t]
                if self.K % qk:
                    raise QuantError(f"tensor {name!r}: {t} rows of {self.K} values are not whole blocks of {qk}")
                raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, (self.K // qk) * bs)
            if merged and merged[-1][0] == t:
                merged[-1] = (t, np.concatenate([merged[-1][1], raw], 0))
            else:
                merged.append((t, raw))
        self.segments = merged
        self.N = int(sum(r.shape[0] for _, r in merged))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.N, self.K)

    ndim = 2

    @property
    def nbytes(self) -> int:
        return int(sum(r.nbytes for _, r in self.segments))

    @property
    def types(self) -> list[str]:
        return [t for t, _ in self.segments]

    def __repr__(self) -> str:
        parts = ", ".join(f"{t}x{r.shape[0]}" for t, r in self.segments)
        return f"QuantWeight({self.name}, [{self.N}, {self.K}], {parts}, {self.nbytes / 1e6:.1f} MB)"

    @staticmethod
    def concat(ws, name: str | None = None) -> "QuantWeight":
        """Rows of several matrices stacked (a fused projection); float ones (numpy / torch) become F32 rows."""
        ws = [w if isinstance(w, QuantWeight) else
              QuantWeight([("F32", w.detach().numpy() if hasattr(w, "detach") else w)], w.shape[-1], "float")
              for w in ws]
        K = {w.K for w in ws}
        if len(K) != 1:
            raise QuantError(f"cannot stack quantised matrices of different widths {sorted(K)}")
        return QuantWeight([s for w in ws for s in w.segments], K.pop(), name or "+".join(w.name for w in ws))

    # ------------------------------------------------------------------ the kernel
    def _segs(self):
        r0 = 0
        for t, raw in self.segments:
            yield t, raw, r0
            r0 += raw.shape[0]

    def gemv_ptr(self, x_ptr: int, y_ptr: int, act8: bool) -> None:
        """y [N] = W x for float32 x [K] and y at raw addresses (the caller keeps them alive)."""
        lib = cpu_gemv.kernel()
        nt = cpu_gemv._threads()
        for t, raw, r0 in self._segs():
            if t == "F32":
                lib.wb_gemv_f32(raw.ctypes.data, x_ptr, y_ptr + 4 * r0, raw.shape[0], self.K, nt)
                continue
            rc = lib.wb_q_gemv(TYPES[t][0], raw.ctypes.data, raw.shape[1], x_ptr, y_ptr + 4 * r0, raw.shape[0],
                               self.K, int(act8), nt)
            if rc:
                raise QuantError(f"tensor {self.name!r}: the C kernel refused {t} [{raw.shape[0]}, {self.K}] ({rc})")

    def gemv(self, x: np.ndarray, act8: bool = True) -> np.ndarray:
        """y = W @ x (numpy float32)."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        if x.shape[0] != self.K:
            raise ValueError(f"tensor {self.name!r}: x has {x.shape[0]} values, the matrix {self.K} columns")
        y = np.empty(self.N, np.float32)
        self.gemv_ptr(x.ctypes.data, y.ctypes.data, act8)
        return y

    def gemm_ptr(self, x_ptr: int, y_ptr: int, M: int) -> None:
        """Y [M, N] = X W^T for M <= GEMM_MAX float32 rows X [M, K] at raw addresses: each block dequantised once
        into L1 and dotted with every row (float32, as the exact one-row product)."""
        lib = cpu_gemv.kernel()
        nt = cpu_gemv._threads()
        for t, raw, r0 in self._segs():
            if t == "F32":
                X = np.ctypeslib.as_array(ctypes.cast(x_ptr, ctypes.POINTER(ctypes.c_float)), (M, self.K))
                Y = np.ctypeslib.as_array(ctypes.cast(y_ptr, ctypes.POINTER(ctypes.c_float)), (M, self.N))
                Y[:, r0:r0 + raw.shape[0]] = X @ raw.T
                continue
            rc = lib.wb_q_gemm(TYPES[t][0], raw.ctypes.data, raw.shape[1], x_ptr, y_ptr + 4 * r0, raw.shape[0],
                               self.K, M, self.N, nt)
            if rc:
                raise QuantError(f"tensor {self.name!r}: the C kernel refused {t} x {M} rows ({rc})")

    def dequant_into(self, r0: int, r1: int, out_ptr: int) -> None:
        """Rows [r0, r1) dequantised to float32 at ``out_ptr`` (row-major, K per row)."""
        lib = cpu_gemv.kernel()
        nt = cpu_gemv._threads()
        for t, raw, s0 in self._segs():
            a, b = max(r0, s0), min(r1, s0 + raw.shape[0])
            if a >= b:
                continue
            if t == "F32":
                ctypes.memmove(out_ptr + 4 * (a - r0) * self.K, raw[a - s0:].ctypes.data, 4 * (b - a) * self.K)
                continue
            rc = lib.wb_q_dequant(TYPES[t][0], raw[a - s0:].ctypes.data, raw.shape[1],
                                  out_ptr + 4 * (a - r0) * self.K, b - a, self.K, nt)
            if rc:
                raise QuantError(f"tensor {self.name!r}: the C kernel refused to dequantise {t} ({rc})")

    def dequantize(self, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """float32 rows [r0, r1) (tests, tools; the model never holds the whole matrix dequantised)."""
        r1 = self.N if r1 is None else r1
        out = np.empty((r1 - r0, self.K), np.float32)
        self.dequant_into(r0, r1, out.ctypes.data)
        return out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), K]: the rows ``ids`` (an embedding lookup)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((ids.shape[0], self.K), np.float32)
        for j, i in enumerate(ids):
            self.dequant_into(int(i), int(i) + 1, out[j:].ctypes.data)
        return out

    def chunks(self):
        """(r0, r1) row ranges of about _CHUNK_BYTES float32 each."""
        step = max(64, _CHUNK_BYTES // (4 * self.K))
        for r0 in range(0, self.N, step):
            yield r0, min(self.N, r0 + step)


def available() -> str | None:
    """None when the kernel is usable for kept-quantised weights, else why not."""
    if cpu_gemv.kernel() is None:
        return f"kept-quantised weights need the C kernel: {cpu_gemv._state.get('why')}"
    return None


def describe(act8: bool) -> str:
    how = "8-bit activations, integer block dot products (llama.cpp's method)" if act8 else \
        "float32 activations, weight blocks dequantised in L1 (exact)"
    lib = cpu_gemv.kernel()
    simd = "portable C" if lib is None or not lib.wb_q_simd() else \
        "AVX2 + AVX-512 VNNI" if lib.wb_q_vnni() else "AVX2"
    return f"GGUF blocks kept quantised ({simd}; {how}; up to {GEMM_MAX} rows: blocks dequantised in L1 for every " \
           f"row, more: {_CHUNK_BYTES >> 20} MiB chunks dequantised for torch's GEMM)"


# ---------------------------------------------------------------------------------------------- torch glue
def torch_linear(x, w: QuantWeight, act8: bool):
    """x [..., K] (float32 torch) times w^T -> [..., N] float32."""
    import torch
    import torch.nn.functional as F
    if x.dtype != torch.float32:
        raise TypeError(f"kept-quantised products take float32 activations, got {x.dtype}")
    xc = x.detach().contiguous()
    rows = xc.numel() // w.K
    y = torch.empty(x.shape[:-1] + (w.N,), dtype=torch.float32)
    if rows == 1:
        w.gemv_ptr(xc.data_ptr(), y.data_ptr(), act8)
        return y
    if rows <= GEMM_MAX:         # a short prompt: on the kernel's pool (torch's threads stay out of it)
        w.gemm_ptr(xc.data_ptr(), y.data_ptr(), rows)
        return y
    x2, y2 = xc.reshape(rows, w.K), y.reshape(rows, w.N)
    buf = None
    for r0, r1 in w.chunks():
        if buf is None or buf.shape[0] != r1 - r0:
            buf = torch.empty((r1 - r0, w.K), dtype=torch.float32)
        w.dequant_into(r0, r1, buf.data_ptr())
        y2[:, r0:r1] = F.linear(x2, buf)
    return y


def torch_rows(w: QuantWeight, ids):
    import torch
    idn = ids.detach().cpu().numpy()
    return torch.from_numpy(w.rows(idn)).reshape(*idn.shape, w.K)


def check_ops(ops) -> None:
    """Kept-quantised weights run on torch:cpu in float32 (the kernel's activations)."""
    if ops.framework != "torch" or ops.device.type != "cpu":
        raise ValueError(f"quant= (GGUF blocks kept quantised) runs on torch:cpu; got {ops.spec.name}")
    if ops.dtype != "float32":
        raise ValueError(f"quant= computes in float32 activations; got dtype={ops.dtype!r} (use dtype='float32')")
    why = available()
    if why:
        raise RuntimeError(why)
