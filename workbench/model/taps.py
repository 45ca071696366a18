"""Named tap and hook points (TransformerLens-style names) and the matching of wildcard patterns.

Taps come back as numpy. Hooks are ``fn(value: np.ndarray, name: str) -> np.ndarray | None``: they see and
return numpy, so an intervention written once behaves the same on every backend.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

import numpy as np

Hook = Callable[[np.ndarray, str], "np.ndarray | None"]


def point_names(cfg) -> list[str]:
    """Every tap/hook point of a model with this config, in forward order."""
    names = ["hook_embed"]
    for i in range(cfg.num_hidden_layers):
        b = f"blocks.{i}."
        names += [b + "hook_resid_pre", b + "ln1.hook_normalized", b + "attn.hook_q", b + "attn.hook_k",
                  b + "attn.hook_v", b + "attn.hook_pattern", b + "attn.hook_z", b + "hook_attn_out",
                  b + "hook_resid_mid", b + "ln2.hook_normalized", b + "mlp.hook_post"]
        if cfg.arch == "gemma4" and cfg.enable_moe_block:
            names += [b + "moe.hook_router_probs", b + "moe.hook_expert_ids", b + "moe.hook_expert_weights",
                      b + "moe.hook_out"]
        names += [b + "hook_mlp_out"]
        if cfg.has_ple:
            names += [b + "hook_ple_in", b + "hook_ple_out"]
        names += [b + "hook_resid_post"]
    names += ["ln_final.hook_normalized", "logits"]
    return names


class TapError(KeyError):
    pass


class Points:
    """Which points are tapped and hooked in one forward call."""

    def __init__(self, cfg, taps: Iterable[str] | str | None, hooks: dict[str, Hook] | None):
        self.all = point_names(cfg)
        known = set(self.all)
        if isinstance(taps, str):
            taps = [taps]
        self.tap_patterns = list(taps or [])
        self.hooks = dict(hooks or {})
        for pat in self.tap_patterns + list(self.hooks):
            if not any(fnmatch.fnmatchcase(n, pat) for n in known):
                close = [n for n in self.all if pat.split(".")[-1] in n][:3]
                raise TapError(f"tap/hook {pat!r} matches no point of this model"
                               + (f"; did you mean {close}?" if close else "")
                               + " (list them with model.tap_names())")
        self.tapped = {n for n in self.all if any(fnmatch.fnmatchcase(n, p) for p in self.tap_patterns)}
        self.hooked: dict[str, list[Hook]] = {}
        for pat, fn in self.hooks.items():
            for n in self.all:
                if fnmatch.fnmatchcase(n, pat):
                    self.hooked.setdefault(n, []).append(fn)
        self.active = bool(self.tapped or self.hooked)
        self.values: dict[str, np.ndarray] = {}

    def wants(self, name: str) -> bool:
        return name in self.tapped or name in self.hooked

    def visit(self, ops, name: str, x, to_np=None, from_np=None):
        """Apply hooks to x at point ``name``, record the tap; returns the (possibly replaced) x.
        ``to_np``/``from_np`` convert between the backend layout and the tap layout."""
        if not self.active or (name not in self.tapped and name not in self.hooked):
            return x
        val = ops.numpy(x)
        if to_np is not None:
            val = to_np(val)
        fns = self.hooked.get(name)
        if fns:
            for fn in fns:
                new = fn(val.copy(), name)
                if new is not None:
                    new = np.asarray(new)
                    if new.shape != val.shape:
                        raise ValueError(f"hook on {name!r} returned shape {new.shape}, expected {val.shape}")
                    val = new
            back = from_np(val) if from_np is not None else val
            x = ops.asarray(back.astype(np.float32) if back.dtype != np.float64 else back,
                            dtype=ops.dtype)
        if name in self.tapped:
            self.values[name] = val
        return x
