"""interp.unembed (the logit lens's last step) is the model's own final norm + head (+ final softcap): on the last
block's residual stream it reproduces the forward's logits, and it agrees with a float64 numpy computation from the
checkpoint's own tensors (independent of the model code)."""
import numpy as np
import pytest

from conftest import cpu_backends, fixture_dir
from workbench import interp
from workbench.loader import load

IDS = [2, 17, 200, 31, 5, 99, 64, 3]


def _numpy_unembed(d, cfg, resid):
    """RMSNorm with Gemma's (1 + w) scale, the tied head, the final softcap; float64, from the safetensors file."""
    from safetensors.numpy import load_file
    t = load_file(str(d / "model.safetensors"))
    x = np.asarray(resid, np.float64)
    w = t["model.norm.weight"].astype(np.float64)
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"]).astype(np.float64)
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.rms_norm_eps) * (1.0 + w)
    y = h @ head.T
    cap = cfg.final_logit_softcapping
    return np.tanh(y / cap) * cap if cap else y


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("fixture", ["gemma3_text", "gemma2"])      # gemma2: final logit softcap
def test_unembed_is_the_models_final_norm_and_head(backend, fixture):
    d = fixture_dir(fixture)
    m = load(d, backend=backend, dtype="float32", progress=False)
    last = f"blocks.{m.config.num_hidden_layers - 1}.hook_resid_post"
    out = m.forward(IDS, taps=[last])
    lg = interp.unembed(m, out.taps[last])
    assert lg.dtype == np.float32 and lg.shape == out.logits.shape and np.isfinite(lg).all()
    scale = float(np.abs(out.logits).max())
    assert float(np.abs(lg - out.logits).max()) <= 1e-5 * scale      # the lens's last layer is the model's output
    ref = _numpy_unembed(d, m.config, out.taps[last])
    assert float(np.abs(lg - ref).max()) <= 1e-5 * float(np.abs(ref).max())
