"""GGUF files (llama.cpp) -> an HF-style config dict and canonical numpy tensors.

``load_gguf(path)`` reads a Gemma 1/2/3/4 GGUF (``general.architecture`` gemma, gemma2, gemma3, gemma4), rebuilds
the config Hugging Face would have (``model_type`` gemma, gemma2, gemma3_text, gemma4_text) including the values
GGUF leaves out and llama.cpp fills in itself, maps llama.cpp's tensor names to the canonical names of
:mod:`workbench.weights.names`, dequantises every tensor and undoes llama.cpp's ``+1`` on Gemma 1-3 norm weights.

What llama.cpp fills in (``src/llama-model.cpp``, ``load_hparams``; ``src/llama-hparams.cpp``):

* gemma2: ``set_swa_pattern(2)`` -> layer ``il`` slides when ``il % 2 < 1`` (even layers); window 4096 unless
  ``gemma2.attention.sliding_window``; softcaps default to ``llama_hparams``' 50.0 (attention) / 30.0 (final);
  ``f_attention_scale = 1/sqrt(n_embd/n_head)`` for the 27B (46 layers), else ``1/sqrt(key_length)``.
* gemma3: ``set_swa_pattern(6)`` -> layer ``il`` slides when ``il % 6 < 5``, i.e. ``(il + 1) % 6 != 0``
  (only when ``gemma3.attention.sliding_window`` is present and > 0; otherwise no layer slides);
  ``rope_freq_base_train_swa = 10000``, ``rope_freq_scale_train_swa = 1`` (the linear RoPE factor of
  ``gemma3.rope.scaling.factor`` only applies to the global layers); final softcap 0 unless stated;
  ``f_attention_scale`` as for gemma2 with the 27B at 62 layers.
* gemma4 (``src/models/gemma4.cpp``): per-layer ``sliding_window_pattern`` (bools), ``head_count_kv`` and
  ``feed_forward_length`` arrays, ``key_length`` (global) vs ``key_length_swa``, ``rope.freq_base_swa``,
  ``shared_kv_layers``, ``embedding_length_per_layer_input``, attention scale 1.0, an optional ``attn_v``
  (absent -> V = K), and a ``rope_freqs`` tensor whose 1e30 entries mark the unrotated pairs of the
  proportional RoPE of the global layers.

Where this loader reads more than llama.cpp does: a gemma3 ``rope.freq_base_swa`` or ``attention.sliding_window_pattern``
key is honoured when present (llama.cpp hard-codes 10000 / period 6; converted files agree with those); a gemma4
file without ``final_logit_softcapping`` gets none (HF's default; llama.cpp's struct default would be 30.0).

The ``+1``: llama.cpp's converter (``convert_hf_to_gguf.py`` / ``conversion/gemma.py``, ``GemmaModel``,
``Gemma2Model``, ``Gemma3Model.norm_shift``) adds 1 to every HF tensor whose name ends in ``norm.weight``: input,
post-attention, pre/post-feedforward, final and q/k norms -- in GGUF names every ``*norm.weight``. Gemma 4's
``norm_shift`` is 0. transformers undoes it the same way (``Gemma2TensorProcessor``: ``weights - 1``).

Dequantised tensors are cached (one memory-mappable ``.npy`` per tensor) so a second load takes about a second.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = ["GGUFError", "load_gguf", "gguf_tokenizer_metadata", "gguf_metadata", "read_gguf", "build_config",
           "canonical_gguf_name", "dequantize_rows", "default_cache_dir", "SUPPORTED_ARCHITECTURES", "LOADER_VERSION"]

LOADER_VERSION = 1
SUPPORTED_ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text", "gemma4": "gemma4_text"}
SLIDING, FULL = "sliding_attention", "full_attention"

_MAGIC = b"GGUF"
_ONE_MIB = 1 << 20


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded as written: not GGUF, truncated, unsupported or incomplete."""


# --------------------------------------------------------------------------------------------- file format
# metadata value types (gguf spec): fixed-size scalars; 8 = string, 9 = array
_SCALAR = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
           7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
              11: "<i8", 12: "<f8"}


class StringArray(int):
    """A string array left unread (its length): only the arrays asked for are decoded."""


def _ggml_types() -> tuple[dict[int, str], dict[int, tuple[int, int]]]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    names = {int(t): t.name for t in GGMLQuantizationType}
    sizes = {int(t): (int(b), int(s)) for t, (b, s) in GGML_QUANT_SIZES.items()}
    return names, sizes


@dataclass
class TensorInfo:
    name: str
    dims: tuple[int, ...]          # ggml order (fastest-moving first)
    ggml_type: int
    type_name: str
    offset: int                    # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / Hugging Face order."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        return int(math.prod(self.dims))


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_start: int
    alignment: int
    file_size: int
    by_name: dict[str, TensorInfo] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.by_name = {t.name: t for t in self.tensors}

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]


