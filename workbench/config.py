"""GemmaConfig: one configuration for Gemma 1, 2, 3 and 4, with per-layer accessors.

The model never reads raw config fields; it asks the accessors (``head_dim(i)``, ``num_kv_heads(i)``,
``rope(i)``, ``sliding_window(i)``, ``kv_source(i)``, ``attn_scale(i)`` ...), so per-layer differences
(Gemma 2's alternation, Gemma 3's 5:1 pattern, Gemma 4's diverging head shapes and KV sharing) live here
and only here.

Parsers: Hugging Face ``config.json`` for model types ``gemma``, ``gemma2``, ``gemma3_text``, ``gemma3``
(nested ``text_config``), ``gemma4_text`` and ``gemma4`` (nested); GGUF metadata arrives through
``workbench.weights.gguf`` already shaped like an HF config dict.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SLIDING = "sliding_attention"
FULL = "full_attention"

ARCHS = {
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "gemma4_text": "gemma4",
    "gemma4": "gemma4",
}
NESTED = {"gemma3", "gemma4"}


class ConfigError(ValueError):
    """A config that cannot describe a Gemma model (unknown type, missing or contradictory fields)."""


@dataclass(frozen=True)
class RopeSpec:
    """RoPE for one layer. ``inv_freq`` has head_dim/2 entries (zeros for pairs that do not rotate, as in
    HF's proportional RoPE); pairs are (i, i + head_dim/2) (NeoX ``rotate_half`` layout)."""

    rope_type: str
    theta: float
    factor: float
    partial_rotary_factor: float
    head_dim: int

    def inv_freq(self, dtype=np.float64) -> np.ndarray:
        d = self.head_dim
        if self.rope_type == "proportional":
            # transformers' _compute_proportional_rope_parameters: denominator is the FULL head dim,
            # the first int(p*d//2) angles rotate, the rest are zero.
            n = int(self.partial_rotary_factor * d // 2)
            inv = 1.0 / (self.theta ** (np.arange(0, 2 * n, 2, dtype=np.float64) / d))
            inv = np.concatenate([inv, np.zeros(d // 2 - n)])
        else:
            rot = int(d * self.partial_rotary_factor)
            inv = 1.0 / (self.theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
            if rot < d:
                inv = np.concatenate([inv, np.zeros(d // 2 - rot // 2)])
        return (inv / self.factor).astype(dtype)


def _get(d: dict, key: str, where: str, default: Any = ...):
    if key in d and d[key] is not None:
        return d[key]
    if default is ...:
        raise ConfigError(f"{where}: missing required field '{key}'")
    return default


@dataclass
class GemmaConfig:
    arch: str                       # "gemma" | "gemma2" | "gemma3" | "gemma4"
    model_type: str                 # the HF model_type the config came from
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim_: int
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    layer_types: list[str] = field(default_factory=list)
    sliding_window_: int | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    rope_parameters: dict[str, dict] = field(default_factory=dict)
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0
    # Gemma 4
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = False
    use_bidirectional_attention: str | None = None
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int | None = None
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    per_layer_overrides: dict[int, dict] = field(default_factory=dict)
    # everything else from the source (multimodal sub-configs, token ids ...)
    raw: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_file(cls, path: str | Path) -> "GemmaConfig":
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise ConfigError(f"{p}: no config.json here (a Hugging Face checkpoint dir needs one)")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        return cls.from_dict(d, where=str(p))

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "GemmaConfig":
        mt = d.get("model_type")
        if mt not in ARCHS:
            raise ConfigError(
                f"{where}: unknown model_type {mt!r}; supported: {', '.join(sorted(ARCHS))}"
                " (Gemma 1-4 causal LMs)")
        arch = ARCHS[mt]
        raw = dict(d)
        if mt in NESTED:
            tc = d.get("text_config")
            if not isinstance(tc, dict):
                raise ConfigError(f"{where}: model_type {mt!r} needs a nested 'text_config' object")
            t = dict(tc)
            where = f"{where} [text_config]"
        else:
            t = dict(d)
        g = lambda k, default=...: _get(t, k, where, default)  # noqa: E731

        hidden = int(g("hidden_size"))
        heads = int(g("num_attention_heads"))
        L = int(g("num_hidden_layers"))
        head_dim = int(g("head_dim", hidden // heads))
        kv = int(g("num_key_value_heads", heads))
        act = t.get("hidden_activation") or t.get("hidden_act") or "gelu_pytorch_tanh"
        if arch == "gemma" and t.get("hidden_activation") is None:
            act = "gelu_pytorch_tanh"  # HF Gemma 1 forces the tanh approximation when unset
        cfg = cls(
            arch=arch, model_type=mt,
            vocab_size=int(g("vocab_size")), hidden_size=hidden,
            intermediate_size=int(g("intermediate_size")), num_hidden_layers=L,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim_=head_dim,
            rms_norm_eps=float(g("rms_norm_eps", 1e-6)), hidden_activation=act,
            max_position_embeddings=int(g("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", True))),
            bos_token_id=t.get("bos_token_id", d.get("bos_token_id", 2)),
            eos_token_id=t.get("eos_token_id", d.get("eos_token_id", 1)),
            pad_token_id=t.get("pad_token_id", d.get("pad_token_id", 0)),
            raw=raw,
        )
        if arch == "gemma":
            cfg.layer_types = [FULL] * L
            cfg.rope_parameters = {FULL: _rope_from(t, default_theta=10000.0)}
        elif arch == "gemma2":
            cfg.layer_types = list(t.get("layer_types") or
                                   [SLIDING if (i + 1) % 2 else FULL for i in range(L)])
            cfg.sliding_window_ = int(g("sliding_window", 4096))
            cfg.attn_logit_softcapping = t.get("attn_logit_softcapping")
            cfg.final_logit_softcapping = t.get("final_logit_softcapping")
            cfg.query_pre_attn_scalar = float(g("query_pre_attn_scalar", head_dim))
            rp = _rope_from(t, default_theta=10000.0)
            cfg.rope_parameters = {FULL: rp, SLIDING: dict(rp)}
        elif arch == "gemma3":
            pattern = int(t.get("sliding_window_pattern") or 6)
            cfg.layer_types = list(t.get("layer_types") or
                                   [SLIDING if (i + 1) % pattern else FULL for i in range(L)])
            cfg.sliding_window_ = int(g("sliding_window", 4096))
            cfg.attn_logit_softcapping = t.get("attn_logit_softcapping")
            cfg.final_logit_softcapping = t.get("final_logit_softcapping")
            cfg.query_pre_attn_scalar = float(g("query_pre_attn_scalar", head_dim))
            cfg.use_bidirectional_attention = "all" if t.get("use_bidirectional_attention") else None
            cfg.rope_parameters = _gemma3_rope(t)
        else:
            _parse_gemma4(cfg, t, where)
        cfg.validate(where)
        return cfg

    # ------------------------------------------------------------------ checks
    def validate(self, where: str = "config") -> None:
        L = self.num_hidden_layers
        if L <= 0 or self.hidden_size <= 0 or self.num_attention_heads <= 0:
            raise ConfigError(f"{where}: sizes must be positive (layers={L}, hidden={self.hidden_size}, "
                              f"heads={self.num_attention_heads})")
        if len(self.layer_types) != L:
            raise ConfigError(f"{where}: layer_types has {len(self.layer_types)} entries but "
                              f"num_hidden_layers is {L}")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"{where}: unknown layer_types {bad}; expected '{SLIDING}' or '{FULL}'")
        if SLIDING in self.layer_types and not self.sliding_window_:
            raise ConfigError(f"{where}: sliding layers present but 'sliding_window' is not set")
        for i in range(L):
            kvh = self.num_kv_heads(i)
            if kvh <= 0 or self.num_attention_heads % kvh:
                raise ConfigError(f"{where}: layer {i}: num_attention_heads={self.num_attention_heads} is not "
                                  f"a multiple of its num_key_value_heads={kvh}")
            if self.head_dim(i) % 2:
                raise ConfigError(f"{where}: layer {i}: head_dim {self.head_dim(i)} must be even for RoPE")
            if self.layer_type(i) not in self.rope_parameters:
                raise ConfigError(f"{where}: no rope parameters for layer type {self.layer_type(i)!r}")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast"):
            raise ConfigError(f"{where}: unsupported hidden_activation {self.hidden_activation!r}; "
                              "Gemma uses gelu_pytorch_tanh")
        if self.arch == "gemma4":
            n = self.num_kv_shared_layers
            if not 0 <= n <= L:
                raise ConfigError(f"{where}: num_kv_shared_layers={n} outside 0..{L}")
            if 0 < n:
                first = L - n
                producers = set(self.layer_types[:first])
                if producers != set(self.layer_types):
                    raise ConfigError(
                        f"{where}: num_kv_shared_layers={n} leaves layer types "
                        f"{sorted(set(self.layer_types) - producers)} with no earlier layer to share K/V from")
            if self.enable_moe_block:
                for k in ("num_experts", "top_k_experts", "moe_intermediate_size"):
                    if not getattr(self, k):
                        raise ConfigError(f"{where}: enable_moe_block is set but '{k}' is missing")
                if self.top_k_experts > self.num_experts:
                    raise ConfigError(f"{where}: top_k_experts={self.top_k_experts} > num_experts="
                                      f"{self.num_experts}")
            if self.use_bidirectional_attention not in (None, "all", "vision"):
                raise ConfigError(f"{where}: use_bidirectional_attention must be null, 'all' or 'vision', "
                                  f"not {self.use_bidirectional_attention!r}")

    # ------------------------------------------------------------------ per-layer accessors
    def layer_type(self, i: int) -> str:
        return self.layer_types[i]

    def is_sliding(self, i: int) -> bool:
        return self.layer_types[i] == SLIDING

    def head_dim(self, i: int) -> int:
        return int(self.per_layer_overrides.get(i, {}).get("head_dim", self.head_dim_))

    def num_kv_heads(self, i: int) -> int:
        return int(self.per_layer_overrides.get(i, {}).get("num_key_value_heads", self.num_key_value_heads))

    def sliding_window(self, i: int) -> int | None:
        """Number of keys a query sees on a sliding layer (itself included), None on full layers.
        For bidirectional ("all") Gemma 3/4 this is HF's *halved* window W//2+1 and |q - k| <= it."""
        if not self.is_sliding(i):
            return None
        w = self.sliding_window_
        if self.use_bidirectional_attention == "all":
            return w // 2 + 1
        return w

    @property
    def causal(self) -> bool:
        return self.use_bidirectional_attention != "all"

    def rope(self, i: int) -> RopeSpec:
        p = self.rope_parameters[self.layer_type(i)]
        return RopeSpec(rope_type=p.get("rope_type", "default"), theta=float(p["rope_theta"]),
                        factor=float(p.get("factor", 1.0)) if p.get("rope_type", "default") in
                        ("linear", "proportional") else 1.0,
                        partial_rotary_factor=float(p.get("partial_rotary_factor", 1.0)),
                        head_dim=self.head_dim(i))

    def attn_scale(self, i: int) -> float:
        if self.arch == "gemma4":
            return 1.0  # QK-norm replaces 1/sqrt(d)
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        return float(self.head_dim(i)) ** -0.5

    def k_eq_v(self, i: int) -> bool:
        return self.arch == "gemma4" and self.attention_k_eq_v and not self.is_sliding(i)

    def kv_shared(self, i: int) -> bool:
        return self.arch == "gemma4" and self.num_kv_shared_layers > 0 and \
            i >= self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source(self, i: int) -> int:
        """The layer whose K/V this layer attends over: itself, or for KV-shared layers the last
        non-shared layer of the same type."""
        if not self.kv_shared(i):
            return i
        first = self.num_hidden_layers - self.num_kv_shared_layers
        for j in range(first - 1, -1, -1):
            if self.layer_types[j] == self.layer_types[i]:
                return j
        raise ConfigError(f"layer {i}: no non-shared layer of type {self.layer_types[i]!r}")

    def intermediate(self, i: int) -> int:
        if self.use_double_wide_mlp and self.kv_shared(i):
            return 2 * self.intermediate_size
        return self.intermediate_size

    # ------------------------------------------------------------------ model-wide conventions
    @property
    def norm_offset(self) -> float:
        """Gemma 1-3 RMSNorm scales by (1 + w); Gemma 4 by w."""
        return 0.0 if self.arch == "gemma4" else 1.0

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @property
    def has_post_norms(self) -> bool:
        return self.arch != "gemma"

    @property
    def has_qk_norm(self) -> bool:
        return self.arch in ("gemma3", "gemma4")

    @property
    def has_v_norm(self) -> bool:
        return self.arch == "gemma4"

    @property
    def has_layer_scalar(self) -> bool:
        return self.arch == "gemma4"

    @property
    def has_ple(self) -> bool:
        return self.arch == "gemma4" and bool(self.hidden_size_per_layer_input)

    def kv_bytes_per_token(self, bytes_per_el: int) -> int:
        """K/V bytes one token adds to the cache (non-shared layers; k_eq_v layers store one tensor)."""
        tot = 0
        for i in range(self.num_hidden_layers):
            if self.kv_shared(i):
                continue
            per = self.num_kv_heads(i) * self.head_dim(i) * bytes_per_el
            tot += per if self.k_eq_v(i) else 2 * per
        return tot

    def describe(self) -> str:
        lines = [f"{self.arch} ({self.model_type}): {self.num_hidden_layers} layers, hidden {self.hidden_size}, "
                 f"heads {self.num_attention_heads}, vocab {self.vocab_size}"]
        for i in range(self.num_hidden_layers):
            r = self.rope(i)
            extra = []
            if self.kv_shared(i):
                extra.append(f"kv from {self.kv_source(i)}")
            if self.k_eq_v(i):
                extra.append("k_eq_v")
            lines.append(f"  layer {i:2d} {self.layer_type(i):17s} head_dim {self.head_dim(i):3d} "
                         f"kv_heads {self.num_kv_heads(i)} window {self.sliding_window(i)} "
                         f"rope {r.rope_type} θ={r.theta:g} x{r.factor:g} p={r.partial_rotary_factor:g} "
                         f"scale {self.attn_scale(i):.4g} {' '.join(extra)}")
        return "\n".join(lines)


def _rope_from(t: dict, default_theta: float) -> dict:
    rp = t.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        out = dict(rp)
        out.setdefault("rope_type", "default")
        return out
    theta = t.get("rope_theta", default_theta)
    out = {"rope_type": "default", "rope_theta": float(theta)}
    rs = t.get("rope_scaling")
    if isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) not in (None, "default"):
        out.update({k: v for k, v in rs.items() if k != "type"})
        out["rope_type"] = rs.get("rope_type", rs.get("type"))
    return out


def _check_rope_type(rp: dict, where: str, allowed=("default", "linear", "proportional")) -> dict:
    rt = rp.get("rope_type", "default")
    if rt not in allowed:
        raise ConfigError(f"{where}: rope_type {rt!r} is not supported (supported: {', '.join(allowed)})")
    if rt == "linear" and not rp.get("factor"):
        raise ConfigError(f"{where}: linear rope scaling needs a 'factor'")
    if "rope_theta" not in rp:
        raise ConfigError(f"{where}: rope parameters without 'rope_theta'")
    return rp


def _gemma3_rope(t: dict) -> dict:
    rp = t.get("rope_parameters")
    if isinstance(rp, dict) and (SLIDING in rp or FULL in rp):
        full = dict(rp.get(FULL) or {"rope_type": "default"})
        slid = dict(rp.get(SLIDING) or {"rope_type": "default"})
        full.setdefault("rope_theta", float(t.get("rope_theta", 1_000_000.0)))
        slid.setdefault("rope_theta", float(t.get("rope_local_base_freq", 10_000.0)))
    else:
        full = {"rope_type": "default", "rope_theta": float(t.get("rope_theta", 1_000_000.0))}
        rs = t.get("rope_scaling")
        if isinstance(rs, dict):
            full.update({k: v for k, v in rs.items() if k != "type"})
            full["rope_type"] = rs.get("rope_type", rs.get("type", "default"))
        slid = {"rope_type": "default", "rope_theta": float(t.get("rope_local_base_freq", 10_000.0))}
    return {FULL: _check_rope_type(full, "rope_parameters.full_attention"),
            SLIDING: _check_rope_type(slid, "rope_parameters.sliding_attention")}


def _parse_gemma4(cfg: GemmaConfig, t: dict, where: str) -> None:
    L = cfg.num_hidden_layers
    lt = t.get("layer_types")
    if lt is None:
        lt = [SLIDING if (i + 1) % 6 else FULL for i in range(L)]
    lt = list(lt)
    if lt and lt[-1] != FULL:
        raise ConfigError(f"{where}: Gemma 4's last layer must be '{FULL}' (transformers forces it); "
                          f"layer_types ends with {lt[-1]!r}")
    cfg.layer_types = lt
    cfg.sliding_window_ = t.get("sliding_window", 512)
    cfg.final_logit_softcapping = t.get("final_logit_softcapping")
    for k in ("attn_logit_softcapping", "query_pre_attn_scalar"):
        if t.get(k) is not None:
            raise ConfigError(f"{where}: Gemma 4 has no '{k}' (attention scale is 1.0 with QK-norm); "
                              f"remove it or use a Gemma 2/3 model_type")
    ub = t.get("use_bidirectional_attention")
    cfg.use_bidirectional_attention = ub
    cfg.attention_k_eq_v = bool(t.get("attention_k_eq_v", False))
    cfg.hidden_size_per_layer_input = int(t.get("hidden_size_per_layer_input") or 0)
    cfg.vocab_size_per_layer_input = t.get("vocab_size_per_layer_input") or cfg.vocab_size
    cfg.num_kv_shared_layers = int(t.get("num_kv_shared_layers") or 0)
    cfg.use_double_wide_mlp = bool(t.get("use_double_wide_mlp", False))
    cfg.enable_moe_block = bool(t.get("enable_moe_block", False))
    cfg.num_experts = t.get("num_experts")
    cfg.top_k_experts = t.get("top_k_experts")
    cfg.moe_intermediate_size = t.get("moe_intermediate_size")

    rp = t.get("rope_parameters")
    if rp is None:
        rp = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
              FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
    if not isinstance(rp, dict) or any(k not in rp for k in set(lt)):
        raise ConfigError(f"{where}: rope_parameters must have an entry per layer type {sorted(set(lt))}")
    cfg.rope_parameters = {k: _check_rope_type(dict(v), f"{where} rope_parameters.{k}") for k, v in rp.items()
                           if k in (SLIDING, FULL)}

    # Per-layer shapes: either the released checkpoints' flat keys or newer transformers' per_layer_config.
    plc = t.get("per_layer_config")
    flat_hd = t.get("global_head_dim")
    flat_kv = t.get("num_global_key_value_heads")
    overrides: dict[int, dict] = {}
    if plc:
        if not isinstance(plc, dict):
            raise ConfigError(f"{where}: per_layer_config must be an object keyed by layer index")
        for k, v in plc.items():
            try:
                idx = int(k)
            except (TypeError, ValueError):
                if k in (SLIDING, FULL):
                    for i, ty in enumerate(lt):
                        if ty == k:
                            overrides.setdefault(i, {}).update(v)
                    continue
                raise ConfigError(f"{where}: per_layer_config key {k!r} is not a layer index") from None
            if not 0 <= idx < L:
                raise ConfigError(f"{where}: per_layer_config names layer {idx}, but there are {L} layers")
            unknown = set(v) - {"head_dim", "num_key_value_heads"}
            if unknown:
                raise ConfigError(f"{where}: per_layer_config[{idx}] has unsupported keys {sorted(unknown)}")
            overrides[idx] = dict(v)
        # both formats given: they must agree
        for i, ty in enumerate(lt):
            if ty == FULL and flat_hd is not None and overrides.get(i, {}).get("head_dim", cfg.head_dim_) != flat_hd:
                raise ConfigError(f"{where}: global_head_dim={flat_hd} contradicts per_layer_config[{i}] "
                                  f"head_dim={overrides.get(i, {}).get('head_dim', cfg.head_dim_)}")
    else:
        ghd = int(flat_hd if flat_hd is not None else 512)
        for i, ty in enumerate(lt):
            if ty == FULL:
                o = {"head_dim": ghd}
                # HF applies the kv-head override only when attention_k_eq_v is set
                if flat_kv is not None and cfg.attention_k_eq_v:
                    o["num_key_value_heads"] = int(flat_kv)
                overrides[i] = o
    cfg.global_head_dim = int(flat_hd) if flat_hd is not None else None
    cfg.num_global_key_value_heads = int(flat_kv) if flat_kv is not None else None
    cfg.per_layer_overrides = overrides
