"""Data logic of the parity dashboard, importable and testable without Streamlit or a browser.

Run selection and filtering, the heatmap picture (tolerance marked, failing cells outlined, first divergence boxed),
throughput bars and history, and running a new parity or benchmark in-process with a progress callback. Verdicts
are not computed here: a stored parity run is read back as the library's report (``ParityReport.from_run``), whose
``passed``, ``first_divergence``, ``target_table()`` and ``heatmap_matrix()`` the page shows; a divergence run as
``Divergence.from_run``. ``dashboards/parity.py`` only lays these out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = "gemma3-270m"
METRICS = ("rel_max", "rel_l2", "nmse", "1-cosine", "max_abs")
METRIC_HELP = {
    "rel_max": "max|Δ| / max|ref| — the metric the tolerance applies to",
    "rel_l2": "‖Δ‖₂ / ‖ref‖₂",
    "nmse": "mean(Δ²) / mean(ref²)",
    "1-cosine": "1 − cos(x, ref)",
    "max_abs": "max|Δ| (absolute, in the tap's units)",
}
TOL_METRICS = ("rel_max", "min_tol")   # metrics in the tolerance's units


# ============================================================================ store and runs
def db_from_argv(argv=None) -> str | None:
    """``--db PATH`` after ``--`` on the streamlit command line; else $WORKBENCH_DB; else None (default)."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--db", default=None)
    args, _ = ap.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return args.db or os.environ.get("WORKBENCH_DB") or None


def open_store(db=None):
    from workbench import runs
    return runs.RunStore(db)


def list_runs(store) -> tuple[pd.DataFrame, list[str]]:
    """All runs (newest first) and the store's messages about damaged records (which are skipped)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # reported on the page instead
        df = store.list()
    return df, list(getattr(store, "problems", []) or [])


def _split(v) -> list[str]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    return [s.strip() for s in str(v).split(",") if s.strip()]


def filter_options(runs_df: pd.DataFrame) -> dict:
    """Values offered by the sidebar filters."""
    if runs_df is None or runs_df.empty:
        return dict(models=[], backends=[], dtypes=[], devices=[], dates=None)
    models = sorted({str(m) for m in runs_df["model"].dropna()})
    backends = sorted({b for v in runs_df["backends"] for b in _split(v)})
    dtypes = sorted({d for v in runs_df["dtypes"] for d in _split(v)})
    devices = sorted({d for v in runs_df["device"] for d in _split(v)})
    created = pd.to_datetime(runs_df["created_at"], utc=True)
    dates = (created.min().date(), created.max().date())
    return dict(models=models, backends=backends, dtypes=dtypes, devices=devices, dates=dates)


def filter_runs(runs_df: pd.DataFrame, kind: str | None = None, models=None, backends=None, dtypes=None,
                devices=None, date_from=None, date_to=None) -> pd.DataFrame:
    """Runs matching every given filter (a run matches a backend/dtype/device filter when it has any of
    the chosen values). Dates are inclusive calendar days (UTC)."""
    if runs_df is None or runs_df.empty:
        return runs_df
    d = runs_df
    if kind:
        d = d[d["kind"] == kind]
    if models:
        d = d[d["model"].astype(str).isin([str(m) for m in models])]

    def any_of(col, chosen):
        chosen = set(chosen)
        return d[col].map(lambda v: bool(set(_split(v)) & chosen))
    if backends:
        d = d[any_of("backends", backends)]
    if dtypes:
        d = d[any_of("dtypes", dtypes)]
    if devices:
        d = d[any_of("device", devices)]
    created = pd.to_datetime(d["created_at"], utc=True)
    if date_from is not None:
        d = d[created.dt.date >= pd.Timestamp(date_from).date()]
        created = pd.to_datetime(d["created_at"], utc=True)
    if date_to is not None:
        d = d[created.dt.date <= pd.Timestamp(date_to).date()]
    return d


def run_label(row) -> str:
    """'2025-11-25 22:40 · model · PASSED · torch:cpu,mlx:cpu float32 · 1a2b3c'."""
    t = pd.Timestamp(row["created_at"]).strftime("%Y-%m-%d %H:%M:%S")
    model = str(row.get("model") or "?")
    if len(model) > 40:
        model = "…" + model[-39:]
    verdict = ""
    if row.get("kind") == "parity":
        p = row.get("passed")
        verdict = " · PASSED" if p is True or p == 1 else (" · FAILED" if p is False or p == 0 else "")
    return f"{t} · {model}{verdict} · {row.get('backends') or ''} {row.get('dtypes') or ''} · {row['run_id']}"


def page_store(st):
    """The page's results store (``--db`` / $WORKBENCH_DB) and its runs, shown in a caption, with a warning about
    damaged records; the page stops with an error when the store can't be opened. ``st``: the streamlit module."""
    try:
        store = open_store(db_from_argv())
    except Exception as e:  # not a results store, corrupt file, newer schema ...
        st.error(f"The results store can't be opened: {e}")
        st.stop()
    st.caption(f"results store: `{store.path}`")
    runs_df, problems = list_runs(store)
    if problems:
        st.warning("Damaged record(s) in the results store were skipped:\n\n" + "\n".join(f"- {p}" for p in problems))
    return store, runs_df


