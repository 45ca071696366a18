"""Hugging Face safetensors checkpoints (single file or sharded) -> canonical numpy tensors.

A small reader of the format itself (an 8-byte header length, a JSON header, raw little-endian data), so
that bfloat16 works without torch and every inconsistency gets a message that names the file and tensor.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .names import canonical_name


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as written: truncated, malformed, missing or surplus tensors."""


_DTYPES = {
    "F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2),
    "I64": (np.int64, 8), "I32": (np.int32, 4), "I16": (np.int16, 2), "I8": (np.int8, 1),
    "U8": (np.uint8, 1), "BOOL": (np.bool_, 1),
}


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read every tensor of one .safetensors file as numpy (bf16 is widened to float32)."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{p}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{p}: header length {n} does not fit in the file ({size} bytes): "
                                  "truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{p}: malformed safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    data = np.memmap(p, dtype=np.uint8, mode="r", offset=data_start, shape=(size - data_start,)) \
        if size > data_start else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        try:
            dt, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{p}: tensor {name!r} has a malformed header entry {info!r}") from None
        if dt not in _DTYPES:
            raise CheckpointError(f"{p}: tensor {name!r} has unsupported dtype {dt}")
        npdt, width = _DTYPES[dt]
        want = int(np.prod(shape, dtype=np.int64)) * width
        if b - a != want:
            raise CheckpointError(f"{p}: tensor {name!r}: {b - a} bytes for shape {shape} {dt} (expected {want})")
        if b > data.shape[0]:
            raise CheckpointError(f"{p}: tensor {name!r} ends at byte {data_start + b} but the file has "
                                  f"{size} bytes: the file is truncated (re-download or re-save it)")
        arr = np.frombuffer(data[a:b], dtype=npdt).reshape(shape)
        if dt == "BF16":
            arr = bf16_to_f32(arr)
        out[name] = arr
    return out


def load_hf_checkpoint(directory: str | Path, model_type: str) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint dir (model.safetensors or a sharded index), canonical names."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({e})") from None
        files = sorted(set(wmap.values()))
        missing = [f for f in files if not (d / f).exists()]
        if missing:
            raise CheckpointError(f"{index}: shard files missing from {d}: {missing}")
    elif (d / "model.safetensors").exists():
        files, wmap = ["model.safetensors"], None
    else:
        found = sorted(x.name for x in d.glob("*.safetensors"))
        if not found:
            raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json "
                                  "(only safetensors checkpoints are supported; convert .bin with transformers)")
        files, wmap = found, None
    raw: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in read_safetensors(d / f).items():
            if k in raw:
                raise CheckpointError(f"{d / f}: tensor {k!r} appears in two shards")
            raw[k] = v
    if wmap is not None:
        absent = sorted(set(wmap) - set(raw))
        if absent:
            raise CheckpointError(f"{index}: tensors listed in the index but not in the shards: {absent[:5]}")
    out: dict[str, np.ndarray] = {}
    for k, v in raw.items():
        c = canonical_name(k, model_type)
        if c is None:
            continue
        out[c] = v
    return out
