"""Cross-backend parity: the same token ids through every backend x dtype, every tap compared with a
reference (float64 on the CPU by default), per layer, for the prefill pass and for KV-cache decode steps.

Checks follow llama.cpp's test-backend-ops: NaN and inf are counted before any norm of the error (NaN never
passes; inf must match the reference in position and sign); then max|Δ|, relative max error
(max|Δ| / max|ref|), relative L2, NMSE and cosine. The tolerance applies to the relative max error and comes
from one table keyed by (backend kind, dtype) — see TOLERANCES and the README for the reasoning.
"""
from __future__ import annotations

import fnmatch
import math
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import backends as _bk
from . import parity_metrics as _pm
from .progress import Progress as _Progress  # noqa: F401 - workbench.distributed uses P._Progress

# Relative max error (max|Δ| / max|ref|) allowed per tap, by (backend kind, dtype), against the float64
# reference. The reasoning is in the README ("Tolerance policy"); the GPU rows are set from what was measured
# on the real Gemma 3 270M on an NVIDIA H200 (README "Parity table"):
#  * float32 on CPU and torch:cuda (TF32 off, torch's default): measured 2.6e-6..1.3e-5; 1e-4 keeps a decade of
#    headroom and still catches a wrong norm offset, RoPE layout or mask (those give 1e-2..1).
#  * mlx:gpu float32: measured 2.8e-3 (first over 1e-3 at layer 8's attention output) — MLX's CUDA backend runs
#    float32 matmuls on TF32 tensor cores (10-bit mantissa), so 1e-2; a real fault still shows as 1e-1..1.
#  * bfloat16 (8-bit mantissa, eps 7.8e-3), compounding over 18 layers: measured 3.1e-2..1.3e-1 on CPU/torch:cuda,
#    1.5e-1 on mlx:gpu decode -> 2e-1 everywhere.
#  * float16: 11-bit mantissa but Gemma's residual stream overflows it at layer 7 on every backend: 5e-2 on the
#    finite taps; the first inf is reported as the precision hazard.
TOLERANCES: dict[tuple[str, str], float] = {
    ("torch:cpu", "float64"): 1e-10,
    ("torch:cpu", "float32"): 1e-4,
    ("mlx:cpu", "float32"): 1e-4,
    ("torch:cuda", "float32"): 1e-4,
    ("torch:mps", "float32"): 1e-3,
    ("mlx:gpu", "float32"): 1e-2,
    ("torch:cpu", "bfloat16"): 2e-1,
    ("mlx:cpu", "bfloat16"): 2e-1,
    ("torch:cuda", "bfloat16"): 2e-1,
    ("mlx:gpu", "bfloat16"): 2e-1,
    ("torch:mps", "bfloat16"): 2e-1,
    ("torch:cpu", "float16"): 5e-2,
    ("mlx:cpu", "float16"): 5e-2,
    ("torch:cuda", "float16"): 5e-2,
    ("mlx:gpu", "float16"): 5e-2,
    ("torch:mps", "float16"): 5e-2,
    # independent references compared with our float64 (same dequantised weights for HF; llama.cpp runs
    # the quantised weights with 8-bit activations, so only its logits' shape is comparable)
    ("hf", "float32"): 1e-4,
    ("llamacpp", "gguf"): 2.5e-1,
}

DEFAULT_TAPS = ["hook_embed", "blocks.*.hook_attn_out", "blocks.*.hook_mlp_out", "blocks.*.hook_resid_post",
                "ln_final.hook_normalized", "logits"]
DEFAULT_PROMPT = ("The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers "
                  "that changed physics: def f(x): return x**2  # ünïcödé ✓")
_LAYER_RE = re.compile(r"^(vision\.|audio\.)?blocks\.(\d+)\.(.+)$")
MEDIA_TAPS = ["vision.hook_patch_embed", "vision.blocks.*.hook_resid_post", "vision.hook_pooled", "vision.hook_out",
              "embed_vision.hook_out", "audio.hook_subsample", "audio.blocks.*.hook_resid_post", "audio.hook_out",
              "embed_audio.hook_out"]


def tolerance_for(kind: str, dtype: str, overrides: dict | None = None) -> float:
    if overrides:
        for key in ((kind, dtype), kind, dtype):
            if key in overrides:
                return float(overrides[key])
    if (kind, dtype) in TOLERANCES:
        return TOLERANCES[(kind, dtype)]
    by_dtype = [v for (k, d), v in TOLERANCES.items() if d == dtype]
    return max(by_dtype) if by_dtype else 1e-3


def split_tap(name: str) -> tuple[str, int | None]:
    m = _LAYER_RE.match(name)
    return ((m.group(1) or "") + m.group(3), int(m.group(2))) if m else (name, None)


def metrics(ref: np.ndarray, x: np.ndarray) -> dict:
    """Error statistics of x against ref. NaN/inf are counted first; the norms use finite entries."""
    ref = np.asarray(ref, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if ref.shape != x.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs {x.shape}")
    nan = int(np.isnan(x).sum())
    xinf, rinf = np.isinf(x), np.isinf(ref)
    inf = int(xinf.sum())
    inf_mismatch = int((xinf != rinf).sum() + (xinf & rinf & (np.sign(x) != np.sign(ref))).sum())
    fin = np.isfinite(x) & np.isfinite(ref)
    d = np.where(fin, x - ref, 0.0)
    r = np.where(fin, ref, 0.0)
    max_abs = float(np.abs(d).max()) if d.size else 0.0
    scale = float(np.abs(r).max()) if r.size else 0.0
    rel_max = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    l2r = float(np.linalg.norm(r))
    rel_l2 = float(np.linalg.norm(d)) / l2r if l2r > 0 else (0.0 if max_abs == 0 else math.inf)
    msr = float(np.mean(r * r)) if r.size else 0.0
    nmse = float(np.mean(d * d)) / msr if msr > 0 else (0.0 if max_abs == 0 else math.inf)
    xf = np.where(fin, x, 0.0)
    den = float(np.linalg.norm(xf) * l2r)
    cosine = float((xf * r).sum()) / den if den > 0 else (1.0 if max_abs == 0 else 0.0)
    bad = nan > 0 or inf_mismatch > 0
    return dict(max_abs=max_abs, ref_scale=scale, rel_max=rel_max if not bad else math.inf, rel_l2=rel_l2,
                nmse=nmse, cosine=cosine, nan_count=nan, inf_count=inf, inf_mismatch=inf_mismatch,
                min_tol=rel_max if not bad else math.inf)


def _topk_agree(ref_logits: np.ndarray, logits: np.ndarray, k: int = 5) -> tuple[float, float]:
    r = ref_logits.reshape(-1, ref_logits.shape[-1])
    x = logits.reshape(-1, logits.shape[-1])
    top1 = float(np.mean(np.argmax(r, -1) == np.argmax(x, -1)))
    rk = np.argsort(-r, -1, kind="stable")[:, :k]     # ties: the lower index (as parity_metrics computes it)
    xk = np.argsort(-x, -1, kind="stable")[:, :k]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(rk, xk)]))
    return top1, overlap


