"""Divergence over a generation: where a backend's greedy continuation parts from the float64 reference, whether
that is a near-tie or a fault, and which layer starts it.

    div = wb.diverge("gemma3-270m", backends=["torch:cpu", "mlx:cpu"], dtypes=["bfloat16"], steps=64)
    div.first_divergence      # earliest differing token over the targets: step, both tokens, the reference's margin
    div.to_frame()            # per target and step: KL(ref || target) over the full vocabulary, top-k overlap, ...
    div.kv_diff               # per target, layer and absolute position: K and V error of the cache
    div.local_error           # per target and layer: the layer's own error beside the error it inherits

What is computed, per target (backend x dtype):

1. **Its own greedy tokens.** ``route="fast"`` (default): the model's public ``generate`` (temperature 0, EOS
   ignored) — whatever decode route it takes, recorded from ``g.stats["route"]``; ``route="plain"``: a plain
   per-token forward loop through the KV cache; ``"both"``: the two, as separate targets (``...@plain``).
2. **Its logits on those tokens**: prefill, then one cached forward per token (the plain loop, teacher-forced on
   the target's own tokens; for the plain route this *is* the generation). The fast route's tokens are checked
   against this loop's argmax (``route_mismatch``).
3. **The reference teacher-forced** on prompt + the target's tokens: one full float64 forward (logits at every
   position, resid taps, its KV cache). The reference also generates its own greedy continuation.

Per step s (token s is chosen from the logits after position P+s-2): KL(ref || target) over the whole vocabulary
(float64 log-softmax), top-k overlap, top-1 agreement, the logits' relative max/L2 error, the reference's margin
between the two candidates (``ref[ref_choice] - ref[target_choice]``; its top-1 minus top-2 where they agree), the
per-layer residual error at the step's input position, both top-k lists with text and probabilities.

The **first differing token** is the first step where the target's token is not the reference's argmax on the same
prefix (before it the prefixes are equal, so this is where the two generations part). It is called a *near-tie*
when the reference's margin is within twice the target's typical logit error on the candidates (the median over
all steps of max |Δlogit| among the reference's top-k), else a *fault*: the target moved a logit by much more than
it usually does. Non-finite logits are their own verdict.

**KV cache** after prefill + N tokens: every layer's K and V per absolute position against the reference's cache
(relative L2 per position). Sliding layers hold a ring of ``sliding_window`` slots: positions are matched by the
absolute position each slot records, evicted ones are absent (NaN). KV-shared layers (Gemma 4) have no cache of
their own and show their source layer's values (``shared_from``); k_eq_v layers store V only (K is rebuilt from
it), so only V is compared there.

**Local versus inherited error** (prefill mode over prompt + the target's tokens): one target forward in which a
hook replaces *every* layer's ``hook_resid_pre`` (and ``hook_ple_in``) with the reference's value cast to the
target dtype, so each layer's ``hook_resid_post`` is that layer's computation on the reference's input — its own
error against the reference's output. Inherited = the error of the target's ordinary full run at the same point.
``input_nonfinite`` counts reference inputs the dtype cannot hold (float16 past 65504); ``overflow`` marks a layer
that turns a representable input into inf/NaN. ``floor`` is the error of merely rounding the reference's output
to the dtype (inf where that output is past the dtype's range: ``ref_unrepresentable`` values, ``ref_absmax``);
a layer whose own error is over ``SUSPECT_RATIO`` x its floor is ``suspect``.

Stored in the results store as kind ``diverge``: one row per (section, target, ...), sections ``step``,
``layer_step``, ``kv``, ``local``; :meth:`Divergence.from_run` rebuilds the object (the dashboard page and the
notebook use it).
"""
from __future__ import annotations

import html
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import backends as _bk
from .parity import _make_fault, _targets, check_target, metrics
from .progress import Progress, ProgressArg

NEAR_TIE_FACTOR = 2.0
# prose, so a greedy continuation has real choices to make (a code/number prompt tends to loop)
DEFAULT_PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
SUSPECT_RATIO = 100.0     # a layer whose own error is this many times its output's rounding floor is suspect
SECTIONS = ("step", "layer_step", "kv", "local")


