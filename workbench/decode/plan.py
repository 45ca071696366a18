"""``DecodePlan``: everything a decode kernel may see — per-layer weights by role, the per-layer flags the
config's accessors give, and the static cache's buffers. The model builds it (``Gemma.decode_plan``); kernels
read only the plan (never the model's private weight names or the cache's internals), so a fault injected into
a plan (tests: :meth:`DecodePlan.scale_weight`, :meth:`DecodePlan.flip_rope`) reaches exactly the kernels that
read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

ROLES = ("qkv", "o", "gate_up", "down", "input_norm", "pre_ff_norm", "post_attn_norm", "post_ff_norm",
         "q_norm", "k_norm")


@dataclass
class LayerPlan:
    """One decoder layer as the kernels see it."""
    index: int
    head_dim: int
    kv_heads: int
    intermediate: int
    window: int | None            # sliding window (keys including the query), None for full attention
    scale: float                  # attention score scale
    # weights by role (backend arrays); None where the model has no such tensor
    qkv: Any                      # [(H + 2 kv) * hd, D]: q, k, v rows (fused)
    o: Any                        # [D, H * hd]
    gate_up: Any                  # [2 F, D]: gate rows then up rows
    down: Any                     # [D, F]
    input_norm: Any
    pre_ff_norm: Any
    post_attn_norm: Any = None
    post_ff_norm: Any = None
    q_norm: Any = None
    k_norm: Any = None
    # the static cache's buffers for this layer: k, v [1, kv, slots, hd], kpos [slots] (position per slot,
    # -1 empty), and how many slots / whether they form a ring (sliding window)
    kv: Any = None                # the layer's cache (public attributes k, v, kpos_dev, slots, ring, update_static)
    rope: tuple = ()              # (cos, sin) tables [max_len, hd] of this layer's RoPE

    @property
    def slots(self) -> int:
        return self.kv.slots

    @property
    def ring(self) -> bool:
        return self.kv.ring


@dataclass
class DecodePlan:
    """The whole step: embedding, layers, final norm and head; model-wide flags."""
    layers: list[LayerPlan]
    embed: Any                    # [V, D]
    embed_scale: float
    final_norm: Any
    head: Any                     # [V, D] (the embedding when tied)
    hidden: int
    n_heads: int
    vocab: int
    eps: float
    attn_softcap: float | None
    final_softcap: float | None
    dtype: str
    ops: Any = None
    cache: Any = None             # the KVCache whose buffers the layers hold (static mode)
    faults: list = field(default_factory=list)    # test-only injections applied to this plan (for reports)

    # ------------------------------------------------------------------ test-only fault injection
    def scale_weight(self, layer: int, role: str, by: float) -> "DecodePlan":
        """A copy of the plan whose layer ``layer`` weight ``role`` is multiplied by ``by`` (test-only)."""
        if role not in ROLES:
            raise ValueError(f"unknown weight role {role!r}; roles: {', '.join(ROLES)}")
        lay = self.layers[layer]
        w = getattr(lay, role)
        if w is None:
            raise ValueError(f"layer {layer} has no {role} weight")
        new = (w * by).astype(w.dtype) if hasattr(w, "astype") and not hasattr(w, "to") else (w * by).to(w.dtype)
        layers = list(self.layers)
        layers[layer] = replace(lay, **{role: new})
        return replace(self, layers=layers, faults=self.faults + [f"layer {layer} {role} x{by}"])

    def flip_rope(self, layer: int) -> "DecodePlan":
        """A copy whose layer ``layer`` rotates the other way (sin negated; test-only)."""
        lay = self.layers[layer]
        cos, sin = lay.rope
        layers = list(self.layers)
        layers[layer] = replace(lay, rope=(cos, -sin))
        return replace(self, layers=layers, faults=self.faults + [f"layer {layer} RoPE sign flipped"])
