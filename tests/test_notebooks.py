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


# ------------------------------------------------------------------------------------------------ the checkout stays clean
def _cell_outputs(path):
    """[(cell index, what)] of code cells that carry outputs or an execution count."""
    nbj = json.loads(path.read_text())
    return [(i, f"{len(c.get('outputs', []))} output(s), execution_count {c.get('execution_count')}")
            for i, c in enumerate(nbj["cells"])
            if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]


def test_tracked_notebooks_have_no_outputs(tmp_path):
    """Outputs and execution counts belong to executed copies (user data dir), never to the tracked sources."""
    import subprocess
    from conftest import ROOT
    tracked = subprocess.run(["git", "ls-files", "notebooks/*.ipynb"], cwd=ROOT, capture_output=True, text=True)
    paths = [ROOT / p for p in tracked.stdout.split()] if tracked.returncode == 0 and tracked.stdout.strip() \
        else sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert {p.stem for p in paths} >= set(NOTEBOOKS)
    for p in paths:
        assert not _cell_outputs(p), f"{p.name} carries outputs (strip them): {_cell_outputs(p)}"
    # the check sees a planted output
    nbj = json.loads(paths[0].read_text())
    code = next(c for c in nbj["cells"] if c["cell_type"] == "code")
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["x\n"]}]
    (tmp_path / "planted.ipynb").write_text(json.dumps(nbj))
    assert _cell_outputs(tmp_path / "planted.ipynb")


def test_notebooks_default_output_dir_is_not_the_checkout(nb):
    """No shipped notebook writes into the working directory by default: output_dir None -> the user data dir."""
    assert set(nb.available_notebooks()) >= set(NOTEBOOKS)
    for name in nb.available_notebooks():
        assert nb.notebook_parameters(name)["output_dir"] is None, name
    assert nb.output_root() == nb.user_data_dir() / "notebooks"


def _tiny_notebook(path, cells, params="x = 1\noutput_dir = None"):
    import nbformat
    v = nbformat.v4
    book = v.new_notebook(cells=[v.new_code_cell(params, metadata={"tags": ["parameters"]})]
                          + [v.new_code_cell(c) for c in cells])
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, str(path))
    return path


def test_run_notebook_writes_under_the_user_data_dir(nb, tmp_path, monkeypatch):
    """Without -o the executed notebook goes to <data dir>/gemma-workbench/notebooks/, and its output_dir
    parameter points beside it, not at the working directory."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    src = _tiny_notebook(tmp_path / "tiny.ipynb", ["print('output_dir =', output_dir)"])
    if sys.platform.startswith("linux"):
        assert nb.output_root() == tmp_path / "data" / "gemma-workbench" / "notebooks"
    out = nb.run_notebook(src, {"x": 2}, timeout=120)
    assert out.parent == nb.output_root() and out.name.startswith("tiny-")
    text, errors, _ = _outputs(out)
    assert not errors and f"output_dir = {out.with_suffix('')}" in text
    assert not (tmp_path / "out").exists()


def test_failing_cell_prints_the_cell_and_the_error(tmp_path, capsys):
    """`workbench notebooks run` on a notebook whose cell raises: the cell's source and `Name: message`,
    exit code 1 — not papermill's PapermillExecutionError traceback."""
    _need_notebook_stack()
    from workbench import cli
    src = _tiny_notebook(tmp_path / "broken.ipynb",
                         ["y = x + 1", "def planted():\n    raise RuntimeError(f'planted failure {y}')\nplanted()",
                          "print('never')"])
    rc = cli.main(["notebooks", "run", str(src), "-p", "x", "41", "-o", str(tmp_path / "broken.out.ipynb")])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "failed in cell 3 of the executed notebook (In [4])" in err and "raise RuntimeError(f'planted failure {y}')" in err
    assert "RuntimeError: planted failure 42" in err
    assert "PapermillExecutionError" not in err and "Traceback" not in err and "\x1b[" not in err
    assert str(tmp_path / "broken.out.ipynb") in err and (tmp_path / "broken.out.ipynb").exists()


