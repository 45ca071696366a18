"""HF transformers decoding with a ``StaticCache`` and CUDA graphs, gpt-fast style: the strongest HF peer.

The recipe (pytorch-labs/gpt-fast): a static KV cache whose tensors never move, the prompt prefilled eagerly
into it, then one compiled function per decode token — ``torch.compile(step, mode="reduce-overhead",
fullgraph=True)`` (inductor kernels replayed as a CUDA graph) — that runs the HF model on one token and takes the
greedy argmax on the device; nothing leaves the device until the timed region ends. Warm-up (compilation, graph
capture) runs outside the timed region; the device is synchronised around it.

Why not transformers' own static cache as is: its sliding-window layer (``StaticSlidingWindowLayer``, Gemma 2/3's
local layers) keeps its length in a Python int (``cumulative_length_int``) that the model reads for the positions
and the mask (``get_seq_length``, ``get_mask_sizes``) and the layer's ``update`` branches on. Dynamo guards on that
int. Under ``generate``'s own compile (``CompileConfig(dynamic=False)``) the forward is recompiled for every token
(guards ``cumulative_length_int == 6``, ``== 7``, ... seen on transformers 5.17 and 5.24, torch 2.13) until
``torch._dynamo`` hits its recompile limit (8): with ``fullgraph=True`` that is a hard error
(``FailOnRecompileLimitHit``), with ``fullgraph=False`` the rest of the run is eager — HF eager speed plus the
compile time. Under a plain ``torch.compile`` (``dynamic=None``) the step recompiles once and then takes the int
as a symbolic size; CUDA graphs are recorded per distinct value of such a size, so ``mode="reduce-overhead"``
would record a new graph per token (tests/tools/gpu/peers_bench.py's ``diag`` part measures that on the card).
Here the sliding layers get a full-length ``StaticLayer`` instead (position kept in a
device tensor, no Python int anywhere in the step) and the sliding window is applied by HF's own sliding-window
mask (``kv_idx > q_idx - sliding_window``), so each layer attends to exactly the keys HF's sliding cache would give
it: the same numbers (tests/test_peers.py checks them past the window), one graph. The price is attention over the
whole context on the local layers (≤ prompt + generated tokens), which gpt-fast pays for every layer too.

``StaticGraphDecoder`` works on CPU as well (compiled by inductor, no CUDA graphs: ``mode="reduce-overhead"`` skips
graphs off CUDA) and with ``compile=False`` (the same static-cache loop, eager), which is how it is tested here.
"""
from __future__ import annotations

import inspect
import time
from typing import Any

import numpy as np


def _counters() -> dict:
    """A snapshot of dynamo/inductor's counters (graphs compiled, graph breaks, CUDA-graph skips)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover - very old torch
        return {"graphs": 0, "breaks": {}, "cudagraph_skips": 0}
    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "breaks": {str(k): int(v) for k, v in counters["graph_break"].items()},
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


def _delta(before: dict, after: dict) -> dict:
    breaks = {k: v - before["breaks"].get(k, 0) for k, v in after["breaks"].items()
              if v - before["breaks"].get(k, 0) > 0}
    return {"graphs": after["graphs"] - before["graphs"], "breaks": breaks,
            "cudagraph_skips": after["cudagraph_skips"] - before["cudagraph_skips"]}


def full_length_static_cache(model, max_len: int):
    """``transformers.StaticCache`` for ``model`` with every sliding-window layer replaced by a full-length
    ``StaticLayer`` (see the module docstring). Returns (cache, number of layers replaced). Raises ``RuntimeError``
    naming the layer class when the config asks for a cache layer this decoder cannot drive."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=model.config, max_cache_len=int(max_len))
    swapped = 0
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            cache.layers[i] = StaticLayer(max_cache_len=int(max_len))
            swapped += 1
        elif type(layer) is not StaticLayer:
            raise RuntimeError(f"unsupported architecture for the static-graph decoder: cache layer {i} is a "
                               f"{type(layer).__name__} (only StaticLayer / StaticSlidingWindowLayer)")
    return cache, swapped


