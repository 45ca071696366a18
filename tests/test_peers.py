"""The bench's peers: the HF StaticCache decoder behind ``hf-static-graphs`` and the rule that every peer that
could not run is a row with its reason (``workbench.references.peers``).

The decoder is checked on the tiny Gemma 3 fixture (sliding window 8, so a 6-token prompt and 16 new tokens run
well past it): its logits at every generated position against HF's own full forward (eager attention, no
cache), with a control showing the window changes those logits (so a decoder that dropped it would fail).
On this CPU the step runs eagerly (and, marked slow, compiled by inductor without CUDA graphs); the CUDA-graph
run is tests/tools/gpu/peers_bench.py's.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import FIXTURES, have

pytestmark = pytest.mark.skipif(not have("transformers") or not have("torch"), reason="needs torch + transformers")

FX = FIXTURES / "gemma3_text"


def _ref(path=FX, attn="sdpa"):
    from workbench.references.hf import HFReference
    return HFReference(str(path), dtype="float32", attn_implementation=attn)


def _decode_logits(ref, prompt, n, compile=False):
    """Greedy through StaticGraphDecoder, recording the logits each token was picked from."""
    from workbench.references.hf_static import StaticGraphDecoder
    dec = StaticGraphDecoder(ref.model, len(prompt) + n, compile=compile)
    seen = []
    pick = dec._pick

    def recording(logits):
        seen.append(logits.detach().float().cpu().numpy()[0])
        return pick(logits)
    dec._pick = recording
    out = dec.run(prompt, n)
    return out, np.stack(seen)


def _full_logits(path, ids):
    return _ref(path, attn="eager").logits(ids)[0]


PROMPT = [2, 17, 99, 45, 200, 31]


def test_static_decoder_matches_hf_full_forward_past_the_window():
    ref = _ref()
    window = ref.text_config.sliding_window
    n = 16
    assert len(PROMPT) + n > 2 * window, "the test must run past the sliding window"
    out, seen = _decode_logits(ref, PROMPT, n)
    toks = out["tokens"]
    assert len(toks) == n and out["prefill_s"] > 0 and out["decode_s"] > 0
    full = _full_logits(FX, PROMPT + toks)
    want = full[len(PROMPT) - 1: len(PROMPT) - 1 + n]       # the logits each new token was chosen from
    assert np.isfinite(seen).all()
    err = np.abs(seen - want).max() / np.abs(want).max()
    assert err < 1e-5, f"static decoder vs HF full forward: max rel err {err:.2e}"
    assert toks == [int(i) for i in want.argmax(-1)]
    # the decoder replaced the sliding layers by full-length ones: the window is the mask's job
    from workbench.references.hf_static import full_length_static_cache
    _, swapped = full_length_static_cache(ref.model, 32)
    assert swapped == sum(t == "sliding_attention" for t in ref.text_config.layer_types) > 0


def test_window_matters_on_this_fixture(tmp_path):
    """Control: the same tokens with the window widened past the sequence give other logits late in the run,
    so the comparison above would catch a decoder that attended to everything."""
    wide = tmp_path / "wide"
    shutil.copytree(FX, wide)
    cfg = json.loads((wide / "config.json").read_text())
    window = cfg["sliding_window"]
    cfg["sliding_window"] = 4096
    (wide / "config.json").write_text(json.dumps(cfg))
    ids = PROMPT + [5, 9, 77, 31, 140, 2, 66, 18, 250, 12, 3, 44, 90, 101, 7, 8]
    a, b = _full_logits(FX, ids), _full_logits(wide, ids)
    assert len(ids) > 2 * window
    late = slice(2 * window, None)
    assert np.abs(a[late] - b[late]).max() / np.abs(a[late]).max() > 1e-2


def test_static_decoder_refuses_too_long_runs():
    from workbench.references.hf_static import StaticGraphDecoder
    dec = StaticGraphDecoder(_ref().model, 8, compile=False)
    with pytest.raises(ValueError, match="exceed the cache"):
        dec.run(PROMPT, 4)


@pytest.mark.slow
def test_compiled_static_decoder_on_cpu_one_graph_same_tokens():
    """torch.compile(mode='reduce-overhead', fullgraph=True) on CPU (inductor; CUDA graphs are skipped off CUDA):
    no graph break, one graph reused by every run (no recompile per token), the eager loop's tokens."""
    from workbench.references.hf_static import bench_static_graphs
    ref = _ref()
    eager, _ = _decode_logits(ref, PROMPT, 12)
    r = bench_static_graphs(ref, prompt_len=len(PROMPT), gen_len=11, repeats=2)
    assert r["graph_breaks"] == {} and r["graphs_timed"] == 0 and r["graphs_warmup"] >= 1, r["note"]
    assert r["cuda_graphs"] is False and r["decode_tok_s"] > 0
    prompt = ref._bench_prompt(len(PROMPT))
    eager2, _ = _decode_logits(ref, prompt.tolist(), 12)
    assert r["tokens"] == eager2["tokens"]


# --------------------------------------------------------------------------- every peer gets a row
def _by_impl(rows):
    return {(r["impl"], r["backend"], r["dtype"]): r for r in rows}


