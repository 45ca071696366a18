"""Generation: chunked prefill into a KV cache, then the decode engine (:mod:`workbench.decode`) — the same
route and step ``wb.bench`` measures (Triton kernels in a CUDA graph on torch:cuda, MLX's custom CUDA kernels on
mlx:gpu, the static step over the CPU GEMV kernel on the CPU, the compiled generic step for Gemma 4 ...).

Greedy (temperature 0) is deterministic; sampling (temperature, top-k, top-p) runs on the device with a
counter-based RNG keyed by (seed, position), so a seed gives the same tokens on every route and backend
(:mod:`workbench.decode.sampler`). Tokens come back a few at a time; EOS / stop ids are checked on those
integers, stop strings on a sliding window of decoded text. ``stream=True`` yields text pieces as they are
produced, detokenised incrementally. ``g.stats["route"]`` names the route and ``route_reason`` says why.

``model`` below is a :class:`workbench.lm.LanguageModel` (tokenizer + decoder), or a bare decoder
(:class:`workbench.model.gemma.Gemma`) given token ids; the decode engine always runs on the decoder.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .decode import sampler as _sampler
from .model.gemma import Gemma, InputError


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stats: dict = field(default_factory=dict)
    stopped_by: str = "length"

    def __str__(self) -> str:
        return self.text


def sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None, seed: int = 0,
           pos: int = 0) -> int:
    """One token id from last-position logits [V], with the engine's semantics (see decode.sampler)."""
    return _sampler.sample_np(logits, _sampler.make(temperature, top_k, top_p, seed), pos)


def _parts(model):
    """(decoder, tokenizer) of a LanguageModel; a bare decoder has no tokenizer (token ids only)."""
    if isinstance(model, Gemma):
        return model, None
    return model.decoder, model.tokenizer


def prompt_ids(model, prompt, chat: bool = False) -> list[int]:
    if isinstance(prompt, str):
        tok = _parts(model)[1]
        if tok is None:
            raise InputError("a text prompt needs a tokenizer; this checkpoint has none — pass token ids")
        if not prompt:
            raise InputError("empty prompt: give at least one character or token id")
        if chat:
            return list(tok.encode_chat([{"role": "user", "content": prompt}]))
        return list(tok.encode(prompt))
    ids = np.asarray(prompt).reshape(-1).tolist()
    if not ids:
        raise InputError("empty prompt: at least one token id is needed")
    return [int(i) for i in ids]


def _check_max_new_tokens(n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"max_new_tokens must be a whole number >= 0 (how many tokens to generate), got {n!r}")


def _stop_ids(model, stop) -> set[int]:
    out: set[int] = set()
    tok = _parts(model)[1]
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


def decode_tokens(model, cache_engine, last_logits, n_prompt: int, max_new_tokens: int, sampling, stops,
                  st: dict) -> Iterator[int]:
    """The shared decode loop (text and multimodal): the first token from the prefill's last logits (host, the
    engine's sampler semantics), then the engine's chunks; stops at a stop id, the length, or the context."""
    eng = cache_engine
    cache = eng.cache
    st.update(route=eng.route.name, route_reason=eng.route.reason, stopped_by="length")
    if max_new_tokens <= 0:
        st.update(generated_tokens=0, decode_s=0.0, gen_tok_s=float("nan"), setup_s=0.0)
        return
    tok = _sampler.sample_np(last_logits, sampling, n_prompt)
    n = 0
    if tok in stops:
        st["stopped_by"] = "eos"
        st.update(generated_tokens=0, decode_s=0.0, gen_tok_s=float("nan"), setup_s=0.0)
        return
    n = 1
    st["generated_tokens"] = n
    yield tok
    room = cache.max_len - cache.offset
    todo = min(max_new_tokens - 1, room)
    if todo < max_new_tokens - 1:
        st["stopped_by"] = "context"
    t_setup = time.perf_counter()
    setup = eng.prepare(tok) if todo > 0 else 0.0
    if not sampling.greedy and getattr(eng, "sampler_note", None):
        st["sampler"] = eng.sampler_note
    t_dec = time.perf_counter()
    steps = 0
    try:
        if todo > 0:
            for chunk in eng.chunks(tok, todo):
                for t in chunk:
                    if t in stops:
                        st["stopped_by"] = "eos"
                        return
                    steps += 1
                    n += 1
                    st["generated_tokens"] = n
                    yield t
    finally:
        model.ops.synchronize()
        t2 = time.perf_counter()
        st.update(setup_s=setup if setup else t_dec - t_setup, decode_s=t2 - t_dec, decode_steps=steps,
                  gen_tok_s=steps / (t2 - t_dec) if steps and t2 > t_dec else float("nan"),
                  peak_memory=model.ops.peak_memory() if hasattr(model.ops, "peak_memory") else None)