def pick_run(st, runs_df: pd.DataFrame, label: str, key: str, wanted: str):
    """A selectbox of ``runs_df``'s runs (labelled by run_label); preselects ``st.session_state[wanted]`` (the run
    just started) when it is there. Returns (run id, {run id: label})."""
    ids = list(runs_df["run_id"])
    labels = {r["run_id"]: run_label(r) for _, r in runs_df.iterrows()}
    want = st.session_state.get(wanted)
    rid = st.selectbox(label, ids, index=ids.index(want) if want in ids else 0, format_func=labels.get, key=key)
    return rid, labels


def load_run(store, run_id):
    """(Run, None) or (None, message) for a damaged or vanished record — never raises."""
    try:
        return store.load(run_id), None
    except Exception as e:  # RunStoreError, KeyError
        return None, f"run {run_id} can't be shown: {e}"


# ============================================================================ parity
# The verdicts (passed, first divergence, per-target table, heatmap numbers) are the library's: a stored run is
# read back as the ParityReport wb.compare returned (ParityReport.from_run); this module only draws and labels.
def load_report(store, run_id):
    """(ParityReport, None) or (None, message) for a damaged or vanished record — never raises."""
    from workbench.parity import ParityReport
    try:
        return ParityReport.from_run(store.load(run_id)), None
    except Exception as e:  # RunStoreError, KeyError, a run of another kind
        return None, f"run {run_id} can't be shown: {e}"


def parity_frame(report) -> pd.DataFrame:
    """A report's rows, the anchor's first (``ParityReport.to_frame(anchor=True)``: ``target`` = backend:dtype),
    with ``1-cosine`` added for the metric picker; layer as a nullable int for the tables."""
    d = report.to_frame(anchor=True)
    if d.empty:
        return d
    if "cosine" in d:
        d["1-cosine"] = 1.0 - pd.to_numeric(d["cosine"], errors="coerce")
    d["layer"] = pd.to_numeric(d["layer"], errors="coerce").astype("Int64")
    return d


def target_of(row: dict | None) -> str | None:
    """backend:dtype of a report row (the key of ``ParityReport.divergences()``)."""
    return None if row is None else f"{row['backend']}:{row['dtype']}"


def describe_divergence(r: dict) -> str:
    where = str(r["tap"]) + (f" @ layer {int(r['layer'])}" if r.get("layer") is not None and
                             not pd.isna(r.get("layer")) else "")
    return (f"{target_of(r)}: {where} ({r['phase']}) — rel_max {float(r['rel_max']):.3g} > tol "
            f"{float(r['tol']):.1g}" + (f", {int(r['nan_count'])} NaN" if r.get("nan_count") else "")
            + (f", inf mismatch {int(r['inf_mismatch'])}" if r.get("inf_mismatch") else ""))


def target_table(report) -> pd.DataFrame:
    """``ParityReport.target_table()`` (what ``summary()`` prints) as a DataFrame for the page."""
    return pd.DataFrame(report.target_table())