# ============================================================================================ small numerics
def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    s = z - m
    return s - np.log(np.sum(np.exp(s), axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(x)) over the last axis, in float64. NaN where either side is not finite
    (NaN never passes as a small number)."""
    ref = np.asarray(ref_logits, dtype=np.float64)
    x = np.asarray(logits, dtype=np.float64)
    bad = ~(np.isfinite(ref).all(-1) & np.isfinite(x).all(-1))
    lp = log_softmax(np.where(np.isfinite(ref), ref, 0.0))
    lq = log_softmax(np.where(np.isfinite(x), x, 0.0))
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    kl = np.maximum(kl, 0.0)            # rounding can give -1e-17
    return np.where(bad, np.nan, kl)


def _rel(m: dict) -> float:
    """The relative L2 error of a ``metrics`` dict, inf when the target has NaN or mismatched inf entries (the norm
    itself only sums finite entries, which would make an all-NaN tensor look perfect)."""
    return math.inf if (m["nan_count"] or m["inf_mismatch"]) else m["rel_l2"]


def _topk(z: np.ndarray, k: int) -> np.ndarray:
    z = np.where(np.isfinite(z), z, -np.inf)
    idx = np.argpartition(-z, k - 1)[:k]
    return idx[np.argsort(-z[idx], kind="stable")]


# ============================================================================================ the result
@dataclass
class Divergence:
    """What ``wb.diverge`` found. ``steps``/``layer_steps``/``kv``/``local`` are lists of flat row dicts (the
    stored rows); ``logits`` holds the target and reference logits per step when ``keep_logits=True``."""
    meta: dict
    steps: list[dict] = field(default_factory=list)
    layer_steps: list[dict] = field(default_factory=list)
    kv: list[dict] = field(default_factory=list)
    local: list[dict] = field(default_factory=list)
    logits: dict = field(default_factory=dict)
    run_id: str | None = None

    # ------------------------------------------------------------------ verdicts
    @property
    def targets(self) -> list[str]:
        return list(self.meta.get("targets") or dict.fromkeys(r["target"] for r in self.steps))

    def divergences(self) -> dict[str, dict | None]:
        """Per target: its first differing token (a dict) or None when every step agrees."""
        fd = self.meta.get("first_divergence") or {}
        return {t: fd.get(t) for t in self.targets}

    @property
    def first_divergence(self) -> dict | None:
        """The earliest first differing token over all targets (ties: the first target); None if none."""
        divs = [d for d in self.divergences().values() if d]
        return min(divs, key=lambda d: d["step"]) if divs else None

    # ------------------------------------------------------------------ frames
    def to_frame(self, section: str = "step"):
        """Rows of one section as a DataFrame: ``step`` (default: KL, top-k, margins per target and step),
        ``layer_step`` (per-layer residual error per step), ``kv`` or ``local``."""
        import pandas as pd
        if section not in SECTIONS:
            raise ValueError(f"section must be one of {', '.join(SECTIONS)}, not {section!r}")
        rows = {"step": self.steps, "layer_step": self.layer_steps, "kv": self.kv, "local": self.local}[section]
        df = pd.DataFrame(rows)
        if "section" in df:
            df = df.drop(columns="section")
        return df

    @property
    def kv_diff(self):
        """DataFrame: target, layer, position, k_rel / v_rel (relative L2 per position), ...; see kv_matrix."""
        return self.to_frame("kv")

    @property
    def local_error(self):
        """DataFrame: target, layer, local (the layer's own error), inherited (the full run's), floor, ..."""
        return self.to_frame("local")

    def kv_matrix(self, target: str | None = None, which: str = "k", metric: str = "rel") -> tuple:
        """(layers, positions, matrix [layers x positions]) of one target's KV error; NaN where a slot does not
        hold the position (evicted from a sliding ring) or the layer has no such tensor (k_eq_v: no K)."""
        target = target or self.targets[0]
        rows = [r for r in self.kv if r["target"] == target]
        if not rows:
            raise KeyError(f"no KV rows for target {target!r}; targets: {self.targets}")
        layers = sorted({int(r["layer"]) for r in rows})
        positions = sorted({int(r["position"]) for r in rows})
        li = {v: i for i, v in enumerate(layers)}
        pi = {v: i for i, v in enumerate(positions)}
        mat = np.full((len(layers), len(positions)), np.nan)
        key = f"{which}_{metric}"
        for r in rows:
            v = r.get(key)
            if v is not None:
                mat[li[int(r["layer"])], pi[int(r["position"])]] = float(v)
        return np.array(layers), np.array(positions), mat

    # ------------------------------------------------------------------ text
    def summary(self) -> str:
        m = self.meta
        lines = [f"Divergence of {m.get('model')} from {m.get('reference')} over {m.get('steps')} greedy steps "
                 f"(prompt {m.get('prompt_tokens')} tokens)"]
        ref_text = m.get("reference_text")
        if ref_text is not None:
            lines.append(f"reference continues: {ref_text!r}")
        hdr = (f"{'target':28s} {'route':26s} {'first diff':>10s} {'KL mean':>9s} {'KL max':>9s} {'top1':>5s} "
               f"{'top5 ovl':>8s}  verdict")
        lines += [hdr, "-" * len(hdr)]
        divs = self.divergences()
        for t in self.targets:
            rs = [r for r in self.steps if r["target"] == t]
            info = (m.get("target_info") or {}).get(t, {})
            kl = np.array([r["kl"] for r in rs], dtype=float)
            klm = f"{np.nanmean(kl):9.2e}" if np.isfinite(kl).any() else f"{'nan':>9s}"
            klx = f"{np.nanmax(kl):9.2e}" if np.isfinite(kl).any() else f"{'nan':>9s}"
            top1 = np.mean([bool(r["agree"]) for r in rs]) if rs else float("nan")
            ovl = np.mean([r["topk_overlap"] for r in rs]) if rs else float("nan")
            d = divs.get(t)
            fd = "-" if d is None else f"step {d['step']}"
            verdict = "no differing token" if d is None else d["verdict"]
            lines.append(f"{t:28s} {str(info.get('route') or '-')[:26]:26s} {fd:>10s} {klm} {klx} {top1:5.2f} "
                         f"{ovl:8.2f}  {verdict}")
        for t in self.targets:
            d = divs.get(t)
            if d is None:
                continue
            lines.append(f"{t}: step {d['step']} (position {d['position']}): target {d['token_text']!r} "
                         f"({d['token']}) vs reference {d['ref_token_text']!r} ({d['ref_token']}); reference margin "
                         f"{_fmt(d['ref_margin'])} logits, typical error {_fmt(d['typical_error'])}, "
                         f"KL {_fmt(d['kl'])}")
            lines.append(f"    {d['verdict']}")
            errs = d.get("layer_errors") or []
            if errs:
                worst = max(errs, key=lambda e: _key(e["rel_l2"]))
                lines.append(f"    per-layer resid error at that step: layer 0 {_fmt(errs[0]['rel_l2'])} ... "
                             f"layer {errs[-1]['layer']} {_fmt(errs[-1]['rel_l2'])} (worst layer {worst['layer']})")
        for t in self.targets:
            loc = sorted([r for r in self.local if r["target"] == t], key=lambda r: r["layer"])
            if not loc:
                continue
            over = [r["layer"] for r in loc if r.get("overflow")]
            fin = [r for r in loc if math.isfinite(float(r["local"]))]
            s = f"{t}: layers' own error"
            if fin:
                top = max(fin, key=lambda r: float(r["local"]))
                s += (f" at most {_fmt(top['local'])} (layer {top['layer']}, {_fmt(top.get('local_over_floor'))}x "
                      f"its rounding floor)")
            s += f"; inherited at the last layer {_fmt(loc[-1]['inherited'])}"
            if over:
                s += f"; local overflow (inf/NaN from a representable input) at layer(s) {over}"
            sus = [r["layer"] for r in loc if r.get("suspect") and not r.get("overflow")]
            if sus:
                s += f"; suspect layer(s) {sus} (own error > {SUSPECT_RATIO:g}x the rounding floor)"
            elif not over:
                s += "; no layer stands out"
            lines.append(s)
        for k, why in (m.get("skipped") or {}).items():
            lines.append(f"skipped {k}: {why}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    # ------------------------------------------------------------------ pictures
    def target_steps(self, target: str | None = None) -> list[dict]:
        target = target or self.targets[0]
        return [r for r in self.steps if r["target"] == target]

    def token_strip_html(self, target: str | None = None) -> str:
        """The generated tokens as HTML spans coloured by KL, the first differing one marked, both top-k lists
        in each token's hover title."""
        target = target or self.targets[0]
        d = self.divergences().get(target)
        return token_strip_html(self.target_steps(target), d["step"] if d else None)

    def kl_figure(self, target: str | None = None):
        target = target or self.targets[0]
        d = self.divergences().get(target)
        return kl_figure(self.target_steps(target), d["step"] if d else None, title=f"KL(ref || target) — {target}")

    def kv_figure(self, target: str | None = None):
        return kv_figure(self, target or self.targets[0])

    def local_figure(self, target: str | None = None):
        return local_figure(self, target or self.targets[0])

    def target_table(self):
        import pandas as pd
        return pd.DataFrame(target_table(self))

    # ------------------------------------------------------------------ store
    def rows(self) -> list[dict]:
        out = []
        for sec, rs in (("step", self.steps), ("layer_step", self.layer_steps), ("kv", self.kv),
                        ("local", self.local)):
            out += [dict(section=sec, **r) for r in rs]
        return out

    @classmethod
    def from_run(cls, run) -> "Divergence":
        """Rebuild from a stored run (``RunStore.load(run_id)``) of kind ``diverge``."""
        if getattr(run, "kind", "diverge") != "diverge":
            raise ValueError(f"run {run.run_id} is a {run.kind!r} run, not 'diverge'")
        df = run.rows
        secs: dict[str, list] = {s: [] for s in SECTIONS}
        if len(df):
            for sec, g in df.groupby("section", sort=False):
                g = g.drop(columns="section").dropna(axis=1, how="all")
                recs = g.to_dict("records")
                secs[str(sec)] = [{k: _py(v, k) for k, v in r.items()} for r in recs]
        return cls(meta=dict(run.meta), steps=secs["step"], layer_steps=secs["layer_step"], kv=secs["kv"],
                   local=secs["local"], run_id=run.run_id)


_INT_COLS = {"layer", "step", "position", "token", "ref_token", "ref_own_token", "slot", "shared_from", "nan_count",
             "inf_count", "nonfinite", "k_nonfinite", "v_nonfinite", "input_nonfinite", "local_nonfinite",
             "inherited_nonfinite"}


def _py(v, col: str = ""):
    """A stored cell back as Python: numpy scalars unwrapped; integer columns (which pandas widened to float
    beside other sections' NaN) as int, NaN there as None."""
    if isinstance(v, np.generic):
        v = v.item()
    if col in _INT_COLS and isinstance(v, float):
        return None if math.isnan(v) else (int(v) if v.is_integer() else v)
    return v


def _key(v) -> float:
    v = float(v) if v is not None else float("nan")
    return math.inf if (math.isnan(v) or math.isinf(v)) else v


def _fmt(v) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v:.3g}" if math.isfinite(v) else str(v)


