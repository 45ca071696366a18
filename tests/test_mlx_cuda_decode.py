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


# ------------------------------------------------------------------ the one-launch step (mlx_cuda_persist)
def test_persistent_step_declines_where_it_does_not_apply(monkeypatch):
    from workbench.backends import mlx_cuda_persist as mp
    m = wb.load(fixture_dir("gemma3_text"), backend="mlx:cpu")
    assert "not mlx:gpu" in mp.unsupported(m.config, m.ops)
    monkeypatch.setenv("WORKBENCH_MLX_PERSIST", "0")
    assert mp.unsupported(m.config, m.ops) == "WORKBENCH_MLX_PERSIST=0"


def _wide_gemma3(tmp_path, dtype="bfloat16"):
    """The gemma3_text fixture with head_dim 64 and hidden/intermediate sizes the kernels take (a multiple of 32 up
    to 256; multiples of 8): a random checkpoint."""
    import json

    from workbench import make_random
    cfg = json.loads((fixture_dir("gemma3_text") / "config.json").read_text())
    cfg.update(head_dim=64, hidden_size=128, intermediate_size=256)
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    out = tmp_path / "ck"
    make_random.make_random(str(p), out, seed=0, dtype=dtype, progress=False)
    return out


def _nvcc_ok(tmp_path, name: str, src: str) -> None:
    """Compile src for sm_90 with nvcc (skips where the CUDA toolkit is missing); fails with nvcc's messages."""
    import shutil
    import subprocess
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed: the kernel source can't be compiled here")
    f = tmp_path / f"{name}.cu"
    f.write_text(src)
    r = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", str(f), "-o", str(tmp_path / f"{name}.o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _translation_unit(step, tok, pos) -> str:
    """The CUDA source MLX's cuda_kernel builds for this step (its generated signature: a const pointer per input in
    the array's type, a pointer per output), for compiling where there is no GPU."""
    import mlx.core as mx
    ct = {mx.float32: "float", mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.int32: "int32_t",
          mx.int64: "int64_t"}
    head, body = step._source()
    ins = step._inputs(tok, pos)
    names = step._names()
    assert len(ins) == len(names)
    sig = [f"const {ct[a.dtype]}* {n}" for n, a in zip(names, ins)]
    sig += [f"{ct[step.dt]}* logits", f"{ct[step.dt]}* resid", "int32_t* token", "int32_t* seq", "int64_t* stamps"]
    return ('#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cuda/std/limits>\n#include <cstdint>\n'
            + head + "#define ESC_ 1.0f\nnamespace mlx::core::cu {\n__global__ void k(" + ", ".join(sig) + ") {\n"
            + f"  using T_ = {ct[step.dt]};\n" + body + "\n}\n}\n")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_persistent_kernel_source_compiles(tmp_path, dtype):
    """The generated one-launch kernel (every layer's phases and the head) compiles for sm_90 with nvcc — a syntax
    or type error in the source shows here, not first on a GPU."""
    import mlx.core as mx

    from workbench.backends import mlx_cuda_persist as mp
    m = wb.load(_wide_gemma3(tmp_path, dtype), backend="mlx:cpu", dtype=dtype)
    c = m.new_cache(max_len=48)
    m.forward(np.array([[5, 6, 7]]), cache=c, last_only=True)
    c.begin_static()
    st = mp.MLXCudaPersistentStep(m.decode_plan(c), blocks=132)
    st._stamps = dtype == "float32"          # (the profiling variant too)
    _nvcc_ok(tmp_path, "k", _translation_unit(st, mx.array([[5]], dtype=mx.int32), mx.array([3], dtype=mx.int32)))
    # every layer's five phases end in a grid barrier
    assert st._source()[1].count("grid_sync(bar, gen, errf);") == 5 * m.config.num_hidden_layers


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _mlx_cuda(), reason="needs MLX on a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_persistent_step_matches_generic_on_cuda(g270m, dtype):
    """The one-launch step against the generic step, teacher-forced: logits, its own argmax, the cache rows it
    writes in place (read back by the next steps' attention), the per-layer residuals against the five-kernel step."""
    import mlx.core as mx

    from workbench.backends import mlx_cuda_decode as mk
    from workbench.backends import mlx_cuda_persist as mp
    m = wb.load(g270m, backend="mlx:gpu", dtype=dtype)
    assert mp.unsupported(m.config, m.ops) is None
    ids = np.random.default_rng(0).integers(100, 262000, size=(1, 64))
    res, caps, toks, kv = [], [], [], []
    for kind in ("generic", "five", "persist"):
        c = m.new_cache(max_len=96)
        m.forward(ids, cache=c, last_only=True)
        c.begin_static()
        plan = m.decode_plan(c)
        st = {"five": lambda: mk.MLXCudaDecodeStep(plan), "persist": lambda: mp.MLXCudaPersistentStep(plan)}.get(
            kind, lambda: None)()
        pos = mx.array([64], dtype=mx.int32)
        out, cp = [], []
        for t in (5, 900, 70000, 12, 3, 262000):
            tk = mx.array([[t]], dtype=mx.int32)
            cap = []
            lg = m.decode_step(tk, pos, c) if st is None else st(tk, pos, capture=cap)
            out.append(np.array(lg.astype(mx.float32)).reshape(-1))
            if cap:
                cp.append(np.array(mx.stack(cap).astype(mx.float32)))
            if kind == "persist":
                toks.append(int(np.array(st.token)[0]))
            pos = pos + 1
        res.append(np.stack(out))
        caps.append(cp)
        kv.append([np.array(lp.kv.v.astype(mx.float32))[0, :, 64:70] for lp in plan.layers])
    G, F, P = res
    assert np.isfinite(P).all()
    tol = 3e-3 if dtype == "float32" else 5e-2
    assert np.abs(P - G).max() / np.abs(G).max() < tol
    assert (P.argmax(1) == G.argmax(1)).all()
    assert toks == P.argmax(1).tolist()
    for a, b in zip(kv[2], kv[0]):
        assert np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1e-6)
    if dtype == "float32":      # the same roundings as the five-kernel step, float32 sums in another order
        assert max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(caps[2], caps[1])) < 1e-5