def heatmap_figure(report, metric: str = "rel_max", by: str = "taps", target: str | None = None,
                   tap: str = "hook_resid_post", phase: str = "prefill", highlight: dict | None = None):
    """The per-layer Δ heatmap of ``report.heatmap_matrix(...)``: log colour scale; failing cells outlined (cyan);
    the tolerance drawn on the colour bar when the metric is in its units; ``highlight`` (a first-divergence row)
    boxed in red."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    vals, passed, tols = report.heatmap_matrix(metric, by, target, tap, phase)
    if vals.empty:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.text(0.5, 0.5, f"no per-layer rows for {'target ' + str(target) if by == 'taps' else 'tap ' + tap} "
                f"({phase})", ha="center", va="center")
        ax.set_axis_off()
        return fig
    v = vals.to_numpy(dtype=float)
    finite = v[np.isfinite(v) & (v > 0)]
    tol_vals = [t for t in tols.dropna().unique()] if metric in TOL_METRICS else []
    lo = finite.min() if finite.size else 1e-12
    hi = finite.max() if finite.size else 1.0
    for t in tol_vals:
        lo, hi = min(lo, t / 3), max(hi, t * 3)
    lo = max(lo, 1e-16)
    hi = max(hi, lo * 10)
    plot = np.where(np.isfinite(v), np.clip(v, lo, hi), hi)
    # the same width for both heatmaps (they sit side by side), height by the number of layers
    fig, ax = plt.subplots(figsize=(6.4, 2.0 + 0.26 * max(1, v.shape[0])))
    im = ax.imshow(plot, aspect="auto", cmap="magma_r", norm=LogNorm(vmin=lo, vmax=hi), interpolation="nearest")
    ax.set_xticks(range(v.shape[1]), [str(c) for c in vals.columns], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(v.shape[0]), [str(int(i)) for i in vals.index], fontsize=8)
    ax.set_ylabel("layer")
    pv = passed.reindex(index=vals.index, columns=vals.columns).to_numpy()
    nfail = 0
    for (yy, xx), ok in np.ndenumerate(pv):
        if ok is not None and not (isinstance(ok, float) and np.isnan(ok)) and not bool(ok):
            nfail += 1
            ax.add_patch(plt.Rectangle((xx - 0.5, yy - 0.5), 1, 1, fill=False, ec="cyan", lw=1.8))
    for yy, xx in zip(*np.where(~np.isfinite(v))):
        ax.text(xx, yy, "NaN/inf", ha="center", va="center", fontsize=6, color="white")
    if highlight:
        col = highlight.get("tap") if by == "taps" else target_of(highlight)
        same = (target_of(highlight) == target) if by == "taps" else (highlight.get("tap") == tap)
        if same and highlight.get("phase") == phase and col in list(vals.columns) and \
                highlight.get("layer") is not None and int(highlight["layer"]) in list(vals.index):
            xx = list(vals.columns).index(col)
            yy = list(vals.index).index(int(highlight["layer"]))
            ax.add_patch(plt.Rectangle((xx - 0.5, yy - 0.5), 1, 1, fill=False, ec="red", lw=3))
            ax.text(xx, yy, "1st", ha="center", va="center", fontsize=8, fontweight="bold", color="red",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    cb = fig.colorbar(im, ax=ax, label=metric + (" (cyan line: tolerance)" if tol_vals else ""))
    for t in tol_vals:
        cb.ax.axhline(t, color="cyan", lw=2.5)
    what = f"{target}" if by == "taps" else f"{tap}"
    tol_txt = ", ".join(f"{t:.0e}" for t in tols.dropna().unique())
    ax.set_title(f"{metric} per layer × {'tap' if by == 'taps' else 'backend'} — {what} ({phase})\n"
                 f"tol {tol_txt} on rel_max; {nfail} cell(s) over (cyan)"
                 + ("; red: first divergence" if highlight else ""), fontsize=9)
    fig.tight_layout()
    return fig


# ============================================================================ throughput
def bench_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Measured bench rows with a label (backend dtype [impl]) and the decode ceiling implied by the bandwidth
    limit: limit / bytes per step = decode_tok_s * bw_limit_gbps / gbps."""
    d = rows.copy()
    if d.empty:
        return d
    if "status" in d:
        d = d[d["status"] == "ok"].copy()
    if "impl" not in d:
        d["impl"] = "workbench"
    d["label"] = d["backend"].astype(str) + " " + d["dtype"].astype(str) + \
        np.where(d["impl"] != "workbench", " (" + d["impl"].astype(str) + ")", "")
    for c in ("prefill_tok_s", "decode_tok_s", "gbps", "bw_limit_gbps", "bw_fraction", "ttft_s"):
        d[c] = pd.to_numeric(d[c], errors="coerce") if c in d else np.nan
    ok = (d["gbps"] > 0) & d["bw_limit_gbps"].notna()
    d["decode_ceiling_tok_s"] = np.where(ok, d["decode_tok_s"] * d["bw_limit_gbps"] / d["gbps"].where(ok, 1.0),
                                         np.nan)
    return d


