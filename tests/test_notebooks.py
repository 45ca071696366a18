"""The notebooks run headless through papermill on a tiny fixture, and what they store is checked.

Each notebook gets model = fixtures/gemma3_text, prompt = token ids, backends = the CPU backends here and a
temporary results database; the assertions are on the runs in that database and on the files written to
output_dir, not merely on the notebook having executed. The real Gemma 3 270M goes through parity.ipynb once
(marked slow).
"""
from __future__ import annotations

import json
import sys

import pytest

from conftest import cpu_backends, fixture_dir, have

NOTEBOOKS = ["parity", "throughput", "explore_layers"]
PROMPT = list(range(3, 19))          # 16 token ids; the tiny fixtures have no tokenizer


def _need_notebook_stack():
    missing = [m for m in ("papermill", "ipykernel", "nbformat", "ipywidgets", "jupyter_client") if not have(m)]
    if missing:
        pytest.skip(f"notebook stack not installed ({', '.join(missing)}): pip install 'gemma-workbench[notebooks]'")
    if not cpu_backends():
        pytest.skip("neither torch nor mlx is installed")


@pytest.fixture(scope="module")
def nb():
    _need_notebook_stack()
    from workbench import notebooks
    return notebooks


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return tmp_path_factory.mktemp("nbdb") / "runs.sqlite"


def _outputs(path):
    """(stream text, error outputs, output types) of an executed notebook."""
    nbj = json.loads(path.read_text())
    text, errors, kinds = [], [], set()
    for c in nbj["cells"]:
        for o in c.get("outputs", []):
            kinds.add(o["output_type"])
            if o["output_type"] == "stream":
                text.append("".join(o["text"]))
            elif o["output_type"] == "error":
                errors.append(f"{o['ename']}: {o['evalue']}")
            for k in o.get("data", {}):
                kinds.add(k)
    return "".join(text), errors, kinds


def _run(nb, name, tmp_path, store_path, **extra):
    params = dict(model=str(fixture_dir("gemma3_text")), prompt=PROMPT, backends=cpu_backends(),
                  db=str(store_path), output_dir=str(tmp_path / name))
    params.update(extra)
    out = nb.run_notebook(name, params, output=tmp_path / f"{name}.out.ipynb", cwd=tmp_path, timeout=300)
    assert out.exists()
    text, errors, kinds = _outputs(out)
    assert not errors, errors
    assert f"python: {sys.executable}" in text, "the kernel did not run on this interpreter"
    return out, text, kinds


# ------------------------------------------------------------------------------------------------ plumbing
def test_each_notebook_has_one_parameters_cell(nb):
    for name in NOTEBOOKS:
        p = nb.notebook_parameters(name)
        for key in ("model", "backends", "dtypes", "prompt", "db", "output_dir"):
            assert key in p, f"{name}: parameter {key!r} missing"
        assert p["model"] == "gemma3-270m", f"{name}: the default model should be the embedded gemma3-270m"
        idx, _ = nb.parameters_cell(nb.notebook_path(name))
        cells = json.loads(nb.notebook_path(name).read_text())["cells"]
        assert sum("parameters" in (c["metadata"].get("tags") or []) for c in cells) == 1
        # thin notebooks: no model code in cells (no ops, no weights)
        src = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert ".w[" not in src and "ops." not in src


def test_unknown_notebook_and_parameter_are_clear_errors(nb):
    with pytest.raises(nb.NotebookError, match="available: .*parity"):
        nb.run_notebook("no_such_notebook", {})
    with pytest.raises(nb.NotebookError, match=r"no parameter\(s\) 'modle'.*valid parameters: model"):
        nb.run_notebook("parity", {"modle": "x"})


def test_python3_kernel_is_this_interpreter(nb):
    assert nb.ensure_kernel("python3") == sys.executable
    from jupyter_client.kernelspec import KernelSpecManager
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] in ("python", "python3", sys.executable) or spec.argv[0].startswith(sys.prefix), spec.argv


def test_helpers_parse_parameters(nb):
    assert nb.as_list("torch:cpu,mlx:cpu") == ["torch:cpu", "mlx:cpu"]
    assert nb.as_list('["torch:cpu"]') == ["torch:cpu"]
    assert nb.as_list(None, ["x"]) == ["x"]
    assert nb.as_prompt("[1, 2, 3]") == [1, 2, 3]
    assert nb.as_prompt("1,2,3") == [1, 2, 3]
    assert nb.as_prompt("Hello, world") == "Hello, world"


