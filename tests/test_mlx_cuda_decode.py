"""MLX's decode step as custom CUDA kernels (``workbench.backends.mlx_cuda_decode``): where it applies, and on a
CUDA GPU (measured on an H100, README) that it computes what the generic compiled step computes."""
import numpy as np
import pytest

from conftest import fixture_dir, have

import workbench as wb

pytestmark = pytest.mark.skipif(not have("mlx"), reason="mlx is not installed")


def _mlx_cuda() -> bool:
    try:
        import mlx.core as mx
        return hasattr(mx, "cuda") and mx.cuda.is_available()
    except Exception:
        return False


def test_declines_where_it_does_not_apply():
    from workbench.backends import mlx_cuda_decode as mk
    m = wb.load(fixture_dir("gemma3_text"), backend="mlx:cpu")
    assert "not mlx:gpu" in mk.unsupported(m.config, m.ops)
    from workbench.decode import route
    r = route.pick(m, m.new_cache(max_len=8), compile=True)
    assert r.kind == "compiled" and "not mlx:gpu" in r.reason


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _mlx_cuda(), reason="needs MLX on a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_step_matches_generic_on_cuda(g270m, dtype):
    import mlx.core as mx

    from workbench.backends import mlx_cuda_decode as mk
    m = wb.load(g270m, backend="mlx:gpu", dtype=dtype)
    assert mk.unsupported(m.config, m.ops) is None
    ids = np.random.default_rng(0).integers(100, 262000, size=(1, 64))
    res = []
    for kern in (False, True):
        c = m.new_cache(max_len=96)
        m.forward(ids, cache=c, last_only=True)
        c.begin_static()
        st = mk.MLXCudaDecodeStep(m.decode_plan(c)) if kern else None
        pos = mx.array([64], dtype=mx.int32)
        out = []
        for t in (5, 900, 70000, 12):
            tk = mx.array([[t]], dtype=mx.int32)
            lg = st(tk, pos) if kern else m.decode_step(tk, pos, c)
            out.append(np.array(lg.astype(mx.float32)).reshape(-1))
            pos = pos + 1
        res.append(np.stack(out))
    P, T = res
    assert np.isfinite(T).all()
    # the generic mlx:gpu float32 path is TF32-grade (parity table); the kernels sum in float32
    assert np.abs(T - P).max() / np.abs(P).max() < (3e-3 if dtype == "float32" else 5e-2)
    assert (T.argmax(1) == P.argmax(1)).all()
