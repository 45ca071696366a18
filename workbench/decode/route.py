"""Which decode route runs, picked once per engine from the backend, the model and the switches — the only
module that reads them:

* ``WORKBENCH_DECODE``      ``fast`` (default) | ``plain`` (one ``model.forward`` per token, the reference path);
* ``WORKBENCH_GPU_DECODE``  torch: ``triton`` (default on CUDA; on the CPU only with TRITON_INTERPRET=1, tests),
                            ``fused`` (inductor step with fused reductions), ``cublas`` (inductor, cuBLAS products);
* ``WORKBENCH_TRITON_SAMPLER`` ``1`` (default): the Triton step samples in its own kernels (head epilogue + one
                            selection kernel), ``0``: the torch sampler (torch.topk, compiled) on its logits;
* ``WORKBENCH_MLX_COMPILE`` ``1`` (default on the GPU) compiles the MLX step with mx.compile, ``0`` queues plain steps;
* ``WORKBENCH_MLX_KERNELS`` ``1`` (default) the custom CUDA kernels where MLX runs on CUDA, ``0`` the generic step;
* ``WORKBENCH_CPU_GEMV``    ``auto`` | ``kernel`` | ``blas`` | ``off``: the products behind the CPU ops
                            (read by :mod:`workbench.backends.cpu_gemv`, reported here);
* ``WORKBENCH_CPU_STEP``    ``1`` (default): GGUF blocks kept quantised decode in one C call per step
                            (:mod:`workbench.backends.cpu_step`), ``0``: the eager static step over the same kernels.

Routes: ``triton step`` (torch: the Triton kernels of :mod:`workbench.backends.triton_decode`, in a CUDA graph),
``mlx-cuda persistent`` (one CUDA kernel a token: :mod:`workbench.backends.mlx_cuda_persist`, under mx.compile; off with
``WORKBENCH_MLX_PERSIST=0``), ``mlx-cuda kernels`` (five a layer: :mod:`workbench.backends.mlx_cuda_decode`, where the
persistent step declines), ``cpu quant step`` (kept-quantised
GGUF blocks on torch:cpu: :mod:`workbench.backends.cpu_step`, the whole step in one C call), ``compiled`` (the generic
static step under torch.compile + CUDA graph or mx.compile — Gemma 4 and whatever the kernels decline), ``cpu gemv`` /
``static`` (the eager static step; on the CPU its products run the C GEMV kernel), ``mlx queued`` (MLX's plain
cached step, the next queued while one runs), ``plain``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    kind: str            # triton | mlx-cuda | cpu-step | compiled | static | mlx-queued | plain
    name: str            # what reports show
    reason: str          # why this route (and why not a faster one)
    compile: bool = False
    graph: bool = False  # torch: the step replayed from a CUDA graph
    torch_threads: int | None = None   # torch's intra-op threads while stepping (None: leave them)

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


@dataclass(frozen=True)
class Switches:
    decode: str
    gpu_decode: str | None
    mlx_compile: bool
    mlx_kernels: bool
    cpu_gemv: str
    triton_interpret: bool
    triton_sampler: bool = True
    cpu_step: bool = True


def switches() -> Switches:
    """The environment switches, read now (an engine reads them once, when it is built)."""
    env = os.environ
    dec = env.get("WORKBENCH_DECODE", "fast").strip().lower() or "fast"
    if dec not in ("fast", "plain"):
        raise ValueError(f"WORKBENCH_DECODE={dec!r}: expected fast or plain")
    gd = env.get("WORKBENCH_GPU_DECODE", "").strip().lower() or None
    if gd is not None and gd not in ("triton", "fused", "cublas"):
        raise ValueError(f"WORKBENCH_GPU_DECODE={gd!r}: expected triton, fused or cublas")
    from ..backends import cpu_gemv
    return Switches(decode=dec, gpu_decode=gd, mlx_compile=env.get("WORKBENCH_MLX_COMPILE", "1") != "0",
                    mlx_kernels=env.get("WORKBENCH_MLX_KERNELS", "1") != "0", cpu_gemv=cpu_gemv.mode(),
                    triton_interpret=env.get("TRITON_INTERPRET", "0") == "1",
                    triton_sampler=env.get("WORKBENCH_TRITON_SAMPLER", "1") != "0",
                    cpu_step=env.get("WORKBENCH_CPU_STEP", "1") != "0")


def pick(model, cache=None, compile: bool | None = None, sw: Switches | None = None) -> Route:
    """The route for this model (and cache) on its backend. ``compile`` forces the generic step compiled or not
    (bench's option); None: the default for the backend."""
    sw = sw or switches()
    ops = model.ops
    spec = ops.spec
    fw, dev = spec.framework, spec.device
    if sw.decode == "plain":
        return Route("plain", "plain", "WORKBENCH_DECODE=plain: one model.forward per token")
    if fw == "torch":
        on_cuda = dev == "cuda"
        want = sw.gpu_decode or ("triton" if on_cuda else None)
        why_not = None
        if want == "triton":
            from ..backends import triton_decode
            why_not = triton_decode.unsupported(model.config, model.ops, cache)
            if why_not is None:
                return Route("triton", "triton step", "Triton kernels, 5 per layer" +
                             (", in a CUDA graph" if on_cuda else ", Triton interpreter (TRITON_INTERPRET=1)"),
                             compile=False, graph=on_cuda)
        do_compile = on_cuda if compile is None else bool(compile)
        if do_compile:
            prods = "cuBLAS products" if sw.gpu_decode == "cublas" else "fused reductions"
            why = f"torch.compile of the generic static step ({prods})" if on_cuda else \
                "torch.compile (inductor) of the generic static step"
            if why_not:
                why += f"; no Triton step: {why_not}"
            return Route("compiled", "compiled", why, compile=True, graph=on_cuda)
        if getattr(ops, "quant", None) and dev == "cpu":
            # GGUF blocks kept quantised (backends/quant.py): the whole step in one C call (backends/cpu_step.py),
            # else the eager static step with products on the kernel's own thread pool; torch's small per-step
            # ops on one thread (two spinning pools on a shared 2-core box cost 5x, measured)
            from ..backends import cpu_step, quant as _quant
            why_not = "WORKBENCH_CPU_STEP=0" if not sw.cpu_step else cpu_step.unsupported(model.config, ops, cache)
            if why_not is None:
                return Route("cpu-step", "cpu quant step", "the whole step in one C call (norms, RoPE, attention, "
                             f"cache writes, products, head, argmax), products: {_quant.describe(ops.quant_act8)}",
                             graph=False, torch_threads=1)
            return Route("static", "cpu gemv", f"eager static step, products: {_quant.describe(ops.quant_act8)}; "
                         f"torch ops on 1 thread; no fused step: {why_not}", graph=False, torch_threads=1)
        if dev == "cpu" and sw.cpu_gemv != "off":
            from ..backends import cpu_gemv
            return Route("static", "cpu gemv", f"eager static step, products: {cpu_gemv.describe(ops.dtype)}"
                         + (f"; no Triton step: {why_not}" if why_not else ""), graph=False)
        return Route("static", "static", f"eager static step on {dev}" +
                     (f"; no Triton step: {why_not}" if why_not else ""), graph=on_cuda)
    # mlx
    do_compile = (dev == "gpu" and sw.mlx_compile) if compile is None else bool(compile)
    if do_compile:
        if sw.mlx_kernels:
            from ..backends import mlx_cuda_decode
            why_not = mlx_cuda_decode.unsupported(model.config, model.ops, cache)
            if why_not is None:
                from ..backends import mlx_cuda_persist
                why_p = mlx_cuda_persist.unsupported(model.config, model.ops, cache)
                if why_p is None:
                    return Route("mlx-cuda", "mlx-cuda persistent",
                                 f"one persistent CUDA kernel a token ({mlx_cuda_persist.sm_count()} blocks, grid "
                                 "barriers between a layer's phases) under mx.compile", compile=True)
                return Route("mlx-cuda", "mlx-cuda kernels", "custom CUDA kernels (5 per layer) under mx.compile; "
                             f"no persistent step: {why_p}", compile=True)
        else:
            why_not = "WORKBENCH_MLX_KERNELS=0"
        return Route("compiled", "compiled", f"mx.compile of the generic static step; no custom kernels: {why_not}",
                     compile=True)
    why = "WORKBENCH_MLX_COMPILE=0" if dev == "gpu" else "mlx:cpu (compiling does not pay on the CPU)"
    prods = ""
    if dev == "cpu" and sw.cpu_gemv != "off":
        from ..backends import cpu_gemv
        prods = f", products: {cpu_gemv.describe(ops.dtype)}"
    return Route("mlx-queued", "cpu gemv" if prods else "mlx queued",
                 f"plain cached step, the next queued while one runs ({why}){prods}")