class StaticGraphDecoder:
    """Greedy decoding of one sequence through ``model`` with a full-length static cache and a compiled step.

    ``max_len``: prompt + new tokens the cache must hold. ``suppress``: token ids never chosen (EOS, so runs
    have a fixed length, like llama.cpp's ``--ignore-eos``). ``compile``: torch.compile the step
    (``mode``, ``fullgraph``, ``backend``: "eager" traces with dynamo only, which shows recompiles and graph
    breaks cheaply); False runs the same loop eagerly. ``full_length=False`` keeps transformers' own
    ``StaticCache`` layers (diagnosis: the sliding ones recompile the step per token). The cache and the compiled
    step are reused by every :meth:`run` (reset in place: static addresses, so the captured graph stays valid).
    """

    def __init__(self, model, max_len: int, *, suppress=(), compile: bool = True, mode: str | None = "reduce-overhead",
                 fullgraph: bool = True, backend: str = "inductor", full_length: bool = True):
        import torch

        self.model = model
        self.torch = torch
        self.device = next(model.parameters()).device
        self.max_len = int(max_len)
        if full_length:
            self.cache, self.swapped = full_length_static_cache(model, self.max_len)
        else:       # transformers' own layers (the sliding ones keep a Python-int length): for diagnosis
            from transformers import StaticCache
            self.cache, self.swapped = StaticCache(config=model.config, max_cache_len=self.max_len), 0
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.2x names the argument ``cache`` (``past_key_values`` deprecated); 5.1x ``past_key_values``
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._suppress = (torch.tensor(sorted({int(i) for i in suppress}), dtype=torch.long, device=self.device)
                          if suppress else None)
        self.compiled = bool(compile)
        self.mode, self.fullgraph = mode, bool(fullgraph)
        kw = {"mode": mode} if backend == "inductor" else {}
        self._step = torch.compile(self._decode_one, fullgraph=fullgraph, backend=backend, **kw) \
            if compile else self._decode_one

    # ------------------------------------------------------------------ the two phases
    def _pick(self, logits):
        torch = self.torch
        if self._suppress is not None:
            logits = logits.index_fill(-1, self._suppress, float("-inf"))
        return torch.argmax(logits, dim=-1, keepdim=True)         # [1, 1], stays on the device

    def _decode_one(self, tok):
        """One token: the HF model on [1, 1] ids (positions from the cache's device-side length), then argmax."""
        out = self.model(input_ids=tok, use_cache=True, **{self._cache_kw: self.cache})
        return self._pick(out.logits[:, -1, :])

    def _prefill(self, ids):
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: self.cache})
        return self._pick(out.logits[:, -1, :])

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def run(self, ids, n_new: int) -> dict[str, Any]:
        """Prefill ``ids`` ([T] or [1, T] ints), then ``n_new`` greedy tokens (the first from the prefill).
        Returns ``tokens`` (list[int]), ``prefill_s`` (prompt to first token, synchronised) and ``decode_s``
        (the other ``n_new - 1`` tokens, synchronised once at the end)."""
        torch = self.torch
        x = torch.as_tensor(np.asarray(ids, dtype=np.int64).reshape(1, -1), device=self.device)
        if x.shape[1] + n_new > self.max_len:
            raise ValueError(f"{x.shape[1]} prompt + {n_new} new tokens exceed the cache ({self.max_len})")
        mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
        with torch.no_grad():
            self.cache.reset()
            self._sync()
            t0 = time.perf_counter()
            tok = self._prefill(x)
            self._sync()
            t1 = time.perf_counter()
            toks = [tok]
            for _ in range(int(n_new) - 1):
                if mark is not None and self.compiled:
                    mark()      # a new CUDA-graph generation: the previous step's output buffer may be reused
                tok = self._step(tok).clone()   # clone: the graph's output buffer is overwritten on the next replay
                toks.append(tok)
            self._sync()
            t2 = time.perf_counter()
        return {"tokens": torch.cat(toks, dim=1)[0].tolist(), "prefill_s": t1 - t0, "decode_s": t2 - t1}


