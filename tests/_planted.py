"""Ten bugs planted in the shared model at run time (issue 14): each one is what a plausible slip in
``workbench.config`` / ``workbench.model`` would do, applied by patching the config's accessors, so the
float64 reference AND every backend run the same wrong model — which cross-backend parity cannot see and
the HF anchor must.

``planted(name)`` is a context manager (patch on enter, restore on exit); ``applies(name, cfg)`` says whether
a bug changes anything for a config (a bug that is a no-op there, e.g. ``query_pre_attn_scalar`` equal to the
head dim, is not a bug for that model). Where a bug bites only for long prompts (the sliding window), the
caller must give a prompt longer than the window: ``min_prompt(cfg)``.
"""
from __future__ import annotations

import contextlib

from workbench.config import GemmaConfig, RopeSpec

BUGS = ["norm_w", "qpas_ignored", "window_plus_one", "rope_linear_dropped", "attn_softcap_dropped",
        "final_softcap_dropped", "eps_x100", "embed_scale_1pct", "g4_scores_inv_sqrt_d", "g4_norms_1_plus_w"]

DESCRIPTION = {
    "norm_w": "Gemma 1-3 RMSNorm scales by w instead of (1 + w)",
    "qpas_ignored": "query_pre_attn_scalar ignored (scores scaled by 1/sqrt(head_dim))",
    "window_plus_one": "sliding window one key too wide",
    "rope_linear_dropped": "RoPE linear scaling factor dropped",
    "attn_softcap_dropped": "attention logit softcap dropped",
    "final_softcap_dropped": "final logit softcap dropped",
    "eps_x100": "RMSNorm eps x100",
    "embed_scale_1pct": "embedding scale sqrt(hidden) 1% off",
    "g4_scores_inv_sqrt_d": "Gemma 4 attention scores scaled by 1/sqrt(head_dim) (QK-norm already scales)",
    "g4_norms_1_plus_w": "Gemma 4 RMSNorm scales by (1 + w) instead of w",
}


def applies(name: str, cfg: GemmaConfig) -> bool:
    L = range(cfg.num_hidden_layers)
    g4 = cfg.arch == "gemma4"
    if name == "norm_w":
        return not g4
    if name == "qpas_ignored":
        return not g4 and cfg.query_pre_attn_scalar is not None and \
            any(float(cfg.query_pre_attn_scalar) != cfg.head_dim(i) for i in L)
    if name == "window_plus_one":
        return any(cfg.is_sliding(i) for i in L)
    if name == "rope_linear_dropped":
        return any(cfg.rope(i).rope_type == "linear" and cfg.rope(i).factor != 1.0 for i in L)
    if name == "attn_softcap_dropped":
        return bool(cfg.attn_logit_softcapping)
    if name == "final_softcap_dropped":
        return bool(cfg.final_logit_softcapping)
    if name in ("eps_x100", "embed_scale_1pct"):
        return True
    if name in ("g4_scores_inv_sqrt_d", "g4_norms_1_plus_w"):
        return g4
    raise KeyError(name)


def min_prompt(cfg: GemmaConfig) -> int:
    """A prompt length at which every bug that applies bites: 3x the sliding window (at least 24)."""
    return max(24, 3 * (cfg.sliding_window_ or 0))


def _patch_instance(mutate):
    orig = GemmaConfig.__dict__["from_dict"]

    def from_dict(cls, d, where="config"):
        cfg = orig.__func__(cls, d, where)
        mutate(cfg)
        return cfg
    return "from_dict", orig, classmethod(from_dict)


@contextlib.contextmanager
def planted(name: str):
    """Patch GemmaConfig so every model built while inside behaves with bug ``name``."""
    patches = []   # (owner, attr, original, replacement)
    C = GemmaConfig
    if name == "norm_w":
        orig = C.__dict__["norm_offset"]
        patches.append((C, "norm_offset", orig, property(lambda self: 0.0)))
    elif name == "g4_norms_1_plus_w":
        orig = C.__dict__["norm_offset"]
        patches.append((C, "norm_offset", orig, property(lambda self: 1.0)))
    elif name == "qpas_ignored":
        orig = C.__dict__["attn_scale"]
        patches.append((C, "attn_scale", orig,
                        lambda self, i: 1.0 if self.arch == "gemma4" else float(self.head_dim(i)) ** -0.5))
    elif name == "g4_scores_inv_sqrt_d":
        orig = C.__dict__["attn_scale"]
        patches.append((C, "attn_scale", orig, lambda self, i: float(self.head_dim(i)) ** -0.5
                        if self.arch == "gemma4" else orig(self, i)))
    elif name == "window_plus_one":
        orig = C.__dict__["sliding_window"]
        patches.append((C, "sliding_window", orig,
                        lambda self, i: None if orig(self, i) is None else orig(self, i) + 1))
    elif name == "rope_linear_dropped":
        orig = C.__dict__["rope"]

        def rope(self, i):
            r = orig(self, i)
            return RopeSpec(r.rope_type, r.theta, 1.0, r.partial_rotary_factor, r.head_dim) \
                if r.rope_type == "linear" else r
        patches.append((C, "rope", orig, rope))
    elif name == "embed_scale_1pct":
        orig = C.__dict__["embed_scale"]
        patches.append((C, "embed_scale", orig, property(lambda self: orig.fget(self) * 1.01)))
    elif name in ("attn_softcap_dropped", "final_softcap_dropped", "eps_x100"):
        def mutate(cfg):
            if name == "attn_softcap_dropped":
                cfg.attn_logit_softcapping = None
            elif name == "final_softcap_dropped":
                cfg.final_logit_softcapping = None
            else:
                cfg.rms_norm_eps = cfg.rms_norm_eps * 100
        attr, orig, new = _patch_instance(mutate)
        patches.append((C, attr, orig, new))
    else:
        raise KeyError(f"unknown planted bug {name!r}; known: {', '.join(BUGS)}")
    for owner, attr, _, new in patches:
        setattr(owner, attr, new)
    try:
        yield
    finally:
        for owner, attr, orig, _ in reversed(patches):
            setattr(owner, attr, orig)