@dataclass
class ParityReport:
    rows: list[dict]
    meta: dict
    skipped: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    # the anchor: the float64 reference itself against an independent implementation (HF transformers in
    # float64), one row per tap and layer (phase "anchor"); anchor_info says what ran and why not
    anchor: list[dict] = field(default_factory=list)
    anchor_info: dict | None = None
    # references the caller asked for that could not run: {name: why}; each one fails the report
    failed_references: dict[str, str] = field(default_factory=dict)

    # ---------------------------------------------------------------- verdicts
    @property
    def anchored(self) -> bool:
        """True when the anchor ran and agreed."""
        return bool(self.anchor_info) and self.anchor_info.get("status") == "anchored"

    @property
    def anchor_ok(self) -> bool:
        """The anchor does not stop a PASS: it ran and agreed, or the caller knowingly turned it off
        (anchor=False). A report built without anchor information (older stored runs) counts as unanchored."""
        info = self.anchor_info or {}
        return info.get("status") in ("anchored", "off")

    @property
    def passed(self) -> bool:
        """True when the anchor agreed (or was knowingly turned off), every requested reference ran, and every
        compared tap of every run backend is within its tolerance/budget. Skipped backends do not count as
        passed: with nothing compared, this is False."""
        return (bool(self.rows) and all(r["passed"] for r in self.rows) and self.anchor_ok
                and not self.failed_references)

    @property
    def first_divergence(self) -> dict | None:
        """The first tap/layer (in forward order, prefill before decode) over tolerance, over all targets."""
        divs = self.divergences()
        if not divs:
            return None
        return min(divs.values(), key=lambda r: (r["phase"] != "prefill", r["order"]))

    def anchor_line(self) -> str:
        """One line: what the reference was anchored to and how well, or UNANCHORED and why."""
        info = self.anchor_info or {}
        st = info.get("status")
        if st == "anchored":
            return (f"reference anchored to {info['against']}: max rel err {info.get('max_err', info['worst']):.1e} "
                    f"over {info['n']} taps; nearest its tol: {info['worst']:.1e} at {info['worst_at']} (tol "
                    f"{info['worst_tol']:.1e}; tol = {info['tol_rule']}) PASSED"
                    + (f"; {info['scope']}" if info.get("scope") else ""))
        if st == "failed":
            return (f"ANCHOR FAILED: reference disagrees with {info['against']} at {info['first_at']} "
                    f"({info['first_err']:.2e} > tol {info['first_tol']:.1e}; worst {info['worst']:.2e} at "
                    f"{info['worst_at']}): the shared model code (or the loader) differs from the independent "
                    "implementation, so every backend inherits the difference"
                    + (f"; {info['scope']}" if info.get("scope") else ""))
        if st == "off":
            return "UNANCHORED (knowingly, anchor=False / --no-anchor): the verdict below rests on the backends alone"
        return f"UNANCHORED: {info.get('reason', 'no anchor was run')} -> FAILED"

    def divergences(self) -> dict[str, dict]:
        """First failing row per target (backend:dtype)."""
        out: dict[str, dict] = {}
        for r in sorted(self.rows, key=lambda r: (r["phase"] != "prefill", r["order"])):
            key = f"{r['backend']}:{r['dtype']}"
            if not r["passed"] and key not in out:
                out[key] = r
        return out

    def hazards(self) -> dict[str, dict]:
        """Per target, the first tap where a NaN or inf appears (float16 overflow and the like)."""
        out: dict[str, dict] = {}
        for r in sorted(self.rows, key=lambda r: (r["phase"] != "prefill", r["order"])):
            key = f"{r['backend']}:{r['dtype']}"
            if (r["nan_count"] or r["inf_count"]) and key not in out:
                out[key] = r
        return out

    def target_table(self) -> list[dict]:
        """One row per target and phase (the anchor's rows included; a decode route other than the plain one as
        its own phase, "decode[fast]"): ``target`` (backend:dtype), ``phase``, ``tol`` and ``margin`` (error /
        allowed error) of the row nearest its limit, ``worst_rel_max``, ``worst_rel_l2``, ``min_cosine``, ``top1``
        (agreement on the logits, None without logits), ``first_divergence`` (first tap over its tolerance in
        forward order, "tap @ layer N", or None), ``result`` (PASSED / FAILED) and ``budget_source`` (where the
        nearest row's tolerance came from). ``summary()`` prints this table; the dashboard shows it."""
        groups: dict[tuple, list] = {}
        for r in self.anchor + self.rows:
            ph = r["phase"] if not r.get("route") or r["route"] == "plain" else f"{r['phase']}[{r['route']}]"
            groups.setdefault((r["backend"], r["dtype"], ph), []).append(r)
        out = []
        for (b, d, ph), rs in groups.items():
            lg = [r for r in rs if r["tap"] == "logits" and r.get("top1") is not None]
            fails = sorted([r for r in rs if not r["passed"]], key=lambda r: r["order"])
            near = max(rs, key=_margin)      # the row nearest its limit: its tolerance (or budget) and margin
            out.append(dict(target=f"{b}:{d}", phase=ph, tol=near["tol"], worst_rel_max=max(r["rel_max"] for r in rs),
                            worst_rel_l2=max(r["rel_l2"] for r in rs), min_cosine=min(r["cosine"] for r in rs),
                            top1=lg[0]["top1"] if lg else None, margin=_margin(near),
                            first_divergence=_where(fails[0]) if fails else None,
                            result="FAILED" if fails else "PASSED", budget_source=near.get("budget_source")))
        return out

    # ---------------------------------------------------------------- stored runs
    @classmethod
    def from_run(cls, run_or_id, store=None) -> "ParityReport":
        """The report of a stored parity run, the same object ``wb.compare`` returned: its rows (phase "anchor"
        rows back in ``anchor``), meta, skipped targets, anchor status and failed references, so ``passed``,
        ``first_divergence``, ``divergences()``, ``summary()``, ``target_table()``, ``heatmap()`` and the
        tolerance notes come from this class for a fresh and a stored run alike.

        run_or_id: a ``workbench.runs.Run`` (``RunStore.load``) or a run id (or unique prefix) read from
        ``store`` (a RunStore, a database path, or None: the default store). A run stored before the anchor
        existed has no anchor status and reads as UNANCHORED (so not passed), as ``anchor_ok`` says."""
        from . import runs
        run = run_or_id
        if isinstance(run_or_id, str):
            if isinstance(store, runs.RunStore):
                run = store.load(run_or_id)
            else:
                with runs.RunStore(store) as st:
                    run = st.load(run_or_id)
        if getattr(run, "kind", "parity") != "parity":
            raise ValueError(f"run {run.run_id} is a {run.kind!r} run, not 'parity'")
        recs = run.records if getattr(run, "records", None) is not None else _frame_records(run.rows)
        recs = [_stored_row(r) for r in recs]
        meta = dict(run.meta)
        return cls(rows=[r for r in recs if r["phase"] != "anchor"], meta=meta,
                   skipped=dict(meta.get("skipped") or {}), run_id=run.run_id,
                   anchor=[r for r in recs if r["phase"] == "anchor"], anchor_info=meta.get("anchor"),
                   failed_references=dict(meta.get("failed_references") or {}))

    # ---------------------------------------------------------------- views
    def to_frame(self, anchor: bool = False):
        """The rows as a DataFrame (with ``target`` = backend:dtype); anchor=True puts the anchor's rows first."""
        import pandas as pd
        cols = ["backend", "dtype", "phase", "tap", "layer", "max_abs", "rel_max", "rel_l2", "nmse", "cosine",
                "nan_count", "inf_count", "inf_mismatch", "min_tol", "tol", "passed", "ref_scale", "top1",
                "top5_overlap", "target", "order", "budget", "budget_l2", "budget_source", "margin", "route"]
        rows = (self.anchor if anchor else []) + self.rows
        df = pd.DataFrame(rows)
        if len(df):
            df["target"] = df["backend"].astype(str) + ":" + df["dtype"].astype(str)
        return df[[c for c in cols if c in df.columns]]

    def heatmap_matrix(self, metric: str = "rel_max", by: str = "taps", target: str | None = None,
                       tap: str = "hook_resid_post", phase: str = "prefill"):
        """The numbers behind a heatmap: see :func:`heatmap_matrix`."""
        return heatmap_matrix(self.to_frame(anchor=True), metric, by, target, tap, phase)

    def summary(self) -> str:
        """A Polygraphy-style table: per target the tolerance used, the worst error, the minimum tolerance
        that would pass, the first divergence, and PASSED/FAILED; skipped targets with their reason."""
        lines = [f"Parity of {self.meta.get('model')} against {self.meta.get('reference')} "
                 f"({self.meta.get('n_tokens')} tokens, {self.meta.get('decode_steps', 0)} decode steps)",
                 self.anchor_line()]
        hdr = f"{'target':24s} {'phase':8s} {'tol':>8s} {'max rel':>10s} {'min tol':>10s} {'rel L2':>10s} " \
              f"{'cos min':>9s} {'top1':>6s} {'margin':>6s}  {'first divergence':28s} result"
        lines += [hdr, "-" * len(hdr)]
        sources: dict[str, list] = {}
        for t in self.target_table():
            top1 = f"{t['top1']:.2f}" if t["top1"] is not None else "  -"
            lines.append(f"{t['target']:24s} {t['phase']:8s} {t['tol']:8.1e} {t['worst_rel_max']:10.2e} "
                         f"{t['worst_rel_max']:10.2e} {t['worst_rel_l2']:10.2e} {t['min_cosine']:9.6f} {top1:>6s} "
                         f"{t['margin']:6.2f}  {t['first_divergence'] or '-':28s} {t['result']}")
            if t["budget_source"]:
                sources.setdefault(t["budget_source"], []).append(t["target"])
        for k, why in self.failed_references.items():
            lines.append(f"{k:24s} {'-':8s} {'':>8s} {'':>10s} {'':>10s} {'':>10s} {'':>9s} {'':>6s} {'':>6s}  "
                         f"{'':28s} FAILED (requested reference could not run: {why})")
        for k, why in self.skipped.items():
            if k in self.failed_references:
                continue
            lines.append(f"{k:24s} {'-':8s} {'':>8s} {'':>10s} {'':>10s} {'':>10s} {'':>9s} {'':>6s} {'':>6s}  "
                         f"{'':28s} SKIPPED ({why})")
        for src, who in sources.items():
            lines.append(f"tolerance of {', '.join(sorted(set(who)))}: {src}")
        for k, flips in (self.meta.get("routing_flips") or {}).items():
            f0 = flips[0]
            kind = "a near-tie" if f0["near_tie"] else "NOT a near-tie"
            lines.append(f"MoE routing differs on {k}: {len(flips)} token/layer choice(s), first layer {f0['layer']} "
                         f"token {f0['token']} (reference top-k margin "
                         f"{'?' if f0['margin'] is None else format(f0['margin'], '.1e')}: {kind}; "
                         "later taps differ by design)")
        hz = self.hazards()
        for k, r in hz.items():
            lines.append(f"precision hazard on {k}: first NaN/inf at {r['tap']}"
                         + (f" layer {r['layer']}" if r['layer'] is not None else "") + f" ({r['phase']})")
        if self.meta.get("cost"):
            lines.append(_pm.cost_line(self.meta["cost"]))
        lines.append(f"Overall: {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def heatmap(self, metric: str = "rel_max", by: str = "taps", backend: str | None = None,
                dtype: str | None = None, tap: str = "hook_resid_post", phase: str = "prefill", ax=None):
        """Per-layer Δ heatmap. by="taps": layers x taps for one target (backend/dtype); by="backends":
        layers x targets for one tap. Log colour scale; failing cells outlined; tolerance in the title."""
        return heatmap(self.to_frame(), metric=metric, by=by, backend=backend, dtype=dtype, tap=tap,
                       phase=phase, ax=ax)


