"""What the peers share: importing an engine with its install hint, one timing loop (a warm-up, then
``repeats`` timed runs, medians) and the rate fields of a result."""
from __future__ import annotations

import statistics
import sys
from typing import Callable


def require(who: str, hint: str, *modules: str, also: str = "") -> list:
    """Import ``modules`` (dotted names allowed) through ``__import__`` (so a patched ``builtins.__import__``
    blocks them too); a missing one raises ``ImportError`` saying who needs what and how to install it."""
    try:
        out = []
        for m in modules:
            __import__(m)
            out.append(sys.modules[m])
        return out
    except ImportError as e:
        raise ImportError(f"{who} needs {' and '.join(modules)} ({e}); install with `{hint}`{also}") from e


def rates(prompt_len: int, gen_len: int, repeats: int, prefill_s: float, decode_s_per_tok: float) -> dict:
    """The run's sizes and the two rates (prompt tokens per prefill second, 1 / seconds per decoded token)."""
    return {
        "prompt_len": int(prompt_len), "gen_len": int(gen_len), "repeats": int(repeats),
        "prefill_tok_s": prompt_len / prefill_s if prefill_s > 0 else float("inf"),
        "decode_tok_s": 1.0 / decode_s_per_tok if decode_s_per_tok > 0 else float("inf"),
        "prefill_s": prefill_s, "decode_s_per_tok": decode_s_per_tok,
    }


def median_timings(timed: Callable[[int], tuple[float, float]], gen_len: int, repeats: int,
                   warmup_len: int) -> tuple[float, float]:
    """``timed(n)`` runs one prompt + n generated tokens and returns (prefill seconds, seconds per decoded token);
    returns their medians over ``repeats`` runs after one warm-up of ``warmup_len`` tokens."""
    timed(warmup_len)
    pre, dec = [], []
    for _ in range(max(int(repeats), 1)):
        p, d = timed(int(gen_len))
        pre.append(p)
        dec.append(d)
    return statistics.median(pre), statistics.median(dec)
