"""One reference for many machines: ``workbench reference export`` writes the float64 reference's taps to a
portable file; ``workbench parity --against FILE`` compares local backends with it.

The artifact (``.wbref``) is ONE safetensors file: every chosen tap of the reference's prefill pass and the
logits, in float64, under their tap names; its ``__metadata__["wbref"]`` is the JSON manifest — format
version, model name, reference (backend:dtype, and the number of ranks when it was sharded), prompt and token
ids, tap patterns, decode steps, the hashes of the weights / config / tokenizer, versions and machine. It is
written to ``FILE.partial`` and renamed, so a crash never leaves a truncated artifact under the final name.

Importing: the local model's hashes must equal the artifact's (same weights, same config, same tokenizer)
or :class:`ArtifactMismatch` says which one differs; then every local backend x dtype runs the same token
ids and its taps are compared with the stored ones — prefill per tap, and decode steps (the last N tokens fed
through the KV cache, compared with the reference's prefill taps at those positions), exactly as
``wb.compare`` does, so the rows, the report and the stored run are the same.

This module knows the file and the one-process export; choosing between a stored, a sharded and a local
reference (``wb.compare(against=, world=)``, ``workbench reference export [--nproc N]``) is
:mod:`workbench.comparison`'s, above this one and :mod:`workbench.distributed`.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "workbench-reference/1"
_SAMPLE = 1 << 20          # 1 MiB chunks for the sampled hash of large files
_FULL_HASH_MAX = 64 << 20  # files up to 64 MiB are hashed whole


class ArtifactError(ValueError):
    """An artifact that cannot be read (not a .wbref, wrong format version, truncated)."""


class ArtifactMismatch(ArtifactError):
    """The artifact was made from other weights, config or tokenizer than the local model."""


# ------------------------------------------------------------------------------------------------ hashes
def _file_digest(h, p: Path):
    st = p.stat()
    h.update(p.name.encode())
    h.update(str(st.st_size).encode())
    with open(p, "rb") as f:
        if st.st_size <= _FULL_HASH_MAX:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
            return
        # large: the safetensors header (names, shapes, offsets) whole + 64 evenly spaced 1 MiB samples
        head = f.read(8)
        h.update(head)
        if p.suffix == ".safetensors":
            n = int.from_bytes(head, "little")
            if n < st.st_size:
                h.update(f.read(n))
        for k in range(64):
            f.seek((st.st_size - _SAMPLE) * k // 63)
            h.update(f.read(_SAMPLE))


def weights_hash(path: Path) -> str:
    """sha256 over the weight files (whole up to 64 MiB, else header + 64 spaced 1 MiB samples)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.suffix in (".safetensors", ".gguf"))
    h = hashlib.sha256(b"wbref-weights-v1")
    for f in files:
        _file_digest(h, f)
    return h.hexdigest()


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(cfg.raw, sort_keys=True, default=str).encode()).hexdigest()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_hash(path: Path) -> str | None:
    """sha256 of the tokenizer files of a checkpoint dir; a .gguf carries its tokenizer inside the weights
    (covered by the weight hash); None when there is no tokenizer."""
    p = Path(path)
    if p.is_file():
        return "in-weights"
    files = [p / n for n in _TOKENIZER_FILES if (p / n).exists()]
    if not files:
        return None
    h = hashlib.sha256(b"wbref-tokenizer-v1")
    for f in files:
        _file_digest(h, f)
    return h.hexdigest()


def local_hashes(path: Path, cfg) -> dict:
    return dict(weights=weights_hash(path), config=config_hash(cfg), tokenizer=tokenizer_hash(path))