def _frame_records(frame) -> list[dict]:
    """Rows of a stored run's DataFrame as dicts (a cell pandas filled for a key the row did not have: None)."""
    if frame is None or len(frame) == 0:
        return []
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in frame.to_dict("records")]


def _stored_row(r: dict) -> dict:
    """A stored row as ``compare`` made it: numpy scalars unwrapped, layer an int or None, counts int, passed
    bool; an old row without ``order`` sorts last."""
    out = {}
    for k, v in r.items():
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    lay = out.get("layer")
    out["layer"] = None if lay is None or (isinstance(lay, float) and math.isnan(lay)) else int(lay)
    for k in ("nan_count", "inf_count", "inf_mismatch"):
        if out.get(k) is not None:
            out[k] = int(out[k])
    out["passed"] = bool(out.get("passed"))
    out.setdefault("order", 10**6)
    return out


def _margin(r: dict) -> float:
    """error / allowed error of a row (rel_max against its tol; rel_l2 against budget_l2 where set)."""
    m = r["rel_max"] / r["tol"] if r["tol"] > 0 else (0.0 if r["rel_max"] == 0 else math.inf)
    if r.get("budget_l2"):
        m = max(m, r["rel_l2"] / r["budget_l2"])
    return m


def heatmap_matrix(df, metric: str = "rel_max", by: str = "taps", target: str | None = None,
                   tap: str = "hook_resid_post", phase: str = "prefill"):
    """(values, passed, tols): pivots of a parity frame (``ParityReport.to_frame``) over its per-layer rows of one
    phase — layers x taps of one ``target`` (by="taps"; None: the first target), or layers x targets of one
    ``tap`` (by="backends"). Columns in forward order; ``passed`` per cell (False where a row of the cell
    failed); ``tols`` the largest tolerance per column. metric "1-cosine" is derived from the cosine. The
    library's heatmap and the dashboard's draw these numbers."""
    import pandas as pd
    d = df[(df["phase"] == phase) & df["layer"].notna()].copy()
    if "target" not in d:
        d["target"] = d["backend"].astype(str) + ":" + d["dtype"].astype(str)
    if metric == "1-cosine" and metric not in d:
        d[metric] = 1.0 - pd.to_numeric(d["cosine"], errors="coerce")
    if by == "taps":
        if target is None and len(d):
            target = d["target"].iloc[0]
        d, col = d[d["target"] == target], "tap"
    elif by == "backends":
        d, col = d[d["tap"] == tap], "target"
    else:
        raise ValueError(f"by={by!r}: use 'taps' or 'backends'")
    if d.empty:
        return pd.DataFrame(), pd.DataFrame(), pd.Series(dtype=float)
    d["layer"] = d["layer"].astype(int)
    d["passed"] = d["passed"].astype(bool)
    vals = d.pivot_table(index="layer", columns=col, values=metric, aggfunc="max")
    passed = d.pivot_table(index="layer", columns=col, values="passed", aggfunc="min")
    tols = d.groupby(col)["tol"].max()
    if "order" in d:
        cols = [c for c in dict.fromkeys(d.sort_values("order", kind="stable")[col]) if c in vals.columns]
        vals, passed, tols = vals[cols], passed.reindex(columns=cols), tols.reindex(cols)
    return vals, passed, tols


def heatmap(df, metric="rel_max", by="taps", backend=None, dtype=None, tap="hook_resid_post", phase="prefill",
            ax=None):
    import matplotlib
    matplotlib.use("Agg") if "matplotlib.pyplot" not in sys.modules else None
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    d = df[(df["phase"] == phase) & df["layer"].notna()]
    tgt = None
    if by == "taps" and backend is not None and len(d):
        tgt = f"{backend}:{dtype}" if dtype is not None else \
            (d[d["backend"] == backend]["backend"] + ":" + d[d["backend"] == backend]["dtype"]).iloc[0]
    piv, passed, tols = heatmap_matrix(df, metric, by, tgt, tap, phase)
    if by == "taps":
        if tgt is None and len(d):
            tgt = d["backend"].iloc[0] + ":" + d["dtype"].iloc[0]
        title = f"{metric} per layer × tap — {tgt} (tol {tols.iloc[0]:.0e})" if len(tols) else str(tgt)
    else:
        title = f"{metric} per layer × backend — {tap}"
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * max(1, piv.shape[1]), 1.2 + 0.32 * max(1, piv.shape[0])))
    else:
        fig = ax.figure
    vals = piv.to_numpy(dtype=float)
    finite = vals[np.isfinite(vals) & (vals > 0)]
    vmin = max(finite.min(), 1e-12) if finite.size else 1e-12
    vmax = max(finite.max(), vmin * 10) if finite.size else 1.0
    plot = np.where(np.isfinite(vals), np.maximum(vals, vmin), vmax)
    im = ax.imshow(plot, aspect="auto", cmap="magma_r", norm=LogNorm(vmin=vmin, vmax=vmax))
    ax.set_xticks(range(piv.shape[1]), [str(c) for c in piv.columns], rotation=30, ha="right")
    ax.set_yticks(range(piv.shape[0]), [str(int(i)) for i in piv.index])
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    pv = passed.reindex(index=piv.index, columns=piv.columns).to_numpy()
    for (yy, xx), ok in np.ndenumerate(pv):
        if ok is not None and not (isinstance(ok, float) and np.isnan(ok)) and not bool(ok):
            ax.add_patch(plt.Rectangle((xx - 0.5, yy - 0.5), 1, 1, fill=False, ec="cyan", lw=2))
    fig.colorbar(im, ax=ax, label=metric)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ the engine
def _targets(backends_arg, dtypes_arg) -> list[tuple[str, str]]:
    if backends_arg in (None, "all"):
        bl = [b for b in _bk.all_backends() if not b.startswith("torch:cuda:")]
    elif isinstance(backends_arg, str):
        bl = [b.strip() for b in backends_arg.split(",") if b.strip()]
    else:
        bl = list(backends_arg)
    dl = ["float32"] if dtypes_arg is None else (
        [d.strip() for d in dtypes_arg.split(",")] if isinstance(dtypes_arg, str) else list(dtypes_arg))
    return [(b, d) for b in bl for d in dl]


