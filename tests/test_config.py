"""GemmaConfig: parsing of every config flavour and the per-layer accessors, checked against what
transformers itself derives from the same config (when it is installed) and against known values."""
import json

import numpy as np
import pytest

from conftest import FIXTURES, fixture_dir, have

from workbench.config import FULL, SLIDING, ConfigError, GemmaConfig


def cfg(name):
    return GemmaConfig.from_file(fixture_dir(name))


def test_gemma1_basics():
    c = cfg("gemma1")
    assert c.arch == "gemma" and c.norm_offset == 1.0 and not c.has_post_norms
    assert all(c.sliding_window(i) is None for i in range(c.num_hidden_layers))
    assert c.attn_scale(0) == pytest.approx(c.head_dim(0) ** -0.5)
    assert c.embed_scale == pytest.approx(np.sqrt(c.hidden_size))


def test_gemma2_alternation_and_softcaps():
    c = cfg("gemma2")
    assert [c.layer_type(i) for i in range(4)] == [SLIDING, FULL, SLIDING, FULL]
    assert c.attn_logit_softcapping and c.final_logit_softcapping
    assert c.attn_scale(0) == pytest.approx(24 ** -0.5)   # query_pre_attn_scalar, not head_dim
    assert c.sliding_window(0) == 8 and c.sliding_window(1) is None


@pytest.mark.parametrize("name", ["gemma3_text", "gemma3_nested"])
def test_gemma3_pattern_and_rope(name):
    c = cfg(name)
    types = [c.layer_type(i) for i in range(c.num_hidden_layers)]
    assert types[5] == FULL and all(t == SLIDING for t in types[:5])
    g, l = c.rope(5), c.rope(0)
    assert g.theta == 1e6 and g.rope_type == "linear" and g.factor == 8.0
    assert l.theta == 1e4 and l.factor == 1.0
    assert np.allclose(g.inv_freq() * 8, 1e6 ** (-np.arange(0, 16, 2) / 16))
    assert c.has_qk_norm and c.norm_offset == 1.0


def test_gemma3_legacy_keys():
    d = {"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
         "num_hidden_layers": 12, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
         "sliding_window": 4, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
         "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "query_pre_attn_scalar": 4}
    c = GemmaConfig.from_dict(d)
    assert c.rope(5).factor == 8 and c.rope(5).theta == 1e6 and c.rope(0).theta == 1e4
    assert [c.layer_type(i) for i in (5, 11)] == [FULL, FULL]


def test_gemma4_diverging_kv_both_formats():
    saved = cfg("gemma4_kv")
    flat = GemmaConfig.from_file(FIXTURES / "gemma4_kv" / "config.flat.json")
    for c in (saved, flat):
        for i in range(c.num_hidden_layers):
            if c.layer_type(i) == FULL:
                assert (c.head_dim(i), c.num_kv_heads(i), c.k_eq_v(i)) == (16, 1, True)
            else:
                assert (c.head_dim(i), c.num_kv_heads(i), c.k_eq_v(i)) == (8, 4, False)
        assert c.attn_scale(0) == 1.0 and c.norm_offset == 0.0
    r = saved.rope(2)
    inv = r.inv_freq()
    # proportional RoPE: denominator is the full head dim, int(0.25*16//2)=2 rotating pairs, rest zero
    assert np.allclose(inv[:2], 1e6 ** (-np.arange(0, 4, 2) / 16)) and np.all(inv[2:] == 0)


@pytest.mark.skipif(not have("transformers"), reason="transformers not installed")
def test_gemma4_proportional_rope_equals_transformers():
    from transformers import Gemma4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    d = json.loads((FIXTURES / "gemma4_kv" / "config.json").read_text())
    hc = Gemma4TextConfig(**{k: v for k, v in d.items() if k not in ("model_type", "transformers_version", "architectures")})
    inv_hf, _ = ROPE_INIT_FUNCTIONS["proportional"](hc, None, layer_type=FULL)
    ours = cfg("gemma4_kv").rope(2).inv_freq()
    assert np.allclose(inv_hf.numpy(), ours, rtol=1e-6)


def test_gemma4_e2b_sharing():
    c = cfg("gemma4_e2b")
    L = c.num_hidden_layers
    first = L - c.num_kv_shared_layers
    for i in range(L):
        if i >= first:
            j = c.kv_source(i)
            assert j < first and c.layer_type(j) == c.layer_type(i)
            assert all(c.layer_type(k) != c.layer_type(i) for k in range(j + 1, first))
            assert c.intermediate(i) == 2 * c.intermediate_size
        else:
            assert c.kv_source(i) == i and c.intermediate(i) == c.intermediate_size
    assert c.has_ple


def test_bidirectional_window():
    c = cfg("gemma4_bidir")
    raw = c.raw.get("sliding_window") or c.raw["text_config"]["sliding_window"]
    i = next(i for i in range(c.num_hidden_layers) if c.layer_type(i) == SLIDING)
    assert c.sliding_window(i) == raw // 2 + 1 and not c.causal


BASE = {"model_type": "gemma4_text", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        "layer_types": [SLIDING, FULL], "sliding_window": 4}


@pytest.mark.parametrize("change,needle", [
    ({"model_type": "llama"}, "unknown model_type 'llama'"),
    ({"hidden_size": None}, "missing required field 'hidden_size'"),
    ({"layer_types": [SLIDING, SLIDING]}, "last layer must be 'full_attention'"),
    ({"layer_types": [SLIDING, FULL, FULL]}, "layer_types has 3 entries"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"attn_logit_softcapping": 50.0}, "Gemma 4 has no 'attn_logit_softcapping'"),
    ({"num_kv_shared_layers": 1}, "no earlier layer to share"),
    ({"enable_moe_block": True}, "'num_experts' is missing"),
    ({"per_layer_config": {"7": {"head_dim": 8}}}, "names layer 7"),
    ({"global_head_dim": 8, "per_layer_config": {"1": {"head_dim": 16}}}, "contradicts"),
    ({"rope_parameters": {SLIDING: {"rope_type": "yarn", "rope_theta": 1.0}, FULL: {"rope_type": "default", "rope_theta": 1.0}}}, "rope_type 'yarn'"),
])
def test_bad_configs_name_the_problem(change, needle):
    d = dict(BASE)
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        GemmaConfig.from_dict(d)


def test_nested_without_text_config():
    with pytest.raises(ConfigError, match="text_config"):
        GemmaConfig.from_dict({"model_type": "gemma3"})
