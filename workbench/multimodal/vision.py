"""The Gemma 4 vision tower (HF ``Gemma4VisionModel``), written against ``ops`` like the text model.

    pixels [n, P, 3*ps*ps] in [0, 1]  (patches in (row, col, channel) order, from ``preprocess``)
      -> patch embedder: Linear(2*pixels - 1) + table[0][x] + table[1][y]   (padding patches: no position)
      -> L encoder layers: RMSNorm -> attention (q/k RMSNorm with weight, v RMSNorm without, axial 2-D RoPE
         with theta 100 — x angles on the first half of each head, y on the second — scale 1.0,
         bidirectional, padding keys masked) -> RMSNorm -> +res -> RMSNorm -> GeGLU MLP -> RMSNorm -> +res
      -> pooler: average of each k x k block of patches (by position), then * sqrt(hidden), in float32
      -> optional standardisation (x - std_bias) * std_scale
    = soft tokens [n, S, hidden]; S = patches / k^2 per image.

All norms scale by ``w`` (no 1 + w). Linears may be "clipped" (``use_clipped_linears``): clamp the input and
output to bounds stored in the checkpoint.
"""
from __future__ import annotations

import math

import numpy as np

from . import mmops
from .common import ClippedLinear, MediaWeights, TowerConfig, norm_weight
from .points import MediaPoints

_BTHD = (0, 2, 1, 3)


class VisionConfig(TowerConfig):
    DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                    num_key_value_heads=12, head_dim=64, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                    rope_theta=100.0, pooling_kernel_size=3, patch_size=16, position_embedding_size=10240,
                    use_clipped_linears=False, standardize=False)

    def check(self, d: dict, where: str) -> None:
        from ..config import ConfigError
        c = self
        if d.get("head_dim") is None:
            c.head_dim = c.hidden_size // c.num_attention_heads
        rp = d.get("rope_parameters") or {}
        if rp.get("rope_type", "axial") != "axial":
            raise ConfigError(f"{where}: the Gemma 4 vision tower supports only axial RoPE, not "
                              f"{rp.get('rope_type')!r}")
        c.rope_theta = float(rp.get("rope_theta", d.get("rope_theta", 100.0)))
        if c.head_dim % 4:
            raise ConfigError(f"{where}: head_dim {c.head_dim} must be a multiple of 4 for 2-D RoPE")
        if c.num_attention_heads % c.num_key_value_heads:
            raise ConfigError(f"{where}: num_attention_heads {c.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {c.num_key_value_heads}")
        if c.hidden_activation not in ("gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast"):
            raise ConfigError(f"{where}: unsupported hidden_activation {c.hidden_activation!r}")


