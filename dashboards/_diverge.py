"""Data logic of the divergence page (dashboards/pages/diverge.py), importable and testable without Streamlit:
the token strip (HTML, coloured by KL, first divergence marked, both top-5s in each token's hover title), the KL
curve, the KV-cache heatmap and the local-versus-inherited bars."""
from __future__ import annotations

import html
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KL_FLOOR = 1e-12


def load_divergence(store, run_id):
    """(Divergence, None) or (None, message) — never raises."""
    from workbench.diverge import Divergence
    try:
        return Divergence.from_run(store.load(run_id)), None
    except Exception as e:
        return None, f"run {run_id} can't be shown: {type(e).__name__}: {e}"


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
        style = f"background:{_kl_colour(kl, lo, hi)}; padding:2px 1px; border-radius:3px; white-space:pre;"
        cls = "wb-tok"
        if first:
            cls += " wb-first"
            style += " outline: 3px solid #1f4fd1; outline-offset: 1px;"
        elif not r.get("agree", True):
            cls += " wb-differ"
            style += " text-decoration: underline dotted;"
        parts.append(f'<span class="{cls}" data-step="{int(r["step"])}" data-kl="{_num(kl)}" '
                     f'title="{html.escape(title, quote=True)}" style="{style}">'
                     f'{html.escape(_vis(r.get("token_text")))}</span>')
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
    cmap = plt.get_cmap("magma_r").copy()
    cmap.set_bad("#d9d9d9")
    im = None
    for ax, (layers, positions, mat), name in zip(axes, mats, ("K", "V")):
        plot = np.ma.masked_invalid(np.where(mat > 0, mat, vmin))
        im = ax.imshow(plot, aspect="auto", cmap=cmap, norm=LogNorm(vmin=vmin, vmax=vmax), interpolation="nearest",
                       extent=(positions[0] - 0.5, positions[-1] + 0.5, layers[-1] + 0.5, layers[0] - 0.5))
        ax.set_title(f"{name} cache: relative L2 error per position — {target}", fontsize=9)
        ax.set_xlabel("absolute position")
        ax.set_yticks(layers, [f"{i}" + (f"→{shared[i]}" if i in shared else "") for i in layers], fontsize=7)
    axes[0].set_ylabel("layer (→ KV source)")
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
    for r in rows:
        if r.get("overflow"):
            ax.annotate("overflow", (r["layer"] - w / 2, top), ha="center", va="top", fontsize=7, rotation=90,
                        color="#d62728")
        elif r.get("input_nonfinite"):
            ax.annotate("input ∞", (r["layer"] - w / 2, top), ha="center", va="top", fontsize=6, rotation=90,
                        color="#555")
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
