"""Interpretability on any backend, through the model's public surface: prompts -> token ids and labels, the
logit lens, attention patterns, numpy ablation and patching hooks, and their effects measured across backends.

Everything here goes through ``model.forward`` with taps and hooks (hook functions are plain numpy, so an
intervention written once behaves the same on every backend); the logit lens also needs the final norm and
the head (``unembed``).

    from workbench import interp
    lens = interp.logit_lens(model, "The capital of France is", k=5)
    curve = interp.patch_logit_diff(model, clean_ids, corrupt_ids, target=tok_a, foil=tok_b)
"""
from __future__ import annotations

import json
from typing import Callable, Iterable

import numpy as np


class PromptError(ValueError):
    """A prompt this model cannot take (text for a model without a tokenizer, ids outside its vocabulary)."""


# ============================================================================ prompts
def as_prompt(prompt):
    """A parameter prompt: text, a list of token ids, or a JSON/comma string of ids -> text or list[int]."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        s = prompt.strip()
        if s.startswith("[") and s.endswith("]"):
            try:
                return [int(i) for i in json.loads(s)]
            except (ValueError, TypeError):
                return prompt
        if s and all(p.strip().lstrip("-").isdigit() for p in s.split(",")) and "," in s:
            return [int(p) for p in s.split(",")]
        return prompt
    return [int(i) for i in np.asarray(prompt).reshape(-1)]


def token_ids(model, prompt, max_tokens: int | None = None) -> list[int]:
    """Token ids for a prompt: ids pass through; text goes through the model's tokenizer."""
    p = as_prompt(prompt)
    if p is None:
        from .parity import DEFAULT_PROMPT
        p = DEFAULT_PROMPT
    if isinstance(p, str):
        if model.tokenizer is None:
            raise PromptError(f"{getattr(model, 'source', 'this model')} has no tokenizer: pass the prompt as "
                              "token ids (a list of ints)")
        p = list(model.tokenizer.encode(p))
    return p[:max_tokens] if max_tokens else p


def token_labels(model, ids: Iterable[int]) -> list[str]:
    """Readable labels for token ids: the decoded piece where there is a tokenizer, else #id."""
    out = []
    tok = getattr(model, "tokenizer", None)
    for i in ids:
        i = int(i)
        s = None
        if tok is not None:
            try:
                s = tok.decode([i])
            except Exception:
                s = None
        out.append(repr(s)[1:-1] if s is not None else f"#{i}")
    return out


# ============================================================================ logit lens
def unembed(model, resid: np.ndarray) -> np.ndarray:
    """ln_final + head (+ final softcap) applied to residual-stream vectors [..., D] -> float32 logits: the model's
    own ``unembed`` (its final norm and head, on its backend; ``LanguageModel.unembed`` / ``Gemma.unembed``)."""
    lg = model.unembed(model.ops.asarray(np.asarray(resid, dtype=np.float32)))
    return np.asarray(lg if isinstance(lg, np.ndarray) else model.ops.numpy(lg), dtype=np.float32)


def logit_lens(model, ids, k: int = 5, positions=None, layers=None, out=None):
    """Top-k tokens per layer: the final norm and the head applied to each layer's hook_resid_post.

    Returns a DataFrame (layer, position, rank, token_id, token, logit, prob); layer == n_layers is the
    model's own output (so the last lens layer matches the logits). ``out``: a forward output that already
    has blocks.*.hook_resid_post and logits (else one forward is run)."""
    import pandas as pd
    ids = token_ids(model, ids) if not isinstance(ids, np.ndarray) else ids.reshape(-1).tolist()
    L = model.config.num_hidden_layers
    if out is None:
        out = model.forward(ids, taps=["blocks.*.hook_resid_post"])
    T = len(ids)
    pos = list(range(T)) if positions is None else [p % T for p in np.atleast_1d(positions)]
    lay = list(range(L)) if layers is None else [int(i) for i in np.atleast_1d(layers)]
    rows = []
    for i in lay + [L]:
        if i == L:
            lg = np.asarray(out.logits, dtype=np.float32)[0, pos]
        else:
            lg = unembed(model, out.taps[f"blocks.{i}.hook_resid_post"][0, pos])
        z = lg - lg.max(-1, keepdims=True)
        pr = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        kk = min(k, lg.shape[-1])
        part = np.argpartition(-lg, kk - 1, axis=-1)[:, :kk]
        top = np.take_along_axis(part, np.argsort(-np.take_along_axis(lg, part, -1), axis=-1), -1)
        for j, p in enumerate(pos):
            labels = token_labels(model, top[j])
            for r, t in enumerate(top[j]):
                rows.append(dict(layer=i, position=p, rank=r, token_id=int(t), token=labels[r],
                                 logit=float(lg[j, t]), prob=float(pr[j, t])))
    return pd.DataFrame(rows)


