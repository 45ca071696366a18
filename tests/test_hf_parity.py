"""Gemma 1-4 against Hugging Face transformers: every layer's hook_resid_post and the logits within 1e-5
relative (max|Δ| / max|ref|), on torch:cpu float32/float64 and mlx:cpu float32 — against the committed
HF dumps (no transformers needed), and directly against transformers when it is installed."""
import numpy as np
import pytest

from conftest import GEMMA4_FIXTURES, TEXT_FIXTURES, cpu_backends, fixture_dir, have, reference, rel_max

import workbench as wb

TARGETS = [(b, d) for b in cpu_backends() for d in (["float32", "float64"] if b == "torch:cpu" else ["float32"])]
TOL = 1e-5


@pytest.mark.parametrize("name", TEXT_FIXTURES + GEMMA4_FIXTURES)
@pytest.mark.parametrize("backend,dtype", TARGETS)
def test_matches_hf_dump(name, backend, dtype):
    ref = reference(name)
    m = wb.load(fixture_dir(name), backend=backend, dtype=dtype)
    ids = ref["input_ids"]
    assert ids.shape[1] > 8, "the prompt must be longer than the sliding window"
    out = m.forward(ids, taps=["hook_embed", "blocks.*.hook_resid_post"])
    assert rel_max(ref["embed"], out.taps["hook_embed"]) < TOL
    for i in range(m.config.num_hidden_layers):
        err = rel_max(ref["resid_post"][i], out.taps[f"blocks.{i}.hook_resid_post"])
        assert err < TOL, f"{name} {backend} {dtype}: layer {i} hook_resid_post rel err {err:.2e}"
    err = rel_max(ref["logits"], out.logits)
    assert err < TOL, f"{name} {backend} {dtype}: logits rel err {err:.2e}"


@pytest.mark.reference
@pytest.mark.skipif(not have("transformers"), reason="transformers not installed (pip install gemma-workbench[reference])")
@pytest.mark.parametrize("name", TEXT_FIXTURES + GEMMA4_FIXTURES)
def test_matches_live_transformers(name):
    from workbench.references.hf import HFReference
    d = fixture_dir(name)
    ref = HFReference(str(d), dtype="float32")
    rng = np.random.default_rng(7)
    cfg = wb.load(d).config
    ids = rng.integers(3, cfg.vocab_size, size=(2, 21))  # batch of 2, a new prompt
    hf_logits = ref.logits(ids)
    hf_resid = ref.resid_post(ids)
    for backend, dtype in TARGETS:
        m = wb.load(d, backend=backend, dtype=dtype)
        out = m.forward(ids, taps=["blocks.*.hook_resid_post"])
        for i in range(cfg.num_hidden_layers):
            assert rel_max(hf_resid[i], out.taps[f"blocks.{i}.hook_resid_post"]) < TOL, (backend, dtype, i)
        assert rel_max(hf_logits, out.logits) < TOL, (backend, dtype)
