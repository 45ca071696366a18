"""The Gemma 4 audio tower (HF ``Gemma4AudioModel``, a USM/Conformer encoder), written against ``ops``.

    log-mel [n, T, 128] (+ frame mask)
      -> sub-sampling: 2 x (mask, Conv2d 3x3 stride 2 pad 1, LayerNorm over channels (no bias), ReLU),
         the mask halves with each (mask[::2]); flatten (freq, channel) -> Linear -> hidden
      -> L conformer layers:
           x = FF1(x)              FF(x) = x + 0.5 * RMSNorm(clip(W2 silu(W1 RMSNorm(clip(x)))))
           x = x + RMSNorm(attn(RMSNorm(clip(x))))
           x = LightConv(x)        x + W_end silu(RMSNorm(clip(causal depthwise conv(GLU(W_start RMSNorm(x))))))
           x = RMSNorm(clip(FF2(x)))
         attention: chunked local (chunks of 12 queries over a context of 12 + 12 past keys), queries scaled
         by head_dim^-0.5 / ln2 * softplus(per_dim_scale), keys by ln(1+e)/ln2, Transformer-XL relative position
         term from sinusoidal embeddings (relative_k_proj) with its "rel shift", logits capped by
         tanh(x/50)*50, invalid keys set to -1e9, softmax in float32
      -> output_proj (Linear with bias) -> [n, T/4, output_proj_dims]

``clip`` is HF's ``gradient_clipping`` clamp (1e10); linears are "clipped" (``use_clipped_linears``): input
and output clamped to bounds stored in the checkpoint. All RMSNorms scale by ``w`` (no 1 + w).
"""
from __future__ import annotations

import math

import numpy as np

from . import mmops
from .common import ClippedLinear, MediaWeights, TowerConfig, finite_max, norm_weight
from .points import MediaPoints


class AudioConfig(TowerConfig):
    DEFAULTS = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, hidden_act="silu",
                    subsampling_conv_channels=[128, 32], conv_kernel_size=5, residual_weight=0.5,
                    attention_chunk_size=12, attention_context_left=13, attention_context_right=0,
                    attention_logit_cap=50.0, attention_invalid_logits_value=-1.0e9, use_clipped_linears=True,
                    rms_norm_eps=1e-6, gradient_clipping=1e10, output_proj_dims=1536)

    def check(self, d: dict, where: str) -> None:
        from ..config import ConfigError
        c = self
        if len(c.subsampling_conv_channels) != 2:
            raise ConfigError(f"{where}: subsampling_conv_channels must have 2 entries, got "
                              f"{c.subsampling_conv_channels}")
        if c.hidden_size % c.num_attention_heads:
            raise ConfigError(f"{where}: hidden_size {c.hidden_size} is not a multiple of num_attention_heads "
                              f"{c.num_attention_heads}")
        if c.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"{where}: unsupported hidden_act {c.hidden_act!r} (Gemma 4 audio uses silu)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def context_size(self) -> int:
        return self.attention_chunk_size + self.attention_context_left - 1 + self.attention_context_right


