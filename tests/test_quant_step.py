"""The fused kept-quantised decode step (workbench/backends/cpu_step.py, route "cpu quant step"): one C call per
token against the eager static step over the same kernels (WORKBENCH_CPU_STEP=0) — greedy and sampled tokens,
per-layer residuals (the step's capture mode, the path parity's decode rows take), on a tiny GGUF with the real
file's mix of block types (Q5_0 q/k, Q8_0 v, Q4_K o, Q5_0 gate/up, Q6_K down, Q8_0 embedding; sliding and full
layers, the sliding ring wrapped) and on the real Gemma 3 270M Q4_K_M; the route's choice and its fallbacks; the
errors for bad input.

Why the 8-bit-activation path ("keep") is compared step by step and not only by free-running tokens: its
activations are rounded to 8 bits before every product, so a 1-ulp difference anywhere upstream (torch's SDPA and
GELU vs the C step's own, ~1e-7) flips a rounding now and then (measured on the 270M: in about a third of the
steps, at one layer) and from there that step's later layers differ at the 8-bit noise level (~1e-2). Nudging the
eager route's own residual by 3e-7 moves its free-running greedy tokens just as much (measured: first divergence
at token 8 of 32). The exact path ("keep-exact", float32 activations) has no such amplifier: its tokens match."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import quantize  # noqa: E402

from workbench.backends import cpu_gemv  # noqa: E402

if cpu_gemv.kernel() is None:
    pytest.skip(f"no C kernel here: {cpu_gemv._state.get('why')}", allow_module_level=True)

from workbench.backends import cpu_step  # noqa: E402
from workbench.backends.quant import QuantError  # noqa: E402

RESID = "blocks.{}.hook_resid_post"


def _kquant_blocks(t, N: int, K: int, rng) -> np.ndarray:
    """[N, row bytes] random Q4_K / Q6_K blocks with ordinary scales (gguf-py cannot quantise K-quants)."""
    if t == Q.Q4_K:
        b = rng.integers(0, 256, size=(N, K // 256, 144), dtype=np.uint8)
        b[..., 0:2] = np.full(b.shape[:2], 2e-4, np.float16).view(np.uint8).reshape(*b.shape[:2], 2)
        b[..., 2:4] = np.full(b.shape[:2], 2e-3, np.float16).view(np.uint8).reshape(*b.shape[:2], 2)
    else:
        b = rng.integers(0, 256, size=(N, K // 256, 210), dtype=np.uint8)
        b[..., 208:210] = np.full(b.shape[:2], 5e-5, np.float16).view(np.uint8).reshape(*b.shape[:2], 2)
    return b.reshape(N, -1)


def write_mixed_gemma3(path, L: int = 6, D: int = 256, F: int = 256, NH: int = 2, KV: int = 1, hd: int = 128,
                       window: int = 8):
    """A tiny gemma3 GGUF whose matrices use the real Q4_K_M file's block types (layers 0-4 slide, 5 is full),
    with a Q6_K output head of its own."""
    from test_gguf import SMALL_VOCAB, _finish, _writer
    rng = np.random.default_rng(0)
    w = _writer(path, "gemma3")
    for k, v in {"block_count": L, "context_length": 256, "embedding_length": D, "feed_forward_length": F,
                 "attention.head_count": NH, "attention.head_count_kv": KV, "attention.key_length": hd,
                 "attention.value_length": hd, "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 1e6,
                 "attention.sliding_window": window}.items():
        (w.add_float32 if isinstance(v, float) else w.add_uint32)(f"gemma3.{k}", v)

    def put(name, shape, t, scale=0.05, norm=False):
        if norm:
            w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        elif t in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(name, _kquant_blocks(t, shape[0], shape[1], rng), raw_dtype=t)
        else:
            w.add_tensor(name, quantize((scale * rng.standard_normal(shape)).astype(np.float32), t), raw_dtype=t)

    put("token_embd.weight", (SMALL_VOCAB, D), Q.Q8_0, scale=0.1)
    put("output.weight", (SMALL_VOCAB, D), Q.Q6_K)          # an untied head (a tied one echoes the input token)
    put("output_norm.weight", (D,), None, norm=True)
    for i in range(L):
        b = f"blk.{i}."
        for n, s in (("attn_norm", D), ("attn_q_norm", hd), ("attn_k_norm", hd), ("post_attention_norm", D),
                     ("ffn_norm", D), ("post_ffw_norm", D)):
            put(b + n + ".weight", (s,), None, norm=True)
        put(b + "attn_q.weight", (NH * hd, D), Q.Q5_0, scale=0.1)
        put(b + "attn_k.weight", (KV * hd, D), Q.Q5_0, scale=0.1)
        put(b + "attn_v.weight", (KV * hd, D), Q.Q8_0, scale=0.1)
        put(b + "attn_output.weight", (D, NH * hd), Q.Q4_K)
        put(b + "ffn_gate.weight", (F, D), Q.Q5_0)
        put(b + "ffn_up.weight", (F, D), Q.Q5_0)
        put(b + "ffn_down.weight", (D, F), Q.Q6_K)
    _finish(w)
    return path


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    return write_mixed_gemma3(tmp_path_factory.mktemp("qstep") / "mixed.gguf")


@pytest.fixture(scope="module")
def tiny_f32_gguf(tmp_path_factory):
    """The loader tests' tiny GGUF: Q8_0 rows beside F16/F32 rows in one projection, an F32 down matrix."""
    from test_gguf import _tiny_gemma3
    p = tmp_path_factory.mktemp("qstep") / "tiny.gguf"
    _tiny_gemma3(p)
    return p