# ============================================================================================ passes
def _resid_taps(cfg) -> list[str]:
    return ["blocks.*.hook_resid_post"]


def _decode_pass(m, prompt: list[int], n: int, tokens: list[int] | None = None, taps=None):
    """Prefill, then one cached forward per token: greedy when ``tokens`` is None (stops early on non-finite
    logits), else teacher-forced on ``tokens``. Every produced token is also fed, so the cache ends holding
    prompt + tokens. Returns (tokens, logits [n, V] float32/64, per-step taps {name: [n, D]}, cache)."""
    P = len(prompt)
    cache = m.new_cache(batch=1, max_len=P + n)
    out = m.forward(np.asarray(prompt, dtype=np.int64)[None], taps=taps, cache=cache, last_only=True)
    toks: list[int] = []
    logits, steps_taps = [], []
    for s in range(n):
        lg = out.logits[0, -1]
        logits.append(lg)
        steps_taps.append({k: v[0, -1] for k, v in out.taps.items()})
        if tokens is not None:
            t = int(tokens[s])
        else:
            if not np.isfinite(lg).any():
                break
            t = int(np.argmax(np.where(np.isfinite(lg), lg, -np.inf)))
        toks.append(t)
        out = m.forward(np.asarray([[t]], dtype=np.int64), taps=taps, cache=cache, last_only=True)
    lgs = np.stack(logits) if logits else np.zeros((0, m.config.vocab_size), np.float32)
    tp = {k: np.stack([st[k] for st in steps_taps]) for k in (steps_taps[0] if steps_taps else {})}
    return toks, lgs, tp, cache


def _cache_arrays(cache) -> list:
    """Per layer: None (KV-shared) or (K [kvh, slots, hd] | None, V [kvh, slots, hd], pos [slots], ring)."""
    out = []
    for c in cache.layers:
        if c is None:
            out.append(None)
            continue
        k = None if c.k is None else np.asarray(c.ops.numpy(c.k), dtype=np.float64)[0]
        v = np.asarray(c.ops.numpy(c.v), dtype=np.float64)[0]
        out.append((k, v, np.asarray(c.pos).copy(), bool(c.ring)))
    return out


def _kv_rows(cfg, ref_kv, tgt_kv, target: str) -> list[dict]:
    rows = []
    for i in range(cfg.num_hidden_layers):
        src = cfg.kv_source(i) if cfg.kv_shared(i) else i
        r, t = ref_kv[src], tgt_kv[src]
        if r is None or t is None:
            continue
        rk, rv, rpos, ring = r
        tk, tv, tpos, _ = t
        rslot = {int(p): s for s, p in enumerate(rpos) if p >= 0}
        tslot = {int(p): s for s, p in enumerate(tpos) if p >= 0}
        for p in sorted(set(rslot) & set(tslot)):
            a, b = rslot[p], tslot[p]
            row = dict(target=target, layer=i, position=p, shared_from=None if src == i else src, ring=ring,
                       slot=b)
            mv = metrics(rv[:, a], tv[:, b])
            row.update(v_rel=_rel(mv), v_rel_max=mv["rel_max"], v_nonfinite=mv["nan_count"] + mv["inf_count"])
            if rk is not None and tk is not None:
                mk = metrics(rk[:, a], tk[:, b])
                row.update(k_rel=_rel(mk), k_rel_max=mk["rel_max"],
                           k_nonfinite=mk["nan_count"] + mk["inf_count"])
            else:
                row.update(k_rel=None, k_rel_max=None, k_nonfinite=None)
            rows.append(row)
    return rows


