"""Progress of long runs (``wb.compare``, ``wb.bench``, ``wb.diverge``), one convention for all three.

Every one of them takes ``progress: bool | Callable[[int, int, str], None]``:

* ``True`` (the command line's choice): lines on stderr — ``[i/N] what (t s)`` when a step finishes, and
  ``      what (t s)`` for a note inside a step (a warm-up, a timed repeat, "loading ...");
* a callable: called as ``fn(done, total, what)`` — ``done`` steps of ``total`` are finished (a note repeats the
  current ``done``), ``what`` says what finished or what runs now. The dashboard moves its progress bar with it,
  the notebooks a widget (``workbench.notebooks.progress_bar``);
* ``False`` / ``None``: silent.

A callback that raises stops the run (the exception propagates): that is how a caller cancels.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Union

ProgressFn = Callable[[int, int, str], None]
ProgressArg = Union[bool, ProgressFn, None]


class Progress:
    """Reports the steps of one run to ``progress`` (see the module docstring)."""

    def __init__(self, progress: ProgressArg, total: int):
        self.callback: ProgressFn | None = progress if callable(progress) else None
        self.enabled = progress is True
        self.total = max(1, int(total))
        self.i = 0
        self.t0 = time.perf_counter()

    @property
    def prints(self) -> bool:
        """True when the lines go to stderr (progress=True): libraries below may show their own bars then."""
        return self.enabled

    def _emit(self, what: str, line: str) -> None:
        if self.callback is not None:
            self.callback(self.i, self.total, what)
        elif self.enabled:
            print(line, file=sys.stderr, flush=True)

    def step(self, what: str) -> None:
        """A step finished."""
        self.i += 1
        self.total = max(self.total, self.i)
        self._emit(what, f"[{self.i}/{self.total}] {what} ({time.perf_counter() - self.t0:.1f}s)")

    def note(self, what: str) -> None:
        """Something inside the current step (does not advance the count)."""
        self._emit(what, f"      {what} ({time.perf_counter() - self.t0:.1f}s)")

    def grow(self, n: int) -> None:
        """n more steps than announced (a count known only once the run is under way)."""
        self.total += max(0, int(n))

    __call__ = step


def as_progress(progress: ProgressArg | Progress, total: int) -> Progress:
    """``progress`` as a Progress of ``total`` steps; an existing Progress (a caller's run) is used as it is."""
    if isinstance(progress, Progress):
        return progress
    return Progress(progress, total)