def bench_static_graphs(ref, prompt_len: int = 128, gen_len: int = 64, repeats: int = 3, *,
                        compile: bool = True, mode: str = "reduce-overhead", fullgraph: bool = True) -> dict:
    """Throughput of :class:`StaticGraphDecoder` on an ``HFReference`` (its model, dtype and device; load it with
    ``attn_implementation="sdpa"`` for the strongest HF). One warm-up run (compilation and graph capture) and
    ``repeats`` timed runs, medians. Besides the rates the result says what dynamo did: graphs compiled in the
    warm-up and during the timed runs (a recompile shows there), graph breaks with their reasons, CUDA-graph
    skips; with ``fullgraph=True`` a graph break is an error, which is then retried once with ``fullgraph=False``
    so the report can name the break."""
    import statistics

    import torch

    x = ref._bench_prompt(int(prompt_len))
    n = int(gen_len) + 1          # the first token comes from the prefill, then gen_len decode steps
    if ref.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ref.device)    # the peak of this peer, not of the process so far
    c0 = _counters()
    note = None
    try:
        dec = StaticGraphDecoder(ref.model, len(x) + n, suppress=ref.eos_ids(), compile=compile, mode=mode,
                                 fullgraph=fullgraph)
        t = time.perf_counter()
        dec.run(x, n)
    except Exception as e:  # noqa: BLE001 - a graph break under fullgraph: say which, retry without fullgraph
        if not (compile and fullgraph):
            raise
        note = f"fullgraph=True failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); fullgraph=False"
        dec = StaticGraphDecoder(ref.model, len(x) + n, suppress=ref.eos_ids(), compile=compile, mode=mode,
                                 fullgraph=False)
        t = time.perf_counter()
        dec.run(x, n)
    warm_s = time.perf_counter() - t
    c1 = _counters()
    runs = [dec.run(x, n) for _ in range(max(int(repeats), 1))]
    c2 = _counters()
    warm, timed = _delta(c0, c1), _delta(c1, c2)
    pre = statistics.median(r["prefill_s"] for r in runs)
    per_tok = statistics.median(r["decode_s"] / max(n - 1, 1) for r in runs)
    us = [1e6 * r["decode_s"] / max(n - 1, 1) for r in runs]
    graphs_on = compile and mode == "reduce-overhead" and dec.device.type == "cuda" and \
        warm["cudagraph_skips"] + timed["cudagraph_skips"] == 0
    how = (f"StaticCache ({dec.swapped} sliding layers held full-length, window by the mask), "
           f"{getattr(ref.model.config, '_attn_implementation', '?')} attention, "
           + (f"torch.compile(mode={mode!r}, fullgraph={dec.fullgraph}) per decode step"
              + (" in CUDA graphs" if graphs_on else ", no CUDA graphs") if compile else "eager static loop")
           + f"; prefill eager; warm-up {warm_s:.1f} s compiled {warm['graphs']} graph(s)")
    problems = []
    if timed["graphs"]:
        problems.append(f"{timed['graphs']} recompile(s) during the timed runs")
    nb = sum(warm["breaks"].values()) + sum(timed["breaks"].values())
    if nb:
        first = next(iter({**warm["breaks"], **timed["breaks"]}))
        problems.append(f"{nb} graph break(s), first: {first[:160]}")
    skips = warm["cudagraph_skips"] + timed["cudagraph_skips"]
    if skips and dec.device.type == "cuda":
        problems.append(f"CUDA graphs skipped {skips}x (TORCH_LOGS=perf_hints says why)")
    return {
        "engine": "transformers+StaticCache+torch.compile",
        "dtype": str(ref.dtype).replace("torch.", ""),
        "device": str(ref.device) if ref.device.type != "cuda" else torch.cuda.get_device_name(ref.device),
        "prompt_len": int(prompt_len), "gen_len": int(gen_len), "repeats": int(repeats),
        "ttft_s": pre,
        "prefill_tok_s": len(x) / pre if pre > 0 else float("inf"),
        "decode_tok_s": 1.0 / per_tok if per_tok > 0 else float("inf"),
        "decode_us_p10": float(np.percentile(us, 10)), "decode_us_p90": float(np.percentile(us, 90)),
        "peak_mem_bytes": torch.cuda.max_memory_allocated(ref.device) if ref.device.type == "cuda" else None,
        "warmup_s": warm_s, "graphs_warmup": warm["graphs"], "graphs_timed": timed["graphs"],
        "graph_breaks": {**warm["breaks"], **timed["breaks"]}, "cudagraph_skips": skips,
        "cuda_graphs": graphs_on,
        "note": "; ".join([how] + ([note] if note else []) + problems),
        "tokens": runs[-1]["tokens"],
    }


