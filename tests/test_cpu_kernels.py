"""The CPU decode kernels (workbench/backends/cpu_gemv.py) against float64 numpy and torch's own rounding;
the backends give the same logits with them as with the frameworks' kernels."""
import numpy as np
import pytest

from conftest import cpu_backends, fixture_dir, have, rel_max

import workbench as wb
from workbench.backends import cpu_gemv

torch = pytest.importorskip("torch", reason="torch is not installed")


def _kernel():
    if cpu_gemv.mode() != "auto":
        pytest.skip(f"WORKBENCH_CPU_GEMV={cpu_gemv.mode()} turns the C kernel off")
    lib = cpu_gemv.kernel()
    if lib is None:
        pytest.skip(cpu_gemv.describe("bfloat16"))
    return lib


def test_kernel_builds_where_a_compiler_exists():
    import shutil
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    _kernel()
    assert cpu_gemv.describe("bfloat16").startswith("C kernel")
    assert "BLAS" in cpu_gemv.describe("float64")


@pytest.mark.parametrize("N,K", [(1, 1), (7, 33), (777, 640), (64, 2048), (5, 9000)])  # tails, > stack buffer
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemv_matches_float64(N, K, dtype):
    _kernel()
    from workbench.backends.torch import _cpu_gemv
    g = torch.Generator().manual_seed(N * 31 + K)
    td = getattr(torch, dtype)
    x = torch.randn(1, 1, K, generator=g).to(td)
    w = torch.randn(N, K, generator=g).to(td)
    y = _cpu_gemv(x, w)
    assert y.dtype == td and y.shape == (1, 1, N)
    ref = x.double().reshape(-1) @ w.double().T
    # float32 sum of K products (error ~ sqrt(K) eps32), then one rounding to the dtype
    scale = float(ref.abs().max()) + 1e-30
    err = float((y.double().reshape(-1) - ref).abs().max()) / scale
    assert err < (1e-6 if dtype == "float32" else 2 ** -8), err


def test_bfloat16_rounding_equals_torch():
    """y = a + b with a, b bfloat16 is exact in float32, so the only rounding is the kernel's final
    float32 -> bfloat16; it must equal torch's (round to nearest even, ties included), and NaN/inf pass."""
    _kernel()
    from workbench.backends.torch import _cpu_gemv
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.standard_normal(4000) * 100, dtype=torch.float32).to(torch.bfloat16)
    b = torch.tensor(rng.standard_normal(4000) * 0.7, dtype=torch.float32).to(torch.bfloat16)
    ones = torch.ones(1, 2, dtype=torch.bfloat16)
    got = torch.stack([_cpu_gemv(torch.stack([ai, bi])[None], ones)[0] for ai, bi in zip(a, b)]).reshape(-1)
    want = (a.float() + b.float()).to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    special = torch.tensor([[float("nan"), 1.0]], dtype=torch.bfloat16)
    assert torch.isnan(_cpu_gemv(special, ones)).all()
    inf = torch.tensor([[float("inf"), 1.0]], dtype=torch.bfloat16)
    assert _cpu_gemv(inf, ones).item() == float("inf")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_matches_float64(dtype, with_weight):
    _kernel()
    from workbench.backends.torch import _cpu_rms_norm
    g = torch.Generator().manual_seed(1)
    td = getattr(torch, dtype)
    x = (torch.randn(1, 1, 4, 256, generator=g) * 5).to(td)
    w = torch.rand(256, generator=g) + 0.5 if with_weight else None
    y = _cpu_rms_norm(x, w, 1e-6)
    xf = x.double()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    if w is not None:
        ref = ref * w.double()
    assert y.dtype == td and y.shape == x.shape
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    assert err < (1e-6 if dtype == "float32" else 2 ** -8), err
    assert _cpu_rms_norm(torch.randn(64, 256).to(td), None, 1e-6) is None   # prefill-sized: torch's ops


def test_compiled_function_keeps_the_kernel():
    """Under torch.compile the kernel is the custom op workbench::cpu_gemv: same values as eager."""
    _kernel()
    from workbench.backends.torch import _cpu_gemv
    w = torch.randn(300, 64)
    f = torch.compile(lambda x: _cpu_gemv(x, w) * 2, fullgraph=True)
    x = torch.randn(1, 64)
    torch.testing.assert_close(f(x), _cpu_gemv(x, w) * 2)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_logits_same_with_framework_kernels(backend, dtype, monkeypatch):
    """The same model decoding with the C kernels and with the frameworks' own (WORKBENCH_CPU_GEMV=off):
    logits within the dtype's rounding, greedy tokens equal; both near the float64 reference."""
    _kernel()
    name = "gemma3_text"
    ids = np.random.default_rng(5).integers(3, 200, size=12)
    ref = wb.load(fixture_dir(name), dtype="float64")
    out = {}
    for m_ in ("auto", "off"):
        monkeypatch.setenv("WORKBENCH_CPU_GEMV", m_)
        m = wb.load(fixture_dir(name), backend=backend, dtype=dtype)
        cache = m.new_cache(max_len=32)
        m.forward(ids[None, :8], cache=cache)
        lg = [m.forward(ids[None, t:t + 1], cache=cache).logits[0, -1] for t in range(8, 12)]
        out[m_] = np.stack(lg)
    cache = ref.new_cache(max_len=32)
    ref.forward(ids[None, :8], cache=cache)
    want = np.stack([ref.forward(ids[None, t:t + 1], cache=cache).logits[0, -1] for t in range(8, 12)])
    tol = 1e-5 if dtype == "float32" else 3e-2
    assert rel_max(out["off"], out["auto"]) < tol
    assert rel_max(want, out["auto"]) < tol
    assert rel_max(want, out["off"]) < tol