def test_parity_notebook_is_anchored_and_has_a_decode_parameter(nb):
    p = nb.notebook_parameters("parity")
    assert p["decode"] == "plain"
    cells = json.loads(nb.notebook_path("parity").read_text())["cells"]
    src = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "anchor=False" not in src
    assert 'extra["decode"] = decode' in src and "inspect.signature(wb.compare)" in src


# ------------------------------------------------------------------------------------------------ workbench lab
def test_lab_working_copy_and_command(nb, tmp_path, monkeypatch):
    from workbench import cli, lab
    monkeypatch.chdir(fixture_dir("gemma3_text").parent.parent)
    path, how = lab.prepare(workdir=tmp_path, params={"model": "fixtures/gemma3_text", "prompt": [3, 4, 5]})
    assert how == "parameterized" and path.parent == tmp_path and path.name == "explore_layers.ipynb"
    cells = json.loads(path.read_text())["cells"]
    i = next(i for i, c in enumerate(cells) if "parameters" in (c["metadata"].get("tags") or []))
    injected = "".join(cells[i + 1]["source"])
    assert "injected-parameters" in cells[i + 1]["metadata"]["tags"]
    assert "prompt = [3, 4, 5]" in injected
    # the kernel runs in the working copy's folder: a path relative to here is made absolute
    assert f"model = {str(fixture_dir('gemma3_text'))!r}" in injected
    path.write_text(path.read_text().replace("Explore layers", "My edited explorer"))
    assert lab.prepare(workdir=tmp_path) == (path, "kept") and "My edited" in path.read_text()
    assert lab.prepare(workdir=tmp_path, fresh=True)[1] == "copied" and "My edited" not in path.read_text()
    with pytest.raises(nb.NotebookError, match=r"no parameter\(s\) 'modle'"):
        lab.prepare(workdir=tmp_path, params={"modle": "x"})
    cmd = lab.command(tmp_path, path.name, 8899, "tok", False)
    assert "--ServerApp.ip=127.0.0.1" in cmd and "--ServerApp.port=8899" in cmd and "--ServerApp.port_retries=0" in cmd
    assert "--IdentityProvider.token=tok" in cmd and f"--ServerApp.root_dir={tmp_path}" in cmd
    args = cli.parse(["lab", "--port", "9000", "--no-browser", "-p", "layer", "2"])
    assert args.port == 9000 and args.browser is False and args.p == [["layer", "2"]] and args.fn is lab.cmd_lab
    assert cli.parse(["lab"]).browser is None          # decided by lab.headless()


# ------------------------------------------------------------------------------------------------ the explorer's logic
@pytest.fixture(scope="module")
def wide_fixture(tmp_path_factory):
    """gemma3_text with its vocabulary padded to 1024 rows: a second model whose ids do not fit the first."""
    if not cpu_backends():
        pytest.skip("neither torch nor mlx is installed")
    import numpy as np
    from safetensors.numpy import load_file, save_file
    src = fixture_dir("gemma3_text")
    d = tmp_path_factory.mktemp("wide") / "gemma3_wide"
    d.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = 1024
    (d / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(src / "model.safetensors"))
    emb = t["model.embed_tokens.weight"]
    extra = np.random.default_rng(0).standard_normal((1024 - emb.shape[0], emb.shape[1])).astype(emb.dtype)
    t["model.embed_tokens.weight"] = np.concatenate([emb, extra * emb.std()])
    save_file(t, str(d / "model.safetensors"))
    return d


WIDE_PROMPT = [300 + 7 * i for i in range(12)]     # ids >= 256: outside gemma3_text's vocabulary


