"""Every exception the package raises on purpose, under one base class, :class:`LiftPlusError`.

Catch :class:`LiftPlusError` for all of them. Each also derives from the built-in exception a
caller would expect (``ValueError`` for bad input, ``OSError`` for what the environment
refused), so ``except ValueError`` and ``except OSError`` keep working::

    LiftPlusError
    ├── UserInputError (ValueError)          bad input: an option, a name, a path, a data file
    │   ├── MissingInputError (FileNotFoundError)   a file or folder the user named is missing
    │   ├── CorruptImageError                an image file that cannot be decoded
    │   ├── CacheError                       a decode-once cache that is missing, stale or damaged
    │   ├── ResumeMismatchError              resume asked with other schedule options
    │   ├── BackboneLoadError (RuntimeError)         backbone weights not obtainable
    │   ├── DatasetUnavailableError (RuntimeError)   data set neither on disk nor downloadable
    │   ├── DivergenceError (RuntimeError)           non-finite loss or tuner
    │   └── BackendUnavailableError (RuntimeError)   the kernel backend asked for cannot run
    ├── OutputWriteError (OSError)           an output file could not be written
    ├── RunExistsError (FileExistsError)     the output folder holds a run; no resume/overwrite
    ├── RunInUseError (BlockingIOError)      the output folder is locked by a live run
    ├── CollectiveTimeoutError (TimeoutError, RuntimeError)   a stalled data-parallel process
    ├── ProcessLostError (ConnectionError, RuntimeError)      a data-parallel process that ended
    └── RunStoppedError                      SIGINT/SIGTERM: stopped at a safe point

The command line prints a :class:`LiftPlusError` (and any ``OSError``) as one line and exits
with status 2 (a :class:`RunStoppedError` with 128 + the signal's number, as a shell reports a
command a signal ended); every other exception is a bug of the package and keeps its traceback.
"""

from typing import Optional

__all__ = [
    "BackboneLoadError",
    "BackendUnavailableError",
    "CacheError",
    "CollectiveTimeoutError",
    "CorruptImageError",
    "DatasetUnavailableError",
    "DivergenceError",
    "LiftPlusError",
    "MissingInputError",
    "OutputWriteError",
    "ProcessLostError",
    "ResumeMismatchError",
    "RunExistsError",
    "RunInUseError",
    "RunStoppedError",
    "UserInputError",
]


class LiftPlusError(Exception):
    """Base of every exception the package raises on purpose."""


class UserInputError(LiftPlusError, ValueError):
    """Bad input from the user; the message names the input and what was expected."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class CorruptImageError(UserInputError):
    """An image file exists but cannot be decoded. ``path`` holds the file.

    ``CorruptImageError(message)`` (one argument) is accepted too, so the error survives being
    re-raised from a DataLoader worker.
    """

    def __init__(self, path: str, reason: Optional[str] = None):
        self.path = path
        super().__init__(path if reason is None else f"cannot decode image {path!r}: {reason}")


class CacheError(UserInputError):
    """A cache that is missing, incomplete, truncated, stale or not a cache of this package."""


class ResumeMismatchError(UserInputError):
    """A resume was asked for with options that differ from those the run was started with."""


class BackboneLoadError(UserInputError, RuntimeError):
    """The backbone's weights could not be obtained (download failed, or no such file)."""


class DatasetUnavailableError(UserInputError, RuntimeError):
    """The data set is not on disk and could not be downloaded."""


class DivergenceError(UserInputError, RuntimeError):
    """Training produced a non-finite loss or parameters; the last good checkpoint is kept."""


class BackendUnavailableError(UserInputError, RuntimeError):
    """The backend ``LIFTPLUS_FAST_BACKEND`` asks for cannot run an op on these tensors."""


class OutputWriteError(LiftPlusError, OSError):
    """A file of the output folder could not be written; the previous version, if any, is intact."""


class RunExistsError(LiftPlusError, FileExistsError):
    """The output folder already holds a run and neither resume nor overwrite was asked for."""


class CollectiveTimeoutError(LiftPlusError, TimeoutError, RuntimeError):
    """A collective waited longer than ``dist_timeout`` for another process.

    A ``TimeoutError`` (the environment failed, not the input: the command line prints it as one
    line) and a ``RuntimeError`` (what torch.distributed raised before it was explained).
    """


class ProcessLostError(LiftPlusError, ConnectionError, RuntimeError):
    """Another process of a data-parallel run ended (killed, crashed, its node lost) while this
    one exchanged data with it. A ``ConnectionError`` (the command line prints it as one line)
    and a ``RuntimeError`` (what torch.distributed raised before it was explained)."""


class RunInUseError(LiftPlusError, BlockingIOError):
    """The output folder is locked by a live run (see :mod:`liftplus_fast.run_lock`).

    ``holder`` is what the live run wrote about itself (``pid``, ``host``, ``command``,
    ``started``), or ``{}`` when it had not written it yet.
    """

    def __init__(self, message: str, holder: Optional[dict] = None):
        super().__init__(message)
        self.holder = dict(holder or {})


class RunStoppedError(LiftPlusError):
    """SIGINT or SIGTERM stopped the work at a safe point (see :mod:`liftplus_fast.stop_signals`).

    ``signum`` is the signal's number; ``detail`` says where the work stopped and what was kept;
    ``hint``, when the work can be continued, how (in Python terms; the command line prints its
    own command). ``str()`` is the detail followed by the hint.
    """

    def __init__(self, detail: str, signum: int, hint: Optional[str] = None):
        super().__init__(detail + (f"; {hint}" if hint else ""))
        self.detail = detail
        self.signum = int(signum)
        self.hint = hint