def _cast_like(m, x: np.ndarray) -> np.ndarray:
    """x rounded to the model's dtype (as a hook's returned value is), back as float64."""
    ops = m.ops
    a = x.astype(np.float32) if m.dtype != "float64" else x
    return np.asarray(ops.numpy(ops.asarray(a, dtype=ops.dtype)), dtype=np.float64)


def _local_rows(m, cfg, seq: np.ndarray, ref_taps: dict, target: str) -> list[dict]:
    """Each layer on the reference's input (all layers substituted in one pass) vs the full run."""
    L = cfg.num_hidden_layers
    post = [f"blocks.{i}.hook_resid_post" for i in range(L)]
    full = m.forward(seq, taps=post)
    hooks = {}
    for i in range(L):
        hooks[f"blocks.{i}.hook_resid_pre"] = (lambda v, n, i=i: ref_taps[f"blocks.{i}.hook_resid_pre"])
        if cfg.has_ple and f"blocks.{i}.hook_ple_in" in ref_taps:
            hooks[f"blocks.{i}.hook_ple_in"] = (lambda v, n, i=i: ref_taps[f"blocks.{i}.hook_ple_in"])
    loc = m.forward(seq, taps=post, hooks=hooks)
    rows = []
    for i in range(L):
        rp = ref_taps[post[i]]
        cin = _cast_like(m, ref_taps[f"blocks.{i}.hook_resid_pre"])
        in_bad = int((~np.isfinite(cin)).sum())
        ml = metrics(rp, loc.taps[post[i]])
        mi = metrics(rp, full.taps[post[i]])
        fl = metrics(rp, _cast_like(m, rp))
        loc_bad = ml["nan_count"] + ml["inf_count"]
        rows.append(dict(target=target, layer=i, local=ml["rel_l2"], local_max=ml["rel_max"],
                         inherited=mi["rel_l2"], inherited_max=mi["rel_max"], floor=_rel(fl),
                         input_nonfinite=in_bad, local_nonfinite=int(loc_bad),
                         inherited_nonfinite=int(mi["nan_count"] + mi["inf_count"]),
                         overflow=bool(loc_bad > 0 and in_bad == 0)))
        lv, fv = rows[-1]["local"], rows[-1]["floor"]
        ratio = math.nan if math.isinf(fv) else (lv / fv if fv > 0 else (0.0 if lv == 0 else math.inf))
        rows[-1]["local_over_floor"] = ratio
        # the reference's own scale there: float16 cannot hold a residual past 65504 however exact the layer
        rows[-1]["ref_absmax"] = float(np.max(np.abs(rp)))
        rows[-1]["ref_unrepresentable"] = int(fl["inf_count"] + fl["nan_count"])
        rows[-1]["suspect"] = bool(rows[-1]["overflow"] or (in_bad == 0 and ratio > SUSPECT_RATIO))
        if loc_bad:          # the norms above use finite entries only: say so in the number
            rows[-1]["local"] = math.inf
        if mi["nan_count"] + mi["inf_count"]:
            rows[-1]["inherited"] = math.inf
    return rows