def _load(path, q):
    import workbench as wb
    return wb.load(path, backend="torch:cpu", dtype="float32", quant=q, progress=False)


def _rel(ref, x):
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    assert np.isfinite(x).all(), "NaN/inf"
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def _gen(m, monkeypatch, env, ids, n, **kw):
    monkeypatch.setenv("WORKBENCH_CPU_STEP", env)
    g = m.generate(list(ids), max_new_tokens=n, ignore_eos=True, **kw)
    return g


IDS = [2, 17, 99, 5, 200, 31, 64, 8, 150, 42]


# ------------------------------------------------------------------------------------------- tiny fixtures
@pytest.mark.parametrize("q", ["keep", "keep-exact"])
@pytest.mark.parametrize("fixture", ["mixed_gguf", "tiny_f32_gguf"])
def test_fused_tokens_equal_eager(fixture, q, request, monkeypatch):
    """Greedy tokens of the fused step equal the eager step's (40 tokens: the 8-slot / 16-slot rings wrap)."""
    m = _load(request.getfixturevalue(fixture), q)
    fused = _gen(m, monkeypatch, "1", IDS, 40)
    eager = _gen(m, monkeypatch, "0", IDS, 40)
    assert fused.stats["route"] == "cpu quant step", fused.stats
    assert eager.stats["route"] == "cpu gemv" and "WORKBENCH_CPU_STEP=0" in eager.stats["route_reason"]
    assert fused.token_ids == eager.token_ids
    if fixture == "mixed_gguf":          # (the tied tiny model repeats its input token: only the residuals tell)
        assert len(set(fused.token_ids)) > 10


def synced_steps(m, ids, full, max_len=64):
    """Teacher-forced steps of ``full`` after the prompt ``ids``: the eager static step (tap points) and the fused
    step (capture buffer) on two caches made equal before every step. Returns (per step x layer rel. max errors of
    the residual, steps whose argmax agrees)."""
    from workbench.model.taps import Points
    dec = m.decoder
    P, L = len(ids), dec.config.num_hidden_layers
    ce, cf = dec.new_cache(batch=1, max_len=max_len), dec.new_cache(batch=1, max_len=max_len)
    dec.forward(np.array([ids]), cache=ce)
    dec.forward(np.array([ids]), cache=cf)
    ce.begin_static()
    step = cpu_step.CpuQuantStep(dec.decode_plan(cf))
    cap = np.zeros((L, dec.config.hidden_size), np.float32)
    errs, agree = [], 0
    for t in range(P, len(full)):
        for a, b in zip(ce.layers, cf.layers):
            b.k.copy_(a.k)
            b.v.copy_(a.v)
            b.kpos_dev.copy_(a.kpos_dev)
        tok, pos = torch.tensor([[full[t]]]), torch.tensor([t])
        pts = Points(dec.config, [RESID.format(i) for i in range(L)], None)
        want = dec.decode_step(tok, pos, ce, pts=pts)
        got = step(tok, pos, capture=cap)
        agree += int(want.argmax()) == int(got.argmax())
        errs.append([_rel(np.asarray(pts.values[RESID.format(i)]).reshape(-1), cap[i]) for i in range(L)])
    return np.array(errs), agree