class AudioTower:
    """Gemma 4 audio encoder on one backend. ``__call__(features, mask, pts)``."""

    def __init__(self, cfg: AudioConfig, tensors: dict[str, np.ndarray], ops, where: str = "checkpoint",
                 n_mels: int = 128):
        self.cfg = c = cfg
        self.ops = ops
        wts = MediaWeights(tensors, "audio_tower.", where)
        D = c.hidden_size
        C0, C1 = c.subsampling_conv_channels
        clip = c.use_clipped_linears
        s = "subsample_conv_projection."
        self.conv0 = ops.conv2d_weight(wts.get(s + "layer0.conv.weight", (C0, 1, 3, 3)))
        self.norm0 = norm_weight(ops, wts, s + "layer0.norm.weight", C0)
        self.conv1 = ops.conv2d_weight(wts.get(s + "layer1.conv.weight", (C1, C0, 3, 3)))
        self.norm1 = norm_weight(ops, wts, s + "layer1.norm.weight", C1)
        self.n_mels = n_mels
        proj_in = (C0 // 4) * C1            # HF sizes this from the channels; it must equal (n_mels / 4) * C1
        self.input_proj = ops.asarray(wts.get(s + "input_proj_linear.weight", (D, proj_in)))
        hd, H = c.head_dim, c.num_attention_heads
        self.layers = []
        for i in range(c.num_hidden_layers):
            p = f"layers.{i}."
            L = {}
            for ff in ("feed_forward1", "feed_forward2"):
                L[ff] = {
                    "w1": ClippedLinear(ops, wts, f"{p}{ff}.ffw_layer_1", (4 * D, D), clip),
                    "w2": ClippedLinear(ops, wts, f"{p}{ff}.ffw_layer_2", (D, 4 * D), clip),
                    "pre": norm_weight(ops, wts, f"{p}{ff}.pre_layer_norm.weight", D),
                    "post": norm_weight(ops, wts, f"{p}{ff}.post_layer_norm.weight", D),
                }
            a = p + "self_attn."
            L["q"] = ClippedLinear(ops, wts, a + "q_proj", (H * hd, D), clip)
            L["k"] = ClippedLinear(ops, wts, a + "k_proj", (H * hd, D), clip)
            L["v"] = ClippedLinear(ops, wts, a + "v_proj", (H * hd, D), clip)
            L["post"] = ClippedLinear(ops, wts, a + "post", (D, D), clip)
            L["rel_k"] = wts.get(a + "relative_k_proj.weight", (H * hd, D))
            pds = wts.get(a + "per_dim_scale", (hd,)).astype(np.float64)
            # q_scale * softplus(per_dim_scale), as HF: float32 math on a float32 parameter
            sp = np.where(pds > 20, pds, np.log1p(np.exp(np.minimum(pds, 20))))
            L["q_mul"] = (hd ** -0.5 / math.log(2)) * sp
            lc = p + "lconv1d."
            L["lin_start"] = ClippedLinear(ops, wts, lc + "linear_start", (2 * D, D), clip)
            L["lin_end"] = ClippedLinear(ops, wts, lc + "linear_end", (D, D), clip)
            dw = wts.get(lc + "depthwise_conv1d.weight", (D, 1, c.conv_kernel_size))
            L["dw"] = [ops.asarray(np.ascontiguousarray(dw[:, 0, k])) for k in range(c.conv_kernel_size)]
            L["lc_pre"] = norm_weight(ops, wts, lc + "pre_layer_norm.weight", D)
            L["lc_norm"] = norm_weight(ops, wts, lc + "conv_norm.weight", D)
            for n in ("norm_pre_attn", "norm_post_attn", "norm_out"):
                L[n] = norm_weight(ops, wts, p + n + ".weight", D)
            self.layers.append(L)
        self.out_w = ops.asarray(wts.get("output_proj.weight", (c.output_proj_dims, D)))
        self.out_b = ops.asarray(wts.get("output_proj.bias", (c.output_proj_dims,)))
        # relative position embeddings: sin/cos of positions context//2 ... 0 (HF Gemma4AudioRelPositionalEncoding)
        nts = D // 2
        inc = math.log(10000.0) / max(nts - 1, 1)
        inv = np.exp(np.arange(nts, dtype=np.float64) * -inc)
        posn = np.arange(c.context_size // 2, -1, -1, dtype=np.float64)[:, None] * inv[None]
        self._pos_emb = np.concatenate([np.sin(posn), np.cos(posn)], -1).astype(np.float32)     # [P, D]
        self._rel_k = [None] * c.num_hidden_layers
        self.unused = wts.unused()

    # ------------------------------------------------------------------------------------------------ pass
    def __call__(self, features: np.ndarray, mask: np.ndarray, pts: MediaPoints):
        """features [n, T, n_mels] float32 log-mel, mask [n, T] bool (valid frames). Returns (encodings
        [n, T', output_proj_dims] backend array, mask' [n, T'] numpy bool: the valid encodings)."""
        c, ops = self.cfg, self.ops
        feats = np.asarray(features, dtype=np.float32)
        m = np.asarray(mask, dtype=bool)
        if feats.ndim == 2:
            feats, m = feats[None], m[None]
        if feats.shape[-1] != self.n_mels or (self.n_mels // 4) * c.subsampling_conv_channels[1] != \
                self.input_proj.shape[1]:
            raise ValueError(f"audio features have {feats.shape[-1]} mel bins; this tower takes {self.n_mels} "
                             f"(and input_proj_linear expects {self.input_proj.shape[1]} = mel/4 * channels)")
        # --- sub-sampling convolutions (channels-last) ---
        x = ops.asarray((feats * m[..., None])[..., None])                 # [n, T, F, 1]
        x = self._conv_block(x, self.conv0, self.norm0)
        m = m[:, ::2]
        x = x * ops.asarray(m[:, :, None, None].astype(np.float32))
        x = self._conv_block(x, self.conv1, self.norm1)
        m = m[:, ::2]
        n, T, Fq, C = x.shape
        x = ops.linear(ops.reshape(x, (n, T, Fq * C)), self.input_proj)
        x = pts.visit(ops, "audio.hook_subsample", x)

        blocked_mask = ops.asmask(self._blocked_mask(m))
        for i, L in enumerate(self.layers):
            x = self._layer(i, L, x, blocked_mask, pts)
        x = mmops.linear_bias(ops, x, self.out_w, self.out_b)
        x = pts.visit(ops, "audio.hook_out", x)
        return x, m

    def _conv_block(self, x, w, norm):
        ops = self.ops
        y = ops.conv2d(x, w, stride=2, padding=1)
        y = ops.layer_norm(y, ops.cast(norm, None), None, self.cfg.rms_norm_eps)
        return ops.relu(y)

    def _blocked_mask(self, valid: np.ndarray) -> np.ndarray:
        """The [n, 1, blocks, chunk, context] "invalid" mask HF builds (create_bidirectional_mask with the
        padding mask and the (left-1, right) window, then _convert_4d_mask_to_blocked_5d): True = masked."""
        c = self.cfg
        n, T = valid.shape
        ch, past, fut = c.attention_chunk_size, c.attention_context_left - 1, c.attention_context_right
        C = c.context_size
        nb = (T + ch - 1) // ch
        q = np.arange(nb)[:, None, None] * ch + np.arange(ch)[None, :, None]          # [nb, ch, 1]
        k = np.arange(nb)[:, None, None] * ch + np.arange(C)[None, None, :] - past    # [nb, 1, C]
        d = q - k
        win = ((d >= 0) & (d < past)) | ((d < 0) & (-d < fut))
        inside = (q < T) & (k >= 0) & (k < T)
        kc = np.clip(k, 0, T - 1)
        ok = win[None] & inside[None] & valid[:, kc]                                  # [n, nb, ch, C]
        return ~ok[:, None]

    def _ff(self, P, x):
        c, ops = self.cfg, self.ops
        g = min(c.gradient_clipping, finite_max(ops.dtype))
        res = x
        h = ops.clamp(x, -g, g)
        h = ops.rms_norm(h, P["pre"], 1e-6)
        h = P["w2"](ops, ops.silu(P["w1"](ops, h)))
        h = ops.clamp(h, -g, g)
        h = ops.rms_norm(h, P["post"], 1e-6)
        return h * c.residual_weight + res

    def _layer(self, i, L, x, bmask, pts):
        c, ops = self.cfg, self.ops
        b = f"audio.blocks.{i}."
        g = min(c.gradient_clipping, finite_max(ops.dtype))
        x = pts.visit(ops, b + "hook_resid_pre", x)
        x = self._ff(L["feed_forward1"], x)
        x = pts.visit(ops, b + "hook_ff1_out", x)
        res = x
        h = ops.rms_norm(ops.clamp(x, -g, g), L["norm_pre_attn"], 1e-6)
        a = self._attention(i, L, h, bmask, pts)
        a = ops.rms_norm(ops.clamp(a, -g, g), L["norm_post_attn"], 1e-6)
        a = pts.visit(ops, b + "hook_attn_out", a)
        x = a + res
        x = pts.visit(ops, b + "hook_resid_mid", x)
        x = self._lconv(L, x)
        x = pts.visit(ops, b + "hook_conv_out", x)
        x = self._ff(L["feed_forward2"], x)
        x = pts.visit(ops, b + "hook_ff2_out", x)
        x = ops.rms_norm(ops.clamp(x, -g, g), L["norm_out"], 1e-6)
        x = pts.visit(ops, b + "hook_resid_post", x)
        return x

    def _lconv(self, L, x):
        c, ops = self.cfg, self.ops
        eps = c.rms_norm_eps
        D = c.hidden_size
        res = x
        h = ops.rms_norm(x, L["lc_pre"], eps)
        h = L["lin_start"](ops, h)
        h = h[..., :D] * ops.sigmoid(h[..., D:])                              # GLU
        h = mmops.causal_depthwise_conv1d(ops, h, L["dw"], c.conv_kernel_size)
        g = min(c.gradient_clipping, finite_max(ops.dtype))
        h = ops.rms_norm(ops.clamp(h, -g, g), L["lc_norm"], eps)
        h = L["lin_end"](ops, ops.silu(h))
        return h + res

    def _attention(self, i, L, h, bmask, pts):
        """HF ``Gemma4AudioAttention``: blocked local attention with a relative-position term, float32."""
        c, ops = self.cfg, self.ops
        n, T = h.shape[0], h.shape[1]
        H, hd = c.num_attention_heads, c.head_dim
        ch, past, fut = c.attention_chunk_size, c.attention_context_left - 1, c.attention_context_right
        C = c.context_size
        nb = (T + ch - 1) // ch
        acc = "float64" if ops.dtype == "float64" else "float32"
        q = ops.reshape(mmops.to_acc(ops, L["q"](ops, h)), (n, T, H, hd))
        k = ops.reshape(mmops.to_acc(ops, L["k"](ops, h)), (n, T, H, hd))
        v = ops.reshape(mmops.to_acc(ops, L["v"](ops, h)), (n, T, H, hd))
        q = q * ops.asarray(L["q_mul"].astype(np.float32), dtype=acc)
        k = k * float(math.log(1 + math.e) / math.log(2))
        # queries in blocks of ch; keys/values: for each block, the window [start - past, start + ch + fut)
        qb = ops.reshape(ops.pad(q, 1, 0, nb * ch - T), (n, nb, ch, H, hd))
        idx = np.arange(nb)[:, None] * ch + np.arange(C)[None, :]
        kb = ops.take(ops.pad(k, 1, past, fut + ch - 1), idx, 1)       # [n, nb, C, H, hd]
        vb = ops.take(ops.pad(v, 1, past, fut + ch - 1), idx, 1)
        if self._rel_k[i] is None:
            rk = self._pos_emb.astype(np.float64) @ L["rel_k"].astype(np.float64).T    # [Pn, H*hd]
            rk = rk.reshape(-1, H, hd).transpose(1, 2, 0)                             # [H, hd, Pn]
            self._rel_k[i] = ops.asarray(np.ascontiguousarray(rk).astype(np.float32), dtype=acc)
        Pn = self._pos_emb.shape[0]
        qh = ops.transpose(qb, (0, 3, 1, 2, 4))                                       # [n, H, nb, ch, hd]
        ac = qh @ ops.transpose(kb, (0, 3, 1, 4, 2))                                  # [n, H, nb, ch, C]
        bd = ops.reshape(ops.reshape(qh, (n, H, nb * ch, hd)) @ self._rel_k[i], (n, H, nb, ch, Pn))
        # Transformer-XL relative shift (HF _rel_shift)
        bd = ops.pad(bd, 4, 0, C + 1 - Pn)
        bd = ops.reshape(bd, (n, H, nb, ch * (C + 1)))[..., :ch * C]
        bd = ops.reshape(bd, (n, H, nb, ch, C))
        s = ac + bd
        cap = float(c.attention_logit_cap)
        s = ops.tanh(s / cap) * cap
        s = ops.where(bmask, float(c.attention_invalid_logits_value), s)
        p = ops.softmax_f32(s)
        p = ops.cast(p, acc)
        if pts.wants(f"audio.blocks.{i}.attn.hook_pattern"):
            p = ops.cast(pts.visit(ops, f"audio.blocks.{i}.attn.hook_pattern", p), acc)
        o = p @ ops.transpose(vb, (0, 3, 1, 2, 4))                                    # [n, H, nb, ch, hd]
        o = ops.reshape(ops.transpose(o, (0, 2, 3, 1, 4)), (n, nb * ch, H * hd))[:, :T]
        return L["post"](ops, ops.cast(o, None))
