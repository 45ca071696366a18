"""Gemma Workbench dashboard: per-layer parity and throughput from the results store.

    streamlit run dashboards/parity.py [-- --db PATH]        (or: workbench dashboard --db PATH)

The data logic lives in dashboards/_logic.py; this file lays it out.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from dashboards._imports import LOCK  # noqa: E402

with LOCK:        # the pages' script threads import the workbench one at a time (see dashboards/_imports.py)
    import workbench  # noqa: E402,F401
    from dashboards import _logic as L  # noqa: E402

TITLE = "Gemma Workbench — parity & throughput"
st.set_page_config(page_title="Gemma Workbench", layout="wide")
st.title(TITLE)

store, runs_df = L.page_store(st)

last = st.session_state.pop("last_run", None)
if last:
    st.success(last)

# ------------------------------------------------------------------------------------------------ filters
opts = L.filter_options(runs_df)
with st.sidebar:
    st.header("Filters")
    f_models = st.multiselect("model", opts["models"], key="f_models")
    f_backends = st.multiselect("backend", opts["backends"], key="f_backends")
    f_dtypes = st.multiselect("dtype", opts["dtypes"], key="f_dtypes")
    f_devices = st.multiselect("device", opts["devices"], key="f_devices")
    dates = None
    if opts["dates"]:
        dates = st.date_input("date (UTC)", value=opts["dates"], key="f_dates")
    d_from = d_to = None
    if isinstance(dates, (tuple, list)) and len(dates) == 2:
        d_from, d_to = dates
    elif dates and not isinstance(dates, (tuple, list)):
        d_from = d_to = dates
    st.caption(f"{len(runs_df)} run(s) in the store")

flt = dict(models=f_models, backends=f_backends, dtypes=f_dtypes, devices=f_devices, date_from=d_from, date_to=d_to)
parity_runs = L.filter_runs(runs_df, kind="parity", **flt)
bench_runs = L.filter_runs(runs_df, kind="bench", **flt)

default_model = str(runs_df["model"].iloc[0]) if len(runs_df) and pd.notna(runs_df["model"].iloc[0]) \
    else L.DEFAULT_MODEL


# ------------------------------------------------------------------------------------------------ new run form
def new_run_form(where: str, model_default: str):
    av = L.available_backends()
    with st.form(f"new_run_{where}"):
        kind = st.radio("kind", ["parity", "benchmark"], horizontal=True, key=f"nr_kind_{where}")
        model = st.text_input("model (registered name, HF checkpoint dir or .gguf)", value=model_default,
                              key=f"nr_model_{where}")
        c1, c2 = st.columns(2)
        backends = c1.multiselect("backends", av, default=av, key=f"nr_backends_{where}")
        dtypes = c2.multiselect("dtypes", ["float32", "bfloat16", "float16"], default=["float32"],
                                key=f"nr_dtypes_{where}")
        prompt = st.text_input("parity prompt (text, or token ids such as 1,2,3; empty: the default prompt)",
                               value="", key=f"nr_prompt_{where}")
        c1, c2, c3, c4 = st.columns(4)
        decode_steps = c1.number_input("decode steps (parity)", 0, 16, 2, key=f"nr_decode_{where}")
        prompt_len = c2.number_input("prompt length (bench)", 1, 4096, 32, key=f"nr_pl_{where}")
        gen_len = c3.number_input("generated tokens (bench)", 1, 4096, 16, key=f"nr_gl_{where}")
        repeats = c4.number_input("repeats (bench)", 1, 20, 1, key=f"nr_rep_{where}")
        decode = st.radio("decode route (parity)", ["plain", "fast"], horizontal=True, key=f"nr_route_{where}",
                          help="fast: the kernels m.generate runs (Triton step / MLX CUDA kernels / CPU GEMV), "
                               "compared per layer, teacher-forced")
        go = st.form_submit_button("Start run", type="primary")
    update = L.run_bar(st, go, backends, dtypes)
    if update is None:
        return
    try:
        if kind == "parity":
            rep = L.start_parity(model, backends, dtypes, prompt=prompt, decode_steps=decode_steps, db=str(store.path),
                                 update=update, decode=decode)
            msg = f"stored parity run {rep.run_id}: {'PASSED' if rep.passed else 'FAILED'}"
            st.session_state["parity_run"] = rep.run_id
        else:
            res = L.start_bench(model, backends, dtypes, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats,
                                db=str(store.path), update=update)
            msg = f"stored benchmark run {res.run_id}"
            st.session_state["bench_run"] = res.run_id
    except Exception as e:
        st.error(f"the run failed: {type(e).__name__}: {e}")
        return
    st.session_state["last_run"] = msg
    st.rerun()


if runs_df.empty:
    st.info(f"The results store is empty. Start a run — the default is the embedded **{L.DEFAULT_MODEL}** on every "
            "backend available here (float32).")
    new_run_form("empty", L.DEFAULT_MODEL)
    st.stop()

tab_parity, tab_bench, tab_new = st.tabs(["Parity", "Throughput", "New run"])

# ------------------------------------------------------------------------------------------------ parity
with tab_parity:
    if parity_runs.empty:
        st.info("No parity runs match the filters. Start one in **New run**.")
    else:
        rid, labels = L.pick_run(st, parity_runs, "parity run", "sel_parity", "parity_run")
        rep, err = L.load_report(store, rid)       # the ParityReport wb.compare returned: its verdicts, not ours
        if err:
            st.warning(err)
        elif not rep.rows and not rep.anchor:
            st.info("this run has no rows (every target skipped?)")
            st.json(L.meta_summary(rep.meta))
        else:
            frame = L.parity_frame(rep)
            meta = rep.meta
            c1, c2, c3, c4 = st.columns(4)
            c1.metric("result", "PASSED" if rep.passed else "FAILED")
            c2.metric("targets", frame["target"].nunique())
            c3.metric("tokens", meta.get("n_tokens") or "-")
            c4.metric("reference", str(meta.get("reference") or "-"))
            st.caption(rep.anchor_line())
            fd = rep.first_divergence
            if fd is not None:
                st.error("**First divergence** — " + L.describe_divergence(fd))
            elif rep.passed:
                st.success("No divergence: every compared tap of every target is within its tolerance.")
            else:
                why = ([] if rep.anchor_ok else [rep.anchor_line()]) + \
                    [f"requested reference {k} could not run: {v}" for k, v in rep.failed_references.items()] + \
                    ([] if rep.rows else ["no target was compared"])
                st.error("**FAILED** with every compared tap within its tolerance: " + "; ".join(why))
            for k, why in rep.skipped.items():
                st.caption(f"skipped {k}: {why}")

            m1, m2 = st.columns([3, 1])
            metric = m1.radio("metric", list(L.METRICS), horizontal=True, key="metric",
                              help="; ".join(f"{k}: {v}" for k, v in L.METRIC_HELP.items()))
            phases = [p for p in ("prefill", "decode") if (frame["phase"] == p).any()] or ["prefill"]
            phase = m2.radio("phase", phases, horizontal=True, key="phase")
            targets = list(dict.fromkeys(frame["target"]))
            per_layer = frame[frame["layer"].notna()]
            layer_taps = list(dict.fromkeys(per_layer.sort_values("order")["tap"]))
            # the picker offers the targets with per-layer rows in this phase (a reference such as the HF anchor
            # may compare the logits only): the default is never an empty picture
            layer_targets = list(dict.fromkeys(per_layer[per_layer["phase"] == phase]["target"])) or targets
            left, right = st.columns(2)
            with left:
                st.subheader("layers × taps")
                fd_t = L.target_of(fd) if fd is not None and L.target_of(fd) in layer_targets else layer_targets[0]
                target = st.selectbox("backend:dtype", layer_targets, index=layer_targets.index(fd_t),
                                      key="hm_target")
                if rep.heatmap_matrix(metric, "taps", target, "hook_resid_post", phase)[0].empty:
                    st.info(f"no per-layer rows for {target} ({phase})")
                else:
                    fig = L.heatmap_figure(rep, metric=metric, by="taps", target=target, phase=phase,
                                           highlight=rep.divergences().get(target))
                    st.pyplot(fig)
                    plt.close(fig)
            with right:
                st.subheader("layers × backends")
                default_tap = fd["tap"] if fd is not None and fd["tap"] in layer_taps else (
                    "hook_resid_post" if "hook_resid_post" in layer_taps else (layer_taps or [None])[0])
                tap = st.selectbox("tap", layer_taps, index=layer_taps.index(default_tap) if default_tap in layer_taps
                                   else 0, key="hm_tap")
                if tap is None or rep.heatmap_matrix(metric, "backends", None, tap, phase)[0].empty:
                    st.info(f"no per-layer rows for tap {tap} ({phase})")
                else:
                    fig = L.heatmap_figure(rep, metric=metric, by="backends", tap=tap, phase=phase, highlight=fd)
                    st.pyplot(fig)
                    plt.close(fig)
            st.subheader("per target")
            st.dataframe(L.target_table(rep), hide_index=True, width="stretch")
            with st.expander("taps outside the layers (embedding, final norm, logits)"):
                other = frame[frame["layer"].isna()]
                cols = [c for c in ["target", "phase", "tap", "rel_max", "rel_l2", "nmse", "1-cosine", "max_abs",
                                    "tol", "passed", "top1", "top5_overlap"] if c in other]
                st.dataframe(other[cols], hide_index=True, width="stretch")
            with st.expander("summary (as `workbench parity` prints it)"):
                st.code(rep.summary(), language=None)
            with st.expander("run details"):
                st.json(L.meta_summary(meta))

# ------------------------------------------------------------------------------------------------ throughput
with tab_bench:
    if bench_runs.empty:
        st.info("No benchmark runs match the filters. Start one in **New run**.")
    else:
        rid, labels = L.pick_run(st, bench_runs, "benchmark run", "sel_bench", "bench_run")
        run, err = L.load_run(store, rid)
        if err:
            st.warning(err)
        else:
            bf = L.bench_frame(run.rows)
            meta = run.meta
            st.caption(f"{meta.get('model')}: pp{meta.get('prompt_len')} / tg{meta.get('gen_len')}, batch 1, "
                       f"{meta.get('repeats')} repeat(s) after warm-up; device {meta.get('device') or '-'}")
            if bf.empty:
                st.info("no measured rows in this run (every target skipped)")
            else:
                c1, c2, c3 = st.columns(3)
                c1.altair_chart(L.throughput_chart(bf, "decode"), width="stretch")
                c2.altair_chart(L.throughput_chart(bf, "prefill"), width="stretch")
                c3.altair_chart(L.throughput_chart(bf, "gbps"), width="stretch")
                cols = [c for c in ["impl", "backend", "dtype", "ttft_s", "prefill_tok_s", "decode_tok_s",
                                    "decode_us_median", "decode_us_p10", "decode_us_p90", "gbps", "bw_limit_gbps",
                                    "bw_fraction", "decode_ceiling_tok_s", "bw_source", "peak_mem_bytes"] if c in bf]
                st.dataframe(bf[cols], hide_index=True, width="stretch")
            skipped = run.rows[run.rows["status"] != "ok"] if "status" in run.rows else run.rows.iloc[0:0]
            for _, r in skipped.iterrows():
                st.caption(f"skipped {r.get('impl')} {r['backend']} {r['dtype']}: {r.get('reason')}")

            others = [i for i in bench_runs[bench_runs["model"] == meta.get("model")]["run_id"] if i != rid]
            base = st.selectbox("compare with a baseline run", ["(none)"] + others,
                                format_func=lambda i: i if i == "(none)" else labels.get(i, i), key="baseline")
            if base != "(none)":
                try:
                    cmp = store.compare_bench(rid, base)
                    n = int(cmp["regression"].sum()) if "regression" in cmp else 0
                    (st.error if n else st.success)(f"{n} regression(s) against {base}")
                    st.dataframe(cmp, hide_index=True, width="stretch")
                except Exception as e:
                    st.warning(f"can't compare with {base}: {e}")

            st.subheader("history")
            hist = L.history(store, run_ids=list(bench_runs["run_id"]), model=meta.get("model"))
            if hist.empty:
                st.info("no history for this model yet")
            else:
                st.altair_chart(L.history_chart(hist), width="stretch")
                bad = hist[hist["regression"]]
                if len(bad):
                    st.warning(f"Regression: {len(bad)} point(s) more than 10% below the best earlier run of their series: "
                               + ", ".join(f"{r['series']} in {r['run_id']} ({r['change']:+.0%})"
                                           for _, r in bad.iterrows()))

# ------------------------------------------------------------------------------------------------ new run
with tab_new:
    new_run_form("tab", default_model)