def test_peer_rows_name_every_peer_that_could_not_run(monkeypatch):
    from workbench.references import hf as hf_mod
    from workbench.references.peers import peer_rows

    def boom(self, *a, **k):
        raise RuntimeError("planted failure")
    monkeypatch.setattr(hf_mod.HFReference, "bench_decode", boom)
    targets = [("torch:cpu", "float32"), ("torch:cuda", "bfloat16")]
    notes = []
    rows = _by_impl(peer_rows(str(FX), targets, 8, 4, 1, note=notes.append))
    hf = rows[("hf", "torch:cpu", "float32")]
    assert hf["status"] == "skipped" and hf["reason"] == "failed: RuntimeError: planted failure"
    graphs = rows[("hf-static-graphs", "torch:cpu", "float32")]
    assert graphs["status"] == "skipped" and graphs["reason"].startswith("needs CUDA:")
    assert rows[("hf+static", "torch:cpu", "float32")]["reason"].startswith("needs CUDA:")
    lc = rows[("llama.cpp", "llamacpp:cpu", "gguf")]
    assert lc["status"] == "skipped" and lc["reason"].startswith("not applicable:") and "GGUF" in lc["reason"]
    import torch
    if not torch.cuda.is_available():
        for impl, backend, dtype in (("hf", "torch:cuda", "bfloat16"), ("hf-static-graphs", "torch:cuda", "bfloat16"),
                                     ("hf+static", "torch:cuda", "bfloat16"), ("llama.cpp", "llamacpp:gpu", "gguf")):
            r = rows[(impl, backend, dtype)]
            assert r["status"] == "skipped" and r["reason"].startswith("target unavailable:"), r
    assert any("planted failure" in n for n in notes)      # the progress lines say it too


def test_missing_engine_is_a_row_with_the_install_hint(monkeypatch):
    import builtins

    from workbench.references.peers import peer_rows
    real = builtins.__import__

    def no_transformers(name, *a, **k):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_transformers)
    rows = _by_impl(peer_rows(str(FX), [("torch:cpu", "float32")], 8, 4, 1))
    r = rows[("hf", "torch:cpu", "float32")]
    assert r["status"] == "skipped" and r["reason"].startswith("not installed:")
    assert "gemma-workbench[reference]" in r["reason"]


def test_llamacpp_gpu_row_refuses_a_cpu_only_build():
    """A GPU target with a llama-cpp-python that cannot offload: a 'no GPU build' row, not a CPU run labelled gpu."""
    llama_cpp = pytest.importorskip("llama_cpp")
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python can offload to a GPU")
    from workbench.references.peers import PeerSkip, plan
    _, run = plan("model.gguf", [("torch:cpu", "float32")])
    with pytest.raises(PeerSkip, match="^no GPU build:"):
        run(("llama.cpp", "gpu", "gguf"), 8, 4, 1)


def test_bench_stores_and_prints_the_skipped_peers(monkeypatch, tmp_path):
    import workbench as wb
    from workbench import runs
    from workbench.references import hf as hf_mod

    def boom(self, *a, **k):
        raise RuntimeError("planted failure")
    monkeypatch.setattr(hf_mod.HFReference, "bench_decode", boom)
    db = str(tmp_path / "runs.sqlite")
    res = wb.bench(str(FX), backends=["torch:cpu"], dtypes=["float32"], prompt_len=8, gen_len=4, repeats=1,
                   peers=True, db=db, progress=False)
    table = res.table()
    assert "hf               torch:cpu    float32   skipped: failed: RuntimeError: planted failure" in table
    assert "hf-static-graphs torch:cpu    float32   skipped: needs CUDA:" in table
    assert "llama.cpp        llamacpp:cpu gguf      skipped: not applicable:" in table
    stored = runs.RunStore(db).load(res.run_id).rows
    peers = stored[stored["impl"] != "workbench"]
    assert set(peers["impl"]) == {"hf", "hf-static-graphs", "hf+static", "llama.cpp"}
    assert (peers["status"] == "skipped").all() and peers["reason"].str.len().min() > 10


def test_workbench_peers_selects_and_says_what_it_left_out(monkeypatch):
    from workbench.references.peers import plan
    monkeypatch.setenv("WORKBENCH_PEERS", "hf")
    entries, _ = plan(str(FX), [("torch:cpu", "float32")])
    got = {e[0]: e for e in entries}
    assert got["hf"][3] is not None and got["hf"][4] is None
    for impl in ("hf-static-graphs", "hf+static", "llama.cpp"):
        assert got[impl][3] is None and got[impl][4] == "not selected: WORKBENCH_PEERS=hf"


@pytest.mark.slow
def test_generate_route_one_graph_with_the_full_length_cache_recompiles_without():
    """transformers' own generate + CompileConfig (dynamo only, backend='eager'): with the full-length cache one graph
    serves every token and run; with its own sliding layers every token is a new graph until the recompile limit."""
    import torch

    from workbench.references.hf_static import bench_generate_static
    ref = _ref()
    r = bench_generate_static(ref, 6, 12, 1, full_length=True, backend="eager", mode=None)
    assert r["graphs_warmup"] == 1 and r["graphs_timed"] == 0 and r["graph_breaks"] == {}, r["note"]
    torch._dynamo.reset()
    try:
        r = bench_generate_static(ref, 6, 12, 1, full_length=False, backend="eager", mode=None, fullgraph=False)
        assert r["graphs_warmup"] >= 4, r["note"]          # one per token (up to the limit), not one
    finally:
        torch._dynamo.reset()
