"""The one decode engine (workbench.decode): the fast route gives the plain route's tokens (greedy, and sampled
with the same seed) on every decoding fixture and both CPU backends; the sampler means the same on numpy, torch
and MLX and draws from the right distribution; generate's stats name the route; streaming and stop strings;
the kernels see only the plan; parity of the fast route finds a fault injected into the plan at its layer."""
import ast
import pathlib

import numpy as np
import pytest

from conftest import GEMMA4_FIXTURES, TEXT_FIXTURES, cpu_backends, fixture_dir, have

import workbench as wb
from workbench.decode import capture_decode, sampler

DECODING = TEXT_FIXTURES + [n for n in GEMMA4_FIXTURES if n != "gemma4_bidir"]   # bidirectional: no KV decode
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _prompt(m, n=11, seed=3):
    return [int(t) for t in np.random.default_rng(seed).integers(3, m.config.vocab_size, size=n)]


def _gen(m, monkeypatch, route, prompt, **kw):
    if route == "plain":
        monkeypatch.setenv("WORKBENCH_DECODE", "plain")
    else:
        monkeypatch.delenv("WORKBENCH_DECODE", raising=False)
    return m.generate(prompt, ignore_eos=True, **kw)


@pytest.mark.parametrize("name", DECODING)
@pytest.mark.parametrize("backend", cpu_backends())
def test_fast_route_equals_plain_greedy_and_sampled(name, backend, monkeypatch):
    m = wb.load(fixture_dir(name), backend=backend, progress=False)
    prompt = _prompt(m)
    plain = _gen(m, monkeypatch, "plain", prompt, max_new_tokens=22)     # 33 positions: 4x the window
    fast = _gen(m, monkeypatch, "fast", prompt, max_new_tokens=22)
    assert plain.stats["route"] == "plain" and fast.stats["route"] != "plain", fast.stats
    assert fast.token_ids == plain.token_ids
    kw = dict(max_new_tokens=22, temperature=0.9, top_p=0.95, seed=11)
    sp = _gen(m, monkeypatch, "plain", prompt, **kw).token_ids
    sf = _gen(m, monkeypatch, "fast", prompt, **kw).token_ids
    assert sf == sp
    other = _gen(m, monkeypatch, "fast", prompt, **dict(kw, seed=12)).token_ids
    assert other != sf, "another seed gives other tokens"
    assert sf != fast.token_ids, "sampling at temperature 0.9 differs from greedy"


def test_same_seed_same_tokens_across_backends(monkeypatch):
    if "mlx:cpu" not in cpu_backends():
        pytest.skip("mlx is not installed")
    outs = []
    for b in ("torch:cpu", "mlx:cpu"):
        m = wb.load(fixture_dir("gemma3_text"), backend=b, progress=False)
        outs.append(_gen(m, monkeypatch, "fast", _prompt(m), max_new_tokens=24, temperature=1.0, top_k=40,
                         seed=3).token_ids)
    assert outs[0] == outs[1]


def test_generate_stats_name_the_route_and_engines_are_reused(monkeypatch):
    m = wb.load(fixture_dir("gemma2"), progress=False)
    g = _gen(m, monkeypatch, "fast", [2, 5, 6], max_new_tokens=8)
    assert g.stats["route"] == "cpu gemv" or g.stats["route"] == "static", g.stats
    assert g.stats["route_reason"] and g.stats["decode_steps"] == 7
    g2 = _gen(m, monkeypatch, "fast", [2, 5, 6], max_new_tokens=8)
    assert g2.token_ids == g.token_ids and len(m.decoder._decode_engines) == 1
    s = m.generate([2, 5, 6], max_new_tokens=3, temperature=0.5, top_k=5)
    assert len(s.token_ids) == 3 and len(m.decoder._decode_engines) == 2     # another sampling shape: its own engine
    monkeypatch.setenv("WORKBENCH_CPU_GEMV", "off")
    g3 = m.generate([2, 5, 6], max_new_tokens=4, ignore_eos=True)
    assert g3.stats["route"] == "static" and g3.token_ids == g.token_ids[:4]


def test_stop_ids_and_context_limit(monkeypatch):
    m = wb.load(fixture_dir("gemma3_text"), progress=False)
    full = _gen(m, monkeypatch, "fast", [2, 7, 8], max_new_tokens=20).token_ids
    stop = full[9]
    first = full.index(stop)
    g = m.generate([2, 7, 8], max_new_tokens=20, stop=[stop])
    assert g.token_ids == full[:first] and g.stopped_by == "eos"
    ctx = m.config.max_position_embeddings
    g = m.generate([2] * (ctx - 5), max_new_tokens=20, ignore_eos=True)
    assert len(g.token_ids) == 5 and g.stopped_by == "context"