def test_without_the_kernel_float32_uses_blas(monkeypatch):
    """No compiler: float32 goes through numpy's BLAS, bfloat16 back to the framework's kernel."""
    monkeypatch.setitem(cpu_gemv._state, "lib", None)
    monkeypatch.setitem(cpu_gemv._state, "why", "C kernel not built: (simulated)")
    w = np.random.default_rng(0).standard_normal((50, 40)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal(40).astype(np.float32)
    y = cpu_gemv.gemv_np(w, x, "float32")
    assert rel_max(w.astype(np.float64) @ x, y) < 1e-6
    assert cpu_gemv.gemv_np(w.view(np.int16)[:, :40], x, "bfloat16") is None
    assert "BLAS" in cpu_gemv.describe("float32") and "simulated" in cpu_gemv.describe("float32")
    from workbench.backends.torch import _cpu_gemv
    xt, wt = torch.randn(1, 40).to(torch.bfloat16), torch.randn(50, 40).to(torch.bfloat16)
    assert _cpu_gemv(xt, wt) is None
    assert rel_max(wt.double() @ xt.double()[0], _cpu_gemv(xt.float(), wt.float())[0]) < 1e-6


@pytest.mark.skipif(not have("mlx"), reason="mlx is not installed")
def test_mlx_gemv_matches_float64():
    _kernel()
    import mlx.core as mx
    from workbench.backends import get_ops
    ops = get_ops("mlx:cpu", "bfloat16")
    rng = np.random.default_rng(2)
    w = mx.array(rng.standard_normal((333, 100)).astype(np.float32)).astype(mx.bfloat16)
    x = mx.array(rng.standard_normal((1, 1, 100)).astype(np.float32)).astype(mx.bfloat16)
    y = ops.linear(x, w)
    assert y.dtype == mx.bfloat16 and y.shape == (1, 1, 333)
    ref = np.array(x.astype(mx.float32), np.float64).reshape(-1) @ np.array(w.astype(mx.float32), np.float64).T
    assert rel_max(ref, np.array(y.astype(mx.float32)).reshape(-1)) < 2 ** -8


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORKBENCH_CPU_GEMV", "fast")
    with pytest.raises(ValueError, match="WORKBENCH_CPU_GEMV"):
        cpu_gemv.mode()


def _child_gemv(q, x, w):
    # only the kernel runs here: torch's own parallel ops hang in a forked child on their own (torch 2.13 CPU)
    from workbench.backends.torch import _cpu_gemv
    q.put(float(_cpu_gemv(x, w).numpy().sum()))


def test_forked_child_does_not_hang():
    """GNU libgomp's pool does not survive fork: a child of a process that used the kernel must still get
    answers (one thread, no OpenMP team) instead of hanging in its first parallel region."""
    import multiprocessing as mp
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("fork start method: Linux only")
    _kernel()
    from workbench.backends.torch import _cpu_gemv
    x, w = torch.ones(1, 64), torch.ones(3000, 64)
    assert float(_cpu_gemv(x, w).numpy().sum()) == 3000 * 64
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_gemv, args=(q, x, w))
    p.start()
    p.join(60)
    if p.exitcode is None:
        p.kill()
    assert p.exitcode == 0, "the forked child hung or failed in the kernel"
    assert q.get(timeout=5) == 3000 * 64


def test_auto_leaves_other_cpus_alone(monkeypatch):
    """Only x86-64 was measured: elsewhere "auto" keeps the frameworks' kernels, "kernel" forces the C one."""
    monkeypatch.setattr(cpu_gemv, "_X86", False)
    monkeypatch.delenv("WORKBENCH_CPU_GEMV", raising=False)
    assert cpu_gemv.mode() == "off" and "not x86-64" in cpu_gemv.describe("float32")
    monkeypatch.setenv("WORKBENCH_CPU_GEMV", "kernel")
    assert cpu_gemv.mode() == "auto"
    monkeypatch.setenv("WORKBENCH_CPU_GEMV", "blas")
    assert cpu_gemv.mode() == "blas"
