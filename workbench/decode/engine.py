"""The one decode engine: ``m.generate``, ``workbench generate``, ``wb.bench`` and parity's fast decode all run
a :class:`DecodeEngine` — the step of its :mod:`route` (Triton kernels in a CUDA graph, MLX's custom CUDA kernels
or the generic static step under mx.compile / torch.compile, the eager static step over the CPU GEMV kernel, MLX's
queued plain step, or the plain forward), with the next token chosen on the device by :mod:`sampler` (greedy or
sampled) and brought to the host a few tokens at a time (chunks of 1, 2, 4 ... 32): no full-vocabulary logits
cross to the host per step, and the host syncs once per chunk.

An engine owns its static cache and keeps what it compiled or captured; :func:`session` keeps a few per model so
repeated calls of ``m.generate`` reuse them (the cache reset in place, the CUDA graph still valid).
"""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np

from . import route as _route
from . import sampler as _sampler

CHUNK_MAX = 32
_KEEP = 3           # engines kept per model


def _chunks(n: int):
    """1, 2, 4, ... CHUNK_MAX, CHUNK_MAX, ... summing to n: the first tokens come back soon (streaming), a stop
    token wastes at most CHUNK_MAX - 1 steps, and long runs sync once per CHUNK_MAX tokens."""
    k = 1
    while n > 0:
        c = min(k, n)
        yield c
        n -= c
        k = min(2 * k, CHUNK_MAX)


