"""The peers' shared timing loop: one warm-up, then ``repeats`` timed runs, medians."""
from __future__ import annotations

import statistics
from typing import Callable


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
