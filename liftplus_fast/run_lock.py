"""One writer or many readers in a run folder: an advisory lock the running process holds.

The contract, for every command that writes into a run folder (``train``; ``test`` into its own
``test-...`` folder) or reads a run (``test`` while it runs, ``predict`` while it loads the
tuner):

* call :func:`lock_run_folder` on the folder before writing anything there (``shared=True`` on
  a run it only reads), and keep the returned :class:`RunLock` until the command ends
  (``release()``, or ``with``);
* a writer excludes everyone and readers exclude writers: a lock of a folder that conflicts
  with a live one, taken by any process on any host that reaches the folder through a
  filesystem with POSIX locks (local disks, NFS with lockd or v4, Lustre, BeeGFS, GPFS), is
  refused with :class:`~liftplus_fast.errors.RunInUseError` naming the holder: its pid, host,
  command line and start time (of readers, the last to start while it is there).
  ``--overwrite`` does not change that: a live run is never replaced, nor a run while it is
  evaluated. Readers share: two tests of one run run side by side. A reader that cannot create
  the lock file (a read-only folder, which no one with its rights can train into) reads unlocked,
  with a warning;
* the lock belongs to the kernel: it ends with the holding process, whatever ends it (SIGKILL,
  a crash, a lost node once the filesystem notices), so it is never stale. The lock file,
  ``.liftplus_fast.lock``, holds the holder's description; the last holder to leave removes it,
  and one left behind by a killed process is taken over by the next command.

POSIX record locks (``fcntl.lockf``) rather than ``flock``: they belong to the process, not to
the open file, so DataLoader workers and other forked helpers never hold the lock after the run
itself has ended, and NFS clients forward them to the server.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from typing import Any, Dict, Optional

from .errors import RunInUseError

__all__ = ["LOCK_NAME", "READ", "WRITE", "RunLock", "lock_run_folder", "read_holder"]

LOCK_NAME = ".liftplus_fast.lock"
READ, WRITE = "read", "write"  # a holder's "mode": a reader's lock is shared, a writer's exclusive
_BUSY = (errno.EACCES, errno.EAGAIN)
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)

logger = logging.getLogger("liftplus_fast")

# Folders this process holds, by real path. POSIX locks are per process: opening and closing
# the lock file again in the holder would drop its lock, so a second lock here never opens it.
_HELD: Dict[str, "RunLock"] = {}


class RunLock:
    """The lock of one run folder, held until :meth:`release` (also on leaving a ``with`` block)."""

    def __init__(self, folder: str, fd: Optional[int], holder: Dict[str, Any]):
        self.folder = folder
        self.holder = holder
        self.shared = holder.get("mode") == READ
        self._fd = fd

    def release(self) -> None:
        """End the lock, removing the lock file when no other process holds it (idempotent)."""
        if _HELD.get(self.folder) is self:
            del _HELD[self.folder]
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self.shared:
            try:  # the last reader out: turning the lock exclusive succeeds only when no one else holds it
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                described = read_holder(self.folder)
                if (described.get("pid"), described.get("host")) == (self.holder["pid"], self.holder["host"]):
                    _describe_in(fd, {"mode": READ})  # other readers stay, undescribed
                os.close(fd)
                return
        try:
            # Unlinked while still locked: a command waiting on the old file finds it gone and
            # opens the new one (see _lock), so two commands never hold two files.
            os.unlink(os.path.join(self.folder, LOCK_NAME))
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) == "__main__.py":
        argv[0] = "python -m liftplus_fast"
    elif argv:
        argv[0] = os.path.basename(argv[0])
    return " ".join(argv[:1] + [shlex.quote(a) for a in argv[1:]])


def read_holder(folder: str) -> Dict[str, Any]:
    """What the lock file of ``folder`` says about its holder (``{}`` when absent or unreadable)."""
    try:
        with open(os.path.join(folder, LOCK_NAME), "rb") as f:
            data = json.loads(f.read(65536).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe_in(fd: int, holder: Dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)


def _describe(holder: Dict[str, Any]) -> str:
    if "pid" not in holder:
        return "another process (which has not described itself)"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}, "
        f"command {str(holder.get('command', '?'))!r}"
    )


def _refusal(folder: str, holder: Dict[str, Any]) -> RunInUseError:
    if holder.get("mode") == READ:
        what = f"is being read by a live command: {_describe(holder)}"
        never = "a run while it is read"
    else:
        what, never = f"is in use by a live run: {_describe(holder)}", "a live run"
    return RunInUseError(
        f"output folder {folder!r} {what}. Wait for it to end or stop it, or choose another output folder "
        f"(--overwrite never replaces {never})",
        holder,
    )


def lock_run_folder(folder: str, command: Optional[str] = None, *, shared: bool = False) -> RunLock:
    """Lock the existing folder ``folder`` for this process (see the module's contract): for
    writing, or with ``shared=True`` for reading it beside other readers.

    ``command`` describes this process to a refused one (default: its command line). Raises
    :class:`~liftplus_fast.errors.RunInUseError` naming the live holder when the folder is
    locked in a conflicting way by another process, or locked at all by this one. On a
    filesystem without locks the command runs unlocked, with a warning.
    """
    key = os.path.realpath(folder)
    if key in _HELD:
        holder = _HELD[key].holder
        raise RunInUseError(
            f"output folder {folder!r} is in use by this process ({_describe(holder)}); one run per folder",
            holder,
        )
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command or _command_line(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": READ if shared else WRITE,
    }
    fd = _lock(key, folder, shared)
    if fd is not None:
        _describe_in(fd, holder)
    lock = RunLock(key, fd, holder)
    _HELD[key] = lock
    return lock


def _same_file(path: str, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _lock(key: str, folder: str, shared: bool) -> Optional[int]:
    path = os.path.join(key, LOCK_NAME)
    for _ in range(100):  # each retry follows a holder that released the lock as we waited on it
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if not shared or exc.errno not in _READ_ONLY:
                raise
            # A run in a folder this user cannot write (a shared, read-only copy): nobody with
            # these rights can train into it either, so it is read unlocked.
            logger.warning("reading %s without its lock: %s", folder, exc.strerror or exc)
            return None
        try:
            fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _BUSY:
                holder = read_holder(key)
                if shared and holder.get("mode") == READ:
                    # Readers conflict only with the last reader leaving, which holds the file
                    # exclusively for a moment while it removes it.
                    time.sleep(0.01)
                    released = not _same_file(path, fd)
                    os.close(fd)
                    if released:
                        continue
                    holder = read_holder(key)
                else:
                    os.close(fd)
                raise _refusal(folder, holder) from None
            os.close(fd)
            logger.warning(
                "cannot lock the output folder %s (%s): this filesystem has no file locks, so a second run "
                "into the folder would not be refused",
                folder,
                exc.strerror or exc,
            )
            return None
        if _same_file(path, fd):
            return fd
        os.close(fd)  # locked a file its holder had just removed: lock the current one
    raise RunInUseError(f"output folder {folder!r}: its lock file keeps being replaced; is another run starting?")