def bench_generate_static(ref, prompt_len: int = 128, gen_len: int = 64, repeats: int = 3, *,
                          full_length: bool = True, mode: str = "reduce-overhead", fullgraph: bool = True,
                          backend: str = "inductor") -> dict:
    """transformers' own route: ``model.generate`` (greedy, EOS suppressed) with a static cache and a
    ``CompileConfig(mode, fullgraph, backend)`` — generate compiles the decode-step forward itself (prefill
    eager). ``full_length=True`` hands generate the cache of :func:`full_length_static_cache` (reset before each
    run); False lets generate build its own (``cache_implementation="static"``: sliding layers with the Python-int
    length, the per-token recompiles described in the module docstring). Reports the graphs dynamo compiled in
    the warm-up and in the timed runs, graph breaks and CUDA-graph skips beside the rates."""
    import torch
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=fullgraph, dynamic=False, mode=mode, backend=backend)
    cc._compile_all_devices = True      # generate auto-compiles only on CUDA-like devices otherwise
    x = torch.from_numpy(ref._bench_prompt(int(prompt_len))[None, :]).to(ref.device)
    cache = full_length_static_cache(ref.model, x.shape[1] + int(gen_len) + 1)[0] if full_length else None
    extra = {"compile_config": cc}
    extra.update({"past_key_values": cache} if cache is not None else {"cache_implementation": "static"})

    def timed(n):
        if cache is not None:
            with torch.inference_mode():    # generate ran under inference_mode: its cache tensors are inference tensors
                cache.reset()
        if ref.device.type == "cuda":
            torch.cuda.synchronize(ref.device)
        return ref._timed_generate(x, n, extra)

    c0 = _counters()
    t = time.perf_counter()
    timed(int(gen_len))
    warm_s = time.perf_counter() - t
    c1 = _counters()
    import statistics
    runs = [timed(int(gen_len)) for _ in range(max(int(repeats), 1))]
    c2 = _counters()
    warm, tm = _delta(c0, c1), _delta(c1, c2)
    pre = statistics.median(p for p, _ in runs)
    per_tok = statistics.median(d for _, d in runs)
    breaks = {**warm["breaks"], **tm["breaks"]}
    skips = warm["cudagraph_skips"] + tm["cudagraph_skips"]
    notes = [f"transformers generate(compile_config=CompileConfig(mode={mode!r}, fullgraph={fullgraph}, "
             f"backend={backend!r})) with " + ("the full-length StaticCache" if full_length else
                                               "cache_implementation='static' (its own sliding layers)")
             + f"; warm-up {warm_s:.1f} s compiled {warm['graphs']} graph(s)"]
    limit = getattr(torch._dynamo.config, "recompile_limit", getattr(torch._dynamo.config, "cache_size_limit", 8))
    if warm["graphs"] + tm["graphs"] >= limit:
        notes.append(f"{warm['graphs'] + tm['graphs']} graphs >= torch._dynamo recompile_limit {limit}: "
                     "the step recompiled until the limit and then ran eagerly")
    if tm["graphs"]:
        notes.append(f"{tm['graphs']} recompile(s) during the timed runs")
    if breaks:
        notes.append(f"{sum(breaks.values())} graph break(s), first: {next(iter(breaks))[:160]}")
    if skips and ref.device.type == "cuda":
        notes.append(f"CUDA graphs skipped {skips}x")
    return {
        "prefill_tok_s": x.shape[1] / pre if pre > 0 else float("inf"),
        "decode_tok_s": 1.0 / per_tok if per_tok > 0 else float("inf"),
        "prefill_s": pre, "decode_s_per_tok": per_tok, "ttft_s": pre, "warmup_s": warm_s,
        "graphs_warmup": warm["graphs"], "graphs_timed": tm["graphs"], "graph_breaks": breaks,
        "cudagraph_skips": skips, "note": "; ".join(notes),
    }
