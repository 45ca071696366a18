"""The fast decode path (static cache, device-side positions, compiled/captured step on torch, queued steps
on MLX) computes the same thing as the plain path: same greedy tokens, same logits."""
import numpy as np
import pytest

from conftest import cpu_backends, fixture_dir, rel_max

import workbench as wb
from workbench.generate import FastDecoder, greedy_fast

NAMES = ["gemma2", "gemma3_text", "gemma4_kv", "gemma4_e2b", "gemma4_moe"]


def _plain(m, prompt, n, monkeypatch):
    """The plain route (one model.forward per token), whatever the default route is."""
    monkeypatch.setenv("WORKBENCH_DECODE", "plain")
    try:
        g = m.generate(prompt, max_new_tokens=n, ignore_eos=True)
    finally:
        monkeypatch.delenv("WORKBENCH_DECODE")
    assert g.stats["route"] == "plain"
    return g.token_ids


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", cpu_backends())
def test_fast_greedy_equals_plain(name, backend, monkeypatch):
    m = wb.load(fixture_dir(name), backend=backend)
    prompt = list(np.random.default_rng(3).integers(3, m.config.vocab_size, size=11))
    plain = _plain(m, prompt, 30, monkeypatch)   # 41 positions: 5x the window
    fast, _ = greedy_fast(m, prompt, 30)
    assert fast == plain


@pytest.mark.parametrize("name", NAMES)
def test_static_step_logits_equal_full_forward(name):
    m = wb.load(fixture_dir(name), dtype="float64")
    ids = np.random.default_rng(4).integers(3, m.config.vocab_size, size=(1, 30))
    full = m.forward(ids).logits[0]
    cache = m.new_cache(max_len=40)
    m.forward(ids[:, :10], cache=cache)
    cache.begin_static()
    import torch
    for t in range(10, 30):
        lg = m.decode_step(torch.tensor(ids[:, t:t + 1]), torch.tensor([t]), cache)
        assert rel_max(full[t], m.ops.numpy(lg)[0]) < 1e-10, t


@pytest.mark.slow
def test_compiled_cpu_step_equals_plain(monkeypatch):
    """torch.compile of the static step (inductor on the CPU; on CUDA it is also captured as a CUDA graph)."""
    m = wb.load(fixture_dir("gemma3_text"))
    prompt = [2, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    plain = _plain(m, prompt, 12, monkeypatch)
    fast, _ = greedy_fast(m, prompt, 12, compile=True)
    assert fast == plain


def test_decoder_reuse_after_reset():
    m = wb.load(fixture_dir("gemma4_e2b"))
    cache = m.new_cache(max_len=40)
    dec = FastDecoder(m, cache)
    outs = []
    for _ in range(2):
        cache.reset()
        lg = m.forward(np.arange(3, 15)[None], cache=cache, last_only=True).logits
        first = int(lg[0, -1].argmax())
        dec.prepare(first)
        outs.append(dec.run(first, 20))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("name", NAMES)
def test_mlx_compiled_static_step(name, monkeypatch):
    """mx.compile of the static step with the cache threaded through (FastDecoder's MLX compiled path):
    teacher-forced logits equal the full forward's past the sliding window, and greedy equals the plain path."""
    if "mlx:cpu" not in cpu_backends():
        pytest.skip("mlx is not installed")
    import mlx.core as mx
    m = wb.load(fixture_dir(name), backend="mlx:cpu")
    ids = np.random.default_rng(4).integers(3, m.config.vocab_size, size=(1, 30))
    full = m.forward(ids).logits[0]
    cache = m.new_cache(max_len=40)
    m.forward(ids[:, :10], cache=cache)
    cache.begin_static()

    def step(state, tok, pos):
        cache.set_static_state(state)
        return m.decode_step(tok, pos, cache), cache.static_state()
    f = mx.compile(step)
    m.ops._cpu_gemv = False          # numpy products can't run inside a trace (FastDecoder does the same)
    state = cache.static_state()
    for t in range(10, 30):
        lg, state = f(state, mx.array(ids[:, t:t + 1].astype(np.int32)), mx.array([t], dtype=mx.int32))
        assert rel_max(full[t], np.array(lg)[0]) < 1e-4, t
    m.ops._cpu_gemv = True
    prompt = list(ids[0, :11])
    plain = _plain(m, prompt, 30, monkeypatch)
    fast, st = greedy_fast(m, prompt, 30, compile=True)
    assert st["route"] == "compiled"
    assert fast == plain
