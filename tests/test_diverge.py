"""wb.diverge: per-step KL and margins of a generation against float64, the KV-cache diff by position, and each
layer's own (local) error against the error it inherits.

The checks are against things the code under test does not produce: an independent KL from HF transformers'
float64 logits, a fault injected into one known layer, the cache geometry of the config (window, KV sharing),
and the known float16 overflow of the real Gemma 3 270M (layer 7).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import cpu_backends, fixture_dir, have, one_torch_thread

PROMPT = list(range(3, 19))          # 16 token ids; the tiny fixtures have no tokenizer

pytestmark = pytest.mark.skipif(not have("torch"), reason="torch is not installed (the float64 reference)")


def _div(fx="gemma3_text", **kw):
    from workbench.diverge import diverge
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("store", False)
    kw.setdefault("progress", False)
    with one_torch_thread():
        return diverge(str(fixture_dir(fx)), **kw)


def _backend_params():
    """torch:cpu in the fast suite; mlx:cpu (the same check, slower here) in the slow one."""
    return [pytest.param(b, marks=[pytest.mark.slow] if b != "torch:cpu" else []) for b in cpu_backends()]


@pytest.mark.parametrize("backend", _backend_params())
def test_clean_float32_has_no_differing_token_over_64_steps(backend):
    div = _div(backends=[backend], dtypes=["float32"], steps=64)
    assert div.first_divergence is None, div.summary()
    df = div.to_frame()
    for t in div.targets:
        d = df[df["target"] == t]
        assert list(d["step"]) == list(range(1, 65))
        assert d["agree"].all()
        kl = d["kl"].to_numpy(float)
        assert np.isfinite(kl).all() and kl.max() < 1e-9, kl.max()
        assert (d["topk_overlap"] == 1.0).all()
        assert d["logit_rel_max"].max() < 1e-5
        # the target's tokens are the reference's own greedy tokens
        assert list(d["token"]) == div.meta["reference_tokens"]
    loc = div.local_error
    assert (loc["local"] < 1e-5).all() and not loc["suspect"].any()


def test_injected_attention_fault_is_local_to_its_layer_and_inherited_after_it():
    F = 3
    div = _div(backends=["torch:cpu"], dtypes=["float32"], steps=8,
               fault={"backend": "torch:cpu", "layer": F, "tap": "hook_attn_out", "scale": 5e-2})
    loc = div.local_error.set_index("layer")
    L = len(loc)
    others = loc.drop(index=F)
    # the layer's own error is large only at the faulty layer
    assert loc.loc[F, "local"] > 1e-3
    assert others["local"].max() < 1e-6, others["local"]
    assert loc.loc[F, "local"] > 1000 * others["local"].max()
    assert loc["suspect"].tolist() == [i == F for i in range(L)]
    # the error of the full run: float32-small before the fault, at least the fault's size from it on, growing
    assert loc.loc[:F - 1, "inherited"].max() < 1e-6
    inh = loc.loc[F:, "inherited"].to_numpy()
    assert (inh > 0.5 * loc.loc[F, "local"]).all()
    assert inh[-1] > inh[0]
    # the KV cache: layers up to F compute K/V before the faulty attention output, the later ones inherit it
    kv = div.kv_diff.groupby("layer")[["k_rel", "v_rel"]].max()
    assert kv.loc[:F].to_numpy().max() < 1e-5
    assert kv.loc[F + 1:].to_numpy().min() > 1e-3


def test_without_the_hooks_local_would_equal_inherited():
    """The local pass really substitutes the reference's inputs: it differs from the full run after a fault."""
    F = 2
    div = _div(backends=["torch:cpu"], dtypes=["float32"], steps=2,
               fault={"backend": "torch:cpu", "layer": F, "tap": "hook_mlp_out", "scale": 1e-1})
    loc = div.local_error.set_index("layer")
    assert loc.loc[F + 1, "inherited"] > 1e4 * loc.loc[F + 1, "local"]


def test_kl_equals_an_independent_computation_from_hf_logits():
    pytest.importorskip("transformers")
    import torch
    import torch.nn.functional as Fn

    from workbench.references.hf import HFReference
    n = 12
    div = _div(backends=["torch:cpu"], dtypes=["bfloat16"], steps=n, keep_logits=True)
    t = div.targets[0]
    lg = div.logits[t]
    seq = np.asarray(lg["prompt"] + lg["tokens"])[None]
    hf = HFReference(str(fixture_dir("gemma3_text")), dtype="float64")
    hl = torch.as_tensor(np.asarray(hf.logits(seq))[0, len(PROMPT) - 1:len(PROMPT) - 1 + n], dtype=torch.float64)
    x = torch.as_tensor(lg["target"], dtype=torch.float64)
    want = Fn.kl_div(Fn.log_softmax(x, -1), Fn.log_softmax(hl, -1), log_target=True, reduction="none").sum(-1).numpy()
    got = div.to_frame()["kl"].to_numpy(float)
    assert np.isfinite(got).all() and (got > 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-12)
    # and the stored top-5 overlap is the one of these logits
    ref_top = np.argsort(-hl.numpy(), -1)[:, :5]
    tgt_top = np.argsort(-lg["target"], -1)[:, :5]
    ovl = [len(set(a) & set(b)) / 5 for a, b in zip(ref_top, tgt_top)]
    np.testing.assert_allclose(div.to_frame()["topk_overlap"].to_numpy(float), ovl)


