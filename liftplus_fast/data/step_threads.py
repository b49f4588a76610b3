"""How many intra-op threads the training process uses while its DataLoader workers share the CPU.

On a CPU the workers that prepare batches and the OpenMP threads of the training step run on
the same cores. A step split over every core stalls at each op's barrier whenever a worker
holds one of them: on a 2-core AMX Xeon, a tiny ViT at 32 px fed by 2 workers from the
decode-once cache took 1.9-2.5x longer per batch with torch's two intra-op threads than with
one (17-34x under a load average of 3-4) and trained 1.6-1.8x slower (docs/data.md). A
GEMM-bound step (ViT-B/16), whose workers idle most of the time, needs every core instead.
Which one wins depends on the model, the data path and the machine, so the training loader
measures it (:class:`StepThreadsLoader`): its first batches run with the fewer threads
(unmeasured: the workers are starting), then it alternates torch's thread count and the cores
the workers leave (CPU count - workers, at least 1), times each batch from one hand-over to
the next (the step on it plus the wait for the next one), and keeps the fewer threads only when
they are clearly faster (by :data:`FEWER_MARGIN`), so a run near the tie keeps torch's count
run after run. The choice is logged. The thread count changes the order of some fp32 sums (the
trained values differ in the last bit), so a bit-for-bit rerun needs the same count:
``LIFTPLUS_FAST_STEP_THREADS=N`` forces ``N``.

The count applies while the loop iterates the loader; the previous count is restored after
each epoch, so evaluation and everything else run as before.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..errors import UserInputError
from .wrapped_loader import WrappedLoader

__all__ = ["ENV_VAR", "FEWER_MARGIN", "StepThreadsLoader", "thread_candidates"]

logger = logging.getLogger("liftplus_fast")

ENV_VAR = "LIFTPLUS_FAST_STEP_THREADS"
# Batch periods left out at the start of every epoch while measuring (the workers are starting
# and the first batches were prepared before the step ran), and periods timed per candidate.
SKIP_PERIODS = 2
PERIODS_PER_CANDIDATE = 3
# The fewer threads are kept only when their median batch period is below torch's count's
# divided by this.
FEWER_MARGIN = 1.2
# A gap this large decides after one period each (a stalled step costs up to a second a batch,
# and a short run would spend much of itself measuring).
CLEAR_RATIO = 3.0


def _forced_threads() -> Optional[int]:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise UserInputError(f"{ENV_VAR} must be a positive integer (intra-op threads) or unset; got {value!r}")
    return int(value)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_candidates(num_workers: int) -> Tuple[int, ...]:
    """The intra-op thread counts measured beside ``num_workers`` workers: torch's current count,
    then the cores the workers leave (one count when they are the same)."""
    full = torch.get_num_threads()
    left = max(1, min(full, _cpu_count() - int(num_workers)))
    return (full,) if left == full else (full, left)


class StepThreadsLoader(WrappedLoader):
    """Wraps a training loader on the CPU: the step's intra-op threads chosen by measurement.

    Iterates like the wrapped loader; other attributes (``sampler``, ``generator``, ``dataset``,
    ``len``) are the wrapped loader's. ``threads`` is the chosen count (``None`` while
    measuring) and ``measured`` the batch periods timed per count, in seconds.
    """

    def __init__(self, loader, num_workers: int):
        super().__init__(loader)
        self.candidates = thread_candidates(num_workers)
        self.measured: Dict[int, List[float]] = {n: [] for n in self.candidates}
        forced = _forced_threads()
        if forced is not None:
            self.threads: Optional[int] = forced
            self._why = f"forced by {ENV_VAR}={forced}"
        elif len(self.candidates) == 1:
            self.threads, self._why = self.candidates[0], ""
        else:
            self.threads, self._why = None, ""
        # Nothing to report where there was no choice.
        self._logged = self.threads is not None and not self._why

    def _wrap(self, batches: Iterator) -> Iterator:
        before = torch.get_num_threads()
        last: Optional[Tuple[int, float]] = None  # (threads of the previous batch, its hand-over)
        try:
            for n, batch in enumerate(batches):
                now = time.perf_counter()
                if last is not None and self.threads is None and n > SKIP_PERIODS:
                    # The period of batch n - 1: its step and the wait for batch n.
                    self.measured[last[0]].append(now - last[1])
                    self._decide()
                threads = self.threads if self.threads is not None else self._next_trial(n)
                if threads != torch.get_num_threads():
                    torch.set_num_threads(threads)
                self._log()
                last = (threads, now)
                yield batch
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    def _next_trial(self, n: int) -> int:
        if n < SKIP_PERIODS:
            # Unmeasured batches run with fewer threads: at worst a GEMM-bound step runs a few
            # batches at half speed, while a stalled one can take 10-30x its time.
            return self.candidates[-1]
        # Alternate, so a change in the machine's load reaches every candidate alike.
        timed = sum(len(v) for v in self.measured.values())
        return self.candidates[timed % len(self.candidates)]

    def _decide(self) -> None:
        timed = min(len(v) for v in self.measured.values())
        if timed == 0:
            return
        med = {n: statistics.median(v) for n, v in self.measured.items()}
        full, fewer = self.candidates
        clear = max(med.values()) > CLEAR_RATIO * min(med.values())
        if timed < PERIODS_PER_CANDIDATE and not clear:
            return
        self.threads = fewer if med[fewer] * FEWER_MARGIN < med[full] else full
        self._why = "measured " + ", ".join(f"{1e3 * t:.0f} ms per batch with {n}" for n, t in med.items())

    def _log(self) -> None:
        if self._logged or self.threads is None:
            return
        self._logged = True
        logger.info("training step: %d intra-op thread(s) beside the DataLoader workers (%s)", self.threads, self._why)
