"""SIGINT and SIGTERM: stop at a safe point, keep what is finished, say how to continue.

Work runs inside :func:`handle_stop_signals` (the command line, ``fast_train`` and
``build_cache`` enter it; nested entries share the outermost one). There the first SIGINT
(Ctrl-C) or SIGTERM (``kill``, a scheduler's notice, ``torchrun`` passing either on):

* inside a :func:`safe_points` region (the training epochs, evaluation, the classifier's
  feature pass, building a cache) is recorded, and the loop stops at its next safe point
  (:func:`check_stop`: after an optimiser step, between evaluation batches, between cache
  chunks) by raising :class:`~liftplus_fast.errors.RunStoppedError`. Checkpoints and cache
  chunks are written between safe points, so the last one is always whole;
* outside one (setting up: options, data checks, loading weights) raises ``KeyboardInterrupt``
  at once, as Python does: nothing is written there that a new start would miss. The run's
  entry points turn it into a :class:`RunStoppedError`.

A second SIGINT ends the process at once (exit status 130): every file is written by rename, so
at worst a temporary file is left beside it. A repeated SIGTERM changes nothing (the stop is
under way; a scheduler's SIGKILL follows its grace period). Processes forked while the handlers
are installed (DataLoader workers, cache builders) ignore SIGINT and die of SIGTERM: the main
process decides when to stop, and ends them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Optional

from .errors import RunStoppedError

__all__ = ["check_stop", "handle_stop_signals", "requested", "safe_points", "signal_name", "stop_error"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _State:
    owner: Optional[int] = None  # pid of the process whose handlers these are
    depth = 0  # nested handle_stop_signals
    defer = 0  # nested safe_points
    signum: Optional[int] = None  # the stop signal received, if any
    previous: dict = {}


_state = _State()


def signal_name(signum: int) -> str:
    """``"SIGINT"`` for 2, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def requested() -> Optional[int]:
    """The stop signal this process received inside :func:`handle_stop_signals`, or ``None``."""
    return _state.signum if _state.owner == os.getpid() else None


def _on_signal(signum, frame) -> None:
    if os.getpid() != _state.owner:  # a forked child: the main process decides
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        return
    if _state.signum is not None:
        if signum == signal.SIGINT:
            os.write(2, f"\nliftplus-fast: {signal_name(signum)} again: stopped at once\n".encode())
            os._exit(128 + signum)
        return
    _state.signum = signum
    if _state.defer == 0:
        raise KeyboardInterrupt(signal_name(signum))
    if sys.stderr is not None and sys.stderr.isatty():  # someone at a terminal pressed Ctrl-C
        note = f"\nliftplus-fast: {signal_name(signum)}: stopping at the next safe point (Ctrl-C again: at once)\n"
        os.write(2, note.encode())


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def handle_stop_signals():
    """Handle SIGINT and SIGTERM as the module says, until the outermost entry is left (then the
    previous handlers are back). Outside the main thread (where Python cannot set handlers),
    nothing changes."""
    if not _main_thread():
        yield
        return
    if _state.depth == 0:
        _state.owner, _state.signum, _state.defer = os.getpid(), None, 0
        _state.previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if _state.depth == 0:
            for s, handler in _state.previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            _state.previous, _state.owner = {}, None


@contextlib.contextmanager
def safe_points():
    """A region whose loop calls :func:`check_stop` at its safe points: a stop signal received
    inside is only recorded."""
    if _state.depth == 0 or not _main_thread():
        yield
        return
    _state.defer += 1
    try:
        yield
    finally:
        _state.defer -= 1


def stop_error(where: str, hint: Optional[str] = None, signum: Optional[int] = None) -> RunStoppedError:
    """The :class:`RunStoppedError` of a stop ``where`` (``"at epoch 2, step 5 of 9"``).

    ``signum`` defaults to the signal received here, else SIGTERM (the processes of a
    data-parallel run agree to stop when any of them received a signal)."""
    signum = signum or requested() or signal.SIGTERM
    return RunStoppedError(f"stopped by {signal_name(signum)} {where}", signum, hint)


def check_stop(where: str) -> None:
    """A safe point: raise :func:`stop_error` when a stop signal was received."""
    if requested() is not None:
        raise stop_error(where)
