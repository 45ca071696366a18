"""Generation: chunked prefill into a KV cache, then one decode step per token.

Greedy (temperature 0) is deterministic; sampling uses temperature, top-k and top-p with a seeded
generator. ``stream=True`` yields text pieces as they are produced.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .model.gemma import InputError


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stats: dict = field(default_factory=dict)
    stopped_by: str = "length"

    def __str__(self) -> str:
        return self.text


def sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
           rng: np.random.Generator) -> int:
    """One token id from last-position logits [V] (float32/64)."""
    if not np.isfinite(logits).any():
        raise FloatingPointError("logits are all NaN/inf: the model diverged (try float32 or bfloat16)")
    if temperature is None or temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        cut = np.searchsorted(cum, top_p) + 1
        keep = order[:cut]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


def prompt_ids(model, prompt, chat: bool = False) -> list[int]:
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise InputError("a text prompt needs a tokenizer; this checkpoint has none — pass token ids")
        if not prompt:
            raise InputError("empty prompt: give at least one character or token id")
        if chat:
            return list(model.tokenizer.encode_chat([{"role": "user", "content": prompt}]))
        return list(model.tokenizer.encode(prompt))
    ids = np.asarray(prompt).reshape(-1).tolist()
    if not ids:
        raise InputError("empty prompt: at least one token id is needed")
    return [int(i) for i in ids]


def _check_max_new_tokens(n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"max_new_tokens must be a whole number >= 0 (how many tokens to generate), got {n!r}")


def _stop_ids(model, stop) -> set[int]:
    out: set[int] = set()
    tok = model.tokenizer
    if tok is not None:
        out |= set(getattr(tok, "stop_ids", []) or [])
    eos = model.config.eos_token_id
    if isinstance(eos, int):
        out.add(eos)
    elif isinstance(eos, list):
        out |= set(eos)
    for s in stop or []:
        if isinstance(s, int):
            out.add(s)
    return out


def generate_iter(model, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = 0, stop=None, chat: bool = False,
                  ignore_eos: bool = False, prefill_chunk: int = 512, max_len: int | None = None,
                  stats: dict | None = None) -> Iterator[int]:
    """Yield generated token ids one by one; fills ``stats`` (timings) as it goes."""
    _check_max_new_tokens(max_new_tokens)
    ids = prompt_ids(model, prompt, chat)
    model.check_ids(ids)
    ctx = model.config.max_position_embeddings
    need = len(ids) + max_new_tokens
    if len(ids) >= ctx:
        raise InputError(f"prompt of {len(ids)} tokens does not fit the model's context of {ctx} tokens")
    max_len = min(max_len or need, ctx)
    cache = model.new_cache(batch=1, max_len=max_len)
    stops = set() if ignore_eos else _stop_ids(model, stop)
    rng = np.random.default_rng(seed)
    st = stats if stats is not None else {}
    ops = model.ops
    t0 = time.perf_counter()
    logits = None
    for a in range(0, len(ids), prefill_chunk):
        chunk = ids[a:a + prefill_chunk]
        logits = model.forward(np.asarray(chunk)[None], cache=cache, last_only=True).logits
    ops.synchronize()
    t1 = time.perf_counter()
    st.update(prompt_tokens=len(ids), prefill_s=t1 - t0, ttft_s=t1 - t0,
              prompt_tok_s=len(ids) / max(t1 - t0, 1e-9))
    n = 0
    t_dec = time.perf_counter()
    while n < max_new_tokens:
        tok = sample(logits[0, -1], temperature, top_k, top_p, rng)
        if tok in stops:            # EOS / end_of_turn: not part of the continuation
            st["stopped_by"] = "eos"
            break
        n += 1
        st["generated_tokens"] = n
        yield tok
        if n >= max_new_tokens or cache.offset >= max_len:
            if cache.offset >= max_len and n < max_new_tokens:
                st["stopped_by"] = "context"
            break
        logits = model.forward(np.asarray([[tok]]), cache=cache, last_only=True).logits
    ops.synchronize()
    t2 = time.perf_counter()
    steps = max(n - 1, 0)
    st.update(decode_s=t2 - t_dec, gen_tok_s=(steps / (t2 - t_dec)) if steps and t2 > t_dec else float("nan"),
              peak_memory=ops.peak_memory() if hasattr(ops, "peak_memory") else None)
    st.setdefault("stopped_by", "length")


def generate(model, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = 0, stop=None, stream: bool = False, chat: bool = False,
             ignore_eos: bool = False, **kw):
    """``m.generate``: a Generation, or with ``stream=True`` an iterator of text pieces."""
    _check_max_new_tokens(max_new_tokens)
    stop_strings = [s for s in (stop or []) if isinstance(s, str)]
    if stream:
        return _stream(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat, ignore_eos,
                       stop_strings, kw)
    stats: dict = {}
    out: list[int] = []
    text = ""
    for tok in generate_iter(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat,
                             ignore_eos, stats=stats, **kw):
        out.append(tok)
        if stop_strings and model.tokenizer is not None:
            text = model.tokenizer.decode(out)
            hit = [s for s in stop_strings if s in text]
            if hit:
                text = text[:text.index(hit[0])]
                stats["stopped_by"] = "stop"
                break
    if model.tokenizer is not None and stats.get("stopped_by") != "stop":
        text = model.tokenizer.decode(out)
    return Generation(text=text, token_ids=out, prompt_ids=prompt_ids(model, prompt, chat), stats=stats,
                      stopped_by=stats.get("stopped_by", "length"))


def _stream(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat, ignore_eos, stop_strings,
            kw):
    stats: dict = {}
    tokens = generate_iter(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat, ignore_eos,
                           stats=stats, **kw)
    return stream_pieces(model, tokens, stats, stop_strings)


def stream_pieces(model, tokens, stats: dict, stop_strings):
    """Text pieces from a token iterator: waits out incomplete UTF-8 sequences, cuts at a stop string, and
    leaves the run's stats on ``model.last_stats``. Shared by text and multimodal streaming."""
    tok = model.tokenizer
    out: list[int] = []
    shown = ""
    for t in tokens:
        if tok is None:
            yield str(t)
            continue
        out.append(t)
        text = tok.decode(out)
        if text.endswith("\ufffd"):      # an incomplete UTF-8 sequence: wait for the next token
            continue
        for s in stop_strings:
            if s in text:
                text = text[:text.index(s)]
                if len(text) > len(shown):
                    yield text[len(shown):]
                model.last_stats = stats
                return
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    model.last_stats = stats