def _rows_for(ref_taps: dict, taps: dict, backend: str, dtype: str, kind: str, phase: str, tol: float,
              order_of: dict, positions: slice | None = None, refs=None) -> list[dict]:
    """One row per tap of ``taps`` (numpy, or torch / MLX arrays left on the target's device) against
    ``ref_taps`` (at ``positions`` for decode steps). The statistics are ``metrics`` / ``_topk_agree``'s,
    computed where the arrays live (workbench.parity_metrics; float64 where the device has it), only the
    numbers come to the host; ``refs``: the comparison's RefCache (the reference uploaded once per device)."""
    names = [n for n in taps if n in ref_taps]
    stats = _pm.tap_metrics(ref_taps, {n: taps[n] for n in names}, positions, refs)
    rows = []
    for name in names:
        m = stats[name]
        tap, layer = split_tap(name)
        top = (m.pop("top1"), m.pop("top5_overlap")) if "top1" in m else None
        row = dict(backend=backend, dtype=dtype, kind=kind, phase=phase, tap=tap, layer=layer, tol=tol,
                   order=order_of.get(name, 10**6), **m)
        row["passed"] = bool(m["rel_max"] <= tol and m["nan_count"] == 0 and m["inf_mismatch"] == 0)
        if tap == "logits":
            row["top1"], row["top5_overlap"] = top
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ the anchor
# The float64 reference is the same ONE implementation every backend runs, so it is compared first with an
# independent one: Hugging Face transformers in float64 on the CPU, on the same weights (for a GGUF: the same
# dequantised tensors, exported once). HF's Gemma computes RMSNorm, RoPE and the attention softmax in float32
# even in a float64 model (`x.float()`), so the two agree at float32 rounding, not at 1e-14. That rounding is
# measured on each run: our own model in float32 on the CPU, per tap, against the float64 reference; the
# anchor tolerance of a tap is ANCHOR_K x that error, clipped to [ANCHOR_FLOOR, ANCHOR_CAP]. Measured on
# every fixture and the real 270M (README "Tolerance policy"): clean anchor error / float32 error <= 1.25
# (worst tap, all fixtures + 270M); the ten planted model bugs give >= 121 (eps x100 on gemma3_nested) and
# mostly 1e4..1e8.
ANCHOR_K = 10.0
ANCHOR_FLOOR = 1e-6
ANCHOR_CAP = 1e-4
ANCHOR_TAPS = ["hook_embed", "blocks.*.hook_attn_out", "blocks.*.hook_mlp_out", "blocks.*.hook_resid_post",
               "ln_final.hook_normalized", "logits"]
# parts of a media anchor to run in float32 in HF even where HF could run them in float64 (tests only)
MEDIA_ANCHOR_FLOAT32_PARTS: tuple = ()
ANCHOR_RULE = f"{ANCHOR_K:g}x our float32 error per tap, within [{ANCHOR_FLOOR:.0e}, {ANCHOR_CAP:.0e}]"

# ------------------------------------------------------------------------------------------ dtype budgets
# A bfloat16/float16 target passes a tap when its error vs float64 is within what a correct, independent
# implementation in the same dtype does on this model and prompt: HF transformers run in that dtype on the
# same weights, per tap and layer (running maximum over the layers of each tap kind, so one layer where HF
# happens to round luckily does not set the bar), on both rel_max and rel_l2:
#     rel_max <= K_MAX x max(HF rel_max, u)   and   rel_l2 <= K_L2 x max(HF rel_l2, u)
# (u: the dtype's unit roundoff; K per phase in BUDGET_K). Where HF in that dtype cannot run, or is not finite
# at a tap (float16 overflow), the flat TOLERANCES table applies (budget_source says which).
# Measured (README "Tolerance policy", both CPU backends, every fixture + the real 270M, bfloat16 and float16):
#  * prefill: clean runs reach 2.70x (rel max) / 2.23x (rel L2) of HF's error; a x1.15 error in one layer's
#    MLP output gives >= 3.93x / 6.21x, a 2% error on every norm weight >= 2.79x / 2.37x (Gemma 3 fixtures:
#    >= 4.12x / 3.95x) -> 3.3 / 2.5.
#  * decode: only decode_steps positions (4 by default: a max over 4 tokens) and another route (one token at a
#    time against the cache) than HF's batched prefill at the same positions: the real 270M reaches 5.39x /
#    4.14x on mlx:cpu bfloat16 (layer 8's MLP output, 0.172 vs HF's 0.032) -> 6.5 / 5.0; a fault shows in the
#    prefill rows anyway.
BUDGET_K = {"prefill": (3.3, 2.5), "decode": (6.5, 5.0)}
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def _import_hf():
    from .references.hf import HFReference, _import_transformers
    tr = _import_transformers()
    return HFReference, tr.__version__


def _hf_for(path, dtype: str):
    HFReference, version = _import_hf()
    gguf = str(path).endswith(".gguf")
    return HFReference(str(path), dtype=dtype, gguf_cache=True if gguf else None), version


def _anchor(path, ids_arr, ref_taps, noise_taps, order_of, tolerances) -> tuple[list[dict], dict]:
    """Anchor rows (phase "anchor", backend "hf", dtype "float64") and the anchor's status dict."""
    try:
        hf, version = _hf_for(path, "float64")
    except ImportError as e:
        return [], dict(status="unanchored", reason=f"transformers is not installed ({e})".splitlines()[0])
    except Exception as e:  # noqa: BLE001 - an unsupported checkpoint: say so, and fail
        return [], dict(status="unanchored", reason=f"HF transformers cannot load {path} in float64: "
                        f"{type(e).__name__}: {e}".splitlines()[0][:300])
    got = hf.activations(ids_arr)
    del hf
    return _anchor_verdict(got, ref_taps, noise_taps, order_of, tolerances, f"HF transformers {version} float64 (CPU)",
                           "HF computes RMSNorm, RoPE and softmax in float32 inside its float64 model")


def _anchor_verdict(got, ref_taps, noise_taps, order_of, tolerances, against: str, note: str,
                    extra: dict | None = None) -> tuple[list[dict], dict]:
    """Anchor rows of HF's values ``got`` against the reference (per-tap tolerance from our float32 run's
    error, ANCHOR_RULE) and the status dict."""
    override = None
    if tolerances:
        for key in (("anchor", "float64"), "anchor"):
            if key in tolerances:
                override = float(tolerances[key])
    rows = []
    for name, x in got.items():
        if name not in ref_taps:
            continue
        if override is not None:
            tol, src = override, "override"
        else:
            noise = _pm.host_metrics(ref_taps[name], noise_taps[name])["rel_max"] if name in noise_taps else ANCHOR_CAP
            noise = noise if math.isfinite(noise) else ANCHOR_CAP / ANCHOR_K
            tol, src = min(max(ANCHOR_K * noise, ANCHOR_FLOOR), ANCHOR_CAP), ANCHOR_RULE
        rows += _rows_for(ref_taps, {name: x}, "hf", "float64", "anchor", "anchor", tol, order_of)
        rows[-1].update(budget=tol, budget_source=f"anchor: {src}", margin=_margin(rows[-1]))
    if not rows:
        raise RuntimeError("the anchor compared nothing: no HF value matches a reference tap")
    worst = max(rows, key=_margin)
    info = dict(against=against, n=len(rows), max_err=max(r["rel_max"] for r in rows), worst=worst["rel_max"],
                worst_tol=worst["tol"], worst_margin=_margin(worst),
                worst_at=_where(worst), tol_rule=ANCHOR_RULE if override is None else f"override {override:g}",
                note=note, **(extra or {}))
    bad = sorted([r for r in rows if not r["passed"]], key=lambda r: r["order"])
    if bad:
        info.update(status="failed", first_at=_where(bad[0]), first_err=bad[0]["rel_max"],
                    first_tol=bad[0]["tol"])
    else:
        info["status"] = "anchored"
    return rows, info


