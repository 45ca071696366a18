"""GGUF weights kept quantised on the CPU (workbench/backends/quant.py, the C kernel's wb_q_gemv / wb_q_dequant):
each block type against gguf-py's own dequantisation (the independent reference) in float64, on random blocks
with edge scales; the 8-bit-activation products against an independent numpy emulation of the activation
quantisation; the torch ops (several-row products, lookups, fused mixed-type projections); the loader option on
a tiny GGUF and the errors; the real 270M (greedy tokens and per-layer decode parity against float64)."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402

from workbench.backends import cpu_gemv, quant  # noqa: E402
from workbench.backends.quant import TYPES, QuantError, QuantWeight  # noqa: E402

if cpu_gemv.kernel() is None:
    pytest.skip(f"no C kernel here: {cpu_gemv._state.get('why')}", allow_module_level=True)

EDGE_F16 = np.array([0.0, 2.0 ** -24, 6.1e-5, -0.37, 1e-3, 3.5, -1200.0, 65504.0], np.float16)


def _f16_scales(rng, shape):
    """fp16 scales: mostly ordinary magnitudes, some edge values (0, subnormal, tiny, huge, negative)."""
    v = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, -1, shape)).astype(np.float16)
    edge = rng.random(shape) < 0.25
    v[edge] = rng.choice(EDGE_F16, size=int(edge.sum()))
    return v.view(np.uint8).reshape(*shape, 2)


def random_blocks(t: str, N: int, K: int, seed: int = 0) -> np.ndarray:
    """[N, row_bytes] random blocks of type t: random quant bytes, finite fp16 scales incl. edge values."""
    rng = np.random.default_rng(seed)
    _, bs, qk = TYPES[t]
    raw = rng.integers(0, 256, size=(N, (K // qk) * bs), dtype=np.uint8)
    b = raw.reshape(N, K // qk, bs)
    if t in ("Q8_0", "Q5_0", "Q4_0"):
        b[..., 0:2] = _f16_scales(rng, b.shape[:2])
    elif t == "Q4_K":
        b[..., 0:2] = _f16_scales(rng, b.shape[:2])
        b[..., 2:4] = _f16_scales(rng, b.shape[:2])
    elif t == "Q6_K":
        b[..., 208:210] = _f16_scales(rng, b.shape[:2])
    return raw


def act8_emulated(x: np.ndarray, qk: int) -> np.ndarray:
    """x as the kernel's 8-bit activations see it (float64): per 32, d = amax/127, q = rint(x/d); per 256
    (Q8_K, ggml's quantize_row_q8_K), the signed extreme m, s = -127/m, q = min(127, rint(s x)), d = 1/s."""
    x = x.astype(np.float32).reshape(-1, qk)
    out = np.zeros(x.shape, np.float64)
    for i, v in enumerate(x):
        if qk == 32:
            d = np.float32(np.abs(v).max() / np.float32(127))
            if d == 0:
                continue
            q = np.rint(v * (np.float32(1) / d))
        else:
            j = int(np.argmax(np.abs(v)))
            if v[j] == 0:
                continue
            s = np.float32(-127) / v[j]
            q = np.minimum(127, np.rint(s * v))
            d = np.float32(1) / s
        out[i] = q.astype(np.float64) * np.float64(d)
    return out.reshape(-1)


def _rel(ref, x):
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    assert np.isfinite(x).all(), "NaN/inf"
    return float(np.abs(x - ref).max() / np.abs(ref).max())


SHAPES = {"Q8_0": (96, 640), "Q5_0": (96, 640), "Q4_0": (64, 320), "Q4_K": (80, 1024), "Q6_K": (80, 1024)}


@pytest.mark.parametrize("t", list(TYPES))
def test_dequant_matches_gguf_py(t):
    N, K = SHAPES[t]
    raw = random_blocks(t, N, K, seed=1)
    want = ref_dequantize(raw, Q[t]).reshape(N, K)
    got = QuantWeight([(t, raw)], K, t).dequantize()
    # the same float32 products; K-quants' d*scale*q - dmin*m may round in another order in gguf-py
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-30 + 2e-7 * np.abs(want).max())
    assert np.isfinite(got).all()


@pytest.mark.parametrize("t", list(TYPES))
def test_gemv_exact_vs_float64(t):
    """float32 x: only float32 summation error against float64 on gguf-py's dequantised weights."""
    N, K = SHAPES[t]
    raw = random_blocks(t, N, K, seed=2)
    w64 = ref_dequantize(raw, Q[t]).reshape(N, K).astype(np.float64)
    x = np.random.default_rng(3).standard_normal(K).astype(np.float32)
    y = QuantWeight([(t, raw)], K, t).gemv(x, act8=False)
    assert _rel(w64 @ x.astype(np.float64), y) < 2e-6


