"""make-random: released configs as data, seeded streamed checkpoints that wb.load and transformers both read."""
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES, have
from workbench import make_random as mr
from workbench.config import GemmaConfig

# transformers' config class per model_type, to check that our data parses there too
_HF_TYPES = {"gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig",
             "gemma4_text": "Gemma4TextConfig"}


@pytest.mark.parametrize("name", mr.names())
def test_released_configs_parse_here_and_in_transformers(name):
    d = mr.config_for(name)
    cfg = GemmaConfig.from_dict(d, where=name)
    assert cfg.num_hidden_layers == d["num_hidden_layers"]
    if name in mr.PUBLISHED_PARAMS:   # the published count (model card) within 1%
        assert abs(mr.count_params(name) / mr.PUBLISHED_PARAMS[name] - 1) < 0.01
    if not have("transformers"):
        pytest.skip("transformers not installed")
    import transformers
    hc = getattr(transformers, _HF_TYPES[d["model_type"]])(**d)
    if "layer_types" in hc.to_dict():      # per-layer types agree with transformers' reading
        assert list(hc.layer_types) == [cfg.layer_type(i) for i in range(cfg.num_hidden_layers)]
    assert hc.num_attention_heads == cfg.num_attention_heads
    if d["model_type"] == "gemma4_text":     # per-layer shapes (transformers resolves them per layer)
        for i in range(cfg.num_hidden_layers):
            assert hc.per_layer_config[i].head_dim == cfg.head_dim(i)
            assert hc.per_layer_config[i].num_key_value_heads == cfg.num_kv_heads(i)


def _header(p):
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def test_streamed_shards_index_and_determinism(tmp_path):
    out = mr.make_random("gemma3-270m", tmp_path / "a", seed=3, dtype="float32", shard_bytes=20_000_000,
                         progress=False, overrides=dict(num_hidden_layers=2, vocab_size=4096))
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(idx["weight_map"].values()))
    assert len(files) > 1 and all((out / f).exists() for f in files)
    assert not (tmp_path / "a.partial").exists()
    for f in files:                     # each shard <= limit unless it holds one larger tensor
        h = {k: v for k, v in _header(out / f).items() if k != "__metadata__"}
        size = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in h.values())
        assert size <= 20_000_000 or len(h) == 1
    # a tensor's values depend on (seed, name) only: equal to a direct draw, and a different seed differs
    from workbench.weights.safetensors import load_hf_checkpoint
    t = load_hf_checkpoint(out, "gemma3_text")
    cfg = GemmaConfig.from_file(out)
    want = mr.tensor_values("layers.1.mlp.down_proj.weight", (640, 2048), cfg, 3)
    np.testing.assert_array_equal(t["layers.1.mlp.down_proj.weight"], want)
    assert not np.array_equal(mr.tensor_values("layers.1.mlp.down_proj.weight", (640, 2048), cfg, 4), want)
    # sensible scales: linear std ~ fan_in^-0.5, norm weights small but non-zero around 0 (1 + w models)
    assert abs(want.std() * np.sqrt(2048) - 1) < 0.02
    nw = t["layers.0.input_layernorm.weight"]
    assert 0.05 < np.abs(nw).mean() < 0.3 and abs(nw.mean()) < 0.05


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(mr.MakeRandomError, match="neither a known config name"):
        mr.make_random("gemma9-1t", tmp_path / "x", progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(mr.MakeRandomError, match="exists and is not an empty directory"):
        mr.make_random("gemma3-270m", busy, progress=False)
    assert (busy / "keep.txt").read_text() == "x"
    with pytest.raises(mr.MakeRandomError, match="dtype"):
        mr.make_random("gemma3-270m", tmp_path / "y", dtype="int4", progress=False)


def test_interrupted_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = mr._to_bytes

    def boom(a, dtype):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(a, dtype)
    monkeypatch.setattr(mr, "_to_bytes", boom)
    with pytest.raises(KeyboardInterrupt):
        mr.make_random(FIXTURES / "gemma2" / "config.json", tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()


@pytest.mark.skipif(not have("transformers"), reason="transformers not installed")
@pytest.mark.parametrize("fixture", ["gemma1", "gemma2", "gemma3_text", "gemma3_nested", "gemma4_e2b", "gemma4_moe",
                                     "gemma4_kv"])
def test_hf_and_workbench_read_it_and_agree(tmp_path, fixture):
    """A tiny config through make-random: transformers loads the checkpoint without missing/unexpected weights,
    and our float64 forward equals HF's (float64, which casts norms/RoPE to float32) to float32 rounding."""
    import torch
    import transformers
    import workbench as wb
    out = mr.make_random(FIXTURES / fixture / "config.json", tmp_path / fixture, seed=1, dtype="float32",
                         progress=False)
    d = json.loads((out / "config.json").read_text())
    cls = getattr(transformers, d["architectures"][0])
    moe = d.get("enable_moe_block")       # HF's grouped expert matmul has no float64 kernel: float32 there
    hf, info = cls.from_pretrained(out, dtype=torch.float32 if moe else torch.float64, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    ids = np.random.default_rng(0).integers(0, GemmaConfig.from_file(out).vocab_size, 12)
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids[None])).logits.numpy()
    m = wb.load(out, dtype="float64")
    got = m.forward(ids).logits
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert np.isfinite(got).all() and err < (1e-4 if moe else 1e-5), err
    assert np.abs(ref).max() > 0.1        # not a degenerate all-zero output


def test_cli_make_random(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "make-random", str(FIXTURES / "gemma3_text" / "config.json"),
                        str(out), "--seed", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "make-random" in r.stderr and (out / "model.safetensors").exists()
    h = _header(out / "model.safetensors")
    assert {v["dtype"] for k, v in h.items() if k != "__metadata__"} == {"BF16"}


@pytest.mark.skipif(not have("torch"), reason="torch not installed")
def test_bfloat16_bytes_are_torchs_rounding():
    import torch
    x = np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32) * 7
    x[:3] = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -0.0]          # ties to even, signed zero
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert bytes(mr._to_bytes(x.copy(), "bfloat16")) == want