@pytest.fixture
def quick(monkeypatch):
    """One torch thread, and a stand-in for the parity run behind the heatmap (recorded in ``calls``) where
    the test is about the explorer's logic, not about parity."""
    from conftest import one_torch_thread
    calls = []

    def fake_compare(source, **kw):
        calls.append((str(source), tuple(kw["prompt"])))
        return _FakeReport()
    monkeypatch.setattr("workbench.parity.compare", fake_compare)
    with one_torch_thread():
        yield calls


def _explorer(source, **kw):
    pytest.importorskip("ipywidgets")
    from workbench.explorer import LayerExplorer
    kw.setdefault("models_choices", [str(fixture_dir("gemma3_text"))])
    kw.setdefault("ablate", "none")
    e = LayerExplorer(source, cpu_backends()[:1], "float32", **kw)
    assert e.error is None, e.error
    return e


def test_explorer_keeps_the_prompt_per_model(wide_fixture, quick):
    fx = str(fixture_dir("gemma3_text"))
    e = _explorer(str(wide_fixture), prompt=WIDE_PROMPT)
    assert e.ids == WIDE_PROMPT and e.w_prompt.value == ", ".join(map(str, WIDE_PROMPT))
    e.w_model.value = fx                                   # a model whose vocabulary (256) cannot take them
    assert e.error is None, e.error
    assert e.source == fx and all(i < 256 for i in e.ids) and e.ids != [i % 256 for i in WIDE_PROMPT]
    assert "own prompt" in e.status.value
    assert e.last["token_ids"] == e.ids and e.last["model"] == fx
    e.w_prompt.value = "5, 6, 7, 8, 9, 10"                # the user's prompt for the fixture
    assert e.error is None and e.ids == [5, 6, 7, 8, 9, 10]
    e.w_model.value = str(wide_fixture)                    # back: the user's prompt, not ids % 256
    assert e.error is None, e.error
    assert e.ids == WIDE_PROMPT and e.w_prompt.value == ", ".join(map(str, WIDE_PROMPT))
    assert e.last["token_ids"] == WIDE_PROMPT and [o[1] for o in e.w_token.options] == list(range(len(WIDE_PROMPT)))
    e.w_model.value = fx                                   # and the fixture's own prompt is kept too
    assert e.ids == [5, 6, 7, 8, 9, 10]
    e.w_prompt.value = "3, 4, 999"                         # a prompt the model cannot take: a clear error
    assert "outside the vocabulary" in e.status.value and e.ids == [5, 6, 7, 8, 9, 10]


def test_explorer_caches_parity_per_model_and_prompt(wide_fixture, quick):
    calls = quick
    fx = str(fixture_dir("gemma3_text"))
    e = _explorer(fx, prompt=PROMPT, models_choices=[str(wide_fixture)])
    assert calls == [(fx, tuple(PROMPT))]
    e.w_prompt.value = "3, 4, 5, 6, 7, 8, 9, 10"
    assert calls[-1] == (fx, (3, 4, 5, 6, 7, 8, 9, 10)), "the heatmap must follow the prompt"
    e.w_layer.value = 2
    e.w_prompt.value = ", ".join(map(str, PROMPT))        # back to the first prompt: cached
    assert len(calls) == 2 and e.error is None
    e.w_model.value = str(wide_fixture)
    assert calls[-1][0] == str(wide_fixture) and len(calls) == 3
    e.w_model.value = fx
    assert len(calls) == 3, "switching back must reuse the cached frame of (model, dtype, prompt)"