# ------------------------------------------------------------------------------------------------ helpers
@pytest.mark.parametrize("fx", ["gemma2", "gemma3_text", "gemma4_e2b"])
def test_logit_lens_of_the_last_layer_is_the_output(fx):
    """final norm + tied head (+ softcap) applied in numpy to the last resid_post reproduces the logits."""
    if not cpu_backends():
        pytest.skip("neither torch nor mlx is installed")
    import numpy as np
    from workbench import notebooks
    for b in cpu_backends():
        m = notebooks.load_models(fixture_dir(fx), [b], "float32")[b]
        out = m.forward(PROMPT, taps=["blocks.*.hook_resid_post"])
        L = m.config.num_hidden_layers
        lg = notebooks.unembed(m, out.taps[f"blocks.{L - 1}.hook_resid_post"])
        assert np.abs(lg - out.logits).max() <= 1e-5 * np.abs(out.logits).max()
        lens = notebooks.logit_lens(m, PROMPT, k=3, out=out)
        assert set(lens["layer"]) == set(range(L + 1)) and (lens.groupby(["layer", "position"]).size() == 3).all()
        top = lens[lens["rank"] == 0]
        assert (top[top["layer"] == L - 1]["token_id"].to_numpy() == top[top["layer"] == L]["token_id"].to_numpy()).all()


def test_the_same_hook_gives_the_same_answer_on_every_backend():
    if len(cpu_backends()) < 2:
        pytest.skip("needs torch and mlx")
    from workbench import notebooks
    models = notebooks.load_models(fixture_dir("gemma3_text"), cpu_backends(), "float32")
    for hook in ({"blocks.3.hook_mlp_out": notebooks.ablation_hook("zero")},
                 {"blocks.2.attn.hook_z": notebooks.ablation_hook("mean", heads=[1], positions=[2, 3])}):
        per, cross, _ = notebooks.intervention(models, PROMPT, hook)
        assert (per["effect_max_abs"] > 1e-3).all()
        assert (cross["effect_rel"] < 1e-3).all() and cross["same_top1"].all()
    curves = {b: notebooks.patching_sweep(m, PROMPT, PROMPT[:4] + [200] + PROMPT[5:], position=4)
              for b, m in models.items()}
    a, b = curves.values()
    assert abs(a["restored"] - b["restored"]).max() < 1e-3
    assert a["restored"].iloc[0] == pytest.approx(1.0)      # patching the embedding back = the corrupted run


# ------------------------------------------------------------------------------------------------ notebooks
def test_parity_notebook_stores_every_layer_and_backend(nb, tmp_path, store_path):
    from workbench import runs
    before = set(runs.RunStore(store_path).list(kind="parity")["run_id"])
    out, text, kinds = _run(nb, "parity", tmp_path, store_path, dtypes=["float32", "bfloat16"], decode_steps=2)
    store = runs.RunStore(store_path)
    new = store.list(kind="parity")
    new = new[~new["run_id"].isin(before)]
    assert len(new) == 1, "the notebook should store exactly one parity run"
    run = store.load(new["run_id"].iloc[0])
    assert run.meta["model"] == str(fixture_dir("gemma3_text"))
    rows = run.rows
    L = 7   # gemma3_text fixture
    for b in cpu_backends():
        for d in ("float32", "bfloat16"):
            r = rows[(rows["backend"] == b) & (rows["dtype"] == d) & (rows["phase"] == "prefill")]
            for tap in ("hook_attn_out", "hook_mlp_out", "hook_resid_post"):
                layers = sorted(int(x) for x in r[r["tap"] == tap]["layer"])
                assert layers == list(range(L)), (b, d, tap, layers)
            assert r[["rel_max", "rel_l2", "nmse", "cosine", "max_abs"]].notna().all().all()
            assert (r["tap"] == "logits").any()
        f32 = rows[(rows["backend"] == b) & (rows["dtype"] == "float32")]
        assert f32["passed"].all(), f"{b} float32 should pass:\n{f32[~f32['passed']]}"
        assert (rows[(rows["backend"] == b)]["phase"] == "decode").any()
    assert f"stored run: {run.run_id}" in text
    od = tmp_path / "parity"
    pngs = {p.name for p in od.glob("*.png")}
    assert "parity_prefill_rel_max_by_backend.png" in pngs
    for b in cpu_backends():
        assert f"parity_prefill_rel_max_{b.replace(':', '-')}_float32.png" in pngs
    summary = json.loads((od / "parity.json").read_text())
    assert summary["run_id"] == run.run_id
    assert "image/png" in kinds


