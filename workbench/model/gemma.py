"""The Gemma forward pass — written once, for Gemma 1-4, against the ops of ``workbench.backends``.

Read top to bottom: ``Gemma.forward`` embeds, runs ``_block`` per layer (attention, MLP or MLP+MoE, PLE,
layer scalar), then the final norm and the tied head. Every per-layer difference comes from the config's
accessors; every named point goes through ``pts.visit`` so taps and hooks work the same on each backend.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np

from ..config import GemmaConfig
from ..backends.protocol import CausalMask
from ..weights.names import MEDIA_PREFIXES
from .cache import ContextOverflow, KVCache
from .taps import Points, point_names

_BTHD = (0, 2, 1, 3)   # [B,H,T,D] <-> [B,T,H,D]


class _NoPoints:
    active = False
    tapped: set = set()
    hooked: dict = {}

    def visit(self, ops, name, x, *a):
        return x

    def wants(self, name):
        return False


_NO_POINTS = _NoPoints()


class WeightError(ValueError):
    """Missing, unexpected or wrongly shaped tensors for a config."""


class InputError(ValueError):
    """Bad token ids or prompt (empty, out of the vocabulary, past the context)."""


def _no_media(kw: dict) -> None:
    """The decoder's forward takes no media: say where they go (and name any other unknown argument)."""
    if kw.get("images") or kw.get("audio"):
        raise InputError("images/audio go through the LanguageModel (wb.load(...).forward / .generate), which "
                         "holds the media towers; the text decoder takes token ids")
    extra = sorted(k for k, v in kw.items() if k not in ("images", "audio") or v)
    if extra:
        raise TypeError(f"forward() got unexpected keyword argument(s) {extra}")


@dataclass
class ForwardOutput:
    logits: np.ndarray | None
    taps: dict[str, np.ndarray] = field(default_factory=dict)