def test_kv_diff_follows_rings_and_positions():
    from workbench.config import GemmaConfig
    n = 8
    div = _div(backends=["torch:cpu"], dtypes=["bfloat16"], steps=n)
    cfg = GemmaConfig.from_file(fixture_dir("gemma3_text"))
    kv = div.kv_diff
    T = len(PROMPT) + n                        # prefill + n tokens are in the cache
    for i in range(cfg.num_hidden_layers):
        pos = sorted(kv[kv["layer"] == i]["position"])
        w = cfg.sliding_window(i)
        want = list(range(T - w, T)) if w is not None and w < T else list(range(T))
        assert pos == want, (i, pos)
        assert kv[kv["layer"] == i]["ring"].all() == (w is not None and w < T)
    e = kv[["k_rel", "v_rel"]].to_numpy(float)
    assert np.isfinite(e).all() and (e > 0).all() and e.max() < 0.1      # bfloat16 rounding, not zero, not broken
    layers, positions, mat = div.kv_matrix(which="k")
    assert mat.shape == (cfg.num_hidden_layers, T)
    assert np.isnan(mat[0, :T - 8]).all() and np.isfinite(mat[0, T - 8:]).all()


def test_kv_diff_shared_and_k_eq_v_layers():
    from workbench.config import GemmaConfig
    div = _div("gemma4_e2b", backends=["torch:cpu"], dtypes=["float32"], steps=4)
    cfg = GemmaConfig.from_file(fixture_dir("gemma4_e2b"))
    kv = div.kv_diff
    shared = [i for i in range(cfg.num_hidden_layers) if cfg.kv_shared(i)]
    assert shared, "the fixture has KV-shared layers"
    for i in shared:
        mine = kv[kv["layer"] == i].reset_index(drop=True)
        src = kv[kv["layer"] == cfg.kv_source(i)].reset_index(drop=True)
        assert (mine["shared_from"] == cfg.kv_source(i)).all()
        np.testing.assert_array_equal(mine["k_rel"], src["k_rel"])
    assert kv[["k_rel", "v_rel"]].to_numpy(float).max() < 1e-5
    # k_eq_v (gemma4_kv full layers): V only
    div = _div("gemma4_kv", backends=["torch:cpu"], dtypes=["float32"], steps=4)
    cfg = GemmaConfig.from_file(fixture_dir("gemma4_kv"))
    kv = div.kv_diff
    for i in range(cfg.num_hidden_layers):
        rows = kv[kv["layer"] == i]
        if cfg.k_eq_v(i):
            assert rows["k_rel"].isna().all() and rows["v_rel"].notna().all()
        else:
            assert rows["k_rel"].notna().all()
    assert div.first_divergence is None


def test_first_divergence_reports_tokens_margin_and_layer_errors():
    """A large fault flips tokens: the first differing step carries both tokens, the reference's margin between
    them (checked against the reference's own logits) and that step's per-layer errors."""
    from workbench.diverge import diverge
    with one_torch_thread():
        div = diverge(str(fixture_dir("gemma3_text")), backends=["torch:cpu"], dtypes=["float32"], prompt=PROMPT,
                      steps=16, store=False, progress=False, keep_logits=True,
                      fault={"backend": "torch:cpu", "layer": 5, "tap": "hook_mlp_out", "scale": 3.0})
    fd = div.first_divergence
    assert fd is not None, div.summary()
    lg = div.logits[fd["target"]]
    s = fd["step"] - 1
    ref = lg["reference"][s]
    assert fd["token"] == lg["tokens"][s] and fd["ref_token"] == int(np.argmax(ref))
    assert fd["token"] != fd["ref_token"]
    assert fd["ref_margin"] == pytest.approx(ref[fd["ref_token"]] - ref[fd["token"]])
    assert fd["ref_margin"] > 0
    # every step before agrees with the reference's own greedy tokens
    assert lg["tokens"][:s] == div.meta["reference_tokens"][:s]
    assert lg["tokens"][s] != div.meta["reference_tokens"][s]
    errs = {e["layer"]: e["rel_l2"] for e in fd["layer_errors"]}
    assert len(errs) == 7 and max(errs[i] for i in range(5)) < 1e-5 < errs[5]
    # the faulty layer makes errors far over its rounding floor: a fault, not a near-tie, whatever the margin
    assert fd["kind"] == "fault" and fd["near_tie"] is False and "layer(s) [5]" in fd["verdict"], fd["verdict"]


