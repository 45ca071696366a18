"""``embed_vision`` / ``embed_audio``: HF ``Gemma4MultimodalEmbedder``.

    soft tokens [.., Dm] -> RMSNorm without scale (eps of the tower's config) -> Linear(Dm -> text hidden), no bias

Dm is the vision hidden size, or the audio tower's ``output_proj_dims``. The result goes into the text
model's input embeddings as is: it is *not* multiplied by sqrt(hidden) like token embeddings.
"""
from __future__ import annotations

import numpy as np

from .common import MediaWeights


class Embedder:
    def __init__(self, tensors: dict[str, np.ndarray], prefix: str, in_dim: int, out_dim: int, eps: float, ops,
                 where: str = "checkpoint"):
        wts = MediaWeights(tensors, prefix, where)
        self.name = prefix.rstrip(".")
        self.w = ops.asarray(wts.get("embedding_projection.weight", (out_dim, in_dim)))
        self.eps = eps
        self.ops = ops
        self.unused = wts.unused()

    def __call__(self, x, pts):
        ops = self.ops
        y = ops.linear(ops.rms_norm(x, None, self.eps), self.w)
        return pts.visit(ops, self.name + ".hook_out", y)