# ------------------------------------------------------------------------------------------ the media anchor
# With images/audio the anchor runs HF's Gemma4ForConditionalGeneration on the same weights and on the *same
# preprocessed inputs* (our pixel values + patch positions, our log-mel features + frame mask, our expanded
# token ids): it checks the towers, the projectors and the decoder, not the preprocessing (that is checked
# against HF's processors in tests/test_multimodal*.py). Every part runs in float64 where HF can; where HF
# cannot (transformers 5.24's audio attention raises in float64), that tower runs in float32 and the anchor line
# says so; its rows carry dtype float32. Compared per tap on the real rows only (patches / soft tokens / frames of
# each item, padding dropped, as HF strips it before merging): the vision tower's patch embedding and layer
# outputs, the pooler, the tower output, embed_vision; the audio sub-sampler, layer outputs, output projection,
# embed_audio; then the decoder's taps (ANCHOR_TAPS) over the expanded sequence. Tolerances: ANCHOR_RULE.
_VISION_PATCH_TAPS = ("vision.hook_patch_embed", "vision.blocks.")
_VISION_SOFT_TAPS = ("vision.hook_pooled", "vision.hook_out", "embed_vision.hook_out")
_MEDIA_SCOPE = ("inputs: our preprocessed pixel values / log-mel features (checks towers + projectors + decoder, "
                "not the preprocessing)")


def _media_inputs(model, images, audio, ref_out) -> dict:
    """The arrays our towers took (runner.prepare's preprocessing, deterministic), checked against the counts
    the reference run reported."""
    from .multimodal import preprocess as pp
    from .multimodal.runner import _listify
    enc = model.encoders()
    out = dict(input_ids=np.asarray(ref_out.input_ids), mm_token_type_ids=np.asarray(ref_out.mm_token_type_ids))
    images, audio = _listify(images), _listify(audio)
    if images:
        vc = enc.vcfg
        prep = [pp.preprocess_image(im, enc.max_soft_tokens, vc.patch_size, vc.pooling_kernel_size, pad=False)
                for im in images]
        counts = [p.num_soft_tokens for p in prep]
        if counts != list(ref_out.num_image_tokens):
            raise RuntimeError(f"re-preprocessed images give {counts} soft tokens, the reference run "
                               f"{list(ref_out.num_image_tokens)}")
        out["pixel_values"], out["image_position_ids"] = pp.batch_images(prep)
        out["image_counts"] = counts
    if audio:
        prep_a = [pp.preprocess_audio(a) for a in audio]
        out["input_features"], out["input_features_mask"] = pp.batch_audio(prep_a)
        m = out["input_features_mask"][:, ::2][:, ::2]      # the two stride-2 sub-sampling halvings
        if [int(r.sum()) for r in m] != list(ref_out.num_audio_tokens):
            raise RuntimeError(f"re-preprocessed audio gives {[int(r.sum()) for r in m]} soft tokens, the "
                               f"reference run {list(ref_out.num_audio_tokens)}")
        out["audio_mask"] = m
    return out


def _media_rows_only(name: str, x: np.ndarray, inp: dict, hf_layout: bool = False) -> np.ndarray:
    """A media tap's real rows as [1, N, ...] (padding dropped); text taps unchanged."""
    x = np.asarray(x)
    if name.startswith(_VISION_PATCH_TAPS):
        valid = ~(inp["image_position_ids"] == -1).all(-1)
        return x[valid][None]
    if name.startswith(_VISION_SOFT_TAPS):
        if hf_layout and name != "vision.hook_pooled":     # HF strips the padding itself: [sum S, D]
            return x.reshape(1, -1, x.shape[-1])
        return np.concatenate([x[b, :c] for b, c in enumerate(inp["image_counts"])])[None]
    if name.startswith(("audio.", "embed_audio.")):
        return x[inp["audio_mask"]][None]
    return x


def _media_anchor(path, model32, images, audio, ref_out, ref_taps, noise_taps, order_of,
                  tolerances, float32_parts=()) -> tuple[list[dict], dict]:
    """The anchor of a media prompt: HF's Gemma 4 multimodal model on our preprocessed inputs (see above)."""
    try:
        from .references.hf import HFMultimodalReference, _import_transformers
        version = _import_transformers().__version__
    except ImportError as e:
        return [], dict(status="unanchored", reason=f"transformers is not installed ({e})".splitlines()[0])
    inp = _media_inputs(model32, images, audio, ref_out)
    try:
        hf = HFMultimodalReference(path, "float64", float32_parts=float32_parts)
    except Exception as e:  # noqa: BLE001 - an unsupported checkpoint: say so, and fail
        return [], dict(status="unanchored", reason=f"HF transformers cannot load {path} as a Gemma 4 multimodal "
                        f"model in float64: {type(e).__name__}: {e}".splitlines()[0][:300])
    got = hf.activations(inp["input_ids"], inp["mm_token_type_ids"], inp.get("pixel_values"),
                         inp.get("image_position_ids"), inp.get("input_features"), inp.get("input_features_mask"))
    parts, why = dict(hf.part_dtypes), dict(hf.fallback_reasons)
    del hf
    got.pop("audio.mask", None)
    ref_m, noise_m, got_m = {}, {}, {}
    for name, x in got.items():
        if name not in ref_taps:
            continue
        got_m[name] = _media_rows_only(name, x, inp, hf_layout=True)
        ref_m[name] = _media_rows_only(name, ref_taps[name], inp)
        if name in noise_taps:
            noise_m[name] = _media_rows_only(name, noise_taps[name], inp)
        if got_m[name].shape != ref_m[name].shape:
            raise RuntimeError(f"anchor tap {name}: HF gives {got_m[name].shape} real rows, the reference "
                               f"{ref_m[name].shape}")
    dts = ", ".join(f"{p} tower {d}" for p, d in parts.items() if (p == "vision" and images) or (p == "audio" and audio))
    against = f"HF transformers {version} float64 (CPU" + (f"; {dts}" if dts else "") + ")"
    note = ("HF computes RMSNorm, RoPE, softmax and the vision pooler in float32 inside its float64 model"
            + "".join(f"; {p} tower float32: {w}" for p, w in why.items()))
    rows, info = _anchor_verdict(got_m, ref_m, noise_m, order_of, tolerances, against, note,
                                 extra=dict(part_dtypes=dict(parts, projectors="float64", decoder="float64"),
                                            scope=_MEDIA_SCOPE))
    for r in rows:          # rows of a tower HF ran in float32 say so
        part = "vision" if r["tap"].startswith("vision.") else "audio" if r["tap"].startswith("audio.") else None
        if part and parts.get(part) == "float32":
            r["dtype"] = "float32"
    return rows, info


def _where(r: dict) -> str:
    return r["tap"] + (f" @ layer {r['layer']}" if r.get("layer") is not None else "")


def _same_dtype_errors(path, dtype, ids_arr, ref_taps, P, T):
    """HF in ``dtype`` on the same weights: {phase: {tap name: (rel_max, rel_l2)}} against our float64, the
    prefill over all positions, "decode" over the decode positions [P, T). Raises where HF cannot run."""
    hf, version = _hf_for(path, dtype)
    got = hf.activations(ids_arr)
    del hf
    out = {"prefill": {}, "decode": {}}
    for name, x in got.items():
        if name not in ref_taps:
            continue
        m = _pm.host_metrics(ref_taps[name], x)     # parity.metrics' numbers, computed the fast way
        out["prefill"][name] = (m["rel_max"], m["rel_l2"])
        if P < T:
            m = _pm.host_metrics(ref_taps[name][:, P:T], x[:, P:T])
            out["decode"][name] = (m["rel_max"], m["rel_l2"])
    return out, f"HF transformers {version} {dtype}"


def _apply_budgets(rows: list[dict], hf_err: dict | None, hf_what: str, why_not: str | None, dtype: str):
    """Set each row's tol from the same-dtype budget (see BUDGET_K); the table tol stays in table_tol."""
    u = UNIT_ROUNDOFF[dtype]
    running: dict[tuple, tuple] = {}
    for r in sorted(rows, key=lambda r: (r["phase"], r["order"])):
        r["table_tol"] = r["tol"]
        name = r["tap"] if r["layer"] is None else _tap_name(r["tap"], r["layer"])
        e = (hf_err or {}).get(r["phase"], {}).get(name)
        if e is None or not (math.isfinite(e[0]) and math.isfinite(e[1])):
            reason = why_not or (f"{hf_what} has no value at this tap" if e is None
                                 else f"{hf_what} is not finite here (overflow)")
            r.update(budget=None, budget_l2=None, budget_source=f"table {r['tol']:.0e} ({reason})")
        else:
            key = (r["phase"], r["tap"])
            pm, pl = running.get(key, (0.0, 0.0))
            hm, hl = max(e[0], pm), max(e[1], pl)
            running[key] = (hm, hl)
            kx, kl = BUDGET_K.get(r["phase"], BUDGET_K["decode"])
            b, bl = kx * max(hm, u), kl * max(hl, u)
            r.update(tol=b, budget=b, budget_l2=bl,
                     budget_source=f"budget: {kx:g}x rel max / {kl:g}x rel L2 of {hf_what} ({r['phase']}; "
                                   "running max over layers, floor = unit roundoff)")
            bad = r["nan_count"] > 0 or r["inf_mismatch"] > 0
            r["passed"] = bool(not bad and r["rel_max"] <= b and r["rel_l2"] <= bl)
        r["margin"] = _margin(r)