def test_near_tie_verdict_follows_the_margin_and_the_layers():
    from workbench.diverge import _first
    base = dict(target="t", position=0, token_text="a", ref_token_text="b", kl=0.1, target_margin=0.01)
    rows = [dict(base, step=i + 1, agree=True, token=1, ref_token=1, ref_margin=5.0, topk_max_abs=0.1)
            for i in range(9)]
    tie = rows + [dict(base, step=10, agree=False, token=2, ref_token=1, ref_margin=0.05, topk_max_abs=0.1)]
    far = rows + [dict(base, step=10, agree=False, token=2, ref_token=1, ref_margin=3.0, topk_max_abs=0.1)]
    clean = [dict(layer=i, suspect=False, overflow=False, local_over_floor=2.0) for i in range(3)]
    bad = [dict(c, suspect=c["layer"] == 1, local_over_floor=5e4 if c["layer"] == 1 else 2.0) for c in clean]
    assert _first(tie, [], clean)["kind"] == "near-tie" and _first(tie, [], clean)["near_tie"] is True
    d = _first(far, [], clean)
    assert d["kind"] == "large-margin" and d["margin_over_typical"] == pytest.approx(30.0)
    d = _first(tie, [], bad)
    assert d["kind"] == "fault" and d["near_tie"] is False and "layer(s) [1]" in d["verdict"]
    assert _first(rows, [], clean) is None


def test_stored_run_round_trips_and_progress_is_reported(tmp_path):
    from workbench import runs
    from workbench.diverge import Divergence, diverge
    calls = []
    with one_torch_thread():
        div = diverge(str(fixture_dir("gemma3_text")), backends=["torch:cpu"], dtypes=["bfloat16"], prompt=PROMPT,
                      steps=6, db=tmp_path / "r.sqlite", progress=lambda i, n, what: calls.append((i, n, what)))
    assert div.run_id
    done, total = [c[0] for c in calls], calls[-1][1]
    assert done == sorted(done) and done[-1] == total                    # forward only, ending at the total
    assert sorted(set(done) - {0}) == list(range(1, total + 1))          # every step (notes repeat the count)
    assert calls[0] == (0, total, f"loading {fixture_dir('gemma3_text')}")   # the load is reported before step 1
    run = runs.RunStore(tmp_path / "r.sqlite").load(div.run_id)
    assert run.kind == "diverge"
    back = Divergence.from_run(run)
    assert back.targets == div.targets
    assert back.to_frame()["kl"].tolist() == pytest.approx(div.to_frame()["kl"].tolist())
    assert len(back.kv) == len(div.kv) and len(back.local) == len(div.local)
    assert back.to_frame()["ref_topk"].iloc[0] == div.to_frame()["ref_topk"].iloc[0]
    assert back.summary().splitlines()[0] == div.summary().splitlines()[0]


def test_bad_input_is_a_clear_error():
    from workbench.diverge import diverge
    with pytest.raises(ValueError, match="no tokenizer"):
        diverge(str(fixture_dir("gemma3_text")), backends=["torch:cpu"], prompt="hello", store=False, progress=False)
    with pytest.raises(ValueError, match="route must be"):
        diverge(str(fixture_dir("gemma3_text")), prompt=PROMPT, route="quick", store=False, progress=False)
    with pytest.raises(ValueError, match="context"):
        diverge(str(fixture_dir("gemma3_text")), backends=["torch:cpu"], prompt=PROMPT, steps=1000, store=False,
                progress=False)


def test_unavailable_backend_is_skipped_with_its_reason():
    div = _div(backends=["torch:cpu", "torch:mps"], dtypes=["float32"], steps=2)
    assert div.targets == ["torch:cpu:float32"]
    assert "torch:mps:float32" in div.meta["skipped"]


def test_plain_and_fast_routes_agree_on_float32():
    div = _div(backends=["torch:cpu"], dtypes=["float32"], steps=8, route="both")
    assert div.targets == ["torch:cpu:float32", "torch:cpu:float32@plain"]
    info = div.meta["target_info"]
    assert info["torch:cpu:float32"]["tokens"] == info["torch:cpu:float32@plain"]["tokens"]
    assert info["torch:cpu:float32"]["route_mismatch"] == []


