"""Writing files whole or not at all: the one place the package (and its benchmarks) writes a file.

Every file is written to a temporary file beside its final name, flushed to disk and renamed
over the final name, so a reader sees the previous version or the new one, never a part. A
failure (disk full, read-only folder) leaves the previous version untouched and no temporary
file behind, and raises :class:`~liftplus_fast.errors.OutputWriteError` naming the file.
Only the append-only logs (``log.txt``, TensorBoard events) are written otherwise.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, BinaryIO, Callable, Optional

from .errors import OutputWriteError

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "json_safe"]


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _failed(path: str, cause: str) -> OutputWriteError:
    kept = " (its previous version is kept)" if os.path.exists(path) else ""
    return OutputWriteError(f"could not write {path}{kept}: {cause}")


def atomic_write(
    path: str, write: Callable[[BinaryIO], Any], before_replace: Optional[Callable[[], Any]] = None
) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it over ``path``.

    ``before_replace`` runs once the new contents are on disk, just before the rename (e.g. to
    remove a file that must never be seen beside the new one). The file gets the permissions
    the umask gives new files (``mkstemp`` alone would leave it 0600). The folder is created
    when missing.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OutputWriteError):
            raise
        if isinstance(exc, OSError):
            raise _failed(path, exc.strerror or str(exc)) from None
        if isinstance(exc, RuntimeError) and "write" in str(exc).lower():
            # torch.save reports a failed write (a full disk) as a RuntimeError of its own.
            raise _failed(path, str(exc).splitlines()[0]) from None
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None``.

    NaN/inf (an empty many/med/few group) are not JSON: strict readers (jq, JavaScript) reject
    them, so they are written as null.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(path: str, payload: Any, indent: int = 2) -> None:
    """Write ``payload`` as strict JSON atomically (non-finite floats become ``null``)."""
    text = json.dumps(json_safe(payload), indent=indent, default=str, allow_nan=False)
    atomic_write_bytes(path, text.encode())
