"""Divergence page of the dashboard (a Streamlit multipage page beside dashboards/parity.py): stored ``diverge``
runs — the token strip coloured by KL with the first differing token marked and both top-5s on hover, KL per
step, the KV-cache heatmap (layers x positions) and local-versus-inherited bars per layer; a form starts a new
run with progress."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
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
    from dashboards import _diverge as D  # noqa: E402
    from dashboards import _logic as L  # noqa: E402

st.set_page_config(page_title="Gemma Workbench — divergence", layout="wide")
st.title("Divergence over a generation")
st.caption("Each target's greedy tokens against torch:cpu float64 teacher-forced on them: KL per step, the first "
           "differing token (near-tie or fault), the KV cache by position, and each layer's own error beside the "
           "error it inherits.")

store, runs_df = L.page_store(st)
div_runs = runs_df[runs_df["kind"] == "diverge"] if len(runs_df) else runs_df
last = st.session_state.pop("diverge_last", None)
if last:
    st.success(last)


def new_run_form(model_default: str):
    av = L.available_backends()
    with st.form("diverge_new"):
        model = st.text_input("model (registered name, HF checkpoint dir or .gguf)", value=model_default)
        c1, c2, c3 = st.columns(3)
        backends = c1.multiselect("backends", av, default=av[:1])
        dtypes = c2.multiselect("dtypes", ["float32", "bfloat16", "float16"], default=["bfloat16"])
        steps = c3.number_input("steps (greedy tokens)", 1, 1024, 32)
        prompt = st.text_input("prompt (text, or token ids such as 1,2,3; empty: the default prompt)", value="")
        go = st.form_submit_button("Start divergence run", type="primary")
    update = L.run_bar(st, go, backends, dtypes)
    if update is None:
        return
    try:
        import workbench as wb
        res = wb.diverge(model, backends=list(backends), dtypes=list(dtypes), prompt=L.parse_prompt(prompt),
                         steps=int(steps), db=str(store.path), progress=L.progress_callback(update))
    except Exception as e:
        st.error(f"the run failed: {type(e).__name__}: {e}")
        return
    st.session_state["diverge_last"] = f"stored divergence run {res.run_id}"
    st.session_state["diverge_run"] = res.run_id
    st.rerun()


if div_runs.empty:
    st.info("No divergence runs in the store yet. Start one below (or `workbench diverge --model M`).")
    new_run_form(L.DEFAULT_MODEL)
    st.stop()

rid, labels = L.pick_run(st, div_runs, "divergence run", "sel_diverge", "diverge_run")
div, err = D.load_divergence(store, rid)
if err:
    st.warning(err)
    st.stop()
meta = div.meta
if not div.targets:
    st.info("this run has no targets (every backend skipped)")
    st.json(meta.get("skipped") or {})
    st.stop()

st.dataframe(pd.DataFrame(D.target_table(div)), hide_index=True, width="stretch")
for k, why in (meta.get("skipped") or {}).items():
    st.caption(f"skipped {k}: {why}")

divs = div.divergences()
# default: the earliest differing token that is a token (a non-finite stop shows one purple cell), else the earliest
finite = [d for d in divs.values() if d and d.get("kind") != "non-finite"]
fd_all = min(finite, key=lambda d: d["step"]) if finite else div.first_divergence
default_t = fd_all["target"] if fd_all else div.targets[0]
target = st.selectbox("target", div.targets, index=div.targets.index(default_t), key="dv_target")
info = (meta.get("target_info") or {}).get(target, {})
fd = divs.get(target)
steps = [r for r in div.steps if r["target"] == target]

c1, c2, c3, c4 = st.columns(4)
c1.metric("first differing token", "none" if fd is None else f"step {fd['step']}")
c2.metric("reference margin", "-" if fd is None else D._num(fd.get("ref_margin")))
c3.metric("KL mean", D._num(pd.Series([r.get("kl") for r in steps], dtype=float).mean()))
c4.metric("route", str(info.get("route") or "-"))
if fd is not None:
    st.error(f"**First differing token** at step {fd['step']} (position {fd['position']}): target "
             f"`{fd['token_text']!r}` vs reference `{fd['ref_token_text']!r}` — {fd['verdict']}")
else:
    st.success(f"No differing token over {len(steps)} steps.")
if meta.get("prompt_text"):
    st.caption(f"prompt: {meta['prompt_text']!r}")

st.subheader("tokens, coloured by KL(ref ‖ target) — hover for both top-5s")
st.html(D.token_strip_html(steps, fd["step"] if fd else None))
if meta.get("reference_text") is not None:
    st.caption(f"reference's own continuation: {meta['reference_text']!r}")

left, right = st.columns(2)
with left:
    fig = D.kl_figure(steps, fd["step"] if fd else None)
    st.pyplot(fig)
    plt.close(fig)
with right:
    fig = D.local_figure(div, target)
    st.pyplot(fig)
    plt.close(fig)

st.subheader("KV cache after prefill + generation: error per layer × absolute position")
try:
    fig = D.kv_figure(div, target)
    st.pyplot(fig)
    plt.close(fig)
except KeyError as e:
    st.info(str(e))

if fd is not None and fd.get("layer_errors"):
    with st.expander(f"per-layer residual error at step {fd['step']} (the first differing token)"):
        st.dataframe(pd.DataFrame(fd["layer_errors"]), hide_index=True, width="stretch")
with st.expander("per-step rows"):
    cols = ["step", "position", "token_text", "ref_token_text", "agree", "kl", "topk_overlap", "logit_rel_max",
            "ref_margin", "ref_top1_top2", "topk_max_abs"]
    sdf = pd.DataFrame(steps)
    st.dataframe(sdf[[c for c in cols if c in sdf]], hide_index=True, width="stretch")
with st.expander("local vs inherited rows"):
    st.dataframe(pd.DataFrame([r for r in div.local if r["target"] == target]), hide_index=True, width="stretch")
with st.expander("start a new divergence run"):
    new_run_form(str(meta.get("model") or L.DEFAULT_MODEL))
