"""Independent references: Hugging Face transformers, llama.cpp (llama-cpp-python) and mlx-lm.

Each backend imports its engine lazily, so importing this package needs none of them; constructing a
reference without its engine raises ``ImportError`` naming ``pip install gemma-workbench[reference]``
(mlx-lm: ``pip install mlx-lm``).
"""
from __future__ import annotations

from .hf import HFReference, export_hf_dir_from_gguf
from .llamacpp import LlamaCppReference
from .mlxlm import MlxLmReference

__all__ = ["HFReference", "LlamaCppReference", "MlxLmReference", "export_hf_dir_from_gguf"]