def test_cli_prints_a_summary_and_stores_the_run(tmp_path, capsys):
    from workbench import cli, runs
    db = tmp_path / "cli.sqlite"
    with one_torch_thread():
        rc = cli.main(["diverge", "--model", str(fixture_dir("gemma3_text")), "--backends", "torch:cpu",
                       "--dtypes", "bfloat16", "--steps", "4", "--prompt-ids", ",".join(map(str, PROMPT)),
                       "--db", str(db)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "torch:cpu:bfloat16" in out and "KL mean" in out and "stored run" in out
    rid = out.split("stored run ")[1].split()[0]
    assert runs.RunStore(db).load(rid).kind == "diverge"


@pytest.mark.slow
def test_float16_overflow_of_the_270m_is_local_to_layer_7(g270m):
    from workbench.diverge import diverge
    div = diverge("gemma3-270m", backends=["torch:cpu"], dtypes=["float16"], steps=2, store=False, progress=False,
                  prompt="The quick brown fox jumps over the lazy dog.")
    loc = div.local_error.set_index("layer")
    assert loc["overflow"].tolist() == [i == 7 for i in range(len(loc))], loc[["local", "input_nonfinite"]]
    assert math.isinf(loc.loc[7, "local"]) and loc.loc[7, "input_nonfinite"] == 0
    assert (loc.loc[:6, "local"] < 1e-2).all()
    assert (loc.loc[8:, "input_nonfinite"] > 0).all()         # the reference's residual is past float16's range
    # independently of the float16 run: the float64 residual first exceeds float16's largest value (65504) at 7
    assert (loc.loc[:6, "ref_absmax"] < 65504).all() and loc.loc[7, "ref_absmax"] > 65504
    fd = div.first_divergence
    assert fd is not None and fd["step"] == 1 and fd["kind"] == "non-finite" and "layer(s) [7]" in fd["verdict"]


def test_notebook_runs_headless_and_stores_the_run(tmp_path):
    for mod in ("papermill", "ipykernel", "nbformat", "jupyter_client"):
        if not have(mod):
            pytest.skip(f"notebook stack not installed ({mod}): pip install 'gemma-workbench[notebooks]'")
    import json

    from workbench import notebooks as nb
    from workbench import runs
    assert "diverge" in nb.available_notebooks()
    db = tmp_path / "nb.sqlite"
    out_dir = tmp_path / "figs"
    out = nb.run_notebook("diverge", dict(model=str(fixture_dir("gemma3_text")), prompt=PROMPT, backends=["torch:cpu"],
                                          dtypes=["bfloat16"], steps=6, db=str(db), output_dir=str(out_dir)),
                          output=tmp_path / "diverge.out.ipynb", cwd=tmp_path, timeout=600)
    cells = json.loads(out.read_text())["cells"]
    errors = [o for c in cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    res = json.loads((out_dir / "diverge.json").read_text())
    run = runs.RunStore(db).load(res["run_id"])
    assert run.kind == "diverge" and res["targets"] == ["torch:cpu:bfloat16"]
    for kind in ("kl", "kv", "local"):
        assert (out_dir / f"diverge_{kind}_torch_cpu_bfloat16.png").stat().st_size > 5000
    html = (out_dir / "diverge_strips.html").read_text()
    assert html.count('class="wb-tok') == 6


def test_dashboard_page_with_apptest(tmp_path, monkeypatch):
    """The page headless (no browser): an empty store offers the run form; a stored run shows the strip with the
    first differing token, the three figures and the verdict."""
    if not have("streamlit"):
        pytest.skip("streamlit not installed: pip install 'gemma-workbench[dashboard]'")
    from streamlit.testing.v1 import AppTest

    from conftest import ROOT
    page = str(ROOT / "dashboards" / "pages" / "diverge.py")
    db = tmp_path / "page.sqlite"
    monkeypatch.setenv("WORKBENCH_DB", str(db))
    at = AppTest.from_file(page, default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("No divergence runs" in i.value for i in at.info)
    with one_torch_thread():
        from workbench.diverge import diverge
        div = diverge(str(fixture_dir("gemma3_text")), backends=["torch:cpu"], dtypes=["float32"], prompt=PROMPT,
                      steps=8, db=db, progress=False,
                      fault={"backend": "torch:cpu", "layer": 5, "tap": "hook_mlp_out", "scale": 3.0})
    at = AppTest.from_file(page, default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    fd = div.first_divergence
    # the page's verdict is the run's (Divergence.from_run of the stored run), the fresh object's word for word
    assert any("First differing token" in e.value and f"step {fd['step']}" in e.value and fd["verdict"] in e.value
               for e in at.error), [e.value for e in at.error]
    strips = [h for h in at.get("html")]
    assert strips and strips[0].proto.body.count('class="wb-tok') == 8
    assert strips[0].proto.body.count("wb-first") == 1
    assert len(at.get("image")) == 3           # KL curve, local vs inherited bars, KV heatmap