def _routing_flips(ref_taps: dict, got: dict, dtype: str) -> list[dict]:
    """Tokens whose MoE expert set differs from the reference's, with the reference's margin between its k-th
    and (k+1)-th router probability: a margin under a few units of the dtype's rounding is a near-tie that a
    correct low-precision implementation may break either way (and the outputs then differ by design)."""
    out = []
    for name in sorted(got, key=lambda n: int(n.split(".")[1])):
        if not name.endswith("moe.hook_expert_ids") or name not in ref_taps:
            continue
        layer = int(name.split(".")[1])
        a, b = np.sort(ref_taps[name], -1), np.sort(got[name], -1)
        probs = ref_taps.get(name.replace("hook_expert_ids", "hook_router_probs"))
        k = a.shape[-1]
        for bt in zip(*np.where((a != b).any(-1))):
            m = None
            if probs is not None:
                p = np.sort(np.asarray(probs)[bt], -1)[::-1]
                m = float(p[k - 1] - p[k]) if p.shape[-1] > k else None
            near = m is not None and m < 4 * UNIT_ROUNDOFF.get(dtype, 2.0 ** -24)
            out.append(dict(layer=layer, token=int(bt[-1]), margin=m, near_tie=bool(near)))
    return out


def _tap_name(tap: str, layer: int) -> str:
    for pre in ("vision.", "audio."):
        if tap.startswith(pre):
            return f"{pre}blocks.{layer}.{tap[len(pre):]}"
    return f"blocks.{layer}.{tap}"


def _auto_references(path) -> list[str]:
    """references="auto": llama.cpp beside the anchor for a GGUF source where llama-cpp-python is installed."""
    import importlib.util
    return ["llamacpp"] if str(path).endswith(".gguf") and importlib.util.find_spec("llama_cpp") else []


def compare(source="gemma3-270m", backends=None, dtypes=None, reference: str = "torch:cpu:float64",
            prompt: str | list[int] | None = None, taps=None, decode_steps: int = 4, references="auto",
            tolerances: dict | None = None, db=None, store: bool = True, progress=True,
            fault: dict | None = None, max_tokens: int = 64, images=None, audio=None, anchor: bool = True,
            decode: str = "plain", budgets: bool = True, against=None) -> ParityReport:
    """Compare every backend x dtype with the reference, tap by tap and layer by layer.

    source: HF dir, .gguf or registered name. backends: list, comma string or "all". dtypes: list or comma
    string (default float32). reference: "torch:cpu:float64" (default) or another "backend:dtype".
    anchor: first compare the float64 reference with HF transformers in float64 on the same weights, per tap
    and layer (report.anchor, the summary's first line); a disagreement, or an anchor that cannot run, fails
    the report. anchor=False skips it knowingly: the report then says UNANCHORED and passes on the backends.
    references: independent implementations compared with the same reference ("hf": HF float32 resid/logits,
    "llamacpp": llama.cpp logits of a GGUF); "auto" (default): llamacpp for GGUF sources where installed. A
    reference asked for by name that cannot run fails the report, with the reason.
    budgets: bfloat16/float16 targets are judged against what HF in the same dtype does (BUDGET_K), the
    flat table as the fallback; False: the table only.
    decode_steps: the last N prompt tokens are also fed one by one through the KV cache and compared.
    decode: "plain" (the model's forward with a KV cache) or "fast" (the fast decode engine's route,
    workbench.decode.capture_decode, teacher-forced; rows carry the route).
    tolerances: overrides {(kind, dtype): tol} or {dtype: tol} ({"anchor": tol} for the anchor); an override
    for a target's (kind, dtype) or dtype replaces its budget too. fault: test-only perturbation
    {"backend": "mlx:cpu", "layer": 3, "tap": "hook_mlp_out", "scale": 1e-2}.
    progress: True prints "[i/N] what" lines to stderr; a callable gets (step, total, what); False: silent.
    images / audio (Gemma 4 multimodal checkpoints): media for the prompt's placeholders; the vision/audio
    towers and projector outputs are then compared per layer too (prefill only); the anchor then runs HF's
    Gemma4ForConditionalGeneration on our preprocessed pixel values / log-mel features (towers, projectors and
    decoder are anchored, not the preprocessing), in float64 where HF can and float32 per tower where it cannot
    (the audio tower in transformers 5.24): the anchor line names each tower's dtype.
    against: an already-resolved reference (a ``reference_artifact.Artifact``, or anything with its
    ``reference_taps(path, cfg)`` and ``token_ids``): its taps are the reference, once its hashes match the local
    model's. ``wb.compare`` (workbench.comparison) reads ``against=FILE`` or shards the reference (``world=N``)
    and passes the artifact here with its prompt, taps and label as source/prompt/taps/reference.
    Stores the run in the results store (``db`` or the default) unless store=False."""
    from .loader import Checkpoint, build_model, read_source, resolve_source

    capture_decode = _decode_route(decode)
    targets = _targets(backends, dtypes)
    art = against
    if art is not None and not callable(getattr(art, "reference_taps", None)):
        raise TypeError(f"parity.compare(against=...) takes a resolved reference artifact, not {against!r}; "
                        "wb.compare(against=PATH) reads the file (workbench.comparison)")
    media = bool(images or audio)
    refs, asked = _references(references, resolve_source(source), media)
    low = sorted({d for _, d in targets if d in UNIT_ROUNDOFF}) if budgets else []
    prog = _Progress(progress, 2 + len(low) + len(targets) + len(refs))
    prog.note(f"loading {source}")
    laps = _pm.Laps()     # the run's cost, by step (meta["cost"], the summary's cost line)
    cfg, tensors, path, tok = read_source(source, dtype="float64", progress=prog.prints)
    laps("load_s")
    ids = _prompt_ids(prompt, tok, max_tokens, source)
    mm = dict(images=images, audio=audio) if media else {}
    ids_arr = np.asarray(ids, dtype=np.int64)[None]
    T = ids_arr.shape[1]
    decode_steps = 0 if media else max(0, min(decode_steps, T - 1))
    if not cfg.causal:   # bidirectional attention: a cached decode cannot see the later tokens the prefill sees
        decode_steps = 0
    taps, order_of = _compare_taps(cfg, taps, media)

    def build(ops):   # the one loader (the media towers' tensors are kept; built on first use)
        return build_model(Checkpoint(cfg, tensors, path, tok), ops, source)

    # MoE: the router's choice per token, to tell a near-tie routing flip from a fault (not compared as rows)
    moe_taps = ["blocks.*.moe.hook_expert_ids", "blocks.*.moe.hook_router_probs"] \
        if cfg.arch == "gemma4" and cfg.enable_moe_block and not media else []
    ref_out, ref_taps = _reference_taps(build, art, path, cfg, reference, ids_arr, taps, anchor, moe_taps, mm)
    prog.step(f"reference {reference}")
    laps("reference_s")

    anchor_rows, anchor_info = _run_anchor(build, anchor, reference, art, path, ids_arr, ref_out, ref_taps, taps,
                                           order_of, tolerances, images, audio)
    prog.step("anchor: " + ("off" if not anchor else anchor_info["status"]))
    laps("anchor_s")

    same_dtype = _budget_errors(low, media, path, ids_arr, ref_taps, T - decode_steps, T, prog)
    laps("budgets_s")
    per_target: dict = {}
    rows, skipped, devices, routing_flips = target_rows(
        build, targets, ids_arr, taps, ref_taps, order_of, decode_steps=decode_steps, tolerances=tolerances,
        fault=fault, prog=prog, forward_kw=mm, extra_taps=moe_taps, capture_decode=capture_decode,
        budgets=same_dtype, cost=per_target)
    laps("targets_s")
    ext_rows, failed_refs = _independent_rows(refs, asked, media, path, cfg, ids_arr, ref_taps, tolerances, order_of,
                                              skipped, prog)
    rows += ext_rows
    laps("independent_s")

    meta = _report_meta(source, path, reference, targets, T, decode_steps, images, audio, prompt, ids, taps, cfg,
                        skipped, devices, anchor_info, failed_refs, refs, decode, routing_flips)
    meta["cost"] = laps.cost(per_target)
    rep = ParityReport(rows=rows, meta=meta, skipped=skipped, anchor=anchor_rows, anchor_info=anchor_info,
                       failed_references=failed_refs)
    meta["passed"] = rep.passed
    if store:
        from . import runs
        rep.run_id = runs.save_run("parity", meta, anchor_rows + rows, db=db, devices=devices,
                                   params=dict(decode_steps=decode_steps, taps=taps, tolerances=_jsonable(tolerances),
                                               fault=fault, anchor=anchor, decode=decode, budgets=budgets))
    return rep