# ============================================================================================ the engine
def diverge(source="gemma3-270m", backends=None, dtypes=None, prompt: str | list[int] | None = None,
            steps: int = 64, reference: str = "torch:cpu:float64", route: str = "fast", k: int = 5,
            max_tokens: int = 64, fault: dict | None = None, keep_logits: bool = False, db=None,
            store: bool = True, progress: ProgressArg = True) -> Divergence:
    """Each target (backend x dtype) generates ``steps`` tokens greedily; the float64 reference is teacher-forced on
    them and generates its own. See the module docstring for every number. backends: list, comma string or "all";
    dtypes: list or comma string (default bfloat16). route: "fast" (the model's generate), "plain" (a per-token
    forward loop) or "both". fault: test-only perturbation of a target, as in ``wb.compare``
    ({"backend": "torch:cpu", "layer": 3, "tap": "hook_attn_out", "scale": 1e-2}). progress: True prints to
    stderr, a callable gets (step, total, what). Stored as a ``diverge`` run unless store=False."""
    from .loader import Checkpoint, build_model, read_source, source_hash

    if route not in ("fast", "plain", "both"):
        raise ValueError(f"route must be 'fast', 'plain' or 'both', not {route!r}")
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    targets = _targets(backends, dtypes if dtypes is not None else ["bfloat16"])
    routes = ["fast", "plain"] if route == "both" else [route]
    prog = Progress(progress, 2 + 4 * len(targets) * len(routes))

    prog.note(f"loading {source}")
    cfg, tensors, path, tok = read_source(source, dtype="float64", progress=prog.prints)
    if prompt is None:
        if tok is None:
            raise ValueError(f"{source}: this checkpoint has no tokenizer; pass the prompt as token ids")
        prompt = DEFAULT_PROMPT
    if isinstance(prompt, str):
        if tok is None:
            raise ValueError(f"{source}: no tokenizer for a text prompt; pass token ids")
        ids = list(tok.encode(prompt))[:max_tokens]
    else:
        ids = [int(i) for i in np.asarray(prompt).reshape(-1)]
    if not ids:
        raise ValueError("empty prompt: at least one token is needed")
    P = len(ids)
    if P + steps > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({P} tokens) + {steps} steps exceed the model's context "
                         f"({cfg.max_position_embeddings})")
    k = min(k, cfg.vocab_size)
    text = (lambda t: tok.decode([int(t)])) if tok is not None else (lambda t: f"<{int(t)}>")

    def build(ops):   # the one loader
        return build_model(Checkpoint(cfg, tensors, path, tok), ops, source)

    rparts = reference.split(":")
    ref = build(_bk.get_ops(":".join(rparts[:-1]), rparts[-1]))
    ref_tokens, _, _, _ = _decode_pass(ref, ids, steps)
    prog(f"reference {reference}: {len(ref_tokens)} greedy tokens")

    L = cfg.num_hidden_layers
    ref_tap_names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + \
        [f"blocks.{i}.hook_resid_post" for i in range(L)] + \
        ([f"blocks.{i}.hook_ple_in" for i in range(L)] if cfg.has_ple else [])
    ref_memo: dict[tuple, tuple] = {}

    def ref_on(toks: list[int]):
        key = tuple(toks)
        if key not in ref_memo:
            seq = np.asarray(ids + list(toks), dtype=np.int64)[None]
            cache = ref.new_cache(batch=1, max_len=len(ids) + steps)
            out = ref.forward(seq, taps=ref_tap_names, cache=cache)
            ref_memo.clear()           # one sequence at a time (the 270M's logits are 2 MB per position)
            ref_memo[key] = (out.logits[0], out.taps, _cache_arrays(cache))
        return ref_memo[key]

    res = Divergence(meta={})
    skipped: dict[str, str] = {}
    info: dict[str, dict] = {}
    firsts: dict[str, dict | None] = {}
    devices: dict[str, str] = {}
    order: list[str] = []
    for b, d in targets:
        base = f"{b}:{d}"
        try:
            spec, why, d = check_target(b, d)
        except _bk.BackendError as e:
            for r in routes:
                skipped[base + ("" if r == "fast" else "@plain")] = str(e)
                for _ in range(4):
                    prog(f"{base} skipped: {e}")
            continue
        devices[base] = why
        m = build(_bk.get_ops(b, d))
        if fault and _bk.parse(fault["backend"]).name == spec.name and fault.get("dtype", d) == d:
            m.perturb = _make_fault(fault)
        for r in routes:
            key = base + ("" if r == "fast" else "@plain")
            order.append(key)
            t0 = time.perf_counter()
            route_name, route_err = "plain per-token forward", None
            plain_toks = None
            if r == "fast":
                try:
                    g = m.generate(list(ids), max_new_tokens=steps, temperature=0.0, ignore_eos=True)
                    toks = [int(t) for t in g.token_ids]
                    route_name = (g.stats or {}).get("route") or "generate (route not reported)"
                except FloatingPointError as e:       # non-finite logits: the plain loop shows where
                    route_err = str(e)
                    toks = None
            else:
                toks = None
            gen_s = time.perf_counter() - t0
            prog(f"{key}: generated ({route_name})")
            taps = _resid_taps(cfg)
            if toks is None:
                toks, lg, st, cache = _decode_pass(m, ids, steps, None, taps)
                plain_toks = toks
            else:
                _, lg, st, cache = _decode_pass(m, ids, len(toks), toks, taps)
            n = len(toks)
            prog(f"{key}: teacher-forced its own {n} tokens")
            ref_lg, ref_taps, ref_kv = ref_on(toks)
            rlg = ref_lg[P - 1:P - 1 + n]
            if keep_logits:
                res.logits[key] = dict(target=np.asarray(lg[:n], np.float32), reference=np.asarray(rlg),
                                       tokens=list(toks), prompt=list(ids))
            # ---- per step
            srows, lsrows = _step_rows(key, b, d, r, ids, toks, lg, rlg, st, ref_taps, ref_tokens, k, text, L)
            if plain_toks is None and r == "fast":
                am = [int(np.argmax(np.where(np.isfinite(x), x, -np.inf))) for x in lg[:n]]
                mism = [s + 1 for s in range(n) if am[s] != toks[s]]
            else:
                mism = []
            # a non-finite stop: the step that could not choose
            if n < steps and len(lg) > n:
                srows.append(_nonfinite_row(key, b, d, r, P, n, lg[n], ref_lg[P - 1 + n] if P - 1 + n < len(ref_lg)
                                            else None, ref_tokens, k, text))
            res.steps += srows
            res.layer_steps += lsrows
            prog(f"{key}: steps compared")
            # ---- KV cache and local error
            res.kv += _kv_rows(cfg, ref_kv, _cache_arrays(cache), key)
            seq = np.asarray(ids + list(toks), dtype=np.int64)[None]
            lrows = _local_rows(m, cfg, seq, ref_taps, key)
            res.local += lrows
            firsts[key] = _first(srows, lsrows, lrows)
            prog(f"{key}: KV cache and local error")
            info[key] = dict(backend=b, dtype=d, route=route_name, route_error=route_err, generated=n,
                             route_mismatch=mism, generate_s=gen_s, text=tok.decode(toks) if tok else None,
                             tokens=list(toks))
        del m

    meta = dict(model=str(source), source=str(path), source_hash=source_hash(path), reference=reference,
                backends=sorted({b for b, _ in targets}), dtypes=sorted({d for _, d in targets}), steps=steps,
                prompt=prompt if isinstance(prompt, str) else None, prompt_ids=ids, prompt_tokens=P,
                prompt_text=tok.decode(ids) if tok else None, route=route, k=k, targets=order,
                reference_tokens=ref_tokens, reference_text=tok.decode(ref_tokens) if tok else None,
                target_info=info, first_divergence=firsts, skipped=skipped, devices=devices, arch=cfg.arch,
                layers=L, fault=fault, near_tie_factor=NEAR_TIE_FACTOR)
    res.meta = meta
    if store:
        from . import runs
        res.run_id = runs.save_run("diverge", meta, res.rows(), db=db, devices=devices, passed=None,
                                   params=dict(steps=steps, route=route, k=k, fault=fault, reference=reference))
    prog(f"stored run {res.run_id}" if res.run_id else "done")
    return res