class DecodeEngine:
    """Decode steps of one model over one cache, on one route, for one sampling shape (greedy, or sampled with
    a given candidate count and top-p on/off; seed, temperature and top_p values change per call)."""

    def __init__(self, model, cache, sampling: _sampler.Sampling | None = None, route: _route.Route | None = None,
                 compile: bool | None = None):
        self.model, self.cache, self.ops = model, cache, model.ops
        self.fw = self.ops.framework
        self.sampling = sampling or _sampler.Sampling()
        self.vocab = model.config.vocab_size
        self.skey = self.sampling.key(self.vocab)
        self.route = route or _route.pick(model, cache, compile=compile)
        self.compile = self.route.compile
        self.graph = self.route.graph
        self._g = None
        self._fn = None
        self._mlx_prm = None
        self.prepared = False
        self._built = False

    def _build(self):
        """Built at the first :meth:`prepare` (after the prompt is in the cache: the plan holds its buffers)."""
        self._built = True
        if self.route.kind == "plain":
            return
        if self.fw == "torch":
            self._build_torch()
        else:
            self._build_mlx()

    # ------------------------------------------------------------------ construction
    def _build_torch(self):
        import torch
        model, cache, ops = self.model, self.cache, self.ops
        if not cache.static:
            cache.begin_static()
        sw = _route.switches()
        if hasattr(ops, "fused_reductions"):
            ops.fused_reductions = sw.gpu_decode != "cublas"
        greedy = self.sampling.greedy
        self._sample = None
        self._advance = None
        if self.route.kind == "triton":
            from ..backends import triton_decode
            self.plan = model.decode_plan(cache)
            self.kernel = triton_decode.TritonDecodeStep(self.plan)
            why = None if greedy else ("WORKBENCH_TRITON_SAMPLER=0" if not sw.triton_sampler else
                                       triton_decode.TritonSampler.unsupported(self.sampling, self.vocab))
            if not greedy and why is None:      # sampled in the step's own kernels (head epilogue + selection)
                self._sample = triton_decode.TritonSampler(self.sampling, self.vocab, ops.device,
                                                           _sampler.TorchParams(ops.device, self.sampling))
                err = self.kernel.use_sampler(self._sample, check=ops.device.type == "cuda")
                if err:
                    self._sample, why = None, f"it failed here: {err}"
            if self._sample is not None or greedy:
                self._fn = self.kernel.greedy
                self._advance = self.kernel.advance         # the graph's step feeds itself (token and position)
                self.sampler_note = None if greedy else self._sample.note
                return
            self._sample = _sampler.torch_sampler(self.sampling, self.vocab, ops.device, dtype=ops.tdtype)
            self.sampler_note = f"torch, {self._sample.note} (no Triton sampler: {why})"

            def tstep(tok, pos):
                return self._sample(self.kernel(tok, pos), pos)
            self._fn = tstep
            return
        if not greedy:
            self._sample = _sampler.torch_sampler(self.sampling, self.vocab, ops.device, dtype=ops.tdtype)
        self.sampler_note = None if greedy else self._sample.note

        def step(tok, pos):
            lg = model.decode_step(tok, pos, cache)
            return ops.argmax_last(lg) if greedy else lg
        fn = step
        if self.route.kind == "cpu-step":        # kept-quantised GGUF blocks on the CPU: the step in one C call
            from ..backends import cpu_step
            self.plan = model.decode_plan(cache)
            self.kernel = cpu_step.CpuQuantStep(self.plan)
            kfn = self.kernel.greedy if greedy else self.kernel

            def fn(tok, pos):
                if getattr(model, "perturb", None) is not None:     # a test fault: the eager step applies it
                    return step(tok, pos)
                return kfn(tok, pos)
        if self.compile:
            opts = None
            if ops.device.type == "cuda" and __import__("os").environ.get("WORKBENCH_CDT", "0") != "0":
                opts = {"coordinate_descent_tuning": True}      # as gpt-fast: tune each reduction's launch config
            fn = torch.compile(step, fullgraph=True, dynamic=False, options=opts)
        if greedy:
            self._fn = fn
        else:
            def sstep(tok, pos):
                return self._sample(fn(tok, pos), pos)
            self._fn = sstep

    def _build_mlx(self):
        import mlx.core as mx
        model, cache, ops = self.model, self.cache, self.ops
        greedy = self.sampling.greedy
        samp = None if greedy else _sampler.mlx_sampler(self.sampling, self.vocab)
        self._samp = samp
        self._mlx_prm = None if greedy else samp.params(self.sampling)

        def pick(logits, pos, prm):
            if greedy:
                return mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32)
            return samp(logits, pos, prm)
        self._pick = pick
        if self.route.kind == "mlx-queued":
            return
        if not cache.static:
            cache.begin_static()
        kstep = None
        persist = False
        self._kcheck = None
        if self.route.kind == "mlx-cuda":
            from ..backends import mlx_cuda_decode, mlx_cuda_persist
            self.plan = model.decode_plan(cache)
            persist = self.route.name == "mlx-cuda persistent"
            # (the persistent step's launches are ordered by the token each feeds the next: no seq chain)
            kstep = (mlx_cuda_persist.MLXCudaPersistentStep(self.plan, chain=False) if persist
                     else mlx_cuda_decode.MLXCudaDecodeStep(self.plan))
            self._kcheck = kstep.check if persist else None

        def mstep(state, tok, pos, prm):
            # functional: the cache arrays come in and go out, so mx.compile can fuse the whole step (the
            # persistent kernel writes them in place and hands the same arrays back)
            cache.set_static_state(state)
            logits = kstep(tok, pos) if kstep is not None else model.decode_step(tok, pos, cache)
            if persist and greedy:                 # the kernel's own argmax (first on ties, as mx.argmax)
                return kstep.token.reshape(1, 1), pos + 1, cache.static_state()
            return pick(logits, pos, prm), pos + 1, cache.static_state()
        self._fn = mx.compile(mstep) if self.compile else mstep

    def set_sampling(self, s: _sampler.Sampling):
        if s.key(self.vocab) != self.skey:
            raise ValueError("this engine was built for another sampling shape")
        self.sampling = s
        if self.fw == "torch" and getattr(self, "_sample", None) is not None:
            self._sample.set(s)
        if self.fw == "mlx" and getattr(self, "_samp", None) is not None:
            self._mlx_prm = self._samp.params(s)

    # ------------------------------------------------------------------ torch CUDA graph
    def _capture(self, tok, pos):
        """Record one step (with the input update) into a CUDA graph; warm-up runs on a side stream write the
        same token at the same slot, so they leave the cache as the first real step will."""
        import torch
        self._tok = tok.clone()
        self._pos = pos.clone()
        fn = self._fn

        def body():
            if self._advance is not None:
                return self._advance(self._tok, self._pos)
            nxt = fn(self._tok, self._pos)
            self._tok.copy_(nxt)
            self._pos.add_(1)
            return nxt

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn(self._tok, self._pos)
                if self._advance is not None:      # its kernels built too, on copies it may move on
                    self._advance(self._tok.clone(), self._pos.clone())
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._out = body()
        self._g = g

    def prepare(self, first_token: int):
        """Compile / capture before timing (the cache must hold the prompt). Returns the seconds it took."""
        t0 = time.perf_counter()
        if self.route.kind == "plain":
            return 0.0
        if not self._built:
            self._build()
        if self.fw == "torch":
            if not self.cache.static:
                self.cache.begin_static()
            if self.graph and self._g is None:
                import torch
                tok = torch.tensor([[first_token]], dtype=torch.long, device=self.ops.device)
                pos = torch.tensor([self.cache.offset], dtype=torch.long, device=self.ops.device)
                self._capture(tok, pos)
                self.ops.synchronize()
        elif self.route.kind != "mlx-queued" and not self.cache.static:
            self.cache.begin_static()
        self.prepared = True
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ running
    def chunks(self, first_token: int, n: int):
        """Yield lists of the n tokens after ``first_token`` (whose position is ``cache.offset``), a chunk at a
        time; the caller may stop early (a stop token) — the cache then holds a few positions more."""
        start = self.cache.offset
        if start + n > self.cache.max_len:
            raise ValueError(f"{n} decode steps from position {start} overflow the cache ({self.cache.max_len})")
        k = self.route.kind
        if not self.prepared:
            self.prepare(first_token)
        if k == "plain":
            yield from self._chunks_plain(first_token, n)
        elif self.fw == "torch":
            yield from self._chunks_torch(first_token, n)
        elif k == "mlx-queued":
            yield from self._chunks_mlx_queued(first_token, n)
        else:
            yield from self._chunks_mlx_compiled(first_token, n)

    def run(self, first_token: int, n: int) -> list[int]:
        out: list[int] = []
        for c in self.chunks(first_token, n):
            out += c
        return out

    def _chunks_plain(self, tok, n):
        m, s = self.model, self.sampling
        for _ in range(n):
            pos = self.cache.offset + 1
            lg = m.forward(np.asarray([[tok]]), cache=self.cache, last_only=True).logits
            tok = _sampler.sample_np(lg[0, -1], s, pos)
            yield [tok]

    def _chunks_torch(self, first, n):
        import torch
        ops, cache = self.ops, self.cache
        if not cache.static:
            cache.begin_static()
        start = cache.offset
        tok = torch.tensor([[first]], dtype=torch.long, device=ops.device)
        pos = torch.tensor([start], dtype=torch.long, device=ops.device)
        done = 0
        if self.graph:
            if self._g is None:
                self._capture(tok, pos)
            else:
                self._tok.copy_(tok)
                self._pos.copy_(pos)
            outs = torch.empty((CHUNK_MAX,), dtype=torch.long, device=ops.device)
            for c in _chunks(n):
                for j in range(c):
                    self._g.replay()
                    outs[j:j + 1].copy_(self._out.reshape(-1))
                done += c
                cache.offset = start + done
                yield outs[:c].tolist()                     # the host sync of this chunk
            return
        one = torch.ones_like(pos)
        nt = self.route.torch_threads
        for c in _chunks(n):
            got = []
            keep = torch.get_num_threads()
            if nt:
                torch.set_num_threads(nt)       # the route's choice for its step (the CPU route of kept-quantised weights)
            try:
                for _ in range(c):
                    tok = self._fn(tok, pos).reshape(1, 1)
                    got.append(tok.clone())                 # the Triton step returns the same buffer every time
                    pos = pos + one
            finally:
                if nt:
                    torch.set_num_threads(keep)
            done += c
            cache.offset = start + done
            yield torch.cat(got, dim=1)[0].tolist()

    def _chunks_mlx_compiled(self, first, n):
        import mlx.core as mx
        cache, ops = self.cache, self.ops
        if not cache.static:
            cache.begin_static()
        start = cache.offset
        tok = mx.array([[first]], dtype=mx.int32)
        pos = mx.array([start], dtype=mx.int32)
        state = cache.static_state()
        done = 0
        with ops.traceable():
            for c in _chunks(n):
                got = []
                for _ in range(c):
                    tok, pos, state = self._fn(state, tok, pos, self._mlx_prm)
                    mx.async_eval(tok, state)
                    got.append(tok)
                cache.set_static_state(state)
                done += c
                cache.offset = start + done
                toks = [int(t.item()) for t in got]
                if self._kcheck is not None:
                    self._kcheck()             # the one-launch step's barrier flag: raise, never a silent hang
                yield toks

    def _chunks_mlx_queued(self, first, n):
        # as mlx-lm does it: the plain cached step (mx.fast.rope at an int offset, in-place slice writes), the
        # token picked on the device, and the next step's graph built while this one runs (mx.async_eval)
        import mlx.core as mx
        m, cache = self.model, self.cache
        tok = mx.array([[first]], dtype=mx.int32)
        for c in _chunks(n):
            got = []
            for _ in range(c):
                pos = mx.array([cache.offset], dtype=mx.int32)
                logits = m.cached_step(tok, cache)
                tok = self._pick(logits, pos, self._mlx_prm)
                mx.async_eval(tok)
                got.append(tok)
            yield [int(t.item()) for t in got]


def _bucket(n: int, ctx: int) -> int:
    b = 256
    while b < n:
        b *= 2
    return max(n, min(b, ctx))


def session(model, need: int, sampling: _sampler.Sampling, compile: bool | None = None) -> DecodeEngine:
    """An engine (and its cache, reset) for ``need`` positions with this sampling shape — reused from earlier
    calls on this model when one fits (so what it compiled or captured is kept)."""
    store = model.__dict__.setdefault("_decode_engines", OrderedDict())
    sw = _route.switches()
    ctx = model.config.max_position_embeddings
    key_base = (sw, compile, sampling.key(model.config.vocab_size))
    for key, eng in store.items():
        if key[:3] == key_base and eng.cache.max_len >= need:
            store.move_to_end(key)
            eng.cache.reset()
            eng.set_sampling(sampling)
            return eng
    cache = model.new_cache(batch=1, max_len=_bucket(need, ctx))
    eng = DecodeEngine(model, cache, sampling, route=_route.pick(model, cache, compile=compile, sw=sw))
    store[key_base + (cache.max_len,)] = eng
    while len(store) > _KEEP:
        store.popitem(last=False)
    return eng