def _versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for pkg in ("gemma-workbench", "numpy", "torch", "safetensors", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ------------------------------------------------------------------------------------------------ file
@dataclass
class Artifact:
    path: Path
    manifest: dict
    taps: dict[str, np.ndarray]       # prefill taps + "logits", float64

    label: str | None = None           # how a report names this reference (ends in ":<dtype>")

    @property
    def token_ids(self) -> list[int]:
        return list(self.manifest["token_ids"])

    def reference_taps(self, path, cfg) -> dict[str, np.ndarray]:
        """The stored taps, after :func:`check_matches` (raises ArtifactMismatch)."""
        check_matches(self, Path(path), cfg)
        return dict(self.taps)


def write(out, taps: dict[str, np.ndarray], manifest: dict) -> Path:
    """Write taps (float64) + manifest atomically (OUT.partial, then rename)."""
    from safetensors.numpy import save_file
    out = Path(os.path.expanduser(str(out)))
    if out.is_dir():
        raise ArtifactError(f"{out} is a directory; give a file name such as ref.wbref")
    arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float64)) for k, v in taps.items()}
    m = dict(manifest, format=FORMAT, tensors=sorted(arrays),
             shapes={k: list(v.shape) for k, v in arrays.items()})
    tmp = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file(arrays, str(tmp), metadata={"wbref": json.dumps(m, default=_json_default)})
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def read(path) -> Artifact:
    from safetensors import SafetensorError, safe_open
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ArtifactError(f"reference artifact {p}: no such file")
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            if "wbref" not in meta:
                raise ArtifactError(f"{p}: a safetensors file but not a workbench reference artifact "
                                    "(no 'wbref' manifest in its metadata)")
            man = json.loads(meta["wbref"])
            if man.get("format") != FORMAT:
                raise ArtifactError(f"{p}: artifact format {man.get('format')!r}; this workbench reads {FORMAT!r}")
            taps = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ArtifactError(f"{p}: not a readable reference artifact ({e})") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{p}: malformed manifest ({e})") from None
    missing = sorted(set(man.get("tensors", [])) - set(taps))
    if missing:
        raise ArtifactError(f"{p}: manifest lists taps the file does not hold: {missing[:5]}")
    return Artifact(p, man, taps)


def check_matches(art: Artifact, path: Path, cfg) -> dict:
    """Refuse (ArtifactMismatch) unless the local model's weights, config and tokenizer hash as the
    artifact's; returns the local hashes."""
    loc = local_hashes(path, cfg)
    want = art.manifest.get("hashes", {})
    bad = []
    for k in ("weights", "config", "tokenizer"):
        a, b = want.get(k), loc.get(k)
        if k == "tokenizer" and (a is None or b is None):
            if a != b:
                bad.append(f"tokenizer: artifact {'has none' if a is None else a[:16]}, local "
                           f"{'has none' if b is None else b[:16]}")
            continue
        if a != b:
            bad.append(f"{k}: artifact {str(a)[:16]}…, local {str(b)[:16]}…")
    if bad:
        raise ArtifactMismatch(
            f"{art.path}: made from model {art.manifest.get('model')!r} on {art.manifest.get('machine', {}).get('node')}"
            f", whose hashes differ from the local model {path}: " + "; ".join(bad)
            + " — compare against the same checkpoint (or export a new reference here)")
    return loc


# ------------------------------------------------------------------------------------------------ export
def manifest_for(source, path, cfg, tok, prompt, ids, taps, reference, decode_steps, world, tap_names) -> dict:
    return dict(model=str(source), source=str(path), arch=cfg.arch, reference=reference, world=int(world),
                prompt=prompt if isinstance(prompt, str) else None, token_ids=[int(i) for i in ids],
                taps=list(taps), tap_names=list(tap_names), decode_steps=int(decode_steps),
                hashes=local_hashes(Path(path), cfg), versions=_versions(),
                machine=dict(node=platform.node(), system=platform.system(), machine=platform.machine(),
                             processor=platform.processor()),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def export(source, out, prompt=None, taps=None, reference: str = "torch:cpu:float64", decode_steps: int = 4,
           max_tokens: int = 64, progress: bool = True) -> Path:
    """Run the reference once, in this process, and write its taps (sharded over N processes:
    ``workbench.comparison.export(..., world=N)``)."""
    from . import backends as _bk
    from .loader import build_model, read_source
    from .parity import ANCHOR_TAPS, DEFAULT_TAPS, _prompt_ids, _split_reference
    taps = list(taps or DEFAULT_TAPS)
    want = list(dict.fromkeys(taps + ANCHOR_TAPS))    # the anchor can then run where the artifact is used
    ckpt = read_source(source, dtype="float64", progress=progress)
    cfg, _, path, tok = ckpt
    ids = _prompt_ids(prompt, tok, max_tokens, source)
    b, d = _split_reference(reference)
    t0 = time.perf_counter()
    m = build_model(ckpt, _bk.get_ops(b, d), source)
    o = m.forward(np.asarray(ids, dtype=np.int64)[None], taps=want)
    got = dict(o.taps)
    got["logits"] = o.logits
    man = manifest_for(source, path, cfg, tok, prompt, ids, taps, reference, decode_steps, 1, got)
    man["seconds"] = round(time.perf_counter() - t0, 3)
    return write(out, got, man)