def _step_rows(key, b, d, route, ids, toks, lg, rlg, st, ref_taps, ref_tokens, k, text, L):
    P = len(ids)
    n = len(toks)
    kl = kl_divergence(rlg[:n], lg[:n]) if n else np.zeros(0)
    srows, lsrows = [], []
    for s in range(n):
        r, x = np.asarray(rlg[s], np.float64), np.asarray(lg[s], np.float64)
        t = toks[s]
        rt = int(np.argmax(r))
        rk, xk = _topk(r, k), _topk(x, k)
        rlp, xlp = log_softmax(r), log_softmax(np.where(np.isfinite(x), x, 0.0))
        mt = metrics(r, x)
        r2 = np.sort(r)[-2:] if r.size > 1 else np.array([r[0], r[0]])
        xr_fin = np.isfinite(x[rt]) and np.isfinite(x[t])
        row = dict(target=key, backend=b, dtype=d, route=route, step=s + 1, position=P + s, token=t,
                   token_text=text(t), ref_token=rt, ref_token_text=text(rt),
                   ref_own_token=ref_tokens[s] if s < len(ref_tokens) else None,
                   agree=bool(t == rt), kl=float(kl[s]),
                   topk_overlap=len(set(rk.tolist()) & set(xk.tolist())) / k,
                   logit_rel_max=mt["rel_max"], logit_rel_l2=_rel(mt), logit_max_abs=mt["max_abs"],
                   topk_max_abs=float(np.max(np.abs(x[rk] - r[rk]))) if np.isfinite(x[rk]).all() else math.inf,
                   ref_top1_top2=float(r2[1] - r2[0]),
                   ref_margin=float(r[rt] - r[t]) if t != rt else float(r2[1] - r2[0]),
                   target_margin=float(x[t] - x[rt]) if (t != rt and xr_fin) else None,
                   nan_count=mt["nan_count"], inf_count=mt["inf_count"], nonfinite_stop=False,
                   ref_topk=rk.tolist(), ref_topk_text=[text(i) for i in rk],
                   ref_topk_p=np.exp(rlp[rk]).tolist(),
                   topk=xk.tolist(), topk_text=[text(i) for i in xk], topk_p=np.exp(xlp[xk]).tolist())
        srows.append(row)
        pos = P - 1 + s              # the input position whose logits chose token s+1
        for i in range(L):
            nm = f"blocks.{i}.hook_resid_post"
            if nm not in st:
                continue
            me = metrics(ref_taps[nm][0, pos], st[nm][s])
            lsrows.append(dict(target=key, step=s + 1, layer=i, rel_l2=_rel(me), rel_max=me["rel_max"],
                               nonfinite=me["nan_count"] + me["inf_count"]))
    return srows, lsrows


def _nonfinite_row(key, b, d, route, P, s, x, r, ref_tokens, k, text):
    row = dict(target=key, backend=b, dtype=d, route=route, step=s + 1, position=P + s, token=None,
               token_text="(no finite logit)", agree=False, kl=math.nan, topk_overlap=0.0,
               nan_count=int(np.isnan(x).sum()), inf_count=int(np.isinf(x).sum()),
               ref_own_token=ref_tokens[s] if s < len(ref_tokens) else None, nonfinite_stop=True)
    if r is not None:
        r = np.asarray(r, np.float64)
        rt = int(np.argmax(r))
        rk = _topk(r, k)
        r2 = np.sort(r)[-2:]
        row.update(ref_token=rt, ref_token_text=text(rt), ref_top1_top2=float(r2[1] - r2[0]), ref_margin=math.inf,
                   logit_rel_max=math.inf, logit_rel_l2=math.nan, ref_topk=rk.tolist(),
                   ref_topk_text=[text(i) for i in rk], ref_topk_p=np.exp(log_softmax(r)[rk]).tolist(),
                   topk=[], topk_text=[], topk_p=[])
    return row


def _first(srows: list[dict], lsrows: list[dict], local: list[dict] = ()) -> dict | None:
    """The first differing token of one target, with its verdict:

    * ``non-finite``: the target's logits at that step are NaN/inf (float16 overflow ...);
    * ``fault``: some layer's own error (local, on the reference's input) is over SUSPECT_RATIO x the rounding
      floor of its output in this dtype — a correct layer is within a small multiple of it — whatever the margin;
    * ``near-tie``: no such layer and the reference's margin between the two tokens is within NEAR_TIE_FACTOR x
      the target's typical logit error on the candidates (median over steps of max |Δlogit| on the reference's
      top-k): ordinary rounding explains the flip;
    * ``large-margin``: no layer stands out, yet the margin is many times the typical error — look at that step's
      per-layer errors."""
    diff = [r for r in srows if not r["agree"]]
    if not diff:
        return None
    d = diff[0]
    errs = [dict(layer=r["layer"], rel_l2=r["rel_l2"], rel_max=r["rel_max"], nonfinite=r["nonfinite"])
            for r in lsrows if r["target"] == d["target"] and r["step"] == d["step"]]
    noise = [r["topk_max_abs"] for r in srows if r.get("topk_max_abs") is not None
             and math.isfinite(r["topk_max_abs"])]
    typical = float(np.median(noise)) if noise else math.nan
    out = dict(target=d["target"], step=d["step"], position=d["position"], token=d["token"],
               token_text=d["token_text"], ref_token=d.get("ref_token"), ref_token_text=d.get("ref_token_text"),
               ref_margin=d.get("ref_margin"), target_margin=d.get("target_margin"), kl=d.get("kl"),
               typical_error=typical, layer_errors=errs)
    over = [r["layer"] for r in local if r.get("overflow")]
    sus = [r for r in local if r.get("suspect") and not r.get("overflow")]
    if d.get("nonfinite_stop") or d["token"] is None:
        out.update(kind="non-finite", near_tie=False,
                   verdict="non-finite logits: the target could not choose a token"
                   + (f" (local overflow at layer(s) {over})" if over else ""))
        return out
    m = float(d["ref_margin"])
    ratio = m / typical if typical and math.isfinite(typical) and typical > 0 else math.inf
    near = bool(math.isfinite(typical) and m <= NEAR_TIE_FACTOR * typical)
    out.update(near_tie=near and not sus and not over, margin_over_typical=ratio)
    if over or sus:
        worst = max(sus, key=lambda r: _key(r.get("local_over_floor"))) if sus else None
        why = (f"local overflow at layer(s) {over}" if over else
               f"layer(s) {[r['layer'] for r in sus]} make errors over {SUSPECT_RATIO:g}x their rounding floor "
               f"(layer {worst['layer']}: {_fmt(worst.get('local_over_floor'))}x)")
        out.update(kind="fault", verdict=f"fault: {why}; margin {m:.3g} logits")
    elif near:
        out.update(kind="near-tie", verdict=f"near-tie (margin {m:.3g} <= {NEAR_TIE_FACTOR:g} x typical error "
                                            f"{typical:.3g}; no layer stands out)")
    else:
        out.update(kind="large-margin", verdict=f"large margin {m:.3g} = {ratio:.1f} x typical error {typical:.3g}, "
                                                "no layer stands out: see this step's per-layer errors")
    return out