def generate_iter(model, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = 0, stop=None, chat: bool = False,
                  ignore_eos: bool = False, prefill_chunk: int = 4096, max_len: int | None = None,
                  stats: dict | None = None, compile: bool | None = None) -> Iterator[int]:
    """Yield generated token ids one by one; fills ``stats`` (timings, route) as it goes."""
    from .decode import engine as _engine
    _check_max_new_tokens(max_new_tokens)
    ids = prompt_ids(model, prompt, chat)
    model, _ = _parts(model)       # from here on, the decoder
    model.check_ids(ids)
    sampling = _sampler.make(temperature, top_k, top_p, seed)
    ctx = model.config.max_position_embeddings
    if len(ids) >= ctx:
        raise InputError(f"prompt of {len(ids)} tokens does not fit the model's context of {ctx} tokens")
    need = min(max_len or (len(ids) + max_new_tokens), ctx)
    st = stats if stats is not None else {}
    ops = model.ops
    eng = _engine.session(model, need, sampling, compile=compile)
    cache = eng.cache
    stops = set() if ignore_eos else _stop_ids(model, stop)
    t0 = time.perf_counter()
    logits = None
    for a in range(0, len(ids), prefill_chunk):
        chunk = ids[a:a + prefill_chunk]
        logits = model.forward(np.asarray(chunk)[None], cache=cache, last_only=True).logits
    ops.synchronize()
    t1 = time.perf_counter()
    st.update(prompt_tokens=len(ids), prefill_s=t1 - t0, ttft_s=t1 - t0,
              prompt_tok_s=len(ids) / max(t1 - t0, 1e-9))
    # the cache may be larger than asked (engines are reused): never decode past what the caller allowed
    limit = max(0, need - len(ids))
    yield from decode_tokens(model, eng, logits[0, -1], len(ids), min(max_new_tokens, limit), sampling, stops, st)
    if limit < max_new_tokens and st.get("stopped_by") == "length":
        st["stopped_by"] = "context"


