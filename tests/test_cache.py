"""KV cache: prefill followed by decode steps gives the logits of one full forward pass, at positions well
past the sliding window, for every variant; the cache keeps sliding layers to their window."""
import numpy as np
import pytest

from conftest import GEMMA4_FIXTURES, TEXT_FIXTURES, cpu_backends, fixture_dir, rel_max

import workbench as wb

ALL = TEXT_FIXTURES + [n for n in GEMMA4_FIXTURES if n != "gemma4_bidir"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("backend,dtype,tol", [("torch:cpu", "float64", 1e-10)] +
                         [(b, "float32", 5e-5) for b in cpu_backends()])
def test_prefill_then_decode_equals_full_forward(name, backend, dtype, tol):
    m = wb.load(fixture_dir(name), backend=backend, dtype=dtype)
    V = m.config.vocab_size
    ids = np.random.default_rng(1).integers(3, V, size=(1, 40))   # 5x the sliding window
    full = m.forward(ids).logits
    cache = m.new_cache(max_len=48)
    parts = [m.forward(ids[:, :6], cache=cache).logits]          # prefill
    for a in range(6, 19, 13):                                    # a chunk longer than the window
        parts.append(m.forward(ids[:, a:a + 13], cache=cache).logits)
    for t in range(19, 40):                                       # decode steps
        parts.append(m.forward(ids[:, t:t + 1], cache=cache).logits)
    inc = np.concatenate(parts, axis=1)
    assert rel_max(full, inc) < tol
    for i, lc in enumerate(cache.layers):
        w = m.config.sliding_window(i)
        if lc is not None and w is not None:
            assert lc.slots == w, "sliding layers keep only their window"
        if m.config.kv_shared(i):
            assert lc is None, "KV-shared layers store nothing"
        if m.config.k_eq_v(i):
            assert lc.k is None, "k_eq_v layers store one tensor"


def test_batch_of_two_matches_single_rows():
    m = wb.load(fixture_dir("gemma2"), dtype="float64")
    ids = np.random.default_rng(2).integers(3, m.config.vocab_size, size=(2, 17))
    both = m.forward(ids).logits
    for b in range(2):
        assert rel_max(m.forward(ids[b]).logits[0], both[b]) < 1e-12


def test_greedy_generation_is_deterministic_and_matches_argmax():
    m = wb.load(fixture_dir("gemma3_text"))
    g1 = m.generate([2, 10, 11, 12], max_new_tokens=12)
    g2 = m.generate([2, 10, 11, 12], max_new_tokens=12)
    assert g1.token_ids == g2.token_ids and len(g1.token_ids) == 12
    ids = [2, 10, 11, 12]
    for _ in range(12):
        ids.append(int(m.forward(ids).logits[0, -1].argmax()))
    assert ids[4:] == g1.token_ids
    s1 = m.generate([2, 10], max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=5).token_ids
    s2 = m.generate([2, 10], max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=5).token_ids
    assert s1 == s2