class VisionTower:
    """Gemma 4 vision encoder + pooler on one backend. ``__call__(pixel_values, position_ids, pts)``."""

    def __init__(self, cfg: VisionConfig, tensors: dict[str, np.ndarray], ops, where: str = "checkpoint"):
        self.cfg = c = cfg
        self.ops = ops
        wts = MediaWeights(tensors, "vision_tower.", where)
        D, F, H, KV, hd = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, \
            c.head_dim
        ps = c.patch_size
        clip = c.use_clipped_linears
        self.input_proj = ops.asarray(wts.get("patch_embedder.input_proj.weight", (D, 3 * ps * ps)))
        table = wts.get("patch_embedder.position_embedding_table", (2, c.position_embedding_size, D))
        self.pos_x = ops.asarray(table[0])
        self.pos_y = ops.asarray(table[1])
        self.layers = []
        for i in range(c.num_hidden_layers):
            p = f"encoder.layers.{i}."
            L = {
                "q": ClippedLinear(ops, wts, p + "self_attn.q_proj", (H * hd, D), clip),
                "k": ClippedLinear(ops, wts, p + "self_attn.k_proj", (KV * hd, D), clip),
                "v": ClippedLinear(ops, wts, p + "self_attn.v_proj", (KV * hd, D), clip),
                "o": ClippedLinear(ops, wts, p + "self_attn.o_proj", (D, H * hd), clip),
                "q_norm": norm_weight(ops, wts, p + "self_attn.q_norm.weight", hd),
                "k_norm": norm_weight(ops, wts, p + "self_attn.k_norm.weight", hd),
                "gate": ClippedLinear(ops, wts, p + "mlp.gate_proj", (F, D), clip),
                "up": ClippedLinear(ops, wts, p + "mlp.up_proj", (F, D), clip),
                "down": ClippedLinear(ops, wts, p + "mlp.down_proj", (D, F), clip),
            }
            for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                      "post_feedforward_layernorm"):
                L[n] = norm_weight(ops, wts, p + n + ".weight", D)
            self.layers.append(L)
        self.std = None
        if c.standardize:
            acc = "float64" if ops.dtype == "float64" else "float32"
            self.std = (ops.asarray(wts.get("std_bias", (D,)), dtype=acc),
                        ops.asarray(wts.get("std_scale", (D,)), dtype=acc))
        self.unused = wts.unused()

    # ------------------------------------------------------------------------------------------------ pass
    def __call__(self, pixel_values: np.ndarray, position_ids: np.ndarray, pts: MediaPoints):
        """pixel_values [n, P, 3*ps*ps] float (0..1), position_ids [n, P, 2] int (x, y; -1 = padding).
        Returns (soft tokens [n, S, D] backend array in the model dtype, counts: list of S per image)."""
        c, ops = self.cfg, self.ops
        pv = np.asarray(pixel_values, dtype=np.float32)
        pos = np.asarray(position_ids, dtype=np.int64)
        if pv.ndim == 2:
            pv, pos = pv[None], pos[None]
        pad = (pos == -1).all(-1)                       # [n, P]
        valid_n = (~pad).sum(-1)
        P = int(valid_n.max())                          # HF pads at the end: drop columns padded everywhere
        pv, pos, pad = pv[:, :P], pos[:, :P], pad[:, :P]
        n = pv.shape[0]
        k = c.pooling_kernel_size
        for b in range(n):
            if valid_n[b] % (k * k):
                raise ValueError(f"image {b}: {int(valid_n[b])} patches is not a multiple of {k}x{k}")

        x = ops.linear(ops.asarray(2 * (pv - np.float32(0.5))), self.input_proj)
        cl = np.maximum(pos, 0)
        pe = ops.take_rows(self.pos_x, ops.asids(cl[..., 0])) + ops.take_rows(self.pos_y, ops.asids(cl[..., 1]))
        if pad.any():
            pe = ops.where(pad[..., None], 0.0, pe)
        x = x + pe
        x = pts.visit(ops, "vision.hook_patch_embed", x)

        mask = ops.asmask((~pad)[:, None, None, :]) if pad.any() else None
        cos, sin = mmops.rope_tables_2d(pos, c.head_dim, c.rope_theta)
        cos = ops.asarray(cos[:, None])
        sin = ops.asarray(sin[:, None])
        for i, L in enumerate(self.layers):
            x = self._layer(i, L, x, cos, sin, mask, pts)

        pooled, counts = self._pool(x, pos, pad)
        pooled = pts.visit(ops, "vision.hook_pooled", pooled)
        if self.std is not None:
            pooled = (pooled - self.std[0]) * self.std[1]
        out = ops.cast(pooled, None)
        out = pts.visit(ops, "vision.hook_out", out)
        return out, counts

    def _layer(self, i, L, x, cos, sin, mask, pts):
        c, ops = self.cfg, self.ops
        eps = c.rms_norm_eps
        b = f"vision.blocks.{i}."
        n, P = x.shape[0], x.shape[1]
        H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        tap_t = lambda a: a.transpose(_BTHD)  # noqa: E731
        x = pts.visit(ops, b + "hook_resid_pre", x)
        h = ops.rms_norm(x, L["input_layernorm"], eps)
        h = pts.visit(ops, b + "ln1.hook_normalized", h)
        q = ops.rms_norm(ops.reshape(L["q"](ops, h), (n, P, H, hd)), L["q_norm"], eps)
        k = ops.rms_norm(ops.reshape(L["k"](ops, h), (n, P, KV, hd)), L["k_norm"], eps)
        v = ops.rms_norm(ops.reshape(L["v"](ops, h), (n, P, KV, hd)), None, eps)
        q = mmops.apply_rope_2d(ops, ops.transpose(q, _BTHD), cos, sin)
        k = mmops.apply_rope_2d(ops, ops.transpose(k, _BTHD), cos, sin)
        v = ops.transpose(v, _BTHD)
        q = pts.visit(ops, b + "attn.hook_q", q, tap_t, tap_t)
        k = pts.visit(ops, b + "attn.hook_k", k, tap_t, tap_t)
        v = pts.visit(ops, b + "attn.hook_v", v, tap_t, tap_t)
        z, probs = ops.attention(q, k, v, mask, 1.0, None, want_probs=pts.wants(b + "attn.hook_pattern"))
        if probs is not None:
            pts.visit(ops, b + "attn.hook_pattern", probs)
        z = pts.visit(ops, b + "attn.hook_z", z, tap_t, tap_t)
        a = L["o"](ops, ops.reshape(ops.transpose(z, _BTHD), (n, P, H * hd)))
        a = ops.rms_norm(a, L["post_attention_layernorm"], eps)
        a = pts.visit(ops, b + "hook_attn_out", a)
        x = x + a
        x = pts.visit(ops, b + "hook_resid_mid", x)
        h = ops.rms_norm(x, L["pre_feedforward_layernorm"], eps)
        h = pts.visit(ops, b + "ln2.hook_normalized", h)
        g = ops.gelu(L["gate"](ops, h), approximate=c.hidden_activation != "gelu")
        m = g * L["up"](ops, h)
        m = pts.visit(ops, b + "mlp.hook_post", m)
        m = ops.rms_norm(L["down"](ops, m), L["post_feedforward_layernorm"], eps)
        m = pts.visit(ops, b + "hook_mlp_out", m)
        x = x + m
        x = pts.visit(ops, b + "hook_resid_post", x)
        return x

    def _pool(self, x, pos: np.ndarray, pad: np.ndarray):
        """HF ``Gemma4VisionPooler``: k x k average by patch position (a [S, P] matrix of 1/k^2 per image),
        then * sqrt(hidden), in float32. Soft token s = bx + (W/k) * by (row-major over the pooled grid)."""
        c, ops = self.cfg, self.ops
        k = c.pooling_kernel_size
        n, P = pad.shape
        counts = [int((~pad[b]).sum()) // (k * k) for b in range(n)]
        S = max(counts)
        xf = mmops.to_acc(ops, x)
        if k == 1 and P == S:
            pooled = xf
            if pad.any():
                pooled = ops.where(pad[..., None], 0.0, pooled)
        else:
            W = np.zeros((n, S, P), dtype=np.float32)
            wk = np.float32(1.0) / np.float32(k * k)
            for b in range(n):
                ok = ~pad[b]
                px, py = pos[b, ok, 0], pos[b, ok, 1]
                width = int(px.max()) + 1
                idx = (px // k) + (width // k) * (py // k)
                cols = np.nonzero(ok)[0]
                W[b, idx, cols] = wk
            pooled = mmops.matmul(ops, ops.asarray(W, dtype="float64" if ops.dtype == "float64" else "float32"), xf)
        pooled = pooled * float(math.sqrt(c.hidden_size))
        return pooled, counts