# ============================================================================================ views
# (the dashboard page and the notebook draw with these; matplotlib is imported when a figure is made)
KL_FLOOR = 1e-12


def _kl_colour(kl, lo: float, hi: float) -> str:
    """White (KL at the run's floor) to red (its maximum), log scale; purple for NaN/inf."""
    if kl is None or not math.isfinite(float(kl)):
        return "rgb(170,120,230)"
    v = math.log10(max(float(kl), KL_FLOOR))
    f = 0.0 if hi <= lo else min(1.0, max(0.0, (v - lo) / (hi - lo)))
    g = int(round(255 - 200 * f))
    return f"rgb(255,{g},{g})"


def _vis(s) -> str:
    s = "" if s is None else str(s)
    return s.replace("\n", "⏎").replace("\t", "⇥") if s.strip() else (s.replace(" ", "␠") or "∅")


def _top(texts, ids, ps) -> str:
    if not ids:
        return "  (none)"
    return "\n".join(f"  {_vis(t)!s:>14}  {p:7.4f}  (id {i})" for t, i, p in zip(texts or [], ids, ps or []))


def token_strip_html(steps: list[dict], first_step: int | None = None) -> str:
    """One ``<span class="wb-tok">`` per generated token, background by log KL(ref || target); the first differing
    token gets class ``wb-first`` (outlined, with the reference's token beside it); each span's title shows
    step, KL, margin and both top-5 lists."""
    kls = [float(r["kl"]) for r in steps if r.get("kl") is not None and math.isfinite(float(r["kl"]))]
    lo = math.log10(max(min(kls), KL_FLOOR)) if kls else 0.0
    hi = math.log10(max(max(kls), KL_FLOOR)) if kls else 0.0
    parts = ['<div class="wb-strip" style="font-family: monospace; line-height: 2.1; font-size: 15px;">']
    for r in steps:
        first = first_step is not None and int(r["step"]) == int(first_step)
        kl = r.get("kl")
        title = (f"step {r['step']} (position {r.get('position')})\n"
                 f"KL(ref || target) = {_num(kl)}   top-5 overlap {_num(r.get('topk_overlap'))}\n"
                 f"target {_vis(r.get('token_text'))!s} (id {r.get('token')}), reference "
                 f"{_vis(r.get('ref_token_text'))!s} (id {r.get('ref_token')}), reference margin "
                 f"{_num(r.get('ref_margin'))}\n"
                 f"reference top-5:\n{_top(r.get('ref_topk_text'), r.get('ref_topk'), r.get('ref_topk_p'))}\n"
                 f"target top-5:\n{_top(r.get('topk_text'), r.get('topk'), r.get('topk_p'))}")
        style = f"background:{_kl_colour(kl, lo, hi)}; padding:2px 1px; border-radius:3px; white-space:pre-wrap;"
        cls = "wb-tok"
        if first:
            cls += " wb-first"
            style += " outline: 3px solid #1f4fd1; outline-offset: 1px;"
        elif not r.get("agree", True):
            cls += " wb-differ"
            style += " text-decoration: underline dotted;"
        parts.append(f'<span class="{cls}" data-step="{int(r["step"])}" data-kl="{_num(kl)}" '
                     f'title="{html.escape(title, quote=True)}" style="{style}">'
                     f'{html.escape(_vis(r.get("token_text")))}</span><wbr>')
        if first:
            parts.append(f'<span class="wb-ref-token" style="color:#1f4fd1; font-size: 12px;"> '
                         f'[ref: {html.escape(_vis(r.get("ref_token_text")))}]</span>')
    parts.append("</div>")
    return "".join(parts)


def _num(v) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def kl_figure(steps: list[dict], first_step: int | None = None, title: str = "KL(ref || target) per step"):
    import matplotlib
    matplotlib.use("Agg") if "matplotlib.pyplot" not in sys.modules else None
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 2.6))
    s = np.array([r["step"] for r in steps])
    kl = np.array([np.nan if r.get("kl") is None else float(r["kl"]) for r in steps])
    ax.semilogy(s, np.maximum(kl, KL_FLOOR), ".-", lw=1)
    if first_step is not None:
        ax.axvline(first_step, color="#1f4fd1", ls="--", lw=1, label=f"first differing token (step {first_step})")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("KL (nats)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def kv_figure(div, target: str):
    """K and V relative L2 error per layer x absolute position (log colour); grey: not held (ring) / no K."""
    import matplotlib
    matplotlib.use("Agg") if "matplotlib.pyplot" not in sys.modules else None
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2), sharey=True)
    mats = [div.kv_matrix(target, which=w) for w in ("k", "v")]
    vals = np.concatenate([m[2][np.isfinite(m[2]) & (m[2] > 0)] for m in mats])
    vmin = max(float(vals.min()), 1e-12) if vals.size else 1e-12
    vmax = max(float(vals.max()), vmin * 10) if vals.size else 1.0
    shared = {int(r["layer"]): int(r["shared_from"]) for r in div.kv if r["target"] == target
              and r.get("shared_from") is not None and not (isinstance(r["shared_from"], float)
                                                            and math.isnan(r["shared_from"]))}
    # grey: the slot does not hold that position (sliding ring) or there is no such tensor (k_eq_v: no K);
    # cyan: inf/NaN in the target's cache (its error is inf)
    cmap = plt.get_cmap("magma_r").with_extremes(bad="#d9d9d9", over="#00bcd4")
    im = None
    for ax, (layers, positions, mat), name in zip(axes, mats, ("K", "V")):
        plot = np.where(np.isinf(mat), vmax * 1e6, np.maximum(mat, vmin))
        plot = np.ma.masked_invalid(np.where(np.isnan(mat), np.nan, plot))
        im = ax.imshow(plot, aspect="auto", cmap=cmap, norm=LogNorm(vmin=vmin, vmax=vmax), interpolation="nearest",
                       extent=(positions[0] - 0.5, positions[-1] + 0.5, layers[-1] + 0.5, layers[0] - 0.5))
        n_inf = int(np.isinf(mat).sum())
        ax.set_title(f"{name} cache: relative L2 error per position" + (f" ({n_inf} inf/NaN cells)" if n_inf else ""),
                     fontsize=9)
        ax.set_xlabel("absolute position")
        ax.set_yticks(layers, [f"{i}" + (f"→{shared[i]}" if i in shared else "") for i in layers], fontsize=7)
    axes[0].set_ylabel("layer (→ KV source)")
    fig.suptitle(f"{target} — grey: position not held (sliding ring) or no such tensor; cyan: inf/NaN", fontsize=9)
    fig.colorbar(im, ax=axes, label="rel L2")
    return fig


