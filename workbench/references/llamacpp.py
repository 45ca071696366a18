"""llama.cpp (through llama-cpp-python) as an independent reference for GGUF checkpoints.

llama.cpp runs the quantised weights directly (Q4_K_M etc. kernels), so its logits are close to, but not
identical with, a reference that dequantises the same file (HF, our own loader). ``llama_cpp`` is imported
lazily; without it the constructor raises ``ImportError`` with the install hint. llama.cpp's own log output
(stderr, C level) is silenced.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._timing import median_timings, rates, require

INSTALL_HINT = "pip install gemma-workbench[reference]"


def _import_llama_cpp():
    return require("LlamaCppReference", INSTALL_HINT, "llama_cpp",
                   also=" (or a prebuilt wheel: .ci/build-llama-wheel.sh)")[0]


@contextlib.contextmanager
def _quiet_stderr(enabled: bool = True):
    """Redirect the process's fd 2 to /dev/null (llama.cpp prints from C, bypassing sys.stderr)."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _as_ids(ids) -> list[int]:
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    a = np.asarray(ids, dtype=np.int64)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"llama.cpp reference takes one non-empty sequence [T] (or [1, T]), got shape {a.shape}")
    return [int(i) for i in a]


class LlamaCppReference:
    """A GGUF model under llama.cpp: full-sequence logits, tokenizer, greedy generation, throughput.

    ``n_threads=None`` uses every core (``os.cpu_count()``); ``n_gpu_layers=0`` keeps everything on the CPU.

    Shared or oversubscribed CPUs: llama.cpp's CPU backend runs on OpenMP, whose threads busy-wait at every
    barrier by default; when another process holds a core, each barrier can cost a scheduler time slice. On a
    loaded 2-core box 2 threads decoded at 0.4-7 tok/s against ~30 tok/s with 1 thread. Start Python with
    ``OMP_WAIT_POLICY=PASSIVE`` (read once, when libgomp loads: torch and llama.cpp share it) or pass
    ``n_threads=1``. ``bench`` records the policy and the load average next to its numbers.
    """

    def __init__(self, gguf_path, n_ctx: int = 2048, n_threads: int | None = None, n_gpu_layers: int = 0,
                 *, quiet: bool = True, seed: int = 0, **llama_kwargs):
        llama_cpp = _import_llama_cpp()
        self._llama_cpp = llama_cpp
        self.path = Path(gguf_path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {self.path}")
        self.quiet = quiet
        threads = n_threads or os.cpu_count() or 1
        t0 = time.perf_counter()
        self._llama_kwargs = dict(
            model_path=str(self.path), n_ctx=int(n_ctx), n_threads=int(threads), n_threads_batch=int(threads),
            n_gpu_layers=int(n_gpu_layers), verbose=False, seed=seed, **llama_kwargs,
        )   # llama_kwargs: further llama_cpp.Llama arguments, e.g. type_k=0, type_v=0 (a float32 KV cache)
        with _quiet_stderr(quiet):
            self.llm = llama_cpp.Llama(logits_all=True, **self._llama_kwargs)
        self._bench_llm = None  # a second context without logits_all, made on the first bench()
        self.load_seconds = time.perf_counter() - t0
        self.n_ctx = int(n_ctx)
        self.n_threads = int(threads)
        self._eog: list[int] | None = None

    # ------------------------------------------------------------------ vocabulary
    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """llama.cpp's tokenizer (the GGUF vocabulary); ``special`` parses ``<start_of_turn>``-style tokens."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def detokenize(self, ids) -> str:
        return self.llm.detokenize(_as_ids(ids)).decode("utf-8", errors="replace")

    def eog_ids(self) -> list[int]:
        """End-of-generation ids as llama.cpp's vocabulary marks them (EOS, ``<end_of_turn>``, ...)."""
        if self._eog is None:
            lc = self._llama_cpp
            eog: set[int] = set()
            try:
                vocab = lc.llama_model_get_vocab(self.llm.model)
                eog = {i for i in range(self.n_vocab) if lc.llama_vocab_is_eog(vocab, i)}
            except (AttributeError, TypeError):
                pass
            eos = self.llm.token_eos()
            if eos is not None and eos >= 0:
                eog.add(int(eos))
            self._eog = sorted(eog)
        return self._eog

    # ------------------------------------------------------------------ evaluation
    def _eval(self, ids: list[int]) -> None:
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed n_ctx={self.n_ctx}")
        self.llm.reset()
        with _quiet_stderr(self.quiet):
            self.llm.eval(ids)

    def logits(self, ids) -> np.ndarray:
        """float32 logits [T, V] for every position of one sequence (fresh context)."""
        seq = _as_ids(ids)
        self._eval(seq)
        return np.array(self.llm.scores[: len(seq)], dtype=np.float32, copy=True)

    def _last_logits(self) -> np.ndarray:
        return self.llm.scores[self.llm.n_tokens - 1]

    def generate_greedy(self, ids, n: int, ignore_eos: bool = True) -> list[int]:
        """Greedy continuation of ``n`` tokens (argmax of llama.cpp's logits); returns only the new ids.

        ``ignore_eos``: end-of-generation tokens are masked to -inf (llama.cpp's ``--ignore-eos``), so exactly
        ``n`` tokens come back; otherwise generation stops after the first EOG token (which is included).
        """
        seq = _as_ids(ids)
        if len(seq) + n > self.n_ctx:
            raise ValueError(f"{len(seq)} + {n} tokens exceed n_ctx={self.n_ctx}")
        eog = np.asarray(self.eog_ids(), dtype=np.int64)
        self._eval(seq)
        out: list[int] = []
        for step in range(int(n)):
            row = np.array(self._last_logits(), dtype=np.float32, copy=True)
            if ignore_eos and eog.size:
                row[eog] = -np.inf
            tok = int(np.argmax(row))
            out.append(tok)
            if not ignore_eos and tok in set(eog.tolist()):
                break
            if step + 1 < n:
                with _quiet_stderr(self.quiet):
                    self.llm.eval([tok])
        return out

    # ------------------------------------------------------------------ throughput
    def _bench_prompt(self, prompt_len: int, seed: int = 0) -> list[int]:
        rng = np.random.default_rng(seed)
        hi = min(self.n_vocab, 200_000)
        ids = rng.integers(1000 if hi > 2000 else 3, hi, size=prompt_len).tolist()
        bos = self.llm.token_bos()
        if prompt_len and bos is not None and bos >= 0:
            ids[0] = int(bos)
        return [int(i) for i in ids]

    def _timed(self, prompt: list[int], gen_len: int) -> tuple[float, float]:
        lc = self._llama_cpp
        llm = self._bench_llm
        n_vocab = self.n_vocab
        eog = np.asarray(self.eog_ids(), dtype=np.int64)

        def next_token() -> int:
            row = np.ctypeslib.as_array(lc.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()
            row[eog] = -np.inf
            return int(np.argmax(row))

        llm.reset()
        with _quiet_stderr(self.quiet):
            t0 = time.perf_counter()
            llm.eval(prompt)
            tok = next_token()
            t1 = time.perf_counter()
            for _ in range(gen_len):
                llm.eval([tok])
                tok = next_token()
            t2 = time.perf_counter()
        return t1 - t0, (t2 - t1) / max(gen_len, 1)

    def bench(self, prompt_len: int = 128, gen_len: int = 64, repeats: int = 3) -> dict[str, Any]:
        """Prefill tok/s (one batched eval of the prompt, logits of its last token only) and decode tok/s (one
        eval per greedy token, EOS ignored), medians over ``repeats`` after a warm-up. Runs on a second context
        without ``logits_all`` (which would add an LM-head product for every prompt token; same weights, mmap'd
        once). Timings include our argmax over the vocabulary, which any sampling loop pays too.
        """
        if prompt_len + gen_len + 1 > self.n_ctx:
            raise ValueError(f"prompt_len + gen_len = {prompt_len + gen_len} exceeds n_ctx={self.n_ctx}")
        if self._bench_llm is None:
            with _quiet_stderr(self.quiet):
                self._bench_llm = self._llama_cpp.Llama(logits_all=False, **self._llama_kwargs)
        prompt = self._bench_prompt(int(prompt_len))
        p_med, d_med = median_timings(lambda n: self._timed(prompt, n), gen_len, repeats, min(int(gen_len), 4))
        return {
            "engine": "llama.cpp",
            "gguf": self.path.name,
            "threads": self.n_threads,
            **rates(prompt_len, gen_len, repeats, p_med, d_med),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "loadavg_1m": _loadavg(),
        }

    def close(self) -> None:
        for attr in ("llm", "_bench_llm"):
            llm = getattr(self, attr, None)
            if llm is not None:
                if hasattr(llm, "close"):
                    with _quiet_stderr(self.quiet):
                        llm.close()
                setattr(self, attr, None)