def test_load_progress_is_reported_before_the_widget_exists(monkeypatch):
    """Each slow load is announced (the notebook shows a progress bar before the explorer appears)."""
    from workbench import explorer
    fx = fixture_dir("gemma3_text")
    for k in [k for k in explorer._MODEL_CACHE if k[0] == str(fx)]:
        monkeypatch.delitem(explorer._MODEL_CACHE, k)
    p = explorer.StepProgress(len(cpu_backends()) + 1, "test", show=False)
    explorer.load_models(fx, cpu_backends(), "float32", progress=p)
    assert [s for s, _ in p.steps] == [f"loading {fx} on {b} (float32)" for b in cpu_backends()]
    explorer.load_models(fx, cpu_backends(), "float32", progress=p)     # cached: nothing to announce
    assert len(p.steps) == len(cpu_backends())
    cb = p.stage("parity")                  # wb.compare(progress=cb) calls cb(step, total, what)
    cb(1, 4, "reference torch:cpu:float64")
    assert p.steps[-1][0] == "parity: reference torch:cpu:float64"
    if p.bar is not None:
        assert p.bar.value == pytest.approx(len(cpu_backends()) + 0.25)
        assert "parity: 1/4 done (reference torch:cpu:float64)" in p.label.value
    p.done()
    if p.bar is not None:
        assert p.bar.value == p.bar.max
    # the notebook creates the progress bar before loading anything
    cells = json.loads((fixture_dir("gemma3_text").parent.parent / "notebooks" / "explore_layers.ipynb").read_text())
    src = "".join("".join(c["source"]) for c in cells["cells"] if c["cell_type"] == "code")
    assert src.index("nb.StepProgress(") < src.index("nb.load_models(") < src.index("nb.LayerExplorer(")
    assert "progress=progress" in src[src.index("nb.load_models("):]
    assert "progress=progress.stage(" in src[src.index("wb.compare("):]


class _WordTokenizer:
    """A stand-in tokenizer: id i <-> the word 'w<i>'."""
    def encode(self, text):
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids):
        return " ".join(f"w{int(i)}" for i in ids)


def test_attention_and_ablation_show_token_text(monkeypatch, quick):
    import matplotlib
    matplotlib.use("Agg")
    from workbench import explorer, interp, plots
    from workbench.loader import load
    fx = str(fixture_dir("gemma3_text"))
    b = cpu_backends()[0]
    m = load(fx, backend=b, dtype="float32", progress=False)
    m.tokenizer = _WordTokenizer()
    key = (fx + "#words", b, "float32")
    monkeypatch.setitem(explorer._MODEL_CACHE, key, m)
    drawn = []
    real = plots.pattern_figure

    def spy(pattern, labels=None, **kw):
        fig = real(pattern, labels, **kw)
        drawn.append((labels, [t.get_text() for t in fig.axes[0].get_xticklabels()]))
        return fig
    monkeypatch.setattr(plots, "pattern_figure", spy)
    e = _explorer(fx + "#words", prompt="w3 w4 w5 w6 w7 w8 w9 w10", models_choices=[], ablate="zero")
    labels, ticks = drawn[-1]
    assert labels == [f"w{i}" for i in range(3, 11)]
    assert ticks[0] == "0 w3" and ticks[-1] == "7 w10"
    per, _, _ = interp.intervention({b: m}, [3, 4, 5, 6, 7, 8, 9, 10], {"blocks.3.hook_mlp_out": interp.ablation_hook()})
    r = per.iloc[0]
    assert r["top1_clean_token"] == f"w{r['top1_clean']}" and r["top1_hooked_token"] == f"w{r['top1_hooked']}"
    assert r["token"] == "w10"
    html = e.html_ablation.value
    assert "top1_clean_token" in html and f"<td>w{r['top1_clean']}</td>" in html


class _FakeReport:
    def to_frame(self):
        import pandas as pd
        return pd.DataFrame(dict(backend=["torch:cpu"], dtype=["float32"], phase=["prefill"], tap=["hook_resid_post"],
                                 layer=[0], rel_max=[1e-7], passed=[True], tol=[1e-5], order=[0]))


