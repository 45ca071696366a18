"""Taps and hooks: names, layouts, and identical interventions on torch and MLX."""
import numpy as np
import pytest

from conftest import cpu_backends, fixture_dir, rel_max

import workbench as wb

BACKENDS = cpu_backends()


def test_tap_layouts_and_names():
    m = wb.load(fixture_dir("gemma3_text"))
    c = m.config
    ids = np.arange(1, 13)[None]
    out = m.forward(ids, taps=["blocks.1.*", "hook_embed", "ln_final.hook_normalized"])
    B, T, D, H = 1, 12, c.hidden_size, c.num_attention_heads
    assert out.taps["hook_embed"].shape == (B, T, D)
    assert out.taps["blocks.1.attn.hook_q"].shape == (B, T, H, c.head_dim(1))
    assert out.taps["blocks.1.attn.hook_k"].shape == (B, T, c.num_kv_heads(1), c.head_dim(1))
    p = out.taps["blocks.1.attn.hook_pattern"]
    assert p.shape == (B, H, T, T)
    assert np.allclose(p.sum(-1), 1, atol=1e-5)
    assert np.all(np.triu(p[0, 0], 1) == 0), "causal: no weight on future keys"
    w = c.sliding_window(1)
    assert np.all(np.tril(p[0, 0], -w) == 0), "sliding window: nothing older than the window"
    assert "blocks.0.hook_resid_post" not in out.taps
    assert set(m.tap_names()) >= set(out.taps)


def test_tap_chain_is_consistent():
    """resid_post = resid_mid + mlp_out; resid_mid = resid_pre + attn_out (Gemma 3: no layer scalar)."""
    m = wb.load(fixture_dir("gemma3_text"), dtype="float64")
    out = m.forward(np.arange(1, 11), taps=["blocks.2.*"])
    t = out.taps
    assert np.allclose(t["blocks.2.hook_resid_mid"], t["blocks.2.hook_resid_pre"] + t["blocks.2.hook_attn_out"])
    assert np.allclose(t["blocks.2.hook_resid_post"], t["blocks.2.hook_resid_mid"] + t["blocks.2.hook_mlp_out"])


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs torch and mlx both installed")
@pytest.mark.parametrize("name", ["gemma2", "gemma3_text", "gemma4_e2b"])
def test_hook_adds_vector_identically_on_torch_and_mlx(name):
    ids = np.arange(3, 23)[None]
    rng = np.random.default_rng(0)
    results = {}
    for b in BACKENDS:
        m = wb.load(fixture_dir(name), backend=b)
        vec = rng.standard_normal(m.config.hidden_size).astype(np.float32) if not results else vec  # noqa: F821
        base = m.forward(ids, taps=["blocks.*.hook_resid_post"])
        hooked = m.forward(ids, taps=["blocks.*.hook_resid_post"],
                           hooks={"blocks.1.hook_resid_post": lambda x, name: x + vec})
        results[b] = (base, hooked)
    L = m.config.num_hidden_layers
    (tb, th), (mb, mh) = results[BACKENDS[0]], results[BACKENDS[1]]
    # the hook changes layer 1 onwards, not layer 0
    assert np.array_equal(tb.taps["blocks.0.hook_resid_post"], th.taps["blocks.0.hook_resid_post"])
    for i in range(1, L):
        k = f"blocks.{i}.hook_resid_post"
        dt = th.taps[k] - tb.taps[k]
        dm = mh.taps[k] - mb.taps[k]
        assert np.abs(dt).max() > 1e-3, f"hook had no effect at {k}"
        assert rel_max(dt, dm) < 1e-4, f"{name}: torch and mlx disagree on the hook's effect at {k}"
    assert rel_max(th.logits, mh.logits) < 1e-5


def test_hook_shape_mismatch_is_an_error():
    m = wb.load(fixture_dir("gemma1"))
    with pytest.raises(ValueError, match="returned shape"):
        m.forward([1, 2, 3], hooks={"blocks.0.hook_resid_post": lambda x, n: x[:, :1]})


def test_ablation_hook_zeroes_attention():
    m = wb.load(fixture_dir("gemma1"))
    out = m.forward([1, 2, 3, 4], taps=["blocks.0.hook_resid_mid", "blocks.0.hook_resid_pre"],
                    hooks={"blocks.0.hook_attn_out": lambda x, n: np.zeros_like(x)})
    assert np.allclose(out.taps["blocks.0.hook_resid_mid"], out.taps["blocks.0.hook_resid_pre"])
