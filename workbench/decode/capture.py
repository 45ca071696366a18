"""Parity of the fast route: teacher-forced decode through the route's own step with a capture mode.

``capture_decode(model, ids_arr, P, taps)`` prefills ``ids_arr[:, :P]`` into a cache, then feeds positions
P..T-1 one token per step through the FAST route — the Triton kernels (their residual buffers copied into a
preallocated [steps, L, D] buffer as the next kernel writes them), MLX's custom CUDA kernels (their residual
outputs), the fused C step of kept-quantised GGUF blocks (each layer's residual copied into such a buffer), or the
generic static step / MLX's queued step (tap points) — and returns what it captured:
``{"blocks.{i}.hook_resid_post": [B, steps, D], ..., "logits": [B, steps, V]}`` and the route's name.
"""
from __future__ import annotations

import contextlib
import fnmatch

import numpy as np

from . import route as _route

RESID = "blocks.{}.hook_resid_post"


def _wanted(taps, names):
    pats = list(taps or [])
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


def capture_decode(model, ids_arr, P: int, taps=None, plan_fault=None, route=None):
    """(captured taps, route name). ``taps``: patterns; the kernel routes capture ``blocks.*.hook_resid_post``
    and ``logits``, the generic ones any tap point. ``plan_fault``: test-only ``fn(plan) -> plan`` (e.g.
    ``lambda p: p.scale_weight(2, "o", 1.05)``) applied to the plan the step reads."""
    from ..model.taps import Points
    ids_arr = np.asarray(ids_arr, dtype=np.int64)
    if ids_arr.ndim == 1:
        ids_arr = ids_arr[None]
    B, T = ids_arr.shape
    if not 0 < P < T:
        raise ValueError(f"capture_decode: P={P} must be in 1..{T - 1} (prefill P tokens, decode the rest)")
    cfg, ops = model.config, model.ops
    taps = list(taps or [RESID.format("*"), "logits"])
    names = model.tap_names()
    want = _wanted(taps, names)
    cache = model.new_cache(batch=B, max_len=T)
    model.forward(ids_arr[:, :P], cache=cache)
    rt = route or _route.pick(model, cache)
    steps = T - P
    # a test fault (model.perturb) reaches only the generic steps: the C step of kept-quantised blocks hands over
    kernel = rt.kind in ("triton", "mlx-cuda") or (rt.kind == "cpu-step" and getattr(model, "perturb", None) is None)
    if kernel:
        got = _capture_kernels(model, cache, ids_arr, P, rt, plan_fault)
        out = {n: got[n] for n in want if n in got}
        return out, rt.name
    # generic routes: the route's own step, uncompiled (same ops), with tap points
    plan = None
    if rt.kind in ("static", "compiled", "cpu-step"):
        plan = model.decode_plan(cache)
    elif rt.kind == "mlx-queued" and plan_fault is not None:
        plan = model.decode_plan(cache)      # the queued step reads only the plan's weights ...
        cache.end_static(P)                  # ... over the plain cache
    elif plan_fault is not None:
        raise ValueError("the plain route reads no plan: a plan fault needs a fast route")
    if plan is not None and plan_fault is not None:
        plan = plan_fault(plan)
    per: dict[str, list] = {n: [] for n in want if n != "logits"}
    logits = []
    for t in range(P, T):
        pts = Points(cfg, [n for n in want if n != "logits"], None)
        tok = ids_arr[:, t:t + 1]
        if rt.kind in ("static", "compiled", "cpu-step"):
            lg = model.decode_step(ops.asids(tok), ops.asids(np.asarray([t])), cache,
                                   plan=plan if plan_fault is not None else None, pts=pts)
            lg = ops.numpy(lg)[:, None]
        elif rt.kind == "mlx-queued":
            ctx = model.plan_weights(plan) if plan is not None else contextlib.nullcontext()
            with ctx:
                lg = ops.numpy(model.cached_step(ops.asids(tok), cache, pts=pts))[:, None]
        else:
            o = model.forward(tok, taps=[n for n in want if n != "logits"] or None, cache=cache, last_only=True)
            pts.values.update(o.taps)
            lg = o.logits
        logits.append(np.asarray(lg, dtype=np.float64 if lg.dtype == np.float64 else np.float32))
        for n in per:
            if n in pts.values:          # a fused step visits the points it has (no hook_embed, say)
                per[n].append(pts.values[n])
    out = {n: np.concatenate(v, axis=1) for n, v in per.items() if len(v) == steps}
    if "logits" in want:
        out["logits"] = np.concatenate(logits, axis=1)
    return out, rt.name


def _capture_kernels(model, cache, ids_arr, P, rt, plan_fault):
    cfg, ops = model.config, model.ops
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    T = ids_arr.shape[1]
    plan = model.decode_plan(cache)
    if plan_fault is not None:
        plan = plan_fault(plan)
    if rt.kind == "cpu-step":      # kept-quantised GGUF blocks on the CPU: the residuals the C step copies out
        import torch
        from ..backends import cpu_step
        step = cpu_step.CpuQuantStep(plan)
        r = np.empty((T - P, L, D), np.float32)
        lg = np.empty((T - P, cfg.vocab_size), np.float32)
        for j, t in enumerate(range(P, T)):
            tok = torch.tensor(ids_arr[:, t:t + 1], dtype=torch.long)
            lg[j] = step(tok, torch.tensor([t], dtype=torch.long), capture=r[j]).numpy().reshape(-1)
    elif rt.kind == "triton":
        import torch
        from ..backends import triton_decode
        step = triton_decode.TritonDecodeStep(plan)
        buf = torch.empty((T - P, L, D), dtype=ops.tdtype, device=ops.device)     # preallocated
        lbuf = torch.empty((T - P, cfg.vocab_size), dtype=ops.tdtype, device=ops.device)
        for j, t in enumerate(range(P, T)):
            tok = torch.tensor(ids_arr[:, t:t + 1], dtype=torch.long, device=ops.device)
            pos = torch.tensor([t], dtype=torch.long, device=ops.device)
            lbuf[j].copy_(step(tok, pos, capture=buf[j]).reshape(-1))
        r = ops.numpy(buf)                       # [steps, L, D]
        lg = ops.numpy(lbuf)
    else:
        import mlx.core as mx
        from ..backends import mlx_cuda_decode, mlx_cuda_persist
        step = (mlx_cuda_persist.MLXCudaPersistentStep(plan) if rt.name == "mlx-cuda persistent"
                else mlx_cuda_decode.MLXCudaDecodeStep(plan))
        rs, ls = [], []
        for t in range(P, T):
            cap: list = []
            lg = step(mx.array(ids_arr[:, t:t + 1].astype(np.int32)), mx.array([t], dtype=mx.int32), capture=cap)
            rs.append(mx.stack(cap))
            ls.append(lg.reshape(-1))
        r = ops.numpy(mx.stack(rs))
        lg = ops.numpy(mx.stack(ls))
    out = {RESID.format(i): r[None, :, i, :].astype(np.float32) for i in range(L)}
    out["logits"] = lg[None].astype(np.float32)
    return out