def lens_table(lens, position: int, value: str = "token"):
    """layers x rank table of the lens at one position (token labels with probabilities)."""
    d = lens[lens["position"] == position].copy()
    d["cell"] = d["token"] + " (" + (100 * d["prob"]).round(1).astype(str) + "%)"
    t = d.pivot(index="layer", columns="rank", values="cell" if value == "token" else value)
    t.index = [("out" if i == lens["layer"].max() else str(i)) for i in t.index]
    return t


# ============================================================================ attention
def attention_patterns(model, ids, layers=None) -> dict[int, np.ndarray]:
    """{layer: pattern [H, T, S]} from blocks.{i}.attn.hook_pattern (batch 0)."""
    L = model.config.num_hidden_layers
    lay = range(L) if layers is None else [int(i) for i in np.atleast_1d(layers)]
    out = model.forward(token_ids(model, ids), taps=[f"blocks.{i}.attn.hook_pattern" for i in lay])
    return {i: out.taps[f"blocks.{i}.attn.hook_pattern"][0] for i in lay}


# ============================================================================ interventions
def ablation_hook(mode: str = "zero", positions=None, heads=None) -> Callable:
    """A hook that ablates its point: mode "zero" or "mean" (mean over positions), optionally only at some
    positions (axis 1) and, for attn.hook_z/q/k/v ([B, T, H, D]), some heads (axis 2). Plain numpy, so the
    same function works on every backend."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"ablation mode {mode!r}: use 'zero' or 'mean'")

    def hook(x, name):
        y = np.asarray(x)
        if heads is not None and y.ndim != 4:
            raise ValueError(f"heads= needs a [B, T, H, D] point (attn.hook_z/q/k/v), not {name}")
        mask = np.ones(y.shape[:3] if heads is not None else y.shape[:2], dtype=bool)
        if positions is not None:
            keep = np.zeros(y.shape[1], dtype=bool)
            keep[np.atleast_1d(positions)] = True
            mask &= keep.reshape((1, -1) + (1,) * (mask.ndim - 2))
        if heads is not None:
            hk = np.zeros(y.shape[2], dtype=bool)
            hk[np.atleast_1d(heads)] = True
            mask &= hk.reshape(1, 1, -1)
        mask = mask.reshape(mask.shape + (1,) * (y.ndim - mask.ndim))
        fill = 0.0 if mode == "zero" else y.mean(axis=1, keepdims=True)
        return np.where(mask, fill, y).astype(y.dtype)
    hook.__qualname__ = f"ablation_hook({mode!r}, positions={positions}, heads={heads})"
    return hook


def patch_hook(source: np.ndarray, positions=None) -> Callable:
    """Activation patching: replace the point's value (at ``positions``, or everywhere) with ``source``
    (the same point tapped on another input)."""
    src = np.asarray(source)

    def hook(x, name):
        if src.shape != x.shape:
            raise ValueError(f"patch for {name}: source shape {src.shape} != {x.shape}")
        y = np.array(x, copy=True)
        if positions is None:
            y[...] = src
        else:
            p = np.atleast_1d(positions)
            y[:, p] = src[:, p]
        return y
    return hook


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def logsm(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, lq = logsm(np.asarray(p_logits, np.float64)), logsm(np.asarray(q_logits, np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def intervention(models: dict, ids, hooks: dict, position: int = -1):
    """Run the same hooks on every model (one per backend) and measure their effect.

    Returns (per_backend DataFrame, cross DataFrame, logits dict). per_backend: the effect of the hooks on
    each backend (max|Δlogit| at ``position``, KL(clean‖hooked), top-1 before/after). cross: for each pair of
    backends, how far apart their hooked logits and their effects (hooked - clean) are — an intervention
    written once in numpy should give the same answer everywhere, up to float32 rounding."""
    import pandas as pd
    rows, logits = [], {}
    ids_l = None
    for b, m in models.items():
        ids_l = token_ids(m, ids) if ids_l is None else ids_l
        last = position % len(ids_l) == len(ids_l) - 1      # only the last position's logits are needed
        p = -1 if last else position
        clean = np.asarray(m.forward(ids_l, last_only=last).logits, np.float64)[0, p]
        hooked = np.asarray(m.forward(ids_l, hooks=hooks, last_only=last).logits, np.float64)[0, p]
        logits[b] = (clean, hooked)
        t_clean, t_hooked = int(np.argmax(clean)), int(np.argmax(hooked))
        lab = token_labels(m, [ids_l[position % len(ids_l)], t_clean, t_hooked])
        rows.append(dict(backend=b, dtype=m.dtype, hooks=", ".join(hooks), position=position % len(ids_l),
                         token=lab[0], effect_max_abs=float(np.abs(hooked - clean).max()), kl=_kl(clean, hooked),
                         top1_clean=t_clean, top1_clean_token=lab[1], top1_hooked=t_hooked,
                         top1_hooked_token=lab[2], top1_changed=t_clean != t_hooked))
    cross = []
    names = list(models)
    for a_i in range(len(names)):
        for b_i in range(a_i + 1, len(names)):
            a, b = names[a_i], names[b_i]
            (ca, ha), (cb, hb) = logits[a], logits[b]
            ea, eb = ha - ca, hb - cb
            scale = max(np.abs(ha).max(), 1e-30)
            escale = max(np.abs(ea).max(), 1e-30)
            cross.append(dict(a=a, b=b, hooked_max_abs=float(np.abs(ha - hb).max()),
                              hooked_rel=float(np.abs(ha - hb).max() / scale),
                              effect_max_abs=float(np.abs(ea - eb).max()),
                              effect_rel=float(np.abs(ea - eb).max() / escale),
                              same_top1=bool(np.argmax(ha) == np.argmax(hb))))
    return pd.DataFrame(rows), pd.DataFrame(cross), logits


def patching_sweep(model, clean_ids, corrupt_ids, tap: str = "hook_resid_pre", position: int | None = None):
    """Activation patching over layers: for each layer, patch ``blocks.{i}.<tap>`` of the clean run (at
    ``position``, default all) with the corrupted run's value; report KL(clean‖patched) at the last position
    and how much of the corrupted run's shift it restores (1 = patched output equals the corrupted one)."""
    import pandas as pd
    L = model.config.num_hidden_layers
    clean_ids, corrupt_ids = token_ids(model, clean_ids), token_ids(model, corrupt_ids)
    if len(clean_ids) != len(corrupt_ids):
        raise ValueError("clean and corrupted prompts must have the same length")
    names = [f"blocks.{i}.{tap}" for i in range(L)]
    cor = model.forward(corrupt_ids, taps=names, last_only=True)
    clean = np.asarray(model.forward(clean_ids, last_only=True).logits, np.float64)[0, -1]
    corrupt = np.asarray(cor.logits, np.float64)[0, -1]
    base = _kl(clean, corrupt)
    rows = []
    for i, n in enumerate(names):
        out = model.forward(clean_ids, hooks={n: patch_hook(cor.taps[n], positions=position)}, last_only=True)
        pl = np.asarray(out.logits, np.float64)[0, -1]
        kl = _kl(clean, pl)
        rows.append(dict(layer=i, tap=tap, position=position, kl_clean_patched=kl, kl_clean_corrupt=base,
                         restored=kl / base if base > 0 else float("nan"), top1=int(np.argmax(pl))))
    return pd.DataFrame(rows)