def test_five_kernel_sources_compile(tmp_path):
    """The five-kernel step's attention and product kernels (which share the q/k norm + RoPE and the product-output
    device functions with the one-launch step) compile for sm_90 with nvcc: attention in bfloat16 with q/k norms and
    in float32 without, the product as gate/up with the norm prologue and as the soft-capped head."""
    from workbench.backends import mlx_cuda_decode as mk
    for T, qkn in (("__nv_bfloat16", 1), ("float", 0)):
        ins = [f"const {T}* qkv", "const float* qw", "const float* kw", f"const {T}* cs", f"const {T}* sn",
               "const int32_t* pos", f"const {T}* Kc", f"const {T}* Vc", "const int32_t* kpos"]
        outs = [f"{T}* z", f"{T}* knew", f"{T}* vnew"]
        consts = (f"  using T_ = {T};\n  constexpr int H_ = 4, HKV_ = 1, HD_ = 256, G_ = 4, S_ = 96, QKN_ = {qkn}, "
                  "WIN_ = 0;\n")
        src = ('#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cuda/std/limits>\n#include <cstdint>\n'
               + mk._HEADER + "#define EPS_ 1e-6f\n#define CAP_ 0.0f\n#define SCALE_ 0.0625f\n"
               + "namespace mlx::core::cu {\n__global__ void k(" + ", ".join(ins + outs) + ") {\n" + consts
               + mk._ATTN + "\n}\n}\n")
        _nvcc_ok(tmp_path, f"attn_{qkn}", src)
    for T, pair, cap in (("__nv_bfloat16", 1, "0.0f"), ("float", 0, "30.0f")):
        ins = [f"const {T}* R", f"const {T}* Y", f"const {T}* PW", f"const {T}* NW", f"const {T}* W"]
        outs = [f"{T}* out", f"{T}* rout"]
        consts = (f"  using T_ = {T};\n  constexpr int K_ = 640, N_ = 2048, RPW_ = 2, HAS_NORM_ = 1, HAS_Y_ = 1, "
                  f"POST_ = 1, WRITE_R_ = 1, PAIR_ = {pair};\n")
        src = ('#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cuda/std/limits>\n#include <cstdint>\n'
               + mk._HEADER + f"#define EPS_ 1e-6f\n#define CAP_ {cap}\n"
               + "namespace mlx::core::cu {\n__global__ void k(" + ", ".join(ins + outs) + ") {\n" + consts
               + mk._GEMV + "\n}\n}\n")
        _nvcc_ok(tmp_path, f"gemv_{pair}", src)