# ------------------------------------------------------------------------------------------------ the sampler
def test_sampler_same_on_numpy_torch_mlx():
    import torch
    rng = np.random.default_rng(0)
    V = 3000
    for kw in (dict(temperature=0.7), dict(temperature=1.0, top_k=50), dict(temperature=0.8, top_p=0.9),
               dict(temperature=1.3, top_k=100, top_p=0.5)):
        s = sampler.make(seed=9, **kw)
        lg = (rng.normal(size=V) * 3).astype(np.float32)
        ref = [sampler.sample_np(lg, s, p) for p in range(1, 40)]
        ft = sampler.torch_sampler(s, V, "cpu")
        got = [int(ft(torch.tensor(lg)[None], torch.tensor([p - 1]))) for p in range(1, 40)]
        assert got == ref, kw
        if "mlx:cpu" in cpu_backends():
            import mlx.core as mx
            fm = sampler.mlx_sampler(s, V)
            prm = fm.params(s)
            got = [int(fm(mx.array(lg)[None], mx.array([p - 1], dtype=mx.int32), prm).item()) for p in range(1, 40)]
            assert got == ref, kw
        assert len(set(ref)) > 3, "positions give different draws"


def test_sampler_draws_from_the_right_distribution():
    """Frequencies over many positions against the tempered softmax (restricted to top-k / the top-p prefix)."""
    V, n = 12, 20000
    lg = np.linspace(2.0, -2.0, V).astype(np.float32)
    for kw, keep in ((dict(temperature=0.8), V), (dict(temperature=1.0, top_k=4), 4),
                     (dict(temperature=1.0, top_p=0.6), None)):
        s = sampler.make(seed=1, **kw)
        p = np.exp(lg / s.temperature - (lg / s.temperature).max())
        p /= p.sum()
        if keep is None:
            keep = int(np.searchsorted(np.cumsum(p), 0.6) + 1)
        q = np.zeros(V)
        q[:keep] = p[:keep] / p[:keep].sum()
        draws = np.array([sampler.sample_np(lg, s, pos) for pos in range(n)])
        f = np.bincount(draws, minlength=V) / n
        assert f[keep:].sum() == 0, (kw, f)
        assert np.abs(f - q).max() < 0.015, (kw, f, q)


def test_sampling_arguments_are_checked():
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sampler.make(**bad)


# ------------------------------------------------------------------------------------------- streaming / stops
@pytest.fixture(scope="module")
def tok270():
    from workbench.tokenizer import Tokenizer
    from workbench.weights import registry
    try:
        return Tokenizer.from_source(registry.resolve("gemma3-270m"))
    except ImportError as e:
        pytest.skip(str(e))


def test_incremental_detokenisation_equals_full_decode(tok270):
    from workbench.generate import _StopText
    text = "Grüße aus Köln — 東京タワー 🎉🎉 and   spaces\n\nnew lines, naïve café." * 3
    ids = tok270.encode(text, add_bos=False)
    st = _StopText(tok270, [])
    pieces = [st.add(t) for t in ids] + [st.flush()]
    assert "".join(pieces) == tok270.decode(ids)
    assert st.base > len(ids) // 2, "the window moves on (decodes stay short)"
    st = _StopText(tok270, ["Köln — 東"])
    out = ""
    for t in ids:
        out += st.add(t)
        if st.hit:
            break
    assert st.hit and out == "Grüße aus " and st.text() == "Grüße aus "