def logit_diff(logits: np.ndarray, target: int, foil: int) -> float:
    """logit[target] - logit[foil] of the last position of [..., V] logits."""
    z = np.asarray(logits, np.float64).reshape(-1, np.shape(logits)[-1])[-1]
    return float(z[int(target)] - z[int(foil)])


def logit_pair(model, clean_ids, corrupt_ids) -> tuple[int, int]:
    """A default (target, foil) for patching: the clean run's top-1 next token and the corrupted run's (its
    second choice if both agree)."""
    a = np.asarray(model.forward(token_ids(model, clean_ids), last_only=True).logits, np.float64)[0, -1]
    b = np.asarray(model.forward(token_ids(model, corrupt_ids), last_only=True).logits, np.float64)[0, -1]
    t = int(np.argmax(a))
    order = np.argsort(-b)
    return t, int(order[0] if order[0] != t else order[1])


def corrupt_prompt(ids, position: int, vocab_size: int) -> list[int]:
    """The prompt with the token at ``position`` replaced by the next id (mod the vocabulary)."""
    out = list(ids)
    p = position % len(out)
    out[p] = (int(out[p]) + 1) % vocab_size
    return out


def patch_logit_diff(model, clean_ids, corrupt_ids, target: int | None = None, foil: int | None = None,
                     tap: str = "hook_resid_pre", position: int | None = None, layers=None):
    """Activation patching from a clean run into a corrupted one, per layer.

    For each layer i, the corrupted prompt runs with ``blocks.{i}.<tap>`` (at ``position``, default every
    position) replaced by its value on the clean prompt, and the logit difference ``logit[target] -
    logit[foil]`` at the last position is measured. ``restored`` = (patched - corrupted) / (clean -
    corrupted): 1 means the patch brings the clean run's difference back, 0 that it does nothing. target/foil
    default to ``logit_pair``. Returns a DataFrame (layer, tap, position, target, foil, logit_diff,
    clean_diff, corrupt_diff, restored)."""
    import pandas as pd
    clean_ids, corrupt_ids = token_ids(model, clean_ids), token_ids(model, corrupt_ids)
    if len(clean_ids) != len(corrupt_ids):
        raise ValueError(f"clean ({len(clean_ids)} tokens) and corrupted ({len(corrupt_ids)} tokens) prompts "
                         "must have the same length")
    if target is None or foil is None:
        t, f = logit_pair(model, clean_ids, corrupt_ids)
        target, foil = (t if target is None else target), (f if foil is None else foil)
    L = model.config.num_hidden_layers
    lay = list(range(L)) if layers is None else [int(i) % L for i in np.atleast_1d(layers)]
    names = {i: f"blocks.{i}.{tap}" for i in lay}
    clean = model.forward(clean_ids, taps=list(names.values()), last_only=True)
    d_clean = logit_diff(clean.logits, target, foil)
    d_corrupt = logit_diff(model.forward(corrupt_ids, last_only=True).logits, target, foil)
    span = d_clean - d_corrupt
    rows = []
    for i, n in names.items():
        out = model.forward(corrupt_ids, hooks={n: patch_hook(clean.taps[n], positions=position)}, last_only=True)
        d = logit_diff(out.logits, target, foil)
        rows.append(dict(layer=i, tap=tap, position=position, target=int(target), foil=int(foil), logit_diff=d,
                         clean_diff=d_clean, corrupt_diff=d_corrupt,
                         restored=(d - d_corrupt) / span if abs(span) > 1e-12 else float("nan")))
    return pd.DataFrame(rows)
