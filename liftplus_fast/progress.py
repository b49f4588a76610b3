"""Progress reporting fit for terminals and for batch-job log files.

On a terminal, :func:`progress_bar` is a tqdm bar. When the stream is not a terminal (a
scheduler's log file, ``make demo > log``), hundreds of carriage-return frames would land in the
file, so it writes a plain line instead every ``LIFTPLUS_FAST_PROGRESS_INTERVAL`` seconds
(default 60): ``epoch 2/5: 120/391 (31%) 4.1 it/s, elapsed 29s, eta 66s, loss=1.2345``. Loops
shorter than the interval write nothing; the training log's per-epoch lines report those.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Optional, TextIO

__all__ = ["PlainProgress", "progress_bar", "progress_interval"]

INTERVAL_ENV = "LIFTPLUS_FAST_PROGRESS_INTERVAL"


def progress_interval() -> float:
    """Seconds between plain progress lines (``LIFTPLUS_FAST_PROGRESS_INTERVAL``, default 60)."""
    text = os.environ.get(INTERVAL_ENV, "60")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds; got {text!r}") from None
    if value < 0:
        raise ValueError(f"{INTERVAL_ENV} must be >= 0 seconds; got {text!r}")
    return value


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


class PlainProgress:
    """Iterates ``iterable`` and writes a progress line to ``stream`` at most every ``interval``
    seconds. Offers the parts of tqdm's interface the package uses (``set_postfix``, ``close``)."""

    def __init__(
        self, iterable: Iterable, desc: str, total: Optional[int], stream: TextIO, interval: float, clock=time.monotonic
    ):
        self.iterable = iterable
        self.desc = desc
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self.n = 0
        self.postfix = ""
        self.start = self.last = clock()

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1
            now = self.clock()
            if now - self.last >= self.interval:
                self.last = now
                self.stream.write(self.line(now) + "\n")
                self.stream.flush()

    def line(self, now: float) -> str:
        """The progress line at time ``now``."""
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total} ({100.0 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {done} {rate:.1f} it/s", f"elapsed {elapsed:.0f}s"]
        if self.total and rate > 0:
            parts.append(f"eta {(self.total - self.n) / rate:.0f}s")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def set_postfix(self, **values) -> None:
        """Values shown at the end of the next line (``loss=1.2345``)."""
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Nothing to clean up (kept for tqdm compatibility)."""


def progress_bar(
    iterable: Iterable,
    desc: str = "",
    total: Optional[int] = None,
    disable: bool = False,
    leave: bool = False,
    stream: Optional[TextIO] = None,
):
    """A tqdm bar on a terminal, :class:`PlainProgress` lines otherwise, a silent wrapper when
    ``disable``; called like ``tqdm`` (``leave`` is tqdm's). ``stream`` defaults to standard error."""
    stream = sys.stderr if stream is None else stream
    if disable:
        return PlainProgress(iterable, desc, total, stream, interval=float("inf"))
    if _is_terminal(stream):
        from tqdm.auto import tqdm

        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        # tqdm.auto's class calls iter() on an iterable in its constructor and again when it is
        # iterated: a DataLoader would start its workers, and draw its seed, twice per loop
        # (so a run on a terminal would crop differently from one logging to a file). One
        # iterator, made here, is iterated once.
        return tqdm(iter(iterable), desc=desc, total=total, leave=leave, file=stream)
    return PlainProgress(iterable, desc, total, stream, progress_interval())