# ------------------------------------------------------------------------------------------ compare's steps
def _decode_route(decode: str):
    """capture_decode of the fast decode engine for decode="fast", None for "plain"."""
    if decode not in ("plain", "fast"):
        raise ValueError(f"decode must be 'plain' or 'fast', not {decode!r}")
    if decode == "plain":
        return None
    try:
        from .decode import capture_decode
    except ImportError as e:
        raise NotImplementedError(f"decode='fast' needs workbench.decode.capture_decode (the fast decode "
                                  f"engine), which is not importable here: {e}") from None
    return capture_decode


def _prompt_ids(prompt, tok, max_tokens: int, source) -> list[int]:
    """The prompt's token ids: a text prompt (default DEFAULT_PROMPT) encoded and cut to max_tokens; ids as given."""
    if prompt is None:
        prompt = DEFAULT_PROMPT
    if isinstance(prompt, str):
        if tok is None:
            raise ValueError(f"{source}: no tokenizer for a text prompt; pass token ids (--prompt-ids)")
        return [int(i) for i in tok.encode(prompt)[:max_tokens]]
    return [int(i) for i in np.asarray(prompt).reshape(-1)]


def _compare_taps(cfg, taps, media: bool) -> tuple[list[str], dict[str, int]]:
    """The taps compared (default DEFAULT_TAPS; with media, the towers' that this checkpoint has) and the forward
    order of every point name (vision and audio towers first)."""
    from .model.taps import point_names
    taps = list(taps or DEFAULT_TAPS)
    names = point_names(cfg)
    if media:
        from .multimodal.points import audio_point_names, vision_point_names
        raw = cfg.raw or {}
        mnames = (vision_point_names(raw["vision_config"]["num_hidden_layers"]) if raw.get("vision_config") else []) + \
            (audio_point_names(raw["audio_config"]["num_hidden_layers"]) if raw.get("audio_config") else [])
        taps += [t for t in MEDIA_TAPS if any(fnmatch.fnmatchcase(n, t) for n in mnames)]
        names = mnames + names
    return taps, {n: k for k, n in enumerate(names)}


def _references(references, path, media: bool) -> tuple[list[str], bool]:
    """(independent references to run, whether the caller named them: then one that cannot run fails)."""
    if references == "auto" or references is None:
        return ([] if media else _auto_references(path)), False
    refs = [r.strip() for r in references.split(",") if r.strip()] if isinstance(references, str) else list(references)
    return refs, True


def _reference_taps(build, art, path, cfg, reference, ids_arr, taps, anchor, extra_taps, mm) -> tuple:
    """(the reference's forward output or None, its taps + "logits"): the artifact's taps once its hashes match
    these weights, config and tokenizer, else one forward of the reference model."""
    if art is not None:
        return None, art.reference_taps(path, cfg)
    ref_backend, ref_dtype = _split_reference(reference)
    ref_model = build(_bk.get_ops(ref_backend, ref_dtype))
    want = list(dict.fromkeys(taps + (ANCHOR_TAPS if anchor else []) + list(extra_taps)))
    ref_out = ref_model.forward(ids_arr, taps=want, **mm)
    ref_taps = dict(ref_out.taps)
    ref_taps["logits"] = ref_out.logits
    return ref_out, ref_taps


def _split_reference(reference: str) -> tuple[str, str]:
    parts = reference.split(":")
    return ":".join(parts[:-1]), parts[-1]


def _run_anchor(build, anchor, reference, art, path, ids_arr, ref_out, ref_taps, taps, order_of, tolerances,
                images, audio) -> tuple[list[dict], dict]:
    """The anchor: the reference itself against HF float64 (with media: HF's multimodal model on our
    preprocessed inputs). (anchor rows, anchor status); an anchor that cannot run is "unanchored", with why."""
    if not anchor:
        return [], dict(status="off", reason="anchor=False: knowingly unanchored")
    if _split_reference(reference)[1] != "float64":
        return [], dict(status="unanchored", reason=f"the anchor checks a float64 reference, not {reference}")
    media = bool(images or audio)
    try:
        if media and art is not None:
            raise ValueError("a stored/sharded reference (against=/world=) with media is not supported")
        m32 = build(_bk.get_ops("torch:cpu", "float32"))
        if media:
            media_taps = [t for t in taps if t.startswith(("vision.", "audio.", "embed_vision.", "embed_audio."))]
            o32 = m32.forward(ids_arr, taps=ANCHOR_TAPS + media_taps, images=images, audio=audio)
            noise = dict(o32.taps, logits=o32.logits)
            return _media_anchor(path, m32, images, audio, ref_out, ref_taps, noise, order_of, tolerances,
                                 MEDIA_ANCHOR_FLOAT32_PARTS)
        o32 = m32.forward(ids_arr, taps=ANCHOR_TAPS)
        del m32
        return _anchor(path, ids_arr, ref_taps, dict(o32.taps, logits=o32.logits), order_of, tolerances)
    except Exception as e:  # noqa: BLE001 - the anchor could not run: that fails the report, with why
        what = "the media anchor" if media else "the anchor"
        return [], dict(status="unanchored", reason=f"{what} failed to run: {type(e).__name__}: "
                        f"{e}".splitlines()[0][:300])


def _budget_errors(low, media, path, ids_arr, ref_taps, P, T, prog) -> dict[str, tuple]:
    """Same-dtype budgets: per low-precision dtype, (HF-in-that-dtype errors, what ran, why not)."""
    same_dtype: dict[str, tuple] = {}
    for d in low:
        if media:
            same_dtype[d] = (None, "", "no same-dtype HF run for media prompts")
        else:
            try:
                err, what = _same_dtype_errors(path, d, ids_arr, ref_taps, P, T)
                same_dtype[d] = (err, what, None)
            except Exception as e:  # noqa: BLE001 - no budget: the table applies, and the rows say why
                same_dtype[d] = (None, "", f"HF in {d} could not run: {type(e).__name__}: {e}".splitlines()[0][:200])
        prog.step(f"budget {d}")
    return same_dtype


def _independent_rows(refs, asked, media, path, cfg, ids_arr, ref_taps, tolerances, order_of, skipped,
                      prog) -> tuple[list[dict], dict[str, str]]:
    """Rows of the independent references (HF float32, llama.cpp) against the reference; one that cannot run is
    skipped (and, when the caller asked for it by name, fails the report: the second value)."""
    rows, failed = [], {}
    for ext in refs:
        try:
            if media:
                raise ValueError("independent references compare text prompts only, not media prompts")
            rows += _external_rows(ext, path, cfg, ids_arr, ref_taps, tolerances, order_of)
        except Exception as e:  # missing package, non-GGUF source ...
            why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            skipped[ext] = why
            if asked:
                failed[ext] = why
        prog.step(f"reference {ext}")
    return rows, failed


def _report_meta(source, path, reference, targets, T, decode_steps, images, audio, prompt, ids, taps, cfg, skipped,
                 devices, anchor_info, failed_refs, refs, decode, routing_flips) -> dict:
    from .loader import source_hash
    return dict(model=str(source), source=str(path), source_hash=source_hash(path), reference=reference,
                backends=sorted({b for b, _ in targets}), dtypes=sorted({d for _, d in targets}),
                n_tokens=T, decode_steps=decode_steps, media=dict(images=len(images or []), audio=len(audio or [])),
                prompt=prompt if isinstance(prompt, str) else None, token_ids=ids, taps=taps, skipped=skipped,
                devices=devices, arch=cfg.arch, anchor=anchor_info, failed_references=failed_refs, references=refs,
                decode=decode, routing_flips=routing_flips)