class _Cursor:
    """Bounds-checked little-endian reads over a memory map; every overrun is a GGUFError naming the file."""

    def __init__(self, buf, path: Path, size: int):
        self.buf, self.path, self.size, self.pos = buf, path, size, 0

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated file: {what} needs {n} bytes at offset {self.pos}, but the "
                            f"file has {self.size} bytes (incomplete download or copy?)")

    def unpack(self, fmt: str, n: int, what: str):
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)[0]

    def raw_string(self, what: str) -> bytes:
        n = self.u64(what)
        self.need(n, what)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(b)

    def string(self, what: str) -> str:
        b = self.raw_string(what)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return b.decode("utf-8", errors="replace")

    def skip_strings(self, count: int, what: str):
        buf, pos, size = self.buf, self.pos, self.size
        unpack = struct.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, what)
            (n,) = unpack("<Q", buf, pos)
            pos += 8 + n
        if pos > size:
            self.pos = pos - 1
            self.need(1, what)
        self.pos = pos

    def strings(self, count: int, what: str) -> list[str]:
        buf, pos, size = self.buf, self.pos, self.size
        unpack = struct.unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, what)
            (n,) = unpack("<Q", buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self.need(n, what)
            b = buf[pos:pos + n]
            pos += n
            try:
                out.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(b.decode("utf-8", errors="replace"))
        self.pos = pos
        return out


def _read_value(cur: _Cursor, vtype: int, key: str, keep_strings: bool):
    if vtype in _SCALAR:
        fmt, n = _SCALAR[vtype]
        return cur.unpack(fmt, n, f"metadata value {key!r}")[0]
    if vtype == 8:
        return cur.string(f"metadata value {key!r}")
    if vtype == 9:
        etype = cur.u32(f"metadata array type of {key!r}")
        count = cur.u64(f"metadata array length of {key!r}")
        if etype in _SCALAR:
            n = _SCALAR[etype][1] * count
            cur.need(n, f"metadata array {key!r} ({count} values)")
            arr = np.frombuffer(cur.buf, dtype=_NP_SCALAR[etype], count=count, offset=cur.pos).copy()
            cur.pos += n
            if etype == 7:
                arr = arr.astype(bool)
            return arr.tolist() if count <= 65536 else arr
        if etype == 8:
            if keep_strings:
                return cur.strings(count, f"metadata array {key!r}")
            cur.skip_strings(count, f"metadata array {key!r}")
            return StringArray(count)
        if etype == 9:
            return [_read_value(cur, 9, key, keep_strings) for _ in range(count)]  # rare: nested arrays
        raise GGUFError(f"{cur.path}: metadata key {key!r} is an array of unknown value type {etype}")
    raise GGUFError(f"{cur.path}: metadata key {key!r} has unknown value type {vtype} (corrupt file?)")


def read_gguf(path: str | os.PathLike, string_arrays: Iterable[str] = ()) -> GGUFFile:
    """Parse a GGUF header: metadata and tensor table, checked against the file size; no tensor data is read.
    String arrays are decoded only for the keys in ``string_arrays`` (others become their length)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such GGUF file")
    if p.is_dir():
        raise GGUFError(f"{p}: is a directory, not a GGUF file")
    keep = set(string_arrays)
    size = p.stat().st_size
    if size < 4:
        raise GGUFError(f"{p}: not a GGUF file ({size} bytes, too short for the 'GGUF' magic)")
    with open(p, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        magic = bytes(buf[:4])
        if magic != _MAGIC:
            raise GGUFError(f"{p}: not a GGUF file (bad magic {magic!r}, expected b'GGUF')")
        cur = _Cursor(buf, p, size)
        cur.pos = 4
        version = cur.u32("the version")
        if version in (1,):
            raise GGUFError(f"{p}: GGUF version 1 is not supported (re-convert with a current llama.cpp)")
        if version not in (2, 3):
            if version >> 24 in (1, 2, 3) and version & 0xFFFFFF == 0:
                raise GGUFError(f"{p}: big-endian GGUF is not supported (convert it on a little-endian machine)")
            raise GGUFError(f"{p}: unknown GGUF version {version} (supported: 2, 3)")
        n_tensors = cur.u64("the tensor count")
        n_kv = cur.u64("the metadata count")
        if n_tensors > size // 24 or n_kv > size // 12:
            raise GGUFError(f"{p}: header claims {n_tensors} tensors and {n_kv} metadata keys, more than "
                            f"the {size}-byte file can hold (corrupt or truncated file)")
        md: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.u32(f"metadata type of {key!r}")
            md[key] = _read_value(cur, vtype, key, key in keep)
        alignment = int(md.get("general.alignment", 32))
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{p}: general.alignment={alignment} is not a power of two")
        names, sizes = _ggml_types()
        raw = []
        for i in range(n_tensors):
            name = cur.string(f"tensor info #{i}")
            nd = cur.u32(f"tensor {name!r} dimension count")
            if nd > 4:
                raise GGUFError(f"{p}: tensor {name!r} has {nd} dimensions (ggml allows at most 4; corrupt file?)")
            dims = cur.unpack(f"<{nd}Q", 8 * nd, f"tensor {name!r} dimensions")
            ttype = cur.u32(f"tensor {name!r} type")
            off = cur.u64(f"tensor {name!r} offset")
            raw.append((name, tuple(int(d) for d in dims), ttype, off))
        data_start = (cur.pos + alignment - 1) // alignment * alignment
    finally:
        buf.close()
    tensors = []
    for name, dims, ttype, off in raw:
        if ttype not in sizes:
            raise GGUFError(f"{p}: tensor {name!r} has unknown ggml type {ttype} (newer llama.cpp quantisation? "
                            f"known: {', '.join(sorted(n for t, n in names.items() if t in sizes))})")
        block, tsize = sizes[ttype]
        ne = int(math.prod(dims)) if dims else 1
        if dims and dims[0] % block:
            raise GGUFError(f"{p}: tensor {name!r}: row length {dims[0]} is not a multiple of the "
                            f"{names[ttype]} block size {block}")
        nbytes = ne // block * tsize
        start = data_start + off
        if start + nbytes > size:
            raise GGUFError(f"{p}: truncated file: tensor {name!r} ({names[ttype]}, shape {list(reversed(dims))}) "
                            f"spans bytes {start}..{start + nbytes} but the file has {size} bytes "
                            "(incomplete download or copy?)")
        tensors.append(TensorInfo(name, dims, ttype, names[ttype], start, nbytes))
    return GGUFFile(p, version, md, tensors, data_start, alignment, size)


# --------------------------------------------------------------------------------------------- dequantisation
def _f16(col: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(col).view(np.float16).astype(np.float32)


def _deq_f32(raw, n):
    return raw.reshape(-1).view(np.float32).reshape(-1, n)


def _deq_f16(raw, n):
    return raw.reshape(-1).view(np.float16).astype(np.float32).reshape(-1, n)


def _deq_bf16(raw, n):
    return (raw.reshape(-1).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(-1, n)


def _deq_f64(raw, n):
    return raw.reshape(-1).view(np.float64).reshape(-1, n)


def _deq_q8_0(raw, n):
    b = raw.reshape(-1, 34)
    d = _f16(b[:, :2])
    q = b[:, 2:].view(np.int8).astype(np.float32)
    q *= d
    return q.reshape(-1, n)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16] bytes -> [blocks, 32]: the 16 low nibbles, then the 16 high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _deq_q4_0(raw, n):
    b = raw.reshape(-1, 18)
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).view(np.int8) - np.int8(8)
    return (d * q.astype(np.float32)).reshape(-1, n)


def _deq_q4_1(raw, n):
    b = raw.reshape(-1, 20)
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:]).astype(np.float32)
    return (d * q + m).reshape(-1, n)


def _q5(b: np.ndarray, h: int) -> np.ndarray:
    """5-bit values of Q5_0/Q5_1 blocks: low nibbles + bit j of the little-endian uint32 at byte ``h``."""
    hi = np.unpackbits(np.ascontiguousarray(b[:, h:h + 4]), axis=1, bitorder="little")
    return _nibbles(b[:, h + 4:]) | (hi << 4)


def _deq_q5_0(raw, n):
    b = raw.reshape(-1, 22)
    d = _f16(b[:, :2])
    q = _q5(b, 2).view(np.int8) - np.int8(16)
    return (d * q.astype(np.float32)).reshape(-1, n)


def _deq_q5_1(raw, n):
    b = raw.reshape(-1, 24)
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _q5(b, 4).astype(np.float32)
    return (d * q + m).reshape(-1, n)


_FAST = {"F32": _deq_f32, "F16": _deq_f16, "BF16": _deq_bf16, "F64": _deq_f64, "Q8_0": _deq_q8_0,
         "Q4_0": _deq_q4_0, "Q4_1": _deq_q4_1, "Q5_0": _deq_q5_0, "Q5_1": _deq_q5_1}
_SUPPORTED_CACHE: dict[int, bool] = {}


def _gguf_can_dequantize(ttype: int) -> bool:
    """Whether ``gguf.quants.dequantize`` implements this type (probed once on one zero block)."""
    if ttype not in _SUPPORTED_CACHE:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize
        try:
            qt = GGMLQuantizationType(ttype)
            _, tsize = GGML_QUANT_SIZES[qt]
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                dequantize(np.zeros((1, tsize), np.uint8), qt)
            _SUPPORTED_CACHE[ttype] = True
        except Exception:
            _SUPPORTED_CACHE[ttype] = False
    return _SUPPORTED_CACHE[ttype]


def _supported(t: TensorInfo) -> bool:
    return t.type_name in _FAST or _gguf_can_dequantize(t.ggml_type)


def dequantize_rows(raw: np.ndarray, ttype: int, type_name: str, n: int) -> np.ndarray:
    """``raw``: uint8 rows [rows, bytes_per_row] of one ggml type -> float32 [rows, n] (a view for F32)."""
    fn = _FAST.get(type_name)
    if fn is not None:
        return fn(raw, n)
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize
    return dequantize(np.ascontiguousarray(raw), GGMLQuantizationType(ttype)).reshape(-1, n)


# --------------------------------------------------------------------------------------------- names
_GLOBAL = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "per_layer_token_embd.weight": "embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "per_layer_projection_norm.weight",
}
_LAYER_BASE = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_POST = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_LAYER_QK = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_LAYER_G4 = {
    "layer_output_scale.weight": "layer_scalar",
    "inp_gate.weight": "per_layer_input_gate.weight",
    "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    # split expert projections (older/other converters): joined into experts.gate_up_proj
    "ffn_gate_exps.weight": "experts.gate_proj",
    "ffn_up_exps.weight": "experts.up_proj",
}
_LAYER_TABLE = {
    "gemma": _LAYER_BASE,
    "gemma2": {**_LAYER_BASE, **_LAYER_POST},
    "gemma3": {**_LAYER_BASE, **_LAYER_POST, **_LAYER_QK},
    "gemma4": {**_LAYER_BASE, **_LAYER_POST, **_LAYER_QK, **_LAYER_G4},
}
_GLOBAL_TABLE = {
    "gemma": {k: v for k, v in _GLOBAL.items() if not k.startswith("per_layer")},
    "gemma2": {k: v for k, v in _GLOBAL.items() if not k.startswith("per_layer")},
    "gemma3": {k: v for k, v in _GLOBAL.items() if not k.startswith("per_layer")},
    "gemma4": _GLOBAL,
}
_DROPPED = {"gemma4": {"rope_freqs.weight"}}   # read for the config, not a model weight
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def canonical_gguf_name(gguf_name: str, arch: str, n_layers: int | None = None, where: str = "") -> str | None:
    """llama.cpp tensor name -> canonical name (None for tensors the model does not read, e.g. rope_freqs).
    Unknown names raise GGUFError naming the tensor."""
    if gguf_name in _DROPPED.get(arch, ()):
        return None
    g = _GLOBAL_TABLE[arch].get(gguf_name)
    if g is not None:
        return g
    m = _BLK.match(gguf_name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        c = _LAYER_TABLE[arch].get(rest)
        if c is not None:
            if n_layers is not None and i >= n_layers:
                raise GGUFError(f"{where}tensor {gguf_name!r} belongs to layer {i}, but the file declares "
                                f"{n_layers} layers ({arch}.block_count)")
            return f"layers.{i}.{c}"
    raise GGUFError(f"{where}unknown tensor {gguf_name!r} for architecture {arch!r}: not a Gemma weight this "
                    "loader knows (a multimodal projector, or a newer llama.cpp layout?)")


def _shifts_norms(arch: str) -> bool:
    """llama.cpp's converter adds 1 to every '*norm.weight' of Gemma 1/2/3 (Gemma 4: norm_shift 0)."""
    return arch in ("gemma", "gemma2", "gemma3")


# --------------------------------------------------------------------------------------------- config
def _req(md: dict, key: str, p: Path):
    if key not in md:
        raise GGUFError(f"{p}: missing required metadata key {key!r}")
    return md[key]


def _per_layer(v, n: int, key: str, p: Path) -> list:
    if isinstance(v, (list, tuple, np.ndarray)):
        v = list(v)
        if len(v) != n:
            raise GGUFError(f"{p}: metadata {key!r} has {len(v)} entries but the model has {n} layers")
        return v
    return [v] * n


def _uniform(vals: list, key: str, p: Path, what: str = ""):
    s = set(vals)
    if len(s) != 1:
        raise GGUFError(f"{p}: metadata {key!r} varies across {what or 'layers'} ({sorted(s)}); "
                        "this Gemma layout is not supported")
    return next(iter(s))


def _clean_float(x: float) -> float:
    """GGUF stores float32: 9.999999974752427e-07 -> 1e-06 (the shortest decimal that rounds to it)."""
    return float(str(np.float32(x)))


def _rope_scaling(md: dict, arch: str, p: Path) -> float | None:
    """The linear RoPE factor llama.cpp would apply (rope.scaling.factor, or the old rope.scale_linear)."""
    factor = md.get(f"{arch}.rope.scaling.factor", md.get(f"{arch}.rope.scale_linear"))
    typ = md.get(f"{arch}.rope.scaling.type", "linear")
    if factor is None or float(factor) in (0.0, 1.0):
        return None
    if typ in ("none",):
        return None
    if typ != "linear":
        raise GGUFError(f"{p}: rope scaling type {typ!r} is not supported for Gemma (only 'linear')")
    return _clean_float(factor)


def _query_pre_attn_scalar(arch: str, L: int, hidden: int, heads: int, head_dim: int) -> float:
    # llama.cpp: f_attention_scale = type == 27B ? 1/sqrt(n_embd/n_head) : 1/sqrt(n_embd_head_k)
    is_27b = (arch == "gemma2" and L == 46) or (arch == "gemma3" and L == 62)
    return float(hidden // heads) if is_27b else float(head_dim)


def build_config(g: GGUFFile) -> dict:
    """An HF config.json-shaped dict from GGUF metadata (+ the tensor table, for what only the tensors tell)."""
    md, p = g.metadata, g.path
    arch = md.get("general.architecture")
    if arch is None:
        raise GGUFError(f"{p}: missing required metadata key 'general.architecture'")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{p}: unsupported architecture {arch!r}; supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)} (Gemma 1-4 text models)")
    k = lambda name: f"{arch}.{name}"  # noqa: E731
    L = int(_req(md, k("block_count"), p))
    hidden = int(_req(md, k("embedding_length"), p))
    heads_l = [int(x) for x in _per_layer(_req(md, k("attention.head_count"), p), L, k("attention.head_count"), p)]
    heads = _uniform(heads_l, k("attention.head_count"), p)
    kv_l = [int(x) for x in _per_layer(md.get(k("attention.head_count_kv"), heads), L,
                                       k("attention.head_count_kv"), p)]
    eps = _clean_float(_req(md, k("attention.layer_norm_rms_epsilon"), p))
    ctx = int(md.get(k("context_length"), 8192))
    emb = g.by_name.get("token_embd.weight")
    if emb is None:
        raise GGUFError(f"{p}: no 'token_embd.weight' tensor (the token embedding)")
    if emb.shape[-1] != hidden:
        raise GGUFError(f"{p}: token_embd.weight has {emb.shape[-1]} columns but {k('embedding_length')} is {hidden}")
    vocab = int(emb.shape[0])
    ffn_l = [int(x) for x in _per_layer(_req(md, k("feed_forward_length"), p), L, k("feed_forward_length"), p)]
    theta = _clean_float(md.get(k("rope.freq_base"), 10000.0))

    cfg: dict[str, Any] = {
        "architectures": [{"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                           "gemma3": "Gemma3ForCausalLM", "gemma4": "Gemma4ForCausalLM"}[arch]],
        "model_type": SUPPORTED_ARCHITECTURES[arch],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": L,
        "num_attention_heads": heads,
        "rms_norm_eps": eps,
        "max_position_embeddings": ctx,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": "output.weight" not in g.by_name,
        "bos_token_id": int(md.get("tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(md.get("tokenizer.ggml.eos_token_id", 1)),
        "pad_token_id": int(md.get("tokenizer.ggml.padding_token_id", 0)),
    }
    if arch != "gemma4":
        kv = _uniform(kv_l, k("attention.head_count_kv"), p)
        head_dim = int(md.get(k("attention.key_length"), hidden // heads))
        vdim = int(md.get(k("attention.value_length"), head_dim))
        if vdim != head_dim:
            raise GGUFError(f"{p}: key_length {head_dim} != value_length {vdim}; Gemma needs them equal")
        cfg.update(intermediate_size=_uniform(ffn_l, k("feed_forward_length"), p), num_key_value_heads=kv,
                   head_dim=head_dim)
        factor = _rope_scaling(md, arch, p)
        if arch == "gemma":
            rp = {"rope_type": "default", "rope_theta": theta}
            if factor:
                rp.update(rope_type="linear", factor=factor)
            cfg.update(rope_theta=theta, rope_parameters=rp)
        elif arch == "gemma2":
            rp = {"rope_type": "default", "rope_theta": theta}
            if factor:
                rp.update(rope_type="linear", factor=factor)
            cfg.update(
                rope_theta=theta, rope_parameters=rp,
                sliding_window=int(md.get(k("attention.sliding_window"), 4096)),
                layer_types=[SLIDING if i % 2 < 1 else FULL for i in range(L)],      # set_swa_pattern(2)
                attn_logit_softcapping=_clean_float(md.get(k("attn_logit_softcapping"), 50.0)),
                final_logit_softcapping=_clean_float(md.get(k("final_logit_softcapping"), 30.0)),
                query_pre_attn_scalar=_query_pre_attn_scalar(arch, L, hidden, heads, head_dim),
            )
        else:  # gemma3
            swa = int(md.get(k("attention.sliding_window"), 0) or 0)
            pattern = md.get(k("attention.sliding_window_pattern"))
            if swa > 0:
                layer_types = _swa_layer_types(pattern if pattern is not None else 6, L, p, k)
            else:
                layer_types = [FULL] * L
            local_theta = _clean_float(md.get(k("rope.freq_base_swa"), 10000.0))   # llama.cpp: 10000
            full = {"rope_type": "default", "rope_theta": theta}
            if factor:
                full.update(rope_type="linear", factor=factor)
            fsc = md.get(k("final_logit_softcapping"))
            cfg.update(
                rope_theta=theta, rope_local_base_freq=local_theta,
                rope_parameters={FULL: full, SLIDING: {"rope_type": "default", "rope_theta": local_theta}},
                sliding_window=swa if swa > 0 else None,
                sliding_window_pattern=6 if pattern is None else None,
                layer_types=layer_types,
                attn_logit_softcapping=None,
                final_logit_softcapping=_clean_float(fsc) if fsc else None,
                query_pre_attn_scalar=_query_pre_attn_scalar(arch, L, hidden, heads, head_dim),
            )
            if cfg["sliding_window_pattern"] is None:
                del cfg["sliding_window_pattern"]
    else:
        _gemma4_config(g, cfg, L, heads, kv_l, ffn_l, theta, k)
    cfg["_gguf"] = {
        "architecture": arch,
        "file": str(p),
        "name": md.get("general.name"),
        "file_type": md.get("general.file_type"),
        "tensor_types": _type_counts(g),
        "loader_version": LOADER_VERSION,
    }
    return cfg


def _type_counts(g: GGUFFile) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in g.tensors:
        out[t.type_name] = out.get(t.type_name, 0) + 1
    return dict(sorted(out.items()))


def _swa_layer_types(pattern, L: int, p: Path, k) -> list[str]:
    """``sliding_window_pattern``: a bool per layer (true = sliding), or llama.cpp's period n
    (``set_swa_pattern(n)``: layer il slides when il % n < n - 1; n == 0 -> all sliding)."""
    if isinstance(pattern, (list, tuple, np.ndarray)):
        vals = list(pattern)
        if len(vals) != L:
            raise GGUFError(f"{p}: {k('attention.sliding_window_pattern')} has {len(vals)} entries for {L} layers")
        return [SLIDING if bool(v) else FULL for v in vals]
    n = int(pattern)
    return [SLIDING if n == 0 or i % n < n - 1 else FULL for i in range(L)]


def _gemma4_config(g: GGUFFile, cfg: dict, L: int, heads: int, kv_l: list, ffn_l: list, theta: float, k):
    md, p = g.metadata, g.path
    layer_types = _swa_layer_types(_req(md, k("attention.sliding_window_pattern"), p), L, p, k)
    hd_full = int(_req(md, k("attention.key_length"), p))
    hd_swa = int(_req(md, k("attention.key_length_swa"), p))
    for a, b in ((k("attention.value_length"), hd_full), (k("attention.value_length_swa"), hd_swa)):
        if a in md and int(md[a]) != b:
            raise GGUFError(f"{p}: {a}={md[a]} differs from the key length {b}; Gemma 4 needs them equal")
    shared = int(md.get(k("attention.shared_kv_layers"), 0) or 0)
    ple = int(_req(md, k("embedding_length_per_layer_input"), p))
    first_shared = L - shared
    sl = [i for i in range(L) if layer_types[i] == SLIDING]
    fl = [i for i in range(L) if layer_types[i] == FULL]
    kv_swa = _uniform([kv_l[i] for i in sl], k("attention.head_count_kv"), p, "sliding layers") if sl else kv_l[0]
    kv_full = _uniform([kv_l[i] for i in fl], k("attention.head_count_kv"), p, "full layers") if fl else kv_swa

    # feed-forward widths: one value, or the doubled width on KV-shared layers (use_double_wide_mlp)
    base = ffn_l[0]
    double = False
    for i, n in enumerate(ffn_l):
        if n == base:
            continue
        if i >= first_shared and n == 2 * base:
            double = True
            continue
        raise GGUFError(f"{p}: {k('feed_forward_length')}={ffn_l} is not a Gemma 4 layout (one width, or twice "
                        "it on the KV-shared layers)")
    if double and any(ffn_l[i] != 2 * base for i in range(first_shared, L)):
        raise GGUFError(f"{p}: {k('feed_forward_length')}={ffn_l}: only some KV-shared layers are double-wide")

    # attention.k_eq_v: a full, non-shared layer with K but no V (llama.cpp uses K as V then)
    k_eq_v = any(f"blk.{i}.attn_k.weight" in g.by_name and f"blk.{i}.attn_v.weight" not in g.by_name
                 for i in fl if i < first_shared)

    # RoPE: theta per layer type; the global layers' proportional RoPE from the rope_freqs tensor
    theta_swa = _clean_float(md.get(k("rope.freq_base_swa"), theta))
    n_rot_full = int(md.get(k("rope.dimension_count"), hd_full))
    n_rot_swa = int(md.get(k("rope.dimension_count_swa"), hd_swa))
    if n_rot_full != hd_full:
        raise GGUFError(f"{p}: {k('rope.dimension_count')}={n_rot_full} != key_length {hd_full}: llama.cpp's "
                        "Gemma 4 rotates the full head and marks unrotated pairs in rope_freqs")
    prf_full = 1.0
    rf = g.by_name.get("rope_freqs.weight")
    if rf is not None:
        vals = _read_small(g, rf).reshape(-1)
        if vals.size != hd_full // 2:
            raise GGUFError(f"{p}: rope_freqs.weight has {vals.size} entries, expected key_length/2 = {hd_full // 2}")
        rot = vals < 1e10
        n_rot = int(rot.sum())
        if not (np.all(vals[rot] == 1.0) and np.all(rot[:n_rot])):
            raise GGUFError(f"{p}: rope_freqs.weight {vals.tolist()} is not a proportional-RoPE mask "
                            "(ones, then 1e30 for the unrotated pairs)")
        prf_full = 2.0 * n_rot / hd_full
    full = {"rope_type": "proportional", "partial_rotary_factor": prf_full, "rope_theta": theta}
    factor = _rope_scaling(md, "gemma4", p)
    if factor:
        full["factor"] = factor
    slid = {"rope_type": "default", "rope_theta": theta_swa}
    if n_rot_swa != hd_swa:
        slid["partial_rotary_factor"] = n_rot_swa / hd_swa

    n_exp = int(md.get(k("expert_count"), 0) or 0)
    has_router = any(t.name.endswith(".ffn_gate_inp.weight") for t in g.tensors)
    moe = n_exp > 0 or has_router
    fsc = md.get(k("final_logit_softcapping"))
    ple_t = g.by_name.get("per_layer_token_embd.weight")
    cfg.update(
        intermediate_size=base,
        num_key_value_heads=kv_swa,
        head_dim=hd_swa,
        global_head_dim=hd_full,
        layer_types=layer_types,
        sliding_window=int(_req(md, k("attention.sliding_window"), p)),
        rope_parameters={SLIDING: slid, FULL: full},
        final_logit_softcapping=_clean_float(fsc) if fsc else None,
        attention_k_eq_v=bool(k_eq_v),
        num_kv_shared_layers=shared,
        use_double_wide_mlp=bool(double),
        hidden_size_per_layer_input=ple,
        vocab_size_per_layer_input=int(ple_t.shape[0]) if ple_t is not None else cfg["vocab_size"],
        enable_moe_block=bool(moe),
        num_experts=n_exp or None,
        top_k_experts=int(md[k("expert_used_count")]) if moe and k("expert_used_count") in md else None,
        moe_intermediate_size=int(md[k("expert_feed_forward_length")]) if moe and
        k("expert_feed_forward_length") in md else None,
        use_bidirectional_attention=None,
    )
    if kv_full != kv_swa or k_eq_v:
        cfg["num_global_key_value_heads"] = kv_full
    if kv_full != kv_swa and not k_eq_v:
        # Gemma4TextConfig applies num_global_key_value_heads only with attention_k_eq_v: state it per layer
        cfg["per_layer_config"] = {str(i): {"head_dim": hd_full, "num_key_value_heads": kv_full} for i in fl}
    if moe:
        for key in ("expert_count", "expert_used_count", "expert_feed_forward_length"):
            if k(key) not in md:
                raise GGUFError(f"{p}: MoE tensors present but metadata key {k(key)!r} is missing")


def _read_small(g: GGUFFile, t: TensorInfo) -> np.ndarray:
    with open(g.path, "rb") as f:
        f.seek(t.offset)
        raw = np.frombuffer(f.read(t.nbytes), np.uint8)
    if len(raw) != t.nbytes:
        raise GGUFError(f"{g.path}: truncated file while reading tensor {t.name!r}")
    n = t.dims[0] if t.dims else 1
    rows = max(1, t.n_elements // n)
    return dequantize_rows(raw.reshape(rows, t.nbytes // rows), t.ggml_type, t.type_name, n)


# --------------------------------------------------------------------------------------------- plan
@dataclass
class _Out:
    name: str                      # canonical name
    shape: tuple[int, ...]
    sources: list[TensorInfo]      # one, or gate+up joined along axis 1
    shift: bool                    # subtract llama.cpp's +1


def _plan(g: GGUFFile, cfg: dict) -> list[_Out]:
    arch = cfg["_gguf"]["architecture"]
    L = cfg["num_hidden_layers"]
    where = f"{g.path}: "
    outs: dict[str, _Out] = {}
    split: dict[int, dict[str, TensorInfo]] = {}
    for t in g.tensors:
        c = canonical_gguf_name(t.name, arch, L, where)
        if c is None:
            continue
        if not _supported(t):
            raise GGUFError(f"{g.path}: tensor {t.name!r} has ggml type {t.type_name}, which cannot be dequantised "
                            f"here (gguf {_gguf_version()}; supported: {', '.join(_supported_type_names())})")
        if c.endswith(("experts.gate_proj", "experts.up_proj")):
            i = int(c.split(".")[1])
            split.setdefault(i, {})[c.rsplit(".", 1)[1]] = t
            continue
        if c in outs:
            raise GGUFError(f"{g.path}: two tensors map to {c!r}")
        outs[c] = _Out(c, t.shape, [t], _shifts_norms(arch) and t.name.endswith("norm.weight"))
    for i, parts in sorted(split.items()):
        if set(parts) != {"gate_proj", "up_proj"}:
            raise GGUFError(f"{g.path}: layer {i} has {sorted(parts)} expert projections but not both "
                            "ffn_gate_exps and ffn_up_exps")
        a, b = parts["gate_proj"], parts["up_proj"]
        if a.shape != b.shape:
            raise GGUFError(f"{g.path}: layer {i}: ffn_gate_exps {a.shape} and ffn_up_exps {b.shape} differ")
        e, f_, h = a.shape
        outs[f"layers.{i}.experts.gate_up_proj"] = _Out(f"layers.{i}.experts.gate_up_proj", (e, 2 * f_, h),
                                                        [a, b], False)
    return list(outs.values())


def _gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:
        return "?"


def _supported_type_names() -> list[str]:
    names, _ = _ggml_types()
    return sorted(n for t, n in names.items() if n in _FAST or _gguf_can_dequantize(t))


_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32, "float64": np.float64}


def _norm_dtype(dtype) -> str:
    s = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    s = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
         "bf16": "bfloat16", "fp64": "float64", "f64": "float64", "double": "float64"}.get(s, s)
    if s not in _NP_DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; use one of {', '.join(_NP_DTYPES)}")
    return s


def _fill(mm: np.ndarray, out: _Out, dst: np.ndarray, pool: ThreadPoolExecutor | None, bar) -> None:
    """Dequantise ``out``'s source tensor(s) (from the file map ``mm``) into ``dst``, undoing the norm shift."""
    col = 0
    dst2 = dst.reshape(-1, dst.shape[-1]) if dst.ndim > 1 else dst.reshape(1, -1)
    for src in out.sources:
        n = src.dims[0] if src.dims else 1
        rows = src.n_elements // n
        row_bytes = src.nbytes // rows
        raw = mm[src.offset:src.offset + src.nbytes].reshape(rows, row_bytes)
        if len(out.sources) > 1:  # joined gate/up experts: [E, F, H] + [E, F, H] -> [E, 2F, H]
            e, f_, h = src.shape
            dst[:, col:col + f_, :] = dequantize_rows(raw, src.ggml_type, src.type_name, n).reshape(e, f_, h)
            col += f_
            bar.update(src.nbytes)
            continue
        target = dst2
        step = max(1, (1 << 21) // max(n, 1))   # ~2M values per chunk
        chunks = [(a, min(a + step, rows)) for a in range(0, rows, step)]

        def work(ab, raw=raw, target=target, src=src, n=n):
            a, b = ab
            vals = dequantize_rows(raw[a:b], src.ggml_type, src.type_name, n)
            if out.shift:
                if target.dtype == np.float64:
                    vals = vals.astype(np.float64) - 1.0
                else:
                    vals = vals - np.float32(1.0)
            target[a:b] = vals
            return (b - a) * row_bytes

        if pool is not None and len(chunks) > 1:
            for nb in pool.map(work, chunks):
                bar.update(nb)
        else:
            for ab in chunks:
                bar.update(work(ab))


# --------------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """``$WORKBENCH_CACHE/gguf`` (default ``~/.cache/gemma-workbench/gguf``)."""
    from .registry import cache_root
    return cache_root() / "gguf"


def _fingerprint(p: Path) -> dict:
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(_ONE_MIB))
        if st.st_size > 2 * _ONE_MIB:
            f.seek(-_ONE_MIB, 2)
        h.update(f.read(_ONE_MIB))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": h.hexdigest()}


def _cache_key(fp: dict, store_dtype: str) -> str:
    blob = json.dumps({**fp, "dtype": store_dtype, "loader_version": LOADER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _safe_stem(p: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem)[:60] or "model"


def _npy_header_len(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                np.lib.format.read_array_header_1_0(f)
            else:
                np.lib.format.read_array_header_2_0(f)
            return f.tell()
    except Exception:
        return None


def _open_cached(entry: Path) -> tuple[dict, dict[str, np.ndarray]] | None:
    """A complete cache entry's (config, read-only memory-mapped tensors), or None if absent/damaged."""
    man = entry / "manifest.json"
    if not man.is_file():
        return None
    try:
        m = json.loads(man.read_text())
        if m.get("loader_version") != LOADER_VERSION or m.get("complete") is not True:
            return None
        out = {}
        for name, info in m["tensors"].items():
            f = entry / info["file"]
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
            if list(arr.shape) != list(info["shape"]) or str(arr.dtype) != info["dtype"]:
                return None
            hl = _npy_header_len(f)
            if hl is None or f.stat().st_size != hl + arr.nbytes:
                return None
            out[name] = arr
        return m["config"], out
    except Exception:
        return None


def _cleanup_stale_tmp(cache_dir: Path) -> None:
    """Remove temp dirs of interrupted runs (their pid is gone, or they are more than a day old)."""
    for d in cache_dir.glob(".tmp-*"):
        try:
            pid = int(d.name.split("-")[1])
        except (IndexError, ValueError):
            pid = -1
        alive = False
        if pid > 0:
            try:
                os.kill(pid, 0)
                alive = True
            except PermissionError:      # exists, owned by someone else
                alive = True
            except OSError:
                alive = False
        try:
            old = time.time() - d.stat().st_mtime > 86400
        except OSError:
            continue
        if not alive or old:
            shutil.rmtree(d, ignore_errors=True)


def _tensor_file(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".npy"


# --------------------------------------------------------------------------------------------- public API
def load_gguf(path: str | os.PathLike, dtype: str = "float32", progress: bool = True, cache: bool = True,
              cache_dir: str | os.PathLike | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Load a Gemma 1-4 GGUF: (HF-style config dict, canonical tensors as numpy).

    ``dtype``: float32 | float16 | float64 | bfloat16 (numpy has no bfloat16: float32 arrays come back and the
    backend casts). Norm weights of Gemma 1-3 come back in HF's convention (llama.cpp's ``+1`` undone).
    With ``cache`` (default) the dequantised tensors are stored under ``cache_dir`` (default
    ``$WORKBENCH_CACHE/gguf`` or ``~/.cache/gemma-workbench/gguf``) and later loads memory-map them; cached
    arrays are read-only. Raises :class:`GGUFError` for files that cannot be loaded.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such GGUF file")
    dt = _norm_dtype(dtype)
    store = "float32" if dt == "bfloat16" else dt
    np_dt = _NP_DTYPES[store]
    if cache:
        cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        fp = _fingerprint(p)
        entry = cdir / f"{_safe_stem(p)}-{store}-{_cache_key(fp, store)}"
        hit = _open_cached(entry)
        if hit is not None:
            hit[0].setdefault("_gguf", {})["file"] = str(p)     # the same bytes may live under another path
            return hit
        if entry.exists():
            warnings.warn(f"GGUF cache entry {entry} is incomplete or damaged; rebuilding it", stacklevel=2)
    g = read_gguf(p)
    cfg = build_config(g)
    plan = _plan(g, cfg)
    total = sum(s.nbytes for o in plan for s in o.sources)

    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               disable=not progress, desc=f"dequantising {p.name}", leave=False, dynamic_ncols=True)
    workers = min(4, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    mm = np.memmap(g.path, dtype=np.uint8, mode="r")
    try:
        if not cache:
            out = {}
            for o in plan:
                arr = np.empty(o.shape, np_dt)
                _fill(mm, o, arr, pool, bar)
                out[o.name] = arr
            return cfg, out
        cdir.mkdir(parents=True, exist_ok=True)
        _cleanup_stale_tmp(cdir)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=cdir))
        try:
            tensors_meta = {}
            for o in plan:
                fname = _tensor_file(o.name)
                arr = np.lib.format.open_memmap(tmp / fname, mode="w+", dtype=np_dt, shape=o.shape)
                _fill(mm, o, arr, pool, bar)
                del arr
                tensors_meta[o.name] = {"file": fname, "shape": list(o.shape), "dtype": np.dtype(np_dt).name,
                                        "source": [s.name for s in o.sources],
                                        "source_type": [s.type_name for s in o.sources]}
            manifest = {"loader_version": LOADER_VERSION, "complete": True, "source": str(p.resolve()),
                        "fingerprint": fp, "dtype": store, "config": cfg, "tensors": tensors_meta,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            if entry.exists():            # a damaged entry, or one another process just finished
                if _open_cached(entry) is None:
                    shutil.rmtree(entry, ignore_errors=True)
            try:
                os.replace(tmp, entry)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)   # lost a race: the other entry is complete
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _prune_old_entries(cdir, entry, str(p.resolve()), store)
        hit = _open_cached(entry)
        if hit is None:
            raise GGUFError(f"{p}: the GGUF cache entry {entry} could not be read back after writing it")
        return hit
    finally:
        del mm
        bar.close()
        if pool is not None:
            pool.shutdown()


def _prune_old_entries(cdir: Path, keep: Path, source: str, store: str) -> None:
    """Entries for the same source path and dtype made from an older version of the file are stale."""
    for d in cdir.iterdir():
        if d == keep or d.name.startswith(".") or not d.is_dir():
            continue
        try:
            m = json.loads((d / "manifest.json").read_text())
        except Exception:
            continue
        if m.get("source") == source and m.get("dtype") == store:
            shutil.rmtree(d, ignore_errors=True)


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata of a GGUF (string arrays as their length), plus 'tensors': {name: (type, shape)}."""
    g = read_gguf(path)
    md = dict(g.metadata)
    md["tensors"] = {t.name: (t.type_name, list(t.shape)) for t in g.tensors}
    return md


def gguf_tokenizer_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The tokenizer a GGUF carries: tokens, scores, token types, merges, special ids, flags, chat template.

    Keys: architecture, model (tokenizer.ggml.model: 'llama' = SentencePiece, 'gemma4', 'gpt2' ...), pre,
    tokens (list[str]), scores (float32 array or None), token_types (list[int] or None), merges (list[str] or None),
    bos_id, eos_id, pad_id, unk_id, eot_id, add_bos, add_eos, add_space_prefix, chat_template (str or None).
    Raises GGUFError when the file has no vocabulary."""
    g = read_gguf(path, string_arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    md = g.metadata
    tokens = md.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError(f"{g.path}: no tokenizer in this GGUF (missing metadata key 'tokenizer.ggml.tokens')")
    scores = md.get("tokenizer.ggml.scores")
    types = md.get("tokenizer.ggml.token_type")
    n = len(tokens)
    for key, val in (("tokenizer.ggml.scores", scores), ("tokenizer.ggml.token_type", types)):
        if val is not None and len(val) != n:
            raise GGUFError(f"{g.path}: {key} has {len(val)} entries for {n} tokens")

    def ident(key):
        v = md.get(key)
        return int(v) if v is not None else None

    merges = md.get("tokenizer.ggml.merges")
    return {
        "architecture": md.get("general.architecture"),
        "model": md.get("tokenizer.ggml.model"),
        "pre": md.get("tokenizer.ggml.pre"),
        "tokens": tokens,
        "scores": np.asarray(scores, np.float32) if scores is not None else None,
        "token_types": [int(x) for x in types] if types is not None else None,
        "merges": merges if isinstance(merges, list) else None,
        "bos_id": ident("tokenizer.ggml.bos_token_id"),
        "eos_id": ident("tokenizer.ggml.eos_token_id"),
        "pad_id": ident("tokenizer.ggml.padding_token_id"),
        "unk_id": ident("tokenizer.ggml.unknown_token_id"),
        "eot_id": ident("tokenizer.ggml.eot_token_id"),
        "add_bos": md.get("tokenizer.ggml.add_bos_token"),
        "add_eos": md.get("tokenizer.ggml.add_eos_token"),
        "add_space_prefix": md.get("tokenizer.ggml.add_space_prefix"),
        "chat_template": md.get("tokenizer.chat_template"),
        "fingerprint": _fingerprint(g.path),
    }


# --------------------------------------------------------------------------------------------- kept quantised
def load_gguf_quantized(path: str | os.PathLike, make_weight, kept_types, progress: bool = True
                        ) -> tuple[dict, dict[str, Any]]:
    """Load a Gemma GGUF with its weight matrices kept in the file's own blocks: (HF-style config dict, canonical
    tensors), where every 2-D matrix stored as Q8_0 / Q5_0 / Q4_0 / Q4_K / Q6_K is a
    :class:`workbench.backends.quant.QuantWeight` (the raw blocks, read into memory once; no dequantised copy)
    and everything else (norms, float matrices) is a float32 numpy array as :func:`load_gguf` gives it.
    A quantised matrix of another type (Q5_K, IQ*, ...) or a quantised 3-D tensor (MoE experts) is a
    :class:`GGUFError` naming the tensor and its type; :func:`load_gguf` dequantises those.
    ``make_weight(segments, K, name)`` makes the kept matrix from [(type name, raw blocks [rows, row bytes])] and
    ``kept_types`` names the types it takes (the caller passes :class:`workbench.backends.quant.QuantWeight` and its
    ``TYPES``: the file format stays below the backends that compute with it)."""
    TYPES = kept_types
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such GGUF file")
    g = read_gguf(p)
    cfg = build_config(g)
    plan = _plan(g, cfg)
    floats = ("F32", "F16", "BF16", "F64")
    for o in plan:
        for s in o.sources:
            if s.type_name in floats:
                continue
            if len(s.dims) != 2 or len(o.sources) != 1:
                raise GGUFError(f"{p}: tensor {s.name!r} ({s.type_name}, shape {s.shape}) cannot be kept quantised: "
                                "only 2-D matrices are; load without quant= to dequantise it")
            if s.type_name not in TYPES:
                raise GGUFError(f"{p}: tensor {s.name!r} has ggml type {s.type_name}, which the CPU kernels do not "
                                f"keep quantised (kept: {', '.join(TYPES)}); load without quant= to dequantise it")
    from tqdm import tqdm
    total = sum(s.nbytes for o in plan for s in o.sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=not progress,
               desc=f"reading {p.name} (kept quantised)", leave=False, dynamic_ncols=True)
    mm = np.memmap(g.path, dtype=np.uint8, mode="r")
    out: dict[str, Any] = {}
    try:
        for o in plan:
            src = o.sources[0]
            if src.type_name in floats:
                arr = np.empty(o.shape, np.float32)
                _fill(mm, o, arr, None, bar)
                out[o.name] = arr
                continue
            rows, n = src.dims[1], src.dims[0]
            raw = np.array(mm[src.offset:src.offset + src.nbytes]).reshape(rows, src.nbytes // rows)
            out[o.name] = make_weight([(src.type_name, raw)], n, name=src.name)
            bar.update(src.nbytes)
    finally:
        del mm
        bar.close()
    cfg.setdefault("_gguf", {})["file"] = str(p)
    cfg["_gguf"]["kept_quantized"] = True
    return cfg, out