def test_throughput_notebook_stores_positive_throughput(nb, tmp_path, store_path):
    from workbench import runs
    before = set(runs.RunStore(store_path).list(kind="bench")["run_id"])
    out, text, kinds = _run(nb, "throughput", tmp_path, store_path, dtypes=["float32"], prompt_len=16, gen_len=8,
                            repeats=1)
    store = runs.RunStore(store_path)
    new = store.list(kind="bench")
    new = new[~new["run_id"].isin(before)]
    assert len(new) == 1
    rows = store.load(new["run_id"].iloc[0]).rows
    for b in cpu_backends():
        r = rows[(rows["backend"] == b) & (rows["impl"] == "workbench")]
        assert len(r) == 1 and r["status"].iloc[0] == "ok", r
        r = r.iloc[0]
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ttft_s"] > 0
        assert r["decode_us_p10"] <= r["decode_us_median"] <= r["decode_us_p90"]
        assert r["prompt_len"] == len(PROMPT) and r["gen_len"] == 8
        assert r["bw_limit_gbps"] > 0 and r["gbps"] > 0
    od = tmp_path / "throughput"
    assert (od / "throughput.png").stat().st_size > 10_000
    assert (od / "throughput_history.png").exists()


def test_explore_layers_notebook(nb, tmp_path, store_path):
    from workbench import runs
    before = set(runs.RunStore(store_path).list(kind="parity")["run_id"])
    out, text, kinds = _run(nb, "explore_layers", tmp_path, store_path, dtypes=["float32"], layer=3, token=-1,
                            ablate="zero", ablate_tap="hook_mlp_out")
    # the widgets rendered their initial state headless
    assert "application/vnd.jupyter.widget-view+json" in kinds
    od = tmp_path / "explore_layers"
    res = json.loads((od / "explore_layers.json").read_text())
    assert res["interactive_state"] and res["interactive_state"]["layer"] == 3
    # the parity run behind the heatmaps is stored, with every tap of every layer on each backend
    store = runs.RunStore(store_path)
    new = store.list(kind="parity")
    new = new[~new["run_id"].isin(before)]
    assert list(new["run_id"]) == [res["run_id"]]
    rows = store.load(res["run_id"]).rows
    for b in cpu_backends():
        r = rows[rows["backend"] == b]
        for tap in ("hook_resid_pre", "attn.hook_q", "attn.hook_z", "mlp.hook_post", "hook_resid_post"):
            assert sorted(int(x) for x in r[r["tap"] == tap]["layer"]) == list(range(7)), (b, tap)
        assert r["passed"].all()
    # logit lens: the last layer's lens is the model's own output
    assert res["lens_matches_output"] is True
    top1 = {(d["layer"], d["position"]) for d in res["lens_top1"]}
    assert top1 == {(i, p) for i in range(8) for p in range(len(PROMPT))}
    # the same numpy hook on every backend: a real effect, identical across backends up to float32 rounding
    assert {a["backend"] for a in res["ablation"]} == set(cpu_backends())
    assert all(a["effect_max_abs"] > 1e-3 for a in res["ablation"])
    for c in res["ablation_cross"]:
        assert c["effect_rel"] < 1e-3 and c["hooked_rel"] < 1e-5 and c["same_top1"]
    assert set(res["patching"]) == set(cpu_backends())
    assert res["patching_backend_max_diff"] < 1e-3
    for name in ("logit_lens.png", "attention_layer3.png", "patching.png", "parity_prefill_rel_max_by_backend.png"):
        assert (od / name).exists(), name
    assert (od / "logit_lens.csv").exists()


@pytest.mark.slow
def test_parity_notebook_on_the_embedded_270m(nb, tmp_path):
    from workbench import runs
    db = tmp_path / "runs.sqlite"
    out = nb.run_notebook("parity", dict(backends=cpu_backends(), dtypes=["float32"], db=str(db), max_tokens=16,
                                         decode_steps=1, output_dir=str(tmp_path / "parity")),
                          output=tmp_path / "parity.out.ipynb", cwd=tmp_path, timeout=1800)
    _, errors, _ = _outputs(out)
    assert not errors
    store = runs.RunStore(db)
    lst = store.list(kind="parity")
    assert len(lst) == 1 and lst["model"].iloc[0] == "gemma3-270m"
    rows = store.load(lst["run_id"].iloc[0]).rows
    L = 18
    for b in cpu_backends():
        r = rows[(rows["backend"] == b) & (rows["phase"] == "prefill") & (rows["tap"] == "hook_resid_post")]
        assert sorted(int(x) for x in r["layer"]) == list(range(L))
        assert rows[rows["backend"] == b]["passed"].all()
    assert (tmp_path / "parity" / "parity_prefill_rel_max_by_backend.png").exists()