class _StopText:
    """Incremental detokenisation with stop strings: decodes only a sliding window of recent tokens (so a token
    costs O(window), not O(output)); holds back text that could still be the start of a stop string or an
    incomplete UTF-8 sequence."""

    WINDOW = 8

    def __init__(self, tok, stop_strings):
        self.tok = tok
        self.stops = [s for s in stop_strings if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.base = 0               # tokens before ``base`` are settled into ``self.done``
        self.done = ""              # settled text
        self.shown = 0              # characters of done + pending already given out
        self.hit = False

    def _pending(self) -> str:
        return self.tok.decode(self.ids[self.base:])

    def add(self, t: int) -> str:
        """The new text that is safe to show after token t ('' while waiting); sets ``hit`` at a stop string."""
        self.ids.append(t)
        pend = self._pending()
        if pend.endswith("\ufffd"):          # an incomplete UTF-8 sequence: wait for the next token
            return ""
        text = self.done + pend
        for s in self.stops:
            j = text.find(s, max(0, self.shown - len(s)))
            if j >= 0:
                self.hit = True
                out = text[self.shown:j]
                self.shown = j
                self.done, self.base = text[:j], len(self.ids)
                return out
        # settle the window's head: decode(ids[base:]) == decode(ids[base:k]) + decode(ids[k:]) when the
        # split falls between whole characters (checked), so the next decode starts at k
        if len(self.ids) - self.base > self.WINDOW:
            k = len(self.ids) - self.WINDOW // 2
            head = self.tok.decode(self.ids[self.base:k])
            tail = self.tok.decode(self.ids[k:])
            if head + tail == pend and not head.endswith("\ufffd"):
                self.done += head
                self.base = k
        safe = len(text) - self.hold if self.stops else len(text)
        out = text[self.shown:safe] if safe > self.shown else ""
        self.shown = max(self.shown, safe)
        return out

    def flush(self) -> str:
        text = self.done + self._pending()
        out = text[self.shown:] if not self.hit else ""
        self.shown = len(text)
        return out

    def text(self) -> str:
        return self.done + ("" if self.hit else self._pending())


def generate(model, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = 0, stop=None, stream: bool = False, chat: bool = False,
             ignore_eos: bool = False, stats: dict | None = None, **kw):
    """``m.generate``: a Generation, or with ``stream=True`` an iterator of text pieces. ``stats``: a dict to
    fill with the run's stats (the Generation's ``stats``; for a stream, filled as it goes)."""
    _check_max_new_tokens(max_new_tokens)
    stop_strings = [s for s in (stop or []) if isinstance(s, str)]
    tok = _parts(model)[1]
    stats = stats if stats is not None else {}
    if stream:
        tokens = generate_iter(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat,
                               ignore_eos, stats=stats, **kw)
        return stream_pieces(tok, tokens, stats, stop_strings)
    out: list[int] = []
    st_text = _StopText(tok, stop_strings) if (stop_strings and tok is not None) else None
    it = generate_iter(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat, ignore_eos,
                       stats=stats, **kw)
    for t in it:
        out.append(t)
        if st_text is not None:
            st_text.add(t)
            if st_text.hit:
                stats["stopped_by"] = "stop"
                it.close()
                break
    if st_text is not None and st_text.hit:
        text = st_text.text()
    else:
        text = tok.decode(out) if tok is not None else ""
    return Generation(text=text, token_ids=out, prompt_ids=prompt_ids(model, prompt, chat), stats=stats,
                      stopped_by=stats.get("stopped_by", "length"))


def stream_pieces(tok, tokens, stats: dict, stop_strings):
    """Text pieces from a token iterator, detokenised incrementally by the tokenizer ``tok`` (a sliding window;
    no tokenizer: the token ids as strings): waits out incomplete UTF-8 sequences, cuts at a stop string (noted
    in ``stats``). Shared by text and multimodal streaming."""
    if tok is None:
        for t in tokens:
            yield str(t)
        return
    st = _StopText(tok, stop_strings)
    for t in tokens:
        piece = st.add(t)
        if piece:
            yield piece
        if st.hit:
            stats["stopped_by"] = "stop"
            tokens.close()
            return
    rest = st.flush()
    if rest:
        yield rest


# ----------------------------------------------------------------------------------------- older entry points
def default_compile(spec) -> bool:
    """Whether the generic decode step is compiled by default: torch on CUDA (inductor + CUDA graph) and MLX on
    the GPU (mx.compile; WORKBENCH_MLX_COMPILE=0 keeps the queued plain steps). See workbench.decode.route."""
    import os
    if spec.framework == "torch":
        return spec.device == "cuda"
    return spec.device == "gpu" and os.environ.get("WORKBENCH_MLX_COMPILE", "1") != "0"


class FastDecoder:
    """Greedy decode of one cache through the engine's route (kept for older callers and tests):
    ``run(first_token, n)`` returns the n tokens after ``first_token``."""

    def __init__(self, model, cache, compile: bool | None = None, graph: bool | None = None):
        from .decode import engine as _engine
        from .decode import route as _route
        model = _parts(model)[0]
        r = _route.pick(model, cache, compile=compile)
        if graph is not None and r.graph != bool(graph):
            import dataclasses
            r = dataclasses.replace(r, graph=bool(graph))
        self.eng = _engine.DecodeEngine(model, cache, _sampler.Sampling(), route=r)
        self.cache = cache
        self.route = r.name
        self.route_reason = r.reason
        self.compile = r.compile

    def prepare(self, first_token: int):
        self.eng.prepare(first_token)

    def run(self, first_token: int, n: int) -> list[int]:
        return self.eng.run(first_token, n)


def greedy_fast(model, prompt, max_new_tokens: int, compile: bool | None = None, prefill_chunk: int = 4096,
                graph: bool | None = None):
    """Greedy continuation through the engine (EOS ignored). Returns (token_ids, stats)."""
    st: dict = {}
    toks = list(generate_iter(model, prompt, max_new_tokens, ignore_eos=True, prefill_chunk=prefill_chunk, stats=st,
                              compile=compile))
    return toks, st