@pytest.mark.parametrize("t", list(TYPES))
def test_gemv_act8_vs_emulation(t):
    """8-bit x: equal (to float32 rounding) to float64 products with x quantised by an independent numpy
    emulation; and visibly different from the exact product (the activations really are 8-bit)."""
    N, K = SHAPES[t]
    qk = TYPES[t][2]
    raw = random_blocks(t, N, K, seed=4)
    w64 = ref_dequantize(raw, Q[t]).reshape(N, K).astype(np.float64)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(K) * 10.0 ** rng.uniform(-3, 2, K // 32).repeat(32)).astype(np.float32)
    x[:32] = 0.0                                           # an all-zero block (scale 0)
    x[40] = 1e4                                            # an outlier that flattens its block
    w = QuantWeight([(t, raw)], K, t)
    y8 = w.gemv(x, act8=True)
    emul = w64 @ act8_emulated(x, qk)
    assert _rel(emul, y8) < 1e-5
    exact = w64 @ x.astype(np.float64)
    assert _rel(exact, y8) < 5e-2
    assert np.abs(exact - y8).max() > 30 * np.abs(emul - y8).max()    # really 8-bit, not float x


def test_gemv_zero_x_and_zero_weights():
    for t in TYPES:
        N, K = SHAPES[t]
        w = QuantWeight([(t, np.zeros((N, (K // TYPES[t][2]) * TYPES[t][1]), np.uint8))], K, t)
        for a in (True, False):
            y = w.gemv(np.ones(K, np.float32), act8=a)
            assert np.array_equal(y, np.zeros(N, np.float32)), t
        w = QuantWeight([(t, random_blocks(t, N, K))], K, t)
        assert np.array_equal(w.gemv(np.zeros(K, np.float32), act8=True), np.zeros(N, np.float32))


def test_mixed_segments_and_lookup():
    """A fused projection of Q5_0 + Q8_0 rows (as the Q4_K_M file's q/k/v): each segment its own type."""
    K = 640
    a, b = random_blocks("Q5_0", 48, K, 7), random_blocks("Q8_0", 16, K, 8)
    wa, wb_ = QuantWeight([("Q5_0", a)], K, "a"), QuantWeight([("Q8_0", b)], K, "b")
    w = QuantWeight.concat([wa, wb_])
    assert w.shape == (64, K) and w.types == ["Q5_0", "Q8_0"]
    d = np.concatenate([ref_dequantize(a, Q.Q5_0).reshape(48, K), ref_dequantize(b, Q.Q8_0).reshape(16, K)])
    x = np.random.default_rng(9).standard_normal(K).astype(np.float32)
    assert _rel(d.astype(np.float64) @ x, w.gemv(x, act8=False)) < 2e-6
    np.testing.assert_array_equal(w.rows([63, 0, 50]), d[[63, 0, 50]])
    same = QuantWeight.concat([wa, QuantWeight([("Q5_0", a)], K, "c")])
    assert same.types == ["Q5_0"]                         # adjacent segments of one type merge


def test_torch_ops_several_rows(monkeypatch):
    """Prefill: chunked dequantisation + torch GEMM equals F.linear on the dequantised matrix."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(quant, "_CHUNK_BYTES", 64 * 1024 * 4)      # several chunks
    K = 1024
    raw = random_blocks("Q4_K", 300, K, 10)
    w = QuantWeight([("Q4_K", raw)], K, "w")
    x = torch.randn(2, 5, K)
    dq = torch.from_numpy(ref_dequantize(raw, Q.Q4_K).reshape(300, K).astype(np.float32))
    got = quant.torch_linear(x, w, act8=True)
    want = torch.nn.functional.linear(x, dq)
    assert got.shape == (2, 5, 300)
    assert _rel(want.numpy(), got.numpy()) < 1e-5
    one = quant.torch_linear(x[:1, :1], w, act8=False)
    assert _rel(want[:1, :1].numpy(), one.numpy()) < 2e-6


def test_unsupported_type_names_tensor_and_type():
    with pytest.raises(QuantError, match=r"'blk\.3\.ffn_down\.weight'.*Q5_K"):
        QuantWeight([("Q5_K", np.zeros((4, 176), np.uint8))], 256, "blk.3.ffn_down.weight")
    with pytest.raises(QuantError, match="whole blocks"):
        QuantWeight([("Q4_K", np.zeros((4, 144), np.uint8))], 200, "x")


# ------------------------------------------------------------------------------------- the loader (tiny GGUF)
@pytest.fixture
def tiny_gguf(tmp_path):
    from test_gguf import _tiny_gemma3
    p = tmp_path / "tiny.gguf"
    _tiny_gemma3(p)
    return p


def test_load_keep_tiny(tiny_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    import workbench as wb
    ids = [2, 17, 99, 5, 200, 31, 64, 8]
    ref = wb.load(tiny_gguf, backend="torch:cpu", dtype="float64", progress=False)
    kept = wb.load(tiny_gguf, backend="torch:cpu", dtype="float32", quant="keep-exact", progress=False)
    q = kept.w["layers.0.self_attn.qkv_proj.weight"]
    assert isinstance(q, QuantWeight) and q.types == ["Q8_0", "F32"]   # q Q8_0; k (F16), v (F32): float rows
    assert not isinstance(kept.w["layers.0.mlp.down_proj.weight"], QuantWeight)   # F32 stays a float tensor
    lr, lk = ref.forward(ids).logits, kept.forward(ids).logits
    assert _rel(lr, lk) < 1e-5
    g_ref = ref.generate(ids, max_new_tokens=12).token_ids
    assert kept.generate(ids, max_new_tokens=12).token_ids == g_ref
    k8 = wb.load(tiny_gguf, backend="torch:cpu", dtype="float32", quant="keep", progress=False)
    assert k8.ops.quant_act8 and not kept.ops.quant_act8
    assert len(k8.generate(ids, max_new_tokens=4).token_ids) == 4


def test_load_keep_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    import workbench as wb
    from test_gguf import _tiny_gemma3

    from workbench.weights.gguf import GGUFError
    p = tmp_path / "q41.gguf"
    _tiny_gemma3(p, qtype=Q.Q4_1)
    with pytest.raises(GGUFError, match=r"'token_embd\.weight' has ggml type Q4_1"):
        wb.load(p, backend="torch:cpu", quant="keep", progress=False)
    with pytest.raises(ValueError, match="float32"):
        wb.load(p, backend="torch:cpu", dtype="bfloat16", quant="keep", progress=False)
    with pytest.raises(ValueError, match="expected 'keep'"):
        wb.load(p, backend="torch:cpu", quant="q4", progress=False)


# ------------------------------------------------------------------------------------- the real 270M Q4_K_M
PROMPT = "The history of the Roman Empire spans many centuries, beginning with the founding of the city and"


def _rel_l2(ref, x):
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    assert np.isfinite(x).all(), "NaN/inf"
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def kept270m(g270m):
    import workbench as wb
    return {q: wb.load(g270m, backend="torch:cpu", dtype="float32", quant=q, progress=False)
            for q in ("keep", "keep-exact")}


@pytest.mark.slow
def test_270m_greedy_kept_vs_dequantised(g270m, kept270m):
    """Greedy tokens: the exact kept-quantised path equals the dequantised float32 model (measured: 32/32);
    the 8-bit-activation path follows it for a while (measured: first divergence at token 16)."""
    import workbench as wb
    deq = wb.load(g270m, backend="torch:cpu", dtype="float32", progress=False)
    want = deq.generate(PROMPT, max_new_tokens=32).token_ids
    got_exact = kept270m["keep-exact"].generate(PROMPT, max_new_tokens=32)
    assert got_exact.token_ids == want
    assert "GGUF blocks kept quantised" in got_exact.stats["route_reason"]
    got8 = kept270m["keep"].generate(PROMPT, max_new_tokens=32)
    agree = next((j for j, (a, b) in enumerate(zip(got8.token_ids, want)) if a != b), 32)
    print(f"keep (8-bit activations): first {agree} of 32 greedy tokens equal the dequantised model's")
    assert agree >= 6
    assert "8-bit activations" in got8.stats["route_reason"]


@pytest.mark.slow
def test_270m_decode_parity_per_layer(g270m, kept270m):
    """Teacher-forced decode through the kept-quantised route, per layer, against float64 on the dequantised
    weights: the exact path at float32 rounding, the 8-bit path visibly above it; llama.cpp's logits beside."""
    import workbench as wb
    from workbench.decode.capture import capture_decode
    m64 = wb.load(g270m, backend="torch:cpu", dtype="float64", progress=False)
    ids = m64.tokenizer.encode(PROMPT)
    P = len(ids)
    full = np.array(ids + m64.generate(ids, max_new_tokens=6).token_ids)
    ref, _ = capture_decode(m64.decoder, full, P)
    got = {q: capture_decode(m.decoder, full, P)[0] for q, m in kept270m.items()}
    L = m64.config.num_hidden_layers
    for i in range(L):
        k = f"blocks.{i}.hook_resid_post"
        e_exact, e8 = _rel(ref[k], got["keep-exact"][k]), _rel(ref[k], got["keep"][k])
        assert e_exact < 1e-5, (k, e_exact)
        assert 1e-4 < e8 < 0.1 and e8 > 100 * e_exact, (k, e8, e_exact)
    lg = ref["logits"][0]
    assert _rel_l2(lg, got["keep-exact"]["logits"][0]) < 1e-5
    d8 = _rel_l2(lg, got["keep"]["logits"][0])
    try:
        from workbench.references.llamacpp import LlamaCppReference
    except ImportError:
        return
    try:
        lc = LlamaCppReference(str(g270m), n_ctx=128, n_threads=2)
    except ImportError as e:
        print(f"llama.cpp not available: {e}")
        return
    dl = _rel_l2(lg, lc.logits(full)[P:])
    print(f"logits rel L2 vs float64 (dequantised): keep (8-bit activations) {d8:.3e}, llama.cpp {dl:.3e}")
    assert 1e-3 < d8 < 0.2 and 1e-3 < dl < 0.2