@pytest.mark.parametrize("fixture", ["mixed_gguf", "tiny_f32_gguf"])
def test_fused_residuals_synced_keep(fixture, request, monkeypatch):
    """keep (8-bit activations), step by step from equal caches: the residuals agree at float32 rounding except
    after an occasional activation-rounding flip (module docstring), where they stay within the 8-bit noise."""
    m = _load(request.getfixturevalue(fixture), "keep")
    full = IDS + _gen(m, monkeypatch, "0", IDS, 30).token_ids
    E, agree = synced_steps(m, IDS, full)
    assert agree >= len(E) - 1
    assert (E < 1e-5).mean() > 0.8 and E.max() < 5e-2, ((E < 1e-5).mean(), E.max())


@pytest.mark.parametrize("fixture", ["mixed_gguf", "tiny_f32_gguf"])
def test_fused_residuals_per_layer(fixture, request, monkeypatch):
    """keep-exact: teacher-forced decode (parity's capture_decode) through the fused step's capture buffer against
    the eager step's tap points: every layer's residual and the logits at float32 rounding."""
    from workbench.decode.capture import capture_decode
    m = _load(request.getfixturevalue(fixture), "keep-exact")
    ids = np.array(IDS + _gen(m, monkeypatch, "0", IDS, 24).token_ids)
    P = len(IDS)
    monkeypatch.setenv("WORKBENCH_CPU_STEP", "1")
    got, route = capture_decode(m.decoder, ids, P)
    monkeypatch.setenv("WORKBENCH_CPU_STEP", "0")
    want, route0 = capture_decode(m.decoder, ids, P)
    assert (route, route0) == ("cpu quant step", "cpu gemv")
    L = m.config.num_hidden_layers
    for i in range(L):
        assert got[RESID.format(i)].shape == want[RESID.format(i)].shape == (1, len(ids) - P, m.config.hidden_size)
        e = _rel(want[RESID.format(i)], got[RESID.format(i)])
        assert e < 1e-5, (i, e)
    assert _rel(want["logits"], got["logits"]) < 1e-5


def test_fused_sampled_tokens_equal_eager(mixed_gguf, monkeypatch):
    m = _load(mixed_gguf, "keep-exact")
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, seed=3)
    fused = _gen(m, monkeypatch, "1", IDS, 24, **kw)
    eager = _gen(m, monkeypatch, "0", IDS, 24, **kw)
    assert fused.stats["route"] == "cpu quant step"
    assert fused.token_ids == eager.token_ids
    assert fused.token_ids != _gen(m, monkeypatch, "1", IDS, 24).token_ids     # really sampled


def test_fused_step_sees_a_fault(mixed_gguf, monkeypatch):
    """A test fault (model.perturb) is applied: the step hands over to the eager step while one is set."""
    m = _load(mixed_gguf, "keep-exact")
    clean = _gen(m, monkeypatch, "1", IDS, 16).token_ids
    m.perturb = lambda i, name, x: x * 3.0 if (i == 2 and name == "hook_mlp_out") else x
    try:
        fused = _gen(m, monkeypatch, "1", IDS, 16).token_ids
        eager = _gen(m, monkeypatch, "0", IDS, 16).token_ids
    finally:
        m.perturb = None
    assert fused == eager != clean


def test_fused_step_errors(mixed_gguf):
    m = _load(mixed_gguf, "keep")
    dec = m.decoder
    cache = dec.new_cache(batch=1, max_len=32)
    dec.forward(np.array([IDS]), cache=cache)
    plan = dec.decode_plan(cache)
    step = cpu_step.CpuQuantStep(plan)
    tok, pos = torch.tensor([[5]]), torch.tensor([len(IDS)])
    lg = step(tok, pos)
    assert lg.shape == (1, m.config.vocab_size) and torch.isfinite(lg).all()
    assert int(step.greedy(tok, pos)) == int(lg.argmax())
    with pytest.raises(ValueError, match=r"token 999 .*outside the vocabulary"):
        step(torch.tensor([[999]]), pos)
    with pytest.raises(ValueError, match="token -1"):
        step(torch.tensor([[-1]]), pos)
    with pytest.raises(ValueError, match=r"position 32: position outside the cache"):
        step(tok, torch.tensor([32]))
    with pytest.raises(ValueError, match="int64"):
        step(tok.to(torch.int32), pos)
    with pytest.raises(ValueError, match=r"capture must be a contiguous float32 \[6, 256\]"):
        step(tok, pos, capture=np.zeros((6, 255), np.float32))
    bad = dataclasses.replace(plan, layers=[dataclasses.replace(plan.layers[0], o=torch.zeros(3, 3))]
                              + plan.layers[1:])
    with pytest.raises(QuantError, match=r"layer 0 o is \[3, 3\], expected \[256, 256\]"):
        cpu_step.CpuQuantStep(bad)
    f64 = torch.zeros(256, dtype=torch.float64)
    bad = dataclasses.replace(plan, layers=plan.layers[:1] + [dataclasses.replace(plan.layers[1], input_norm=f64)]
                              + plan.layers[2:])
    with pytest.raises(QuantError, match="layer 1 input_norm must be a contiguous float32"):
        cpu_step.CpuQuantStep(bad)
    lc = cache.layers[3]
    lc.k = lc.k.clone()                 # a cache that re-allocated its buffers
    with pytest.raises(RuntimeError, match="buffers changed"):
        step(tok, pos)