# ------------------------------------------------------------------------------------------ the target loop
def check_target(backend: str, dtype: str):
    """(spec, what the device is, dtype normalised) of a backend x dtype that can run here; raises
    ``backends.BackendError`` with the reason where it cannot (not installed, no device, no such dtype there)."""
    spec = _bk.parse(backend)
    ok, why = _bk.status(backend)
    if not ok:
        raise _bk.BackendError(why)
    return spec, why, _bk.check_dtype(dtype, spec)


def target_rows(build, targets, ids_arr, taps, ref_taps, order_of, *, decode_steps: int = 0, tolerances=None,
                fault=None, prog=None, make_ops=None, forward_kw=None, extra_taps=(), capture_decode=None,
                budgets=None, cost: dict | None = None) -> tuple[list[dict], dict, dict, dict]:
    """The per-target part of every comparison (``wb.compare``, a stored or sharded reference, the sharded targets
    of workbench.distributed): per backend x dtype, a model from ``build(ops)`` (``make_ops(backend, dtype)``,
    default ``backends.get_ops``), its prefill taps and the last ``decode_steps`` tokens through the KV cache
    (``capture_decode``: the fast route's, else the plain forward), rows against ``ref_taps``, each row's tolerance
    from the table (``tolerances`` overrides it) or from ``budgets`` ({dtype: (HF errors, what, why not)});
    ``extra_taps`` (MoE routing) compared as routing flips, not rows. Returns (rows, skipped {target: why},
    devices {target: device}, routing flips {target: [...]}). With the default ops the taps stay on the target's
    device and the statistics are computed there (workbench.parity_metrics); ``cost`` (a dict) gets, per target,
    {build_s, forward_s (its own forwards: prefill, and the decode route's prefill + steps), metrics_s (the
    parity work on its outputs: reference upload, statistics, the scalars' transfer, the rows)}."""
    refs = _pm.RefCache(ref_taps)
    on_device = make_ops is None     # sharded (tensor-parallel) ops: their taps come gathered through numpy
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    devices: dict[str, str] = {}
    routing_flips: dict[str, list] = {}
    for b, d in targets:
        key = f"{b}:{d}"
        try:
            spec, device, _ = check_target(b, d)
        except _bk.BackendError as e:
            skipped[key] = str(e)
            prog and prog.step(f"{key} skipped: {e}")
            continue
        devices[key] = device
        clock = dict(build_s=time.perf_counter(), forward_s=0.0, metrics_s=0.0)
        m = build((make_ops or _bk.get_ops)(b, d))
        clock["build_s"] = time.perf_counter() - clock["build_s"]
        if fault and _bk.parse(fault["backend"]).name == spec.name and fault.get("dtype", d) == d:
            m.perturb = _make_fault(fault)
        tol = tolerance_for(spec.kind, d, tolerances)
        trows, flips = _prefill_rows(m, spec, d, tol, ids_arr, taps, ref_taps, order_of, forward_kw, extra_taps,
                                     refs=refs, on_device=on_device, clock=clock)
        if flips:
            routing_flips[key] = flips
        if decode_steps:
            trows += _decode_rows(m, spec, d, tol, ids_arr, decode_steps, taps, ref_taps, order_of, capture_decode,
                                  refs=refs, on_device=on_device, clock=clock)
        if cost is not None:
            cost[key] = {k: round(v, 4) for k, v in clock.items()}
        overridden = bool(tolerances) and any(k in tolerances for k in ((spec.kind, d), spec.kind, d))
        if budgets and d in budgets and not overridden:
            _apply_budgets(trows, *budgets[d], d)
        else:
            for r in trows:
                r["margin"] = _margin(r)
        rows += trows
        del m
        prog and prog.step(key)
    return rows, skipped, devices, routing_flips


def _prefill_rows(m, spec, d, tol, ids_arr, taps, ref_taps, order_of, forward_kw=None, extra_taps=(), refs=None,
                  on_device=False, clock=None):
    """A target's prefill rows, and its MoE routing flips against the reference (from ``extra_taps``).
    on_device: the taps stay on the target's device (text prompts); clock: {forward_s, metrics_s} accumulated."""
    t0 = time.perf_counter()
    want = list(taps) + list(extra_taps)
    got = _pm.device_forward(m, ids_arr, want) if on_device and not forward_kw else None
    if got is None:
        out = m.forward(ids_arr, taps=want, **(forward_kw or {}))
        got = dict(out.taps)
        got["logits"] = out.logits
    _pm.ready(m, list(got.values()))
    t1 = time.perf_counter()
    routing = {n: _pm.to_numpy(m, got.pop(n)) for n in list(got)
               if n.endswith(("moe.hook_expert_ids", "moe.hook_router_probs"))
               and not any(fnmatch.fnmatchcase(n, t) for t in taps)}
    flips = _routing_flips(ref_taps, routing, d) if routing else []
    rows = _rows_for(ref_taps, got, spec.name, d, spec.kind, "prefill", tol, order_of, refs=refs)
    if clock is not None:
        clock["forward_s"] += t1 - t0
        clock["metrics_s"] += time.perf_counter() - t1
    return rows, flips


def _decode_rows(m, spec, d, tol, ids_arr, decode_steps, taps, ref_taps, order_of, capture_decode=None, refs=None,
                 on_device=False, clock=None):
    """The last ``decode_steps`` prompt tokens one by one through the KV cache (teacher-forced), rows against the
    reference at those positions; each row carries its route ("plain", or the fast engine's). on_device / clock:
    as ``_prefill_rows`` (the plain route's taps stay on the device, concatenated there)."""
    T = ids_arr.shape[1]
    P = T - decode_steps
    t0 = time.perf_counter()
    if capture_decode is not None:
        dec, route = capture_decode(m, ids_arr, P, taps)
    else:
        cache = m.new_cache(batch=1, max_len=T)
        route = "plain"
        if on_device and _pm.device_forward(m, ids_arr[:, :P], [], cache) is not None:
            dec = _pm.concat_steps([_pm.device_forward(m, ids_arr[:, t:t + 1], taps, cache) for t in range(P, T)])
        else:
            m.forward(ids_arr[:, :P], cache=cache)
            steps = [m.forward(ids_arr[:, t:t + 1], taps=taps, cache=cache) for t in range(P, T)]
            dec = {n: np.concatenate([s.taps[n] for s in steps], axis=1) for n in steps[0].taps}
            dec["logits"] = np.concatenate([s.logits for s in steps], axis=1)
    _pm.ready(m, list(dec.values()))
    t1 = time.perf_counter()
    rows = _rows_for(ref_taps, dec, spec.name, d, spec.kind, "decode", tol, order_of, positions=slice(P, T), refs=refs)
    for r in rows:
        r["route"] = route
    if clock is not None:
        clock["forward_s"] += t1 - t0
        clock["metrics_s"] += time.perf_counter() - t1
    return rows


def _jsonable(t):
    if not t:
        return None
    return {":".join(k) if isinstance(k, tuple) else str(k): v for k, v in t.items()}


def _make_fault(fault: dict):
    layer, tap, scale = int(fault["layer"]), fault.get("tap", "hook_mlp_out"), float(fault.get("scale", 1e-2))

    def perturb(i, name, x):
        if i == layer and name == tap:
            return x * (1.0 + scale)
        return x
    return perturb


def _external_rows(ext: str, path, cfg, ids_arr, ref_taps, tolerances, order_of) -> list[dict]:
    if ext == "hf":
        from .references.hf import HFReference
        ref = HFReference(str(path), dtype="float32", gguf_cache=True if str(path).endswith(".gguf") else None)
        got = {"logits": ref.logits(ids_arr)}
        rp = ref.resid_post(ids_arr)
        for i in range(rp.shape[0]):
            got[f"blocks.{i}.hook_resid_post"] = rp[i]
        tol = tolerance_for("hf", "float32", tolerances)
        return _rows_for(ref_taps, got, "hf", "float32", "hf", "prefill", tol, order_of)
    if ext == "llamacpp":
        if not str(path).endswith(".gguf"):
            raise ValueError("llama.cpp compares GGUF sources only")
        from .references.llamacpp import LlamaCppReference
        ref = LlamaCppReference(str(path), n_ctx=max(512, ids_arr.shape[1] + 8))
        got = {"logits": np.asarray(ref.logits(ids_arr[0].tolist()))[None]}
        tol = tolerance_for("llamacpp", "gguf", tolerances)
        return _rows_for(ref_taps, got, "llamacpp", "gguf", "llamacpp", "prefill", tol, order_of)
    raise ValueError(f"unknown external reference {ext!r}; use 'hf' or 'llamacpp'")