def test_patching_clean_into_corrupted_per_layer(quick):
    """Patching hook_resid_pre at the corrupted position of layer 0 restores the clean run exactly (the only
    difference is there); the same curve on every backend; the widget shows it."""
    import numpy as np
    from workbench import interp, explorer
    fx = fixture_dir("gemma3_text")
    models = explorer.load_models(fx, cpu_backends(), "float32")
    m0 = next(iter(models.values()))
    corrupt = interp.corrupt_prompt(PROMPT, 8, m0.config.vocab_size)
    assert corrupt[8] == PROMPT[8] + 1 and corrupt[:8] == PROMPT[:8]
    t, f = interp.logit_pair(m0, PROMPT, corrupt)
    curves = {b: interp.patch_logit_diff(m, PROMPT, corrupt, target=t, foil=f, position=8) for b, m in models.items()}
    for b, c in curves.items():
        assert list(c["layer"]) == list(range(m0.config.num_hidden_layers))
        assert abs(c["clean_diff"].iloc[0] - c["corrupt_diff"].iloc[0]) > 1e-3, "the corruption must matter"
        assert c["restored"].iloc[0] == pytest.approx(1.0, abs=1e-5), c
        assert np.isfinite(c["restored"]).all()
        # patching every position of any layer's resid_pre restores the clean run
        full = interp.patch_logit_diff(models[b], PROMPT, corrupt, target=t, foil=f, layers=[4])
        assert full["restored"].iloc[0] == pytest.approx(1.0, abs=1e-4)
    a = next(iter(curves.values()))
    for c in curves.values():
        assert np.abs(c["restored"].to_numpy() - a["restored"].to_numpy()).max() < 1e-3
    e = _explorer(str(fx), prompt=PROMPT, patching=True, corrupt_position=8)
    p = e.last["patching"]
    assert p["position"] == 8 and p["corrupt_ids"] == corrupt and (p["target"], p["foil"]) == (t, f)
    assert len(e.img_patch.value) > 1000 and "activation patching" in e.html_patch.value
    e.w_target.value, e.w_foil.value = "#7", "9"
    assert e.error is None and (e.last["patching"]["target"], e.last["patching"]["foil"]) == (7, 9)
    e.w_patch_tap.value = "hook_mlp_out"
    assert e.last["patching"]["tap"] == "hook_mlp_out"
    e.w_target.value = "#5000"
    assert "outside the vocabulary" in e.status.value
    e.w_patch.value = False
    assert "patching" not in e.last and e.img_patch.value == b""


def test_logit_lens_uses_the_models_own_unembed_when_it_has_one():
    import numpy as np
    from workbench import interp
    from workbench.loader import load
    m = load(fixture_dir("gemma3_text"), backend=cpu_backends()[0], dtype="float32", progress=False)
    x = np.ones((2, m.config.hidden_size), np.float32)
    reimpl = interp.unembed(m, x)
    seen = []
    m.unembed = lambda v: seen.append(v) or np.full((2, m.config.vocab_size), 7.0, np.float32)
    assert (interp.unembed(m, x) == 7.0).all() and len(seen) == 1
    assert reimpl.shape == (2, m.config.vocab_size) and np.isfinite(reimpl).all()


def test_patching_target_token_is_taken_as_typed():
    """' Berlin' and 'Berlin' are different tokens: the target/foil boxes keep the leading space."""
    from types import SimpleNamespace
    from workbench.explorer import _parse_token
    from workbench.interp import PromptError

    class Tok:
        def encode(self, text):
            return [2] + {"Berlin": [5], " Berlin": [6], " two words": [7, 8]}[text]
    m = SimpleNamespace(config=SimpleNamespace(vocab_size=256, bos_token_id=2), tokenizer=Tok())
    assert _parse_token(m, " Berlin") == 6 and _parse_token(m, "Berlin") == 5
    assert _parse_token(m, "#17") == 17 and _parse_token(m, " 17 ") == 17 and _parse_token(m, "  ") is None
    with pytest.raises(PromptError, match="2 tokens, not one"):
        _parse_token(m, " two words")
    with pytest.raises(PromptError, match="outside the vocabulary"):
        _parse_token(m, "#256")