def throughput_chart(bf: pd.DataFrame, which: str = "decode"):
    """Altair bars of tokens/s per backend; for decode, the bandwidth ceiling as a red tick per bar; for
    "gbps", achieved GB/s with the device limit marked. Where the limit is decades above the bars (tiny models)
    the scale is logarithmic, bars starting from a decade below the data."""
    import altair as alt
    col = {"decode": "decode_tok_s", "prefill": "prefill_tok_s", "gbps": "gbps"}[which]
    title = {"decode": "decode tok/s", "prefill": "prefill tok/s", "gbps": "decode GB/s"}[which]
    d = bf[["label", "impl", col] + [c for c in ("decode_ceiling_tok_s", "bw_limit_gbps", "bw_source")
                                     if c in bf]].copy()
    d = d[pd.to_numeric(d[col], errors="coerce") > 0]
    limit_col = {"decode": "decode_ceiling_tok_s", "gbps": "bw_limit_gbps"}.get(which)
    has_limit = limit_col is not None and limit_col in d and d[limit_col].notna().any()
    log = False
    if has_limit:
        vals = d[col].to_numpy(float)
        log = bool(np.nanmax(d[limit_col].to_numpy(float)) / np.nanmin(vals) > 30) if len(vals) else False
    if log:
        lo = float(np.nanmin(np.concatenate([d[col].to_numpy(float), d[limit_col].to_numpy(float)])))
        d["_base"] = 10.0 ** math.floor(math.log10(lo)) if lo > 0 else 1e-3
        scale = alt.Scale(type="log")
    else:
        d["_base"] = 0.0
        scale = alt.Scale(zero=True)
    peers = d["impl"].nunique() > 1
    x = alt.X("label:N", title=None, sort=None, axis=alt.Axis(labelAngle=-30, labelLimit=160))
    bars = alt.Chart(d).mark_bar(size=28).encode(
        x=x, y=alt.Y(f"{col}:Q", title=title, scale=scale), y2="_base:Q",
        color=alt.Color("impl:N", title=None, legend=alt.Legend(orient="bottom")) if peers else alt.value("#4c72b0"),
        tooltip=["label", alt.Tooltip(f"{col}:Q", format=".4g")])
    chart = bars
    if has_limit:
        lim = d[d[limit_col].notna()]
        ticks = alt.Chart(lim).mark_tick(color="crimson", thickness=3, size=36).encode(
            x=x, y=alt.Y(f"{limit_col}:Q", scale=scale),
            tooltip=["label", alt.Tooltip(f"{limit_col}:Q", title="bandwidth limit", format=".4g"), "bw_source"])
        chart = bars + ticks
    sub = ("red tick: memory-bandwidth limit" + (" (log scale)" if log else "")) if has_limit else " "
    return chart.properties(title=alt.TitleParams(title, subtitle=sub, anchor="start"), height=240)


def history(store, run_ids=None, model: str | None = None, threshold: float = 0.10):
    """Bench history (see ``workbench.notebooks.bench_history``), restricted to ``run_ids`` when given."""
    from workbench.notebooks import bench_history
    h = bench_history(store, model=model, threshold=threshold)
    if run_ids is not None and len(h):
        h = h[h["run_id"].isin(list(run_ids))]
    return h


