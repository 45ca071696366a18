"""``workbench.load``: a source (HF dir, .gguf file, registered name) -> a :class:`~workbench.lm.LanguageModel`
on one backend.

Two steps, shared by every path that makes a model (``wb.load``, ``wb.compare``, ``wb.bench``, ``wb.diverge``):
``read_source`` reads a checkpoint once (config, canonical numpy tensors, tokenizer), and ``build_model`` makes
the LanguageModel on one backend from it (the text decoder, the tokenizer, the media towers' tensors) — as
often as there are backends x dtypes, without reading the files again.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

from . import backends
from .config import ConfigError, GemmaConfig
from .lm import LanguageModel
from .model.gemma import Gemma


class Checkpoint(NamedTuple):
    """What ``read_source`` read: unpacks as ``cfg, tensors, path, tokenizer``."""
    config: GemmaConfig
    tensors: dict
    path: Path
    tokenizer: object


def resolve_source(source) -> Path:
    """A path to an HF checkpoint dir or a .gguf file; registered names resolve through the registry."""
    p = Path(os.path.expanduser(str(source)))
    if p.exists():
        return p
    from .weights import registry
    if str(source) in registry.names():
        return registry.resolve(str(source))
    raise FileNotFoundError(f"model source {source!r}: no such file or directory, and not a registered name "
                            f"(registered: {', '.join(registry.names())})")


def read_source(source, dtype: str = "float32", progress: bool = True, quant: str | None = None) -> Checkpoint:
    """(GemmaConfig, canonical numpy tensors, resolved path, tokenizer or None), as a :class:`Checkpoint`.
    ``quant`` (GGUF only): "keep" / "keep-exact" keep the weight matrices in the file's blocks
    (:mod:`workbench.backends.quant`)."""
    p = resolve_source(source)
    if quant is not None and not (p.is_file() and p.suffix == ".gguf"):
        raise ValueError(f"quant={quant!r} keeps a GGUF's quantised blocks; {p} is not a .gguf file")
    if p.is_file() and p.suffix == ".gguf":
        from .weights.gguf import load_gguf, load_gguf_quantized
        if quant is not None:
            from .backends.quant import TYPES, QuantWeight
            hf_cfg, tensors = load_gguf_quantized(p, QuantWeight, TYPES, progress=progress)
        else:
            hf_cfg, tensors = load_gguf(p, dtype="float64" if dtype == "float64" else "float32", progress=progress)
        cfg = GemmaConfig.from_dict(hf_cfg, where=str(p))
        tok = _tokenizer(p)
        return Checkpoint(cfg, tensors, p, tok)
    if p.is_dir():
        cfg = GemmaConfig.from_file(p)
        from .weights.safetensors import load_hf_checkpoint
        tensors = load_hf_checkpoint(p, cfg.model_type)
        tok = _tokenizer(p) if (p / "tokenizer.json").exists() else None
        return Checkpoint(cfg, tensors, p, tok)
    raise ConfigError(f"{p}: expected a Hugging Face checkpoint directory or a .gguf file")


def _tokenizer(p: Path):
    try:
        from .tokenizer import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_source(p)


def source_hash(p: Path) -> str:
    """A cheap content hash: sizes + first/last MiB of every weight file."""
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.suffix in (".safetensors", ".json", ".gguf"))
    for f in files:
        st = f.stat()
        h.update(f.name.encode())
        h.update(str(st.st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if st.st_size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def build_model(ckpt: Checkpoint, ops, source=None) -> LanguageModel:
    """The one place a LanguageModel is made: the text decoder from ``ckpt``'s text tensors on ``ops``, the
    tokenizer, and (Gemma 4 with vision/audio configs) the towers' tensors kept beside it (the towers are built
    on first use, from these arrays). ``source``: what the user named (default: the resolved path)."""
    cfg, tensors, path, tok = ckpt
    decoder = Gemma(cfg, tensors, ops, where=str(path))
    media = None
    raw = cfg.raw or {}
    if cfg.arch == "gemma4" and (raw.get("vision_config") or raw.get("audio_config")):
        from .multimodal.runner import MediaTensors
        media = MediaTensors.from_checkpoint(tensors, path)
    return LanguageModel(decoder, tok, media, source=str(source) if source is not None else str(path),
                         source_path=path)


def load(source, backend: str = "torch:cpu", dtype: str = "float32", progress: bool = True,
         quant: str | None = None) -> LanguageModel:
    """``wb.load``: a LanguageModel of ``source`` on ``backend`` in ``dtype`` (see the module docstring).
    ``quant="keep"`` (a GGUF on torch:cpu, float32): the weight matrices stay in the file's blocks and decode runs
    the quantised GEMV with 8-bit activations (llama.cpp's method); ``"keep-exact"``: the same blocks, float32
    activations; None (default): dequantised on load."""
    ops = backends.get_ops(backend, dtype)
    from .backends import quant as _quant
    quant = _quant.check_mode(quant)
    if quant is not None:
        _quant.check_ops(ops)
        ops.quant, ops.quant_act8 = quant, _quant.MODES[quant]
    return build_model(read_source(source, dtype=ops.dtype, progress=progress, quant=quant), ops, source)
