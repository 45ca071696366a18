"""Prefill attention through ``CausalMask`` plans (workbench/backends/attn_plan.py): the causal kernel, the banded
pass for sliding windows much shorter than the prompt, keys outside every window dropped, chunked prefill over the
KV cache (ring reads in two runs) — against HF transformers on a prompt long enough for the band, and chunked
against one-shot; a band off by one key is caught."""
import numpy as np
import pytest

from conftest import cpu_backends, fixture_dir, have, rel_max

import workbench as wb
from workbench.backends import attn_plan
from workbench.backends.protocol import CausalMask

T = 40          # the fixtures' window is 8: T >= 3 W, so sliding layers run the banded pass on the CPU


def test_plan_kinds():
    P = attn_plan.plan
    assert P(CausalMask(), 16, 16) == attn_plan.AttnPlan("causal", 0, None)
    assert P(CausalMask(), 4, 16) == attn_plan.AttnPlan("causal", 0, None)       # lower-right, after a cache
    assert P(CausalMask(8), 8, 8).kind == "causal"                               # every key inside the window
    assert P(CausalMask(8), 9, 9) == attn_plan.AttnPlan("dense", 0, 8)
    # 4 queries after 60 cached keys: only the last 4 + 7 keys are in any window; 11 > 8 -> a dense mask
    assert P(CausalMask(8), 4, 64) == attn_plan.AttnPlan("dense", 53, 8)
    assert P(CausalMask(8), 1, 64) == attn_plan.AttnPlan("causal", 56, None)
    assert P(CausalMask(8), 24, 24) == attn_plan.AttnPlan("band", 0, 8)
    assert P(CausalMask(8), 24, 24, band_min=16).kind == "dense"
    with pytest.raises(ValueError, match="at least as many keys"):
        P(CausalMask(), 5, 4)


def test_band_arrays_cover_the_window_exactly():
    """Every (query, key) pair the band allows is one the dense mask allows and vice versa, each pair once."""
    for Tq, S, W in ((40, 40, 8), (41, 53, 8), (17, 17, 5)):
        nb, idx, ok = attn_plan.band(Tq, S, W)
        got = np.zeros((nb * W, S), np.int64)
        for b in range(nb):
            for i in range(W):
                np.add.at(got[b * W + i], idx[b][ok[b, i]], 1)
        q = np.arange(Tq)[:, None] + (S - Tq)
        k = np.arange(S)[None, :]
        want = ((k <= q) & (q - k < W)).astype(np.int64)
        assert np.array_equal(got[:Tq], want), (Tq, S, W)
        assert (got[Tq:].sum(1) >= 1).all()           # padded queries keep a key (no NaN rows)


def _ids(cfg, n, seed=3):
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, size=(1, n))


@pytest.mark.reference
@pytest.mark.skipif(not have("transformers"), reason="transformers not installed (pip install gemma-workbench[reference])")
@pytest.mark.parametrize("name", ["gemma3_text", "gemma2", "gemma4_kv"])
def test_long_prompt_matches_transformers(name):
    """A 40-token prompt (5 windows): torch:cpu float64 (banded sliding layers; Gemma 2's softcap takes the explicit
    path with the dense mask) within 1e-5 of HF float64 per layer and in the logits."""
    from workbench.references.hf import HFReference
    d = fixture_dir(name)
    m = wb.load(d, backend="torch:cpu", dtype="float64")
    ids = _ids(m.config, T)
    ref = HFReference(str(d), dtype="float64")
    logits, resid = ref.logits(ids), ref.resid_post(ids)
    out = m.forward(ids, taps=["blocks.*.hook_resid_post"])
    for i in range(m.config.num_hidden_layers):
        assert rel_max(resid[i], out.taps[f"blocks.{i}.hook_resid_post"]) < 1e-5, (name, i)
    assert rel_max(logits, out.logits) < 1e-5


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", ["gemma3_text", "gemma4_kv"])
def test_chunked_prefill_equals_one_pass(backend, name, monkeypatch):
    """generate's loop (chunks into the KV cache) against one pass without a cache: chunks shorter than the window,
    equal to it, longer (the band over cache history) — the last logits agree to float32 rounding (1e-5: the chunks
    run other kernels — one-row products, one-query attention; a wrong mask moves them by > 1e-3). And the dense plan
    (WORKBENCH_ATTN=dense) gives the same as the planned one."""
    m = wb.load(fixture_dir(name), backend=backend, dtype="float32")
    dec = m.decoder
    ids = _ids(m.config, T)
    one = dec.forward(ids).logits[0, -1]
    for chunk in (3, 8, 13, 27):
        cache = dec.new_cache(batch=1, max_len=T + 4)
        for a in range(0, T, chunk):
            got = dec.forward(ids[:, a:a + chunk], cache=cache, last_only=True).logits[0, -1]
        assert rel_max(one, got) < 1e-5, (name, backend, chunk, rel_max(one, got))
    monkeypatch.setenv("WORKBENCH_ATTN", "dense")
    assert rel_max(one, dec.forward(ids).logits[0, -1]) < 1e-5


def test_band_off_by_one_is_caught(monkeypatch):
    """A band that lets each query see one key too many (window W + 1) moves the logits far past the tolerance."""
    m = wb.load(fixture_dir("gemma3_text"), backend="torch:cpu", dtype="float32")
    ids = _ids(m.config, T)
    good = m.decoder.forward(ids).logits[0, -1]
    real = attn_plan.band

    def wide(Tq, S, W):
        nb, idx, ok = real(Tq, S, W)
        return nb, idx, ok | np.roll(ok, -1, axis=-1)
    monkeypatch.setattr(attn_plan, "band", wide)
    m2 = wb.load(fixture_dir("gemma3_text"), backend="torch:cpu", dtype="float32")
    bad = m2.decoder.forward(ids).logits[0, -1]
    assert rel_max(good, bad) > 1e-3
