"""Figures of the notebooks and the explorer (matplotlib): parity heatmaps per target, throughput with the
bandwidth limit, the logit lens, attention patterns with token labels, patching curves, bench history.

The per-layer Δ heatmap itself is ``workbench.parity.heatmap`` (the dashboard draws its own variant in
``dashboards/_logic.py``; see the notes of issue 18)."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np


# ============================================================================ parity pictures
def parity_figures(frame, metric: str = "rel_max", tap: str = "hook_resid_post",
                   phase: str = "prefill") -> dict[str, object]:
    """Per-layer Δ heatmaps of a parity frame: layers x backends for ``tap`` and layers x taps per target
    (failing cells outlined, tolerance in the title). Returns {png filename: figure}."""
    from .parity import heatmap
    figs = {}
    df = frame[frame["layer"].notna()]
    if df.empty:
        return figs
    if (df["tap"] == tap).any():
        figs[f"parity_{phase}_{metric}_by_backend.png"] = heatmap(frame, metric=metric, by="backends", tap=tap,
                                                                   phase=phase)
    for (b, d), _ in df.groupby(["backend", "dtype"], sort=False):
        name = f"parity_{phase}_{metric}_{b.replace(':', '-')}_{d}.png"
        figs[name] = heatmap(frame, metric=metric, by="taps", backend=b, dtype=d, phase=phase)
    return figs


# ============================================================================ throughput pictures
def throughput_figure(frame, title: str | None = None):
    """Prefill and decode tokens/s per backend (bars) with the memory-bandwidth ceiling of decode marked:
    ceiling tok/s = bandwidth limit / bytes read per step (= decode tok/s x limit / achieved GB/s); a third
    panel shows achieved GB/s against the device limit. Log scale where the limit is decades away."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    df = frame[frame["status"] == "ok"].copy() if "status" in frame else frame.copy()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    if df.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "no measured rows", ha="center", va="center")
            ax.set_axis_off()
        return fig
    if "impl" not in df:
        df["impl"] = "workbench"
    df["label"] = df["backend"] + "\n" + df["dtype"] + np.where(df["impl"] != "workbench", "\n(" + df["impl"] + ")", "")
    x = np.arange(len(df))
    colors = ["#4c72b0" if i == "workbench" else "#999999" for i in df["impl"]]
    fmt = FuncFormatter(lambda v, _: f"{v:g}")

    def panel(ax, values, limits, name, note=None):
        values = np.asarray(values, dtype=float)
        ax.bar(x, values, color=colors)
        lim = np.asarray([np.nan if v is None else float(v) for v in limits], dtype=float)
        if np.isfinite(lim).any():
            for xi, c in zip(x, lim):
                if np.isfinite(c):
                    ax.plot([xi - 0.4, xi + 0.4], [c, c], color="crimson", lw=2.2)
            ax.plot([], [], color="crimson", lw=2.2, label="bandwidth limit")
            ax.legend(loc="upper right", fontsize=8)
            pos = values[values > 0]
            if pos.size and np.nanmax(lim) / pos.min() > 30:
                ax.set_yscale("log")
            ax.set_ylim(top=np.nanmax(lim) * (3 if ax.get_yscale() == "log" else 1.15))
        elif np.isfinite(values).any():
            ax.set_ylim(top=np.nanmax(values) * 1.15)
        for xi, v, n in zip(x, values, note if note is not None else [None] * len(x)):
            if np.isfinite(v):
                ax.annotate(f"{v:.3g}" + (f"\n{n}" if n else ""), (xi, v), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
        ax.yaxis.set_major_formatter(fmt)
        ax.set_title(name)
        ax.set_xticks(x, df["label"], fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    panel(axes[0], df["prefill_tok_s"], [None] * len(df), f"prefill (pp{int(df['prompt_len'].iloc[0])}) tok/s")
    frac = [f"{100 * f:.0f}% of limit" if f is not None and np.isfinite(float(f)) else None
            for f in (df["bw_fraction"] if "bw_fraction" in df else [None] * len(df))]
    panel(axes[1], df["decode_tok_s"], _decode_ceiling(df), f"decode (tg{int(df['gen_len'].iloc[0])}) tok/s", frac)
    panel(axes[2], df["gbps"] if "gbps" in df else np.full(len(df), np.nan),
          df["bw_limit_gbps"] if "bw_limit_gbps" in df else [None] * len(df), "decode achieved GB/s")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _decode_ceiling(df) -> list:
    out = []
    for _, r in df.iterrows():
        g, lim, tps = r.get("gbps"), r.get("bw_limit_gbps"), r.get("decode_tok_s")
        try:
            out.append(float(tps) * float(lim) / float(g) if g and lim and float(g) > 0 else None)
        except (TypeError, ValueError):
            out.append(None)
    return out


@contextlib.contextmanager
def _quiet_glyphs():
    """Token labels may hold characters the default font lacks (CJK ...): drawn as boxes, without warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from font")
        yield


def lens_figure(lens, labels=None, title: str = "logit lens: top-1 token per layer"):
    """A layers x positions grid of the top-1 token, coloured by its probability; ``labels``: the input
    tokens, shown under the positions."""
    import matplotlib.pyplot as plt
    top = lens[lens["rank"] == 0]
    piv_p = top.pivot(index="layer", columns="position", values="prob")
    piv_t = top.pivot(index="layer", columns="position", values="token")
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * piv_p.shape[1], 0.9 + 0.3 * piv_p.shape[0]))
    im = ax.imshow(piv_p.to_numpy(float), aspect="auto", cmap="Blues", vmin=0, vmax=1)
    for (yy, xx), t in np.ndenumerate(piv_t.to_numpy()):
        ax.text(xx, yy, str(t)[:8], ha="center", va="center", fontsize=7,
                color="white" if piv_p.to_numpy(float)[yy, xx] > 0.6 else "black")
    Lmax = lens["layer"].max()
    ax.set_yticks(range(piv_p.shape[0]), ["out" if i == Lmax else str(i) for i in piv_p.index])
    ax.set_xticks(range(piv_p.shape[1]), [f"{c}\n{str(labels[c])[:8]}" if labels is not None and c < len(labels)
                                          else str(c) for c in piv_p.columns], fontsize=7)
    ax.set_xlabel("position (input token)")
    ax.set_ylabel("layer (resid_post)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="p(top-1)")
    with _quiet_glyphs():
        fig.tight_layout()
    return fig


def tick_labels(labels, n: int, every: int | None = None) -> tuple[list[int], list[str]]:
    """(positions, "i label" strings) for an axis of n tokens: every label when there are few, every
    ``every``-th (about 24 shown) when there are many. Labels are cut to 10 characters."""
    every = every or max(1, int(np.ceil(n / 24)))
    pos = list(range(0, n, every))
    return pos, [f"{i} {str(labels[i])[:10]}" if labels is not None and i < len(labels) else str(i) for i in pos]


def pattern_figure(pattern: np.ndarray, labels=None, title: str = "attention pattern", query: int | None = None):
    """One map per head: rows = query positions, columns = key positions, the input tokens on both axes
    (thinned out for long prompts); ``query`` marks a row."""
    import matplotlib.pyplot as plt
    H, T, S = pattern.shape
    size = 2.6 if labels is None else 3.3
    fig, axes = plt.subplots(1, H, figsize=(size * H + 1.2, size + (1.1 if labels is not None else 0.3)),
                             squeeze=False)
    kl = labels[-S:] if labels is not None and len(labels) >= S else None
    for h in range(H):
        ax = axes[0, h]
        ax.imshow(pattern[h], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"head {h}", fontsize=9)
        if labels is not None:
            xp, xt = tick_labels(kl, S)
            yp, yt = tick_labels(labels, T)
            ax.set_xticks(xp, xt, rotation=90, fontsize=6)
            ax.set_yticks(yp, yt if h == 0 else [""] * len(yp), fontsize=6)
            if h == 0:
                ax.set_ylabel("query", fontsize=8)
            ax.set_xlabel("key", fontsize=8)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        if query is not None:
            ax.axhline(query % T, color="red", lw=0.8)
    fig.suptitle(title, fontsize=10)
    with _quiet_glyphs():
        fig.tight_layout()
    return fig


def patching_figure(curves: dict, labels=None, position: int | None = None, title: str | None = None):
    """{backend: patching frame} as one line per backend (they should lie on top of each other): the share
    restored per layer, from ``interp.patch_logit_diff`` (clean -> corrupted, a logit difference) or
    ``interp.patching_sweep`` (corrupted -> clean, the KL)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for i, (b, df) in enumerate(curves.items()):
        ax.plot(df["layer"], df["restored"], marker="o", ms=4 + 3 * (len(curves) - 1 - i), label=b, alpha=0.8)
    first = next(iter(curves.values()))
    ax.set_xticks(list(first["layer"]))
    where = "at the corrupted position" if position is not None else "at every position"
    ax.set_xlabel(f"layer patched ({first['tap'].iloc[0]} {where})")
    if "logit_diff" in first:
        ax.set_ylabel("share of the logit diff. restored")
        ax.axhline(0, color="grey", lw=0.6)
        ax.axhline(1, color="grey", lw=0.6, ls="--")
    else:
        ax.set_ylabel("share of the corruption's KL")
    ax.grid(alpha=0.3)
    ax.legend()
    what = f"token {position}" + (f" {labels[position]!r}" if labels is not None and position is not None else "")
    ax.set_title(title or f"activation patching: {what} corrupted", fontsize=10)
    with _quiet_glyphs():
        fig.tight_layout()
    return fig


def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    with _quiet_glyphs():
        fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def history_figure(hist, metric: str = "decode_tok_s", title: str | None = None):
    """decode tok/s per series over time; regressions (vs the best earlier run) as red crosses."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.2))
    if hist is None or hist.empty:
        ax.text(0.5, 0.5, "no benchmark history", ha="center", va="center")
        ax.set_axis_off()
        return fig
    for s, g in hist.groupby("series"):
        ax.plot(g["created_at"], g[metric], marker="o", label=s)
    bad = hist[hist["regression"]]
    if len(bad):
        ax.scatter(bad["created_at"], bad[metric], marker="x", s=90, color="crimson", zorder=5, label="regression")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or f"{metric} across runs", fontsize=10)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def save_figures(figs: dict, out_dir, show: bool = True) -> list[Path]:
    """Save {filename: figure} as PNGs into out_dir, close them, and (in a notebook) display the PNGs."""
    import matplotlib.pyplot as plt
    od = Path(out_dir)
    od.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figs.items():
        p = od / name
        with _quiet_glyphs():
            fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    if show:
        try:
            from IPython.display import Image, display
            for p in paths:
                display(Image(filename=str(p)))
        except ImportError:
            pass
    return paths