def history_chart(h: pd.DataFrame, metric: str = "decode_tok_s"):
    """Line per series over time; regressions (below the best earlier run by more than the threshold) red."""
    import altair as alt
    d = h.copy()
    d["created_at"] = pd.to_datetime(d["created_at"], utc=True).dt.tz_localize(None)
    d["regression"] = d["regression"].astype(bool)
    base = alt.Chart(d).encode(x=alt.X("created_at:T", title="run time (UTC)",
                                       axis=alt.Axis(format="%Y-%m-%d %H:%M", labelAngle=-20)),
                               y=alt.Y(f"{metric}:Q", title=metric.replace("_", " ")))
    lines = base.mark_line(point=True).encode(color=alt.Color("series:N"),
                                              tooltip=["series", "run_id", alt.Tooltip(f"{metric}:Q", format=".1f"),
                                                       alt.Tooltip("change:Q", format="+.1%")])
    bad = base.transform_filter(alt.datum.regression).mark_point(color="crimson", size=160, shape="cross",
                                                                 filled=True)
    return (lines + bad).properties(title=alt.TitleParams(f"{metric} across runs", anchor="start",
                                                          subtitle="red cross: more than 10% below the best earlier "
                                                                   "run of its series"), height=260)


# ============================================================================ starting runs
def parse_prompt(text: str | None):
    """'' -> None (the library default); '1, 2, 3' or '[1,2,3]' -> token ids; other text stays text."""
    if text is None or not str(text).strip():
        return None
    s = str(text).strip()
    if re.fullmatch(r"\[?\s*\d+(\s*,\s*\d+)*\s*,?\s*\]?", s) and ("," in s or s.startswith("[")):
        return [int(x) for x in re.findall(r"\d+", s)]
    return s


def progress_callback(update: Callable[[float, str], None]) -> Callable[[int, int, str], None]:
    """The ``progress=`` callback of wb.compare / wb.bench / wb.diverge (``fn(done, total, what)``) that moves a
    progress bar: ``update(fraction, text)``, called in the thread that runs the work (Streamlit's script thread)."""
    def fn(done: int, total: int, what: str):
        update(min(0.99, done / max(1, total)), str(what))
    return fn


def run_bar(st, go: bool, backends, dtypes):
    """After a new-run form: None when it was not submitted, or misses a backend or dtype (said on the page); else
    the ``update(fraction, text)`` of a new progress bar (give it to ``progress_callback``)."""
    if not go:
        return None
    if not backends or not dtypes:
        st.error("pick at least one backend and one dtype")
        return None
    bar = st.progress(0.0, text="starting")
    return lambda frac, text: bar.progress(float(frac), text=str(text)[:120])


def start_parity(model, backends, dtypes, prompt=None, decode_steps: int = 2, db=None,
                 update: Callable[[float, str], None] = lambda f, t: None, decode: str = "plain"):
    """wb.compare in-process with progress (anchored to HF float64: compare's default); returns the ParityReport
    (stored in ``db``). decode="fast" compares the fast decode kernels per layer too."""
    import workbench as wb
    rep = wb.compare(source=model, backends=list(backends), dtypes=list(dtypes), prompt=parse_prompt(prompt),
                     decode_steps=int(decode_steps), references=(), db=db, decode=decode,
                     progress=progress_callback(update))
    update(1.0, "done")
    return rep


def start_bench(model, backends, dtypes, prompt_len: int = 32, gen_len: int = 16, repeats: int = 1, db=None,
                update: Callable[[float, str], None] = lambda f, t: None):
    """wb.bench in-process with progress; returns the BenchResult (stored in ``db``)."""
    from workbench.notebooks import run_bench
    res = run_bench(source=model, backends=list(backends), dtypes=list(dtypes), prompt_len=int(prompt_len),
                    gen_len=int(gen_len), repeats=int(repeats), db=db, progress=progress_callback(update))
    update(1.0, "done")
    return res


def available_backends() -> list[str]:
    try:
        from workbench.backends import base
        return list(base.available())
    except Exception:
        return ["torch:cpu"]


def meta_summary(meta: dict) -> dict:
    """The run meta worth a glance (JSON-able, short)."""
    keep = ("model", "source", "reference", "n_tokens", "decode_steps", "prompt", "backends", "dtypes", "device",
            "prompt_len", "gen_len", "repeats", "git_commit", "created_at", "skipped")
    out = {k: meta.get(k) for k in keep if meta.get(k) not in (None, "", [], {})}
    v = meta.get("versions")
    if isinstance(v, dict):
        out["versions"] = {k: v[k] for k in ("python", "torch", "mlx", "numpy") if k in v}
    return json.loads(json.dumps(out, default=str))
