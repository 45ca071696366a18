"""Bad input gets an error that names the problem: checkpoints, tensors, ids, backends, dtypes."""
import json
import shutil

import numpy as np
import pytest

from conftest import fixture_dir

import workbench as wb
from workbench.backends import BackendError
from workbench.model.gemma import InputError, WeightError
from workbench.weights.safetensors import CheckpointError, read_safetensors


@pytest.fixture
def g3(tmp_path):
    d = tmp_path / "g3"
    shutil.copytree(fixture_dir("gemma3_text"), d)
    return d


def _rewrite(d, fn):
    """Rewrite model.safetensors after fn(tensors) edits the dict (raw HF names)."""
    import struct
    t = read_safetensors(d / "model.safetensors")
    t = {k: np.array(v, dtype=np.float32) for k, v in t.items()}
    fn(t)
    header, off, blobs = {}, 0, []
    for k, v in t.items():
        b = v.tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_truncated_safetensors(g3):
    p = g3 / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        wb.load(g3)


def test_missing_tensor(g3):
    _rewrite(g3, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(WeightError, match=r"missing.*layers\.2\.mlp\.up_proj\.weight"):
        wb.load(g3)


def test_unexpected_tensor(g3):
    _rewrite(g3, lambda t: t.__setitem__("model.layers.2.mlp.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(WeightError, match=r"unexpected.*layers\.2\.mlp\.extra\.weight"):
        wb.load(g3)


def test_wrong_shape(g3):
    def f(t):
        k = "model.layers.1.self_attn.q_proj.weight"
        t[k] = t[k][:-1]
    _rewrite(g3, f)
    with pytest.raises(WeightError, match=r"layers\.1\.self_attn\.q_proj\.weight.*shape"):
        wb.load(g3)


def test_config_weights_disagree(g3):
    c = json.loads((g3 / "config.json").read_text())
    c["num_hidden_layers"] = c["num_hidden_layers"] - 1
    c.pop("layer_types", None)
    (g3 / "config.json").write_text(json.dumps(c))
    with pytest.raises(WeightError, match="unexpected"):
        wb.load(g3)


def test_unknown_model_type(g3):
    c = json.loads((g3 / "config.json").read_text())
    c["model_type"] = "mistral"
    (g3 / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="unknown model_type 'mistral'"):
        wb.load(g3)


def test_token_ids_out_of_range():
    m = wb.load(fixture_dir("gemma1"))
    V = m.config.vocab_size
    with pytest.raises(InputError, match=f"token id {V} .* outside the vocabulary"):
        m.forward([1, 2, V])
    with pytest.raises(InputError, match="token id -1"):
        m.forward([1, -1])
    with pytest.raises(InputError, match="empty prompt"):
        m.forward([])
    with pytest.raises(InputError, match="integers"):
        m.forward(np.array([1.5, 2.0]))


def test_prompt_past_context():
    m = wb.load(fixture_dir("gemma1"))
    cache = m.new_cache(max_len=16)
    with pytest.raises(ValueError, match="needs 20 positions"):
        m.forward(np.arange(1, 21), cache=cache)


@pytest.mark.parametrize("backend,needle", [("jax:cpu", "unknown backend"), ("torch:tpu", "torch devices"),
                                            ("mlx:gpu:1", "only torch:cuda takes")])
def test_unknown_backend(backend, needle):
    with pytest.raises(BackendError, match=needle):
        wb.load(fixture_dir("gemma1"), backend=backend)


def test_unavailable_backend_says_why():
    av = wb.backends.available()
    missing = [b for b in av.reasons if b not in av and not b.startswith("torch:cuda:")]
    if not missing:
        pytest.skip("every backend is available on this machine")
    with pytest.raises(BackendError, match="not available here"):
        wb.load(fixture_dir("gemma1"), backend=missing[0])


def test_bad_dtype():
    with pytest.raises(BackendError, match="unknown dtype 'int8'"):
        wb.load(fixture_dir("gemma1"), dtype="int8")
    if "mlx:cpu" in wb.backends.available():
        with pytest.raises(BackendError, match="float64 runs on torch:cpu only"):
            wb.load(fixture_dir("gemma1"), backend="mlx:cpu", dtype="float64")


def test_unknown_tap():
    m = wb.load(fixture_dir("gemma1"))
    with pytest.raises(KeyError, match="matches no point"):
        m.forward([1, 2, 3], taps=["blocks.*.hook_resid_psot"])