def local_figure(div, target: str):
    """Per layer: the layer's own (local) error beside the error the full run carries there (inherited), and the
    rounding floor of the dtype; overflow layers marked."""
    import matplotlib
    matplotlib.use("Agg") if "matplotlib.pyplot" not in sys.modules else None
    import matplotlib.pyplot as plt
    rows = sorted([r for r in div.local if r["target"] == target], key=lambda r: r["layer"])
    layers = np.array([r["layer"] for r in rows])
    loc = np.array([float(r["local"]) for r in rows])
    inh = np.array([float(r["inherited"]) for r in rows])
    flo = np.array([float(r["floor"]) for r in rows])
    fin = np.concatenate([loc, inh, flo])
    fin = fin[np.isfinite(fin) & (fin > 0)]
    top = float(fin.max()) * 10 if fin.size else 1.0
    bot = max(float(fin.min()) / 3, 1e-12) if fin.size else 1e-12
    fig, ax = plt.subplots(figsize=(7, 3.2))
    w = 0.4
    ax.bar(layers - w / 2, np.where(np.isfinite(loc), np.maximum(loc, bot), top), w, label="local (own)",
           color="#d62728")
    ax.bar(layers + w / 2, np.where(np.isfinite(inh), np.maximum(inh, bot), top), w, label="inherited (full run)",
           color="#7f7f7f")
    ax.step(np.r_[layers - 0.5, layers[-1] + 0.5], np.r_[flo, flo[-1]], where="post", color="k", lw=0.8, ls=":",
            label="rounding floor")
    for r in rows:     # inf bars reach the top; say why at their foot
        if r.get("overflow"):
            ax.text(r["layer"] - w / 2, bot * 1.3, "overflow", ha="center", va="bottom", fontsize=7, rotation=90,
                    color="white", fontweight="bold")
        elif r.get("input_nonfinite"):
            ax.text(r["layer"] - w / 2, bot * 1.3, "input ∞", ha="center", va="bottom", fontsize=6, rotation=90,
                    color="white")
    ax.set_yscale("log")
    ax.set_ylim(bot, top * 1.5)
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("rel L2 of resid_post")
    ax.set_title(f"local vs inherited error — {target}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def target_table(div) -> list[dict]:
    """One row per target for the page's overview table."""
    out = []
    info = div.meta.get("target_info") or {}
    divs = div.divergences()
    for t in div.targets:
        rs = [r for r in div.steps if r["target"] == t]
        kl = np.array([np.nan if r.get("kl") is None else float(r["kl"]) for r in rs])
        d = divs.get(t)
        loc = [r for r in div.local if r["target"] == t]
        out.append(dict(target=t, route=(info.get(t) or {}).get("route"), steps=len(rs),
                        first_differing_step=None if d is None else d["step"],
                        verdict="no differing token" if d is None else d["verdict"],
                        kl_mean=float(np.nanmean(kl)) if np.isfinite(kl).any() else None,
                        kl_max=float(np.nanmax(kl)) if np.isfinite(kl).any() else None,
                        overflow_layers=[r["layer"] for r in loc if r.get("overflow")] or None,
                        suspect_layers=[r["layer"] for r in loc if r.get("suspect")] or None))
    return out


# ============================================================================================ command line
def add_cli(sub) -> None:
    """``workbench diverge`` (called by workbench.cli)."""
    p = sub.add_parser("diverge", help="where each backend's greedy generation parts from float64: per-step KL, "
                       "first differing token, KV-cache diff, local vs inherited error per layer")
    p.add_argument("--model", default="gemma3-270m", help="HF dir, .gguf, or registered name (default %(default)s)")
    p.add_argument("--backends", default="torch:cpu", help="'all' or a comma list, e.g. torch:cpu,mlx:cpu")
    p.add_argument("--dtypes", default="bfloat16", help="comma list: float32,bfloat16,float16")
    p.add_argument("--steps", type=int, default=64, help="greedy tokens per target (default %(default)s)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of a text prompt")
    p.add_argument("--route", default="fast", choices=["fast", "plain", "both"],
                   help="fast: the model's generate (its decode route); plain: a per-token forward loop")
    p.add_argument("--reference", default="torch:cpu:float64")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--db", default=None, help="results database (default $WORKBENCH_DB or the user data dir)")
    p.add_argument("--no-store", action="store_true")
    p.add_argument("--json", default=None, help="write the per-step rows as JSON here")
    p.set_defaults(fn=cmd_diverge)
    return p


def cmd_diverge(args) -> int:
    prompt = args.prompt
    if args.prompt_ids:
        prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    div = diverge(args.model, backends=args.backends, dtypes=args.dtypes, prompt=prompt, steps=args.steps,
                  reference=args.reference, route=args.route, k=args.top_k, db=args.db, store=not args.no_store,
                  progress=True)
    print(div.summary())
    if div.run_id:
        print(f"stored run {div.run_id}")
    if args.json:
        div.to_frame().to_json(args.json, orient="records", indent=1)
        print(f"json written to {args.json}")
    return 0