# ----------------------------------------------------------------------------------------------- fast path
def default_compile(spec) -> bool:
    """Whether the fast path compiles its step by default: torch on CUDA (inductor + CUDA graph) and MLX on
    the GPU (mx.compile; WORKBENCH_MLX_COMPILE=0 keeps the queued plain steps)."""
    if spec.framework == "torch":
        return spec.device == "cuda"
    return spec.device == "gpu" and os.environ.get("WORKBENCH_MLX_COMPILE", "1") != "0"


def _triton_step(model, cache, on_cuda: bool):
    """The Triton decode step where it applies: torch on CUDA unless WORKBENCH_GPU_DECODE says otherwise
    (``fused``: the inductor step with fused reductions, ``cublas``: with cuBLAS products), and on the CPU
    through Triton's interpreter when WORKBENCH_GPU_DECODE=triton and TRITON_INTERPRET=1 (tests)."""
    mode = os.environ.get("WORKBENCH_GPU_DECODE", "triton" if on_cuda else "").lower()
    if mode != "triton":
        return None
    from .backends import triton_decode
    return triton_decode.make_step(model, cache)


class FastDecoder:
    """Greedy decode through the static cache with the position on the device and no host sync per
    token.

    torch on CUDA: the step (inductor-compiled unless ``compile=False``) is captured once into a CUDA graph
    that also advances the position and feeds its argmax back as the next input, so each token is one
    ``graph.replay()``. torch on CPU: the eager static step (``compile=True`` uses inductor). MLX: the static
    step compiled with mx.compile (default on the GPU, see :func:`default_compile`; otherwise the plain cached
    step), the next step queued (mx.async_eval) while the current one runs. ``run(first_token, n)`` returns
    the n tokens after ``first_token``."""

    def __init__(self, model, cache, compile: bool | None = None, graph: bool | None = None):
        self.model = model
        self.cache = cache
        self.ops = model.ops
        self.fw = model.ops.framework
        dev = getattr(self.ops.spec, "device", "cpu")
        on_cuda = self.fw == "torch" and dev == "cuda"
        self.compile = bool(compile if compile is not None else default_compile(self.ops.spec))
        self.graph = bool(graph if graph is not None else on_cuda)
        self._fn = None
        self._advance = None
        self._g = None
        self.route = None           # which decode kernels run (bench prints it)
        if self.fw == "mlx" and self.compile:
            import mlx.core as mx
            from .backends import mlx_cuda_decode
            cstep = mlx_cuda_decode.make_step(model, cache)     # custom CUDA kernels where MLX runs on CUDA
            self.route = "mx.compile, custom CUDA kernels (5/layer)" if cstep is not None else "mx.compile"

            def mstep(state, tok, pos):
                # functional: the cache arrays come in and go out, so mx.compile can fuse the whole step
                cache.set_static_state(state)
                logits = cstep(tok, pos) if cstep is not None else model.decode_step(tok, pos, cache)
                nxt = mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32)
                return nxt, pos + 1, cache.static_state()
            self._fn = mx.compile(mstep)
        tstep = None
        if self.fw == "torch":
            tstep = _triton_step(model, cache, on_cuda)
        if tstep is not None:
            # the step as Triton kernels (five per layer, see backends/triton_decode); nothing to compile
            self.route = "triton step (5 kernels/layer)"
            self.compile = False
            self._fn = tstep.greedy
            self._advance = tstep.advance       # the graph's step feeds itself (token and position)
        elif self.fw == "torch":
            def step(tok, pos):
                return model.ops.argmax_last(model.decode_step(tok, pos, cache))
            self._fn = step
            if on_cuda:
                self.route = ("inductor, cuBLAS products" if os.environ.get("WORKBENCH_GPU_DECODE", "").lower()
                              == "cublas" else "inductor, fused reductions") if self.compile else "eager"
            if self.compile:
                import torch
                opts = None
                if on_cuda and os.environ.get("WORKBENCH_CDT", "0") != "0":
                    # as gpt-fast does: tune each reduction's launch config (the decode GEMVs are reductions)
                    opts = {"coordinate_descent_tuning": True}
                self._fn = torch.compile(step, fullgraph=True, dynamic=False, options=opts)

    def _capture(self, tok, pos):
        """Record one step (with the input update) into a CUDA graph; warm-up runs on a side stream write
        the same token at the same slot, so they leave the cache as the first real step will."""
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
        """Compile and capture before timing (torch CUDA graph); the cache must hold the prompt."""
        if self.fw == "torch" and not self.cache.static:
            self.cache.begin_static()
        if self.fw == "torch" and self.graph and self._g is None:
            import torch
            tok = torch.tensor([[first_token]], dtype=torch.long, device=self.ops.device)
            pos = torch.tensor([self.cache.offset], dtype=torch.long, device=self.ops.device)
            self._capture(tok, pos)

    def run(self, first_token: int, n: int) -> list[int]:
        ops = self.ops
        if self.fw == "torch" and not self.cache.static:
            self.cache.begin_static()
        start = self.cache.offset
        if start + n > self.cache.max_len:
            raise ValueError(f"{n} decode steps from position {start} overflow the cache ({self.cache.max_len})")
        if self.fw == "torch":
            import torch
            tok = torch.tensor([[first_token]], dtype=torch.long, device=ops.device)
            pos = torch.tensor([start], dtype=torch.long, device=ops.device)
            if self.graph:
                if self._g is None:
                    self._capture(tok, pos)
                else:
                    self._tok.copy_(tok)
                    self._pos.copy_(pos)
                outs = torch.empty((n,), dtype=torch.long, device=ops.device)
                for j in range(n):
                    self._g.replay()
                    outs[j:j + 1].copy_(self._out[0])
                res = outs.tolist()                             # the only host sync
            else:
                one = torch.ones_like(pos)
                outs = []
                for _ in range(n):
                    tok = self._fn(tok, pos)
                    outs.append(tok.clone())     # the Triton step returns the same buffer every time
                    pos = pos + one
                res = torch.cat(outs, dim=1)[0].tolist()      # the only host sync
        elif self.compile:
            # MLX, compiled: the static step (device-side position, cache arrays threaded through) traced once
            # by mx.compile; each step queued while the previous one runs
            import mlx.core as mx
            if not self.cache.static:
                self.cache.begin_static()
            tok = mx.array([[first_token]], dtype=mx.int32)
            pos = mx.array([start], dtype=mx.int32)
            state = self.cache.static_state()
            outs = []
            gemv, ops._cpu_gemv = getattr(ops, "_cpu_gemv", False), False   # numpy can't run inside a trace
            try:
                for _ in range(n):
                    tok, pos, state = self._fn(state, tok, pos)
                    mx.async_eval(tok, state)
                    outs.append(tok)
            finally:
                ops._cpu_gemv = gemv
            self.cache.set_static_state(state)
            res = [int(t.item()) for t in outs]
        else:
            # MLX, as mlx-lm does it: the plain cached step (mx.fast.rope at an int offset, in-place slice
            # writes, no mask once the window is full), argmax on the device, and the next step's graph built
            # while this one runs (mx.async_eval) — no host sync until the end.
            import mlx.core as mx
            from .model.gemma import _NO_POINTS
            m, ops_ = self.model, self.ops
            emb = m.w["embed_tokens.weight"]
            tok = mx.array([[first_token]], dtype=mx.int32)
            outs = []
            for j in range(n):
                x = ops_.scale(ops_.take_rows(emb, tok), m.config.embed_scale)
                logits = m._forward_embeds(x, tok, _NO_POINTS, self.cache, start + j, True)
                self.cache.offset = start + j + 1
                tok = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
                mx.async_eval(tok)                          # queue this step; build the next meanwhile
                outs.append(tok)
            res = [int(t.item()) for t in outs]
        self.cache.offset = start + n
        return res


def greedy_fast(model, prompt, max_new_tokens: int, compile: bool | None = None, prefill_chunk: int = 512,
                graph: bool | None = None):
    """Greedy continuation through the fast path (EOS ignored): prefill, then FastDecoder. Returns
    (token_ids, stats)."""
    ids = prompt_ids(model, prompt)
    model.check_ids(ids)
    cache = model.new_cache(batch=1, max_len=len(ids) + max_new_tokens)
    t0 = time.perf_counter()
    for a in range(0, len(ids), prefill_chunk):
        logits = model.forward(np.asarray(ids[a:a + prefill_chunk])[None], cache=cache, last_only=True).logits
    first = int(np.argmax(logits[0, -1]))
    t1 = time.perf_counter()
    dec = FastDecoder(model, cache, compile=compile, graph=graph)
    out = [first] + (dec.run(first, max_new_tokens - 1) if max_new_tokens > 1 else [])
    model.ops.synchronize()
    t2 = time.perf_counter()
    return out, dict(prompt_tokens=len(ids), ttft_s=t1 - t0, decode_s=t2 - t1,
                     gen_tok_s=(max_new_tokens - 1) / (t2 - t1) if max_new_tokens > 1 else float("nan"))