def test_route_declines_with_reason(mixed_gguf):
    from workbench.decode import route as R
    import workbench as wb
    m = _load(mixed_gguf, "keep")
    assert R.pick(m.decoder, m.decoder.new_cache(batch=1, max_len=16)).kind == "cpu-step"
    assert cpu_step.unsupported(m.config, m.decoder.ops, m.decoder.new_cache(batch=2, max_len=16)) == "batch > 1"
    deq = wb.load(mixed_gguf, backend="torch:cpu", dtype="float32", progress=False)
    assert "quant=None" in cpu_step.unsupported(deq.config, deq.decoder.ops)


# ------------------------------------------------------------------------------------------- the real 270M
PROMPT = "The history of the Roman Empire spans many centuries, beginning with the founding of the city and"


@pytest.mark.slow
def test_270m_fused_vs_eager(g270m, monkeypatch):
    """keep-exact: the fused step's greedy tokens equal the eager step's (32/32). keep (8-bit activations):
    teacher-forced with the two caches synchronised before each step, the argmax agrees at every step and the
    residuals agree at float32 rounding except after an occasional activation-rounding flip (see the module
    docstring), where they stay within the 8-bit noise."""
    m = _load(g270m, "keep-exact")
    ids = m.tokenizer.encode(PROMPT)
    fused = _gen(m, monkeypatch, "1", ids, 32)
    assert fused.stats["route"] == "cpu quant step"
    assert fused.token_ids == _gen(m, monkeypatch, "0", ids, 32).token_ids

    m = _load(g270m, "keep")
    full = ids + _gen(m, monkeypatch, "0", ids, 16).token_ids
    E, agree = synced_steps(m, ids, full)
    print(f"keep, fused vs eager, synchronised steps: {(E < 1e-5).mean():.0%} of layer-steps below 1e-5, "
          f"max {E.max():.2e}; argmax agrees {agree}/{len(E)}")
    assert agree == len(E)
    assert (E < 1e-5).mean() > 0.6 and E.max() < 5e-2


# ------------------------------------------------------------------------------------------- short prompts
@pytest.mark.parametrize("rows", [2, 7, 16, 17, 40])
def test_several_rows_on_the_kernel(rows, monkeypatch):
    """Prefill products: up to GEMM_MAX rows through wb_q_gemm (blocks dequantised once, every row dotted), more
    through the chunked dequantisation + torch GEMM; both equal F.linear on gguf-py's dequantised matrix, for a
    projection of Q5_0 + Q8_0 + float32 rows (as the tiny loader file's)."""
    from gguf.quants import dequantize as ref_dequantize
    from test_quant import random_blocks

    from workbench.backends import quant
    from workbench.backends.quant import QuantWeight
    monkeypatch.setattr(quant, "_CHUNK_BYTES", 64 * 1024 * 4)      # several chunks on the torch path
    K = 640
    a, b = random_blocks("Q5_0", 200, K, 11), random_blocks("Q8_0", 24, K, 12)
    f = np.random.default_rng(13).standard_normal((8, K)).astype(np.float32)
    w = QuantWeight.concat([QuantWeight([("Q5_0", a)], K, "a"), QuantWeight([("Q8_0", b)], K, "b"), torch.from_numpy(f)])
    dq = np.concatenate([ref_dequantize(a, Q.Q5_0).reshape(200, K), ref_dequantize(b, Q.Q8_0).reshape(24, K), f])
    x = torch.randn(1, rows, K)
    want = x.double().numpy() @ dq.astype(np.float64).T
    for act8 in (True, False):                   # several-row products are exact in both modes
        got = quant.torch_linear(x, w, act8).numpy()
        assert got.shape == (1, rows, 232)
        assert np.abs(got - want).max() / np.abs(want).max() < 2e-6
    if rows <= quant.GEMM_MAX:       # per row the same sums as the exact one-row product (the quantised rows)
        one = quant.torch_linear(x[:, :1], w, False).numpy()
        np.testing.assert_array_equal(quant.torch_linear(x, w, False).numpy()[:, :1, :224], one[..., :224])