@pytest.mark.slow
def test_stream_and_stop_string_on_the_real_model(g270m):
    m = wb.load(g270m, progress=False)
    g = m.generate("The capital of France is", max_new_tokens=12)
    pieces = list(m.generate("The capital of France is", max_new_tokens=12, stream=True))
    assert "".join(pieces) == g.text and len(pieces) > 1
    assert m.last_stats["route"] == g.stats["route"]
    cut = g.text[len(g.text) // 2:len(g.text) // 2 + 3]
    if cut.strip():
        s = m.generate("The capital of France is", max_new_tokens=12, stop=[cut])
        assert s.stopped_by == "stop" and s.text == g.text[:g.text.index(cut)]
        ps = "".join(m.generate("The capital of France is", max_new_tokens=12, stop=[cut], stream=True))
        assert ps == s.text


# ------------------------------------------------------------------------------------------- plan and layering
def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name


def test_backends_import_nothing_from_model_and_kernels_see_only_the_plan():
    for p in (ROOT / "workbench" / "backends").glob("*.py"):
        for mod in _imports(p):
            assert "model" not in mod.split("."), f"{p.name} imports {mod}"
    for name in ("triton_decode.py", "mlx_cuda_decode.py", "mlx_cuda_persist.py"):
        tree = ast.parse((ROOT / "workbench" / "backends" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                # the model's weight dict and private names, the cache's RoPE tables / layer list
                assert node.attr not in ("w", "_fuse", "_inv_freq", "rope_tables", "rope_key", "model", "config"), \
                    f"{name}:{node.lineno} reads .{node.attr}"
                assert not (node.attr.startswith("_") and not node.attr.startswith("__")
                            and isinstance(node.value, ast.Name) and node.value.id not in ("self", "tl", "triton",
                                                                                         "torch", "mx")), \
                    f"{name}:{node.lineno} reads a private attribute .{node.attr}"
            if isinstance(node, ast.Name):
                assert node.id != "model", f"{name}:{node.lineno} names the model"


# ------------------------------------------------------------------------------------------- fast-route parity
def _first_over(ref, got, L, tol):
    bad = []
    for i in range(L):
        k = f"blocks.{i}.hook_resid_post"
        r, x = ref[k].astype(np.float64), got[k].astype(np.float64)
        assert np.isfinite(x).all()
        bad.append(np.abs(x - r).max() / np.abs(r).max() > tol)
    return bad.index(True) if any(bad) else None


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", ["gemma3_text", "gemma4_e2b"])
def test_capture_decode_matches_float64_and_finds_a_plan_fault(backend, name):
    ref_m = wb.load(fixture_dir(name), dtype="float64", progress=False)
    m = wb.load(fixture_dir(name), backend=backend, progress=False)
    L = m.config.num_hidden_layers
    ids = np.random.default_rng(2).integers(3, m.config.vocab_size, size=(1, 20))
    ref = ref_m.forward(ids, taps=["blocks.*.hook_resid_post"])
    refd = {k: v[:, 12:] for k, v in ref.taps.items()}
    got, route = capture_decode(m, ids, 12, ["blocks.*.hook_resid_post", "logits"])
    assert route in ("cpu gemv", "static", "mlx queued")
    assert got["logits"].shape == (1, 8, m.config.vocab_size)
    assert np.abs(got["logits"] - ref.logits[:, 12:]).max() / np.abs(ref.logits).max() < 1e-4
    assert _first_over(refd, got, L, 1e-4) is None
    bad, _ = capture_decode(m, ids, 12, ["blocks.*.hook_resid_post"],
                            plan_fault=lambda p: p.scale_weight(1, "gate_up", 1.05))
    assert _first_over(refd, bad, L, 1e-4) == 1


@pytest.mark.slow
@pytest.mark.skipif(not have("triton"), reason="triton is not installed (pip install triton)")
def test_capture_decode_through_the_triton_interpreter():
    """The Triton kernels (interpreter on the CPU) captured per layer: clean within 1e-4 of float64, and a flipped
    RoPE sign / a scaled GEMV injected into the plan shows first at its layer."""
    import json
    import os
    import subprocess
    import sys
    script = r'''
import json, sys, numpy as np, workbench as wb
from workbench.decode import capture_decode
fx = sys.argv[1]
ids = np.random.default_rng(2).integers(3, 256, size=(1, 16))
ref = wb.load(fx, dtype="float64", progress=False).forward(ids, taps=["blocks.*.hook_resid_post"]).taps
m = wb.load(fx, progress=False)
def first(got):
    errs = [float(np.abs(got[f"blocks.{i}.hook_resid_post"] - ref[f"blocks.{i}.hook_resid_post"][:, 12:]).max()
                  / np.abs(ref[f"blocks.{i}.hook_resid_post"]).max()) for i in range(m.config.num_hidden_layers)]
    return errs
out = {}
g, out["route"] = capture_decode(m, ids, 12)
out["clean"] = first(g)
g, _ = capture_decode(m, ids, 12, plan_fault=lambda p: p.flip_rope(1))
out["rope"] = first(g)
g, _ = capture_decode(m, ids, 12, plan_fault=lambda p: p.scale_weight(2, "gate_up", 1.05))
out["down"] = first(g)
print("RESULT " + json.dumps(out))
'''
    env = dict(os.environ, TRITON_INTERPRET="1", WORKBENCH_GPU_DECODE="triton")
    p = subprocess.run([sys.executable, "-c", script, str(fixture_dir("gemma3_text"))], env=env,
                       capture_output=True, text=True, timeout=900)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    r = json.loads(line[0][7:])
    assert r["route"] == "triton step"
    assert max(r["clean"]) < 1e-4, r["clean"]
    for key, layer in (("rope", 1), ("down", 2)):
        over = [e > 1e-4 for e in r[key]]
        assert over.index(True) == layer, (key, r[key])


def test_mlx_compiled_route_samples_as_the_plain_route(monkeypatch):
    """mx.compile of the static step with the sampler inside (mlx:gpu's route; here forced on mlx:cpu)."""
    if "mlx:cpu" not in cpu_backends():
        pytest.skip("mlx is not installed")
    from workbench.generate import generate_iter
    m = wb.load(fixture_dir("gemma3_text"), backend="mlx:cpu", progress=False)
    p = _prompt(m, 8)
    for kw in (dict(temperature=0.8, top_p=0.95, seed=4), dict(temperature=1.0, top_k=5, seed=2), {}):
        st: dict = {}
        fast = list(generate_iter(m, p, 20, ignore_eos=True, compile=True, stats=st, **kw))
        assert st["route"] == "compiled"
        monkeypatch.setenv("WORKBENCH_DECODE", "plain")
        plain = list(generate_iter(m, p, 20, ignore_eos=True, **kw))
        monkeypatch.delenv("WORKBENCH_DECODE")
        assert fast == plain, kw