def expected_shapes(cfg: GemmaConfig) -> dict[str, tuple]:
    """The canonical tensors a config needs, with their shapes."""
    D, V, H = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    s = {"embed_tokens.weight": (V, D), "norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (V, D)
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        hd, kv, F = cfg.head_dim(i), cfg.num_kv_heads(i), cfg.intermediate(i)
        s[p + "input_layernorm.weight"] = (D,)
        s[p + "pre_feedforward_layernorm.weight"] = (D,)
        if cfg.has_post_norms:
            s[p + "post_attention_layernorm.weight"] = (D,)
            s[p + "post_feedforward_layernorm.weight"] = (D,)
        s[p + "self_attn.q_proj.weight"] = (H * hd, D)
        s[p + "self_attn.o_proj.weight"] = (D, H * hd)
        if cfg.has_qk_norm:
            s[p + "self_attn.q_norm.weight"] = (hd,)
        if not cfg.kv_shared(i):
            s[p + "self_attn.k_proj.weight"] = (kv * hd, D)
            if not cfg.k_eq_v(i):
                s[p + "self_attn.v_proj.weight"] = (kv * hd, D)
            if cfg.has_qk_norm:
                s[p + "self_attn.k_norm.weight"] = (hd,)
        s[p + "mlp.gate_proj.weight"] = (F, D)
        s[p + "mlp.up_proj.weight"] = (F, D)
        s[p + "mlp.down_proj.weight"] = (D, F)
        if cfg.has_layer_scalar:
            s[p + "layer_scalar"] = (1,)
        if cfg.has_ple:
            P = cfg.hidden_size_per_layer_input
            s[p + "per_layer_input_gate.weight"] = (P, D)
            s[p + "per_layer_projection.weight"] = (D, P)
            s[p + "post_per_layer_input_norm.weight"] = (D,)
        if cfg.arch == "gemma4" and cfg.enable_moe_block:
            E, Fm = cfg.num_experts, cfg.moe_intermediate_size
            s[p + "router.proj.weight"] = (E, D)
            s[p + "router.scale"] = (D,)
            s[p + "router.per_expert_scale"] = (E,)
            s[p + "experts.gate_up_proj"] = (E, 2 * Fm, D)
            s[p + "experts.down_proj"] = (E, D, Fm)
            for n in ("post_feedforward_layernorm_1", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2"):
                s[p + n + ".weight"] = (D,)
    if cfg.has_ple:
        L, P = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        s["embed_tokens_per_layer.weight"] = (cfg.vocab_size_per_layer_input, L * P)
        s["per_layer_model_projection.weight"] = (L * P, D)
        s["per_layer_projection_norm.weight"] = (P,)
    return s


_NORM_SUFFIXES = ("layernorm.weight", "norm.weight", "_norm.weight")


def check_tensors(cfg: GemmaConfig, tensors: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Validate names and shapes against the config; returns the text-model tensors. Never invents
    a missing tensor."""
    want = expected_shapes(cfg)
    t = dict(tensors)
    if "lm_head.weight" in t and cfg.tie_word_embeddings:
        head = t.pop("lm_head.weight")
        emb = t.get("embed_tokens.weight")
        if emb is not None and (head.shape != emb.shape or not np.array_equal(head, emb)):
            raise WeightError(f"{where}: lm_head.weight differs from embed_tokens.weight but the config says "
                              "tie_word_embeddings=true; set it to false to use the separate head")
    if cfg.arch == "gemma4":   # HF drops k/v weights of KV-shared layers on load; so do we
        for i in range(cfg.num_hidden_layers):
            if cfg.kv_shared(i):
                for n in ("k_proj.weight", "v_proj.weight", "k_norm.weight"):
                    t.pop(f"layers.{i}.self_attn.{n}", None)
    text = {k: v for k, v in t.items() if not k.startswith(MEDIA_PREFIXES)}
    missing = sorted(set(want) - set(text))
    if missing:
        raise WeightError(f"{where}: {len(missing)} tensor(s) the config needs are missing: {missing[:6]}"
                          f"{' ...' if len(missing) > 6 else ''} — the checkpoint does not match its config.json "
                          "(or is incomplete); nothing is initialised at random")
    extra = sorted(set(text) - set(want))
    if extra:
        raise WeightError(f"{where}: {len(extra)} unexpected tensor(s) for this config: {extra[:6]}"
                          f"{' ...' if len(extra) > 6 else ''} — config.json and the weights disagree "
                          "(wrong model_type, layer count or Gemma 4 sharing settings?)")
    for k, shp in want.items():
        got = tuple(text[k].shape)
        if k.endswith("layer_scalar") and got in ((), (1,)):
            continue
        if got != tuple(shp):
            raise WeightError(f"{where}: tensor {k!r} has shape {got}, expected {tuple(shp)} from the config")
    return text


class Gemma:
    """The text decoder of one Gemma model on one backend and dtype: token ids (or input embeddings) -> logits,
    with taps, hooks and the KV cache. ``workbench.load`` wraps it in a :class:`workbench.lm.LanguageModel`
    (tokenizer, media towers, generate); the pass is public in three steps: ``embed``, ``forward_embeds``,
    ``unembed``."""

    def __init__(self, config: GemmaConfig, tensors: dict[str, np.ndarray], ops, where: str = "checkpoint"):
        self.config = cfg = config
        self.ops = ops
        self.dtype = ops.dtype
        self.backend = ops.spec.name
        text = check_tensors(cfg, tensors, where)
        self._nan_check(text, where)
        off = cfg.norm_offset
        acc = "float64" if ops.dtype == "float64" else "float32"
        w = {}
        for k, v in text.items():
            v = v if getattr(v, "is_quantized", False) else np.asarray(v)   # GGUF blocks kept (backends/quant.py)
            if self._is_norm(k):
                # Gemma 1-3 scale by (1 + w): fold the offset once, in float32/64 as HF computes it
                w[k] = ops.asarray(v.astype(np.float64) + off, dtype=acc)
            elif k.endswith(("layer_scalar", "router.scale", "router.per_expert_scale")):
                w[k] = ops.asarray(v.reshape(-1) if k.endswith("layer_scalar") else v)
            else:
                w[k] = ops.asarray(v)
        self._fuse(w)
        self.w = w
        self.n_params = int(sum(int(np.prod(v.shape)) for v in text.values()))
        self.weight_bytes = self.n_params * {"float64": 8, "float32": 4}.get(ops.dtype, 2)
        if any(getattr(v, "is_quantized", False) for v in text.values()):    # the blocks' own bytes
            self.weight_bytes = int(sum(v.nbytes if getattr(v, "is_quantized", False) else
                                        np.prod(v.shape) * 4 for v in text.values()))
        self._inv_freq = [cfg.rope(i).inv_freq(np.float64) for i in range(cfg.num_hidden_layers)]
        self.where = where
        self.perturb = None     # test-only fault injection: fn(layer, name, x) -> x

    def _fuse(self, w):
        """One matmul for q/k/v and one for gate/up per layer (one GEMV instead of three or two at decode);
        the outputs are sliced, so every tap sees exactly what the separate projections give."""
        cfg, ops = self.config, self.ops
        for i in range(cfg.num_hidden_layers):
            a = f"layers.{i}.self_attn."
            parts = [a + "q_proj.weight"] + ([] if cfg.kv_shared(i) else [a + "k_proj.weight"]) + \
                ([] if cfg.kv_shared(i) or cfg.k_eq_v(i) else [a + "v_proj.weight"])
            w[a + "qkv_proj.weight"] = ops.concat([w.pop(n) for n in parts], 0)
            m = f"layers.{i}.mlp."
            w[m + "gate_up_proj.weight"] = ops.concat([w.pop(m + "gate_proj.weight"), w.pop(m + "up_proj.weight")], 0)

    def _qkv(self, i, h, B, T, joint=False):
        """q [B, T, H, hd], k, v [B, T, kvh, hd] (views of one product); joint: (q and k as one [B, T, H + kvh, hd]
        view, v) — for one norm and one RoPE call over both."""
        cfg, ops = self.config, self.ops
        H, hd, kvh = cfg.num_attention_heads, cfg.head_dim(i), cfg.num_kv_heads(i)
        y = ops.linear(h, self.w[f"layers.{i}.self_attn.qkv_proj.weight"])
        q = ops.reshape(y[..., :H * hd], (B, T, H, hd))
        if cfg.kv_shared(i):
            return q, None, None
        k = ops.reshape(y[..., H * hd:(H + kvh) * hd], (B, T, kvh, hd))
        v = k if cfg.k_eq_v(i) else ops.reshape(y[..., (H + kvh) * hd:], (B, T, kvh, hd))
        if joint:
            return ops.reshape(y[..., :(H + kvh) * hd], (B, T, H + kvh, hd)), v
        return q, k, v

    def _qk_norm_weight(self, i):
        """q_norm's and k_norm's weights as one [H + kvh, hd] (a row per head), rebuilt when ``w``'s change
        (``plan_weights``)."""
        cfg, ops, p = self.config, self.ops, f"layers.{i}.self_attn."
        qn, kn = self.w[p + "q_norm.weight"], self.w[p + "k_norm.weight"]
        memo = self.__dict__.setdefault("_qk_w", {})
        hit = memo.get(i)
        if hit is None or hit[0] is not qn or hit[1] is not kn:
            hd = cfg.head_dim(i)
            rows = [ops.reshape(qn, (1, hd))] * cfg.num_attention_heads + [ops.reshape(kn, (1, hd))] * cfg.num_kv_heads(i)
            hit = memo[i] = (qn, kn, ops.concat(rows, 0))
        return hit[2]

    @staticmethod
    def _is_norm(k: str) -> bool:
        return k.endswith(("norm.weight",)) or "layernorm" in k

    @staticmethod
    def _nan_check(text, where):
        for k, v in text.items():
            if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
                raise WeightError(f"{where}: tensor {k!r} contains NaN or inf")

    # ------------------------------------------------------------------ public
    def tap_names(self) -> list[str]:
        return point_names(self.config)

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache(self, batch=batch, max_len=max_len)

    def check_ids(self, ids) -> np.ndarray:
        if isinstance(ids, str):
            raise InputError("the text decoder takes token ids; a text prompt goes through the LanguageModel "
                             "(wb.load), which holds the tokenizer")
        a = np.asarray(ids)
        if a.size == 0:
            raise InputError("empty prompt: at least one token id is needed")
        if not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"token ids must be integers, got dtype {a.dtype}")
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2:
            raise InputError(f"token ids must be [T] or [B, T], got shape {a.shape}")
        bad = (a < 0) | (a >= self.config.vocab_size)
        if bad.any():
            j = tuple(np.argwhere(bad)[0])
            raise InputError(f"token id {int(a[j])} at position {j} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        return a.astype(np.int64)

    def forward(self, ids, taps=None, hooks=None, cache: KVCache | None = None, last_only: bool = False,
                **mm) -> ForwardOutput:
        """Run token ids [T] or [B, T] through the decoder.

        taps: names or wildcard patterns (``blocks.*.hook_resid_post``); hooks: {pattern: fn(np, name)}.
        cache: a KVCache to continue from (prefill/decode); last_only: logits of the last position only.
        Text prompts and media go through :class:`workbench.lm.LanguageModel` (tokenizer, towers)."""
        _no_media(mm)
        a = self.check_ids(ids)
        B, T = a.shape
        start = cache.offset if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.max_position_embeddings
        if start + T > limit:
            raise ContextOverflow(f"prompt of {T} tokens at position {start} needs {start + T} positions but the "
                                  f"{'cache' if cache is not None else 'model context'} holds {limit}")
        pts = Points(self.config, taps, hooks)
        logits = self._forward(a, pts, cache, start, last_only)
        if cache is not None:
            cache.offset = start + T
        out = None
        if logits is not None:
            out = self.ops.numpy(logits)
            if out.dtype != np.float64:
                out = out.astype(np.float32)
        return ForwardOutput(logits=out, taps=pts.values)

    __call__ = forward

    # ------------------------------------------------------------------ the pass, in three public steps
    def embed(self, ids):
        """Token ids ([B, T] numpy or backend ids) -> the scaled input embeddings [B, T, D] (backend array)."""
        if isinstance(ids, np.ndarray):
            ids = self.ops.asids(ids)
        return self.ops.scale(self.ops.take_rows(self.w["embed_tokens.weight"], ids), self.config.embed_scale)

    def forward_embeds(self, x, ple_ids, pts: Points | None = None, cache: KVCache | None = None, start: int = 0,
                       last_only: bool = False, extra_mask=None):
        """The pass from input embeddings ``x`` [B, T, D] (``embed``'s, or with media rows merged in) at positions
        ``start``.. -> logits (backend array; the cache's offset is left to the caller). ple_ids [B, T]: backend
        ids for Gemma 4's per-layer token embedding (the pad id at media positions); pts: tap/hook points
        (:class:`workbench.model.taps.Points`; none: no taps); extra_mask: numpy bool [T, T], pairs also allowed
        on sliding layers (Gemma 4 bidirectional attention within an image)."""
        return self._forward_embeds(x, ple_ids, pts if pts is not None else _NO_POINTS, cache, start, last_only,
                                    extra_mask=extra_mask)

    def unembed(self, x, pts: Points | None = None):
        """Final norm, head and final softcap: residual-stream vectors [..., D] (backend array) -> logits [..., V].
        pts: tap points, visited at ``ln_final.hook_normalized`` (between the norm and the head)."""
        cfg, ops, w = self.config, self.ops, self.w
        h = ops.rms_norm(x, w["norm.weight"], cfg.rms_norm_eps)
        if pts is not None:
            h = pts.visit(ops, "ln_final.hook_normalized", h)
        y = ops.linear(h, w.get("lm_head.weight", w["embed_tokens.weight"]))
        return ops.softcap(y, cfg.final_logit_softcapping) if cfg.final_logit_softcapping else y

    def _forward(self, a: np.ndarray, pts: Points, cache, start: int, last_only: bool):
        ids = self.ops.asids(a)
        return self._forward_embeds(self.embed(ids), ids, pts, cache, start, last_only)

    def _forward_embeds(self, x, ple_ids, pts: Points, cache, start: int, last_only: bool, extra_mask=None):
        """The pass from input embeddings on. x [B, T, D]: scaled token embeddings (the multimodal runner merges
        media rows into them); ple_ids [B, T] backend ids for PLE's token-identity lookup (media positions carry
        the pad id); extra_mask: numpy bool [T, T] over this call's positions, extra pairs allowed on sliding
        layers (Gemma 4 bidirectional attention within an image), still inside the window."""
        cfg, ops, w = self.config, self.ops, self.w
        T = x.shape[1]
        x = pts.visit(ops, "hook_embed", x)
        ple = self._per_layer_inputs(ple_ids, x) if cfg.has_ple else None
        positions = np.arange(start, start + T, dtype=np.int64)
        shared: dict[int, tuple] = {}
        for i in range(cfg.num_hidden_layers):
            x = self._block(i, x, positions, pts, cache, shared, ple, extra_mask)
        x = ops.rms_norm(x, w["norm.weight"], cfg.rms_norm_eps)
        if last_only:
            x = x[:, -1:]
        x = pts.visit(ops, "ln_final.hook_normalized", x)
        head = w.get("lm_head.weight", w["embed_tokens.weight"])
        logits = ops.linear(x, head)
        if cfg.final_logit_softcapping:
            logits = ops.softcap(logits, cfg.final_logit_softcapping)
        logits = pts.visit(ops, "logits", logits)
        return logits

    def _per_layer_inputs(self, ids, x):
        """Gemma 4 PLE: token-identity embedding + projection of the main embedding, per layer."""
        cfg, ops, w = self.config, self.ops, self.w
        L, P = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        B, T = x.shape[0], x.shape[1]
        tok = ops.scale(ops.take_rows(w["embed_tokens_per_layer.weight"], ids), math.sqrt(P))
        tok = ops.reshape(tok, (B, T, L, P))
        proj = ops.linear(x, w["per_layer_model_projection.weight"]) * (cfg.hidden_size ** -0.5)
        proj = ops.rms_norm(ops.reshape(proj, (B, T, L, P)), w["per_layer_projection_norm.weight"], cfg.rms_norm_eps)
        return (proj + tok) * (2.0 ** -0.5)

    def _block(self, i, x, positions, pts: Points, cache, shared, ple, extra_mask=None):
        cfg, ops, w = self.config, self.ops, self.w
        p = f"layers.{i}."
        b = f"blocks.{i}."
        eps = cfg.rms_norm_eps
        x = pts.visit(ops, b + "hook_resid_pre", x)
        h = ops.rms_norm(x, w[p + "input_layernorm.weight"], eps)
        h = pts.visit(ops, b + "ln1.hook_normalized", h)
        attn = self._attention(i, h, positions, pts, cache, shared, extra_mask)
        if cfg.has_post_norms:
            attn = ops.rms_norm(attn, w[p + "post_attention_layernorm.weight"], eps)
        attn = self._perturb(i, "hook_attn_out", attn)
        attn = pts.visit(ops, b + "hook_attn_out", attn)
        x = x + attn
        x = pts.visit(ops, b + "hook_resid_mid", x)

        h = ops.rms_norm(x, w[p + "pre_feedforward_layernorm.weight"], eps)
        h = pts.visit(ops, b + "ln2.hook_normalized", h)
        m = self._mlp(i, h, pts)
        if cfg.arch == "gemma4" and cfg.enable_moe_block:
            m = ops.rms_norm(m, w[p + "post_feedforward_layernorm_1.weight"], eps)
            m = m + self._moe(i, x, pts)
        if cfg.has_post_norms:
            m = ops.rms_norm(m, w[p + "post_feedforward_layernorm.weight"], eps)
        m = self._perturb(i, "hook_mlp_out", m)
        m = pts.visit(ops, b + "hook_mlp_out", m)
        x = x + m
        if ple is not None:
            pin = pts.visit(ops, b + "hook_ple_in", ple[:, :, i, :])
            g = ops.gelu(ops.linear(x, w[p + "per_layer_input_gate.weight"]),
                         approximate=cfg.hidden_activation != "gelu")
            g = ops.linear(g * pin, w[p + "per_layer_projection.weight"])
            g = ops.rms_norm(g, w[p + "post_per_layer_input_norm.weight"], eps)
            g = pts.visit(ops, b + "hook_ple_out", g)
            x = x + g
        if cfg.has_layer_scalar:
            x = x * w[p + "layer_scalar"]
        x = self._perturb(i, "hook_resid_post", x)
        x = pts.visit(ops, b + "hook_resid_post", x)
        return x

    def _perturb(self, i, name, x):
        return self.perturb(i, name, x) if self.perturb is not None else x

    def _attention(self, i, h, positions, pts: Points, cache, shared, extra_mask=None):
        cfg, ops, w = self.config, self.ops, self.w
        p = f"layers.{i}.self_attn."
        b = f"blocks.{i}.attn."
        B, T = h.shape[0], h.shape[1]
        H, hd = cfg.num_attention_heads, cfg.head_dim(i)
        eps = cfg.rms_norm_eps
        inv = self._inv_freq[i]
        if cache is not None and cache.static:
            return self._attention_static(i, h, positions, cache, shared)
        start = int(positions[0])
        tap_t = lambda a: a.transpose(_BTHD)  # noqa: E731  [B,H,T,D] -> tap layout [B,T,H,D]

        if cfg.kv_shared(i):
            q, _, _ = self._qkv(i, h, B, T)
            if cfg.has_qk_norm:
                q = ops.rms_norm(q, w[p + "q_norm.weight"], eps)
            q = ops.rope(ops.transpose(q, _BTHD), inv, start)
            q = pts.visit(ops, b + "hook_q", q, tap_t, tap_t)
            K, V, kpos = shared[cfg.kv_source(i)]
        else:
            # q and k side by side in the product: one norm (a weight row per head) and one RoPE for both
            qk, v = self._qkv(i, h, B, T, joint=True)
            if cfg.has_qk_norm:
                qk = ops.rms_norm(qk, self._qk_norm_weight(i), eps)
            qk = ops.rope(ops.transpose(qk, _BTHD), inv, start)
            q, k = qk[:, :H], qk[:, H:]
            q = pts.visit(ops, b + "hook_q", q, tap_t, tap_t)
            if cfg.has_v_norm:
                v = ops.rms_norm(v, None, eps)
            v = ops.transpose(v, _BTHD)
            k = pts.visit(ops, b + "hook_k", k, tap_t, tap_t)
            v = pts.visit(ops, b + "hook_v", v, tap_t, tap_t)
            lc = cache.layers[i] if cache is not None else None
            if lc is None:
                K, V, kpos = k, v, positions
            elif lc.one_tensor:
                # k_eq_v: store V only; K = rope(V * k_norm.w) is the same tensor up to rounding
                _, V, kpos = lc.update(None, v, positions)
                if self._hooked_kv(pts, i):
                    raise NotImplementedError("hooks on hook_k of a k_eq_v layer with a cache")
                Kn = V * ops.cast(w[p + "k_norm.weight"], None) if cfg.has_qk_norm else V
                K = ops.rope(Kn, inv, 0)
            else:
                K, V, kpos = lc.update(k, v, positions)
            shared[i] = (K, V, kpos)

        mask = self._mask(i, positions, kpos, extra_mask)
        z, probs = ops.attention(q, K, V, mask, cfg.attn_scale(i), cfg.attn_logit_softcapping,
                                 want_probs=pts.wants(f"blocks.{i}.attn.hook_pattern"))
        if probs is not None:
            pts.visit(ops, b + "hook_pattern", probs)
        z = pts.visit(ops, b + "hook_z", z, tap_t, tap_t)
        z = ops.reshape(ops.transpose(z, _BTHD), (B, T, H * hd))
        return ops.all_reduce(ops.linear(z, w[p + "o_proj.weight"]))   # tensor parallel: sum of head shards

    def _attention_static(self, i, h, pos, cache, shared):
        """One decode token against the preallocated cache, with the position as a device tensor: no host
        sync, fixed shapes, so torch.compile / CUDA graphs and mx.compile can capture the step. Same math as
        ``_attention`` (tested: the fast path's greedy tokens equal the plain path's)."""
        cfg, ops, w = self.config, self.ops, self.w
        p = f"layers.{i}.self_attn."
        B = h.shape[0]
        H, hd = cfg.num_attention_heads, cfg.head_dim(i)
        eps = cfg.rms_norm_eps
        plan = shared.get("plan")
        tab = plan.layers[i].rope if plan is not None else cache.rope_tables[i]
        memo = shared.setdefault("memo", {})  # this step's values that all layers of a kind share
        rkey = ("rope", cache.rope_key[i]) if plan is None else ("rope", id(tab[1]))
        cs = memo.get(rkey)
        if cs is None:
            cs = memo[rkey] = ops.rope_rows(tab, pos)
        q, k_raw, v = self._qkv(i, h, B, 1)
        if cfg.has_qk_norm:
            q = ops.rms_norm(q, w[p + "q_norm.weight"], eps)
        q = ops.rope_apply(ops.transpose(q, _BTHD), cs)
        if cfg.kv_shared(i):
            K, V, kpos = shared[cfg.kv_source(i)]
        else:
            if cfg.has_v_norm:
                v = ops.rms_norm(v, None, eps)
            v = ops.transpose(v, _BTHD)
            lc = cache.layers[i]
            if lc.one_tensor:
                V, kpos = lc.update_static(None, v, pos)
                Kn = V * ops.cast(w[p + "k_norm.weight"], None) if cfg.has_qk_norm else V
                K = ops.rope_at(Kn, tab, kpos)
            else:
                k = ops.rms_norm(k_raw, w[p + "k_norm.weight"], eps) if cfg.has_qk_norm else k_raw
                k = ops.rope_apply(ops.transpose(k, _BTHD), cs)
                K, V, kpos = lc.update_static(k, v, pos)
            shared[i] = (K, V, kpos)
        # the slot positions of every cache of the same size hold the same values (all are written at the
        # same positions), so one mask per (slots, window) serves all those layers
        mkey = ("mask", kpos.shape[0], cfg.sliding_window(i))
        mask = memo.get(mkey)
        if mask is None:
            mask = memo[mkey] = ops.decode_mask(kpos, pos, cfg.sliding_window(i))
        z = ops.decode_attention(q, K, V, mask, cfg.attn_scale(i), cfg.attn_logit_softcapping)
        z = ops.reshape(ops.transpose(z, _BTHD), (B, 1, H * hd))
        return ops.all_reduce(ops.linear(z, w[p + "o_proj.weight"]))   # tensor parallel: sum of head shards

    def decode_step(self, tok, pos, cache, plan=None, pts=None):
        """The generic fast decode step: token ids [B, 1] and position [1] as backend arrays, a static cache;
        returns last-position logits [B, V] as a backend array (nothing leaves the device).
        plan: a :class:`workbench.decode.plan.DecodePlan` whose weights and RoPE tables the step reads instead
        of the model's own (the same arrays unless a test injected a fault into it); pts: tap points (capture)."""
        if plan is not None:
            with self.plan_weights(plan):
                return self._decode_step(tok, pos, cache, plan, pts)
        return self._decode_step(tok, pos, cache, None, pts)

    def _decode_step(self, tok, pos, cache, plan, pts):
        cfg, ops, w = self.config, self.ops, self.w
        x = self.embed(tok)
        ple = self._per_layer_inputs(tok, x) if cfg.has_ple else None
        shared: dict = {}   # layer -> its K/V for KV-sharing consumers; 'memo' -> per-step values
        if plan is not None:
            shared["plan"] = plan
        pts = pts or _NO_POINTS
        for i in range(cfg.num_hidden_layers):
            x = self._block(i, x, pos, pts, cache, shared, ple)
        x = ops.rms_norm(x, w["norm.weight"], cfg.rms_norm_eps)
        x = pts.visit(ops, "ln_final.hook_normalized", x)
        logits = ops.linear(x[:, -1], w.get("lm_head.weight", w["embed_tokens.weight"]))
        if cfg.final_logit_softcapping:
            logits = ops.softcap(logits, cfg.final_logit_softcapping)
        return logits

    # ------------------------------------------------------------------ the decode plan
    def decode_plan(self, cache):
        """The :class:`~workbench.decode.plan.DecodePlan` of this model over a static cache: weights by role,
        per-layer flags from the config's accessors, the cache's buffers. The only place that maps the model's
        internal (fused) weight names to roles."""
        from ..decode.plan import DecodePlan, LayerPlan
        cfg, w = self.config, self.w
        if not cache.static:
            cache.begin_static()
        layers = []
        for i in range(cfg.num_hidden_layers):
            p, a = f"layers.{i}.", f"layers.{i}.self_attn."
            layers.append(LayerPlan(
                index=i, head_dim=cfg.head_dim(i), kv_heads=cfg.num_kv_heads(i), intermediate=cfg.intermediate(i),
                window=cfg.sliding_window(i), scale=float(cfg.attn_scale(i)),
                qkv=w[a + "qkv_proj.weight"], o=w[a + "o_proj.weight"], gate_up=w[p + "mlp.gate_up_proj.weight"],
                down=w[p + "mlp.down_proj.weight"], input_norm=w[p + "input_layernorm.weight"],
                pre_ff_norm=w[p + "pre_feedforward_layernorm.weight"],
                post_attn_norm=w.get(p + "post_attention_layernorm.weight"),
                post_ff_norm=w.get(p + "post_feedforward_layernorm.weight"),
                q_norm=w.get(a + "q_norm.weight"), k_norm=w.get(a + "k_norm.weight"),
                kv=cache.layers[i], rope=tuple(cache.rope_tables[i])))
        return DecodePlan(layers=layers, embed=w["embed_tokens.weight"], embed_scale=float(cfg.embed_scale),
                          final_norm=w["norm.weight"], head=w.get("lm_head.weight", w["embed_tokens.weight"]),
                          hidden=cfg.hidden_size, n_heads=cfg.num_attention_heads, vocab=cfg.vocab_size,
                          eps=float(cfg.rms_norm_eps), attn_softcap=cfg.attn_logit_softcapping,
                          final_softcap=cfg.final_logit_softcapping, dtype=self.ops.dtype, ops=self.ops, cache=cache)

    _PLAN_ROLES = {"qkv": "self_attn.qkv_proj.weight", "o": "self_attn.o_proj.weight",
                   "gate_up": "mlp.gate_up_proj.weight", "down": "mlp.down_proj.weight",
                   "input_norm": "input_layernorm.weight", "pre_ff_norm": "pre_feedforward_layernorm.weight",
                   "post_attn_norm": "post_attention_layernorm.weight",
                   "post_ff_norm": "post_feedforward_layernorm.weight", "q_norm": "self_attn.q_norm.weight",
                   "k_norm": "self_attn.k_norm.weight"}

    @contextlib.contextmanager
    def plan_weights(self, plan):
        """Within the block, the generic pass reads the plan's weights (a plan with an injected fault makes the
        generic routes see it too)."""
        saved = self.w
        w = dict(saved)
        for lay in plan.layers:
            for role, name in self._PLAN_ROLES.items():
                v = getattr(lay, role)
                if v is not None:
                    w[f"layers.{lay.index}.{name}"] = v
        w["embed_tokens.weight"] = plan.embed
        w["norm.weight"] = plan.final_norm
        if "lm_head.weight" in saved:
            w["lm_head.weight"] = plan.head
        self.w = w
        try:
            yield
        finally:
            self.w = saved

    def cached_step(self, tok, cache, pts=None):
        """One token [B, 1] (a backend array, e.g. the previous step's pick) through the plain cached pass at
        ``cache.offset``; returns last-position logits [B, V] as a backend array and moves the offset on. MLX's
        queued decode route (the next step built while this one runs)."""
        start = cache.offset
        if start + 1 > cache.max_len:
            raise ContextOverflow(f"position {start} is past the cache's {cache.max_len} positions")
        logits = self._forward_embeds(self.embed(tok), tok, pts or _NO_POINTS, cache, start, True)
        cache.offset = start + 1
        return logits[:, -1]

    @staticmethod
    def _hooked_kv(pts, i):
        return f"blocks.{i}.attn.hook_k" in pts.hooked

    def _mask(self, i, qpos: np.ndarray, kpos: np.ndarray, extra=None):
        """Boolean [T, S] mask from absolute positions: causal, sliding window (W keys including the
        query itself, HF's ``kv > q - W``), bidirectional where the config says so; empty slots masked.
        ``extra`` [T, T] (this call's positions): pairs also allowed on sliding layers — Gemma 4's
        use_bidirectional_attention="vision" (HF create_masks_for_vision_model: full layers stay causal)."""
        cfg = self.config
        win = cfg.sliding_window(i)
        T, S = len(qpos), len(kpos)
        if cfg.causal and (extra is None or not cfg.is_sliding(i)) and S >= T and kpos[0] >= 0 and \
                kpos[-1] == qpos[-1] and kpos[-1] - kpos[0] == S - 1 and (S < 3 or np.all(np.diff(kpos) == 1)):
            # consecutive keys ending at the last query: described, not built (flash / is_causal, banded windows)
            if T == 1 and (win is None or S <= win):
                return None
            return CausalMask(win)
        d = qpos[:, None] - kpos[None, :]
        ok = kpos[None, :] >= 0
        if cfg.causal:
            allow = d >= 0
            if extra is not None and cfg.is_sliding(i):
                j = kpos - qpos[0]
                inside = (j >= 0) & (j < len(qpos))
                blk = np.zeros((len(qpos), len(kpos)), dtype=bool)
                blk[:, inside] = extra[:, j[inside]]
                allow = allow | blk
            ok = ok & allow
            if win is not None:
                ok = ok & (d < win)
        elif win is not None:
            ok = ok & (np.abs(d) <= win)   # HF: |q - k| <= the halved window
        if ok.all():
            return None
        return self.ops.asmask(ok)

    def _mlp(self, i, h, pts):
        cfg, ops, w = self.config, self.ops, self.w
        p = f"layers.{i}.mlp."
        F = cfg.intermediate(i)
        gu = ops.linear(h, w[p + "gate_up_proj.weight"])
        a = ops.gelu(gu[..., :F], approximate=cfg.hidden_activation != "gelu") * gu[..., F:]
        a = pts.visit(ops, f"blocks.{i}.mlp.hook_post", a)
        return ops.all_reduce(ops.linear(a, w[p + "down_proj.weight"]))   # tensor parallel: sum of shards

    def _moe(self, i, res, pts):
        """Gemma 4 MoE branch on the pre-MLP residual: router (scale-free norm, scale, softmax, top-k,
        renormalise, per-expert scale) and experts on pre_feedforward_layernorm_2(res)."""
        cfg, ops, w = self.config, self.ops, self.w
        p = f"layers.{i}."
        b = f"blocks.{i}.moe."
        eps = cfg.rms_norm_eps
        E, k = cfg.num_experts, cfg.top_k_experts
        r = ops.rms_norm(res, None, eps) * w[p + "router.scale"] * (cfg.hidden_size ** -0.5)
        probs = ops.softmax_f32(ops.linear(r, w[p + "router.proj.weight"]))
        probs = pts.visit(ops, b + "hook_router_probs", probs)
        topv, topi = ops.topk(probs, k)
        topv = topv / topv.sum(-1, keepdims=True) if ops.framework == "mlx" else topv / topv.sum(-1, keepdim=True)
        if pts.active and b + "hook_expert_ids" in pts.tapped:
            pts.values[b + "hook_expert_ids"] = np.asarray(ops.numpy(topi)).astype(np.int64)
        scale = w[p + "router.per_expert_scale"]
        topv = topv * (scale[topi] if ops.framework == "mlx" else scale[topi])
        topv = pts.visit(ops, b + "hook_expert_weights", topv)
        xin = ops.rms_norm(res, w[p + "pre_feedforward_layernorm_2.weight"], eps)
        gu, dn = w[p + "experts.gate_up_proj"], w[p + "experts.down_proj"]
        Fm = cfg.moe_intermediate_size
        out = None
        topv = ops.cast(topv, None)
        for e in range(E):
            # dense over tokens: weight is zero where expert e is not among a token's top-k
            sel = (topi == e)
            we = (topv * ops.cast(sel, None)).sum(-1, keepdims=True) if ops.framework == "mlx" else \
                (topv * sel.to(topv.dtype)).sum(-1, keepdim=True)
            g_u = ops.linear(xin, gu[e])
            a = ops.gelu(g_u[..., :Fm], approximate=cfg.hidden_activation != "gelu") * g_u[..., Fm:]
            y = ops.linear(a, dn[e]) * we
            out = y if out is None else out + y
        out = ops.all_reduce(out)   # tensor parallel: each rank holds a slice of every expert
        out = ops.rms_norm(out, w[p + "post_feedforward_layernorm_2.weight"], eps)
        out = pts.visit(ops, b + "hook_out", out)
        return out
