"""Tuner-only checkpoints in the published format, written atomically.

``checkpoint.pth.tar`` is a dict whose ``"tuner"`` entry is the published code's tuner state
dict (so the published ``load_model`` reads it). liftplus_fast adds the training state needed to
resume (``epoch``, ``optimizer``, ``scheduler``, ``config``) under other keys, which the
published loader ignores. Nothing of the frozen backbone is stored.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
import zipfile
from typing import Any, Dict

import torch

from .errors import MissingInputError, OutputWriteError, UserInputError

CHECKPOINT_NAME = "checkpoint.pth.tar"
FORMAT = "liftplus_fast/1"


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it over ``path``.

    The file gets the permissions the umask gives new files (``mkstemp`` alone would leave it
    0600). A failure (disk full, read-only folder) raises :class:`OutputWriteError` naming the
    file and the cause, with the temporary file removed and the previous ``path`` untouched.
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
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):
            kept = " (its previous version is kept)" if os.path.exists(path) else ""
            raise OutputWriteError(f"could not write {path}{kept}: {exc.strerror or exc}") from None
        if isinstance(exc, RuntimeError) and "write" in str(exc).lower():
            # torch.save reports a failed write (a full disk) as a RuntimeError of its own.
            kept = " (its previous version is kept)" if os.path.exists(path) else ""
            raise OutputWriteError(f"could not write {path}{kept}: {str(exc).splitlines()[0]}") from None
        raise


def _json_safe(value: Any) -> Any:
    # NaN/inf (an empty many/med/few group) are not JSON: strict readers (jq, JavaScript)
    # reject them, so they are written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_json(path: str, payload: Any) -> None:
    """Write ``payload`` as strict JSON atomically (non-finite floats become ``null``)."""
    text = json.dumps(_json_safe(payload), indent=2, default=str, allow_nan=False)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def save_checkpoint(path: str, tuner_state: Dict[str, torch.Tensor], **extra: Any) -> None:
    """Save ``{"tuner": tuner_state, **extra}`` atomically to ``path``."""
    payload = {"tuner": {k: v.detach().cpu() for k, v in tuner_state.items()}, "format": FORMAT}
    payload.update(extra)
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint written by this package or by the published LIFT+ code.

    A folder is accepted too (its ``checkpoint.pth.tar``). Raises ``FileNotFoundError`` or
    ``ValueError`` with the path when the file is missing, unreadable or has no ``"tuner"``.
    """
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise MissingInputError(f"checkpoint not found at {path!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise UserInputError(f"could not read checkpoint {path!r}: {_unreadable_reason(path, exc)}") from None
    if not isinstance(payload, dict) or "tuner" not in payload:
        raise UserInputError(f"{path!r} is not a LIFT+ tuner checkpoint (no 'tuner' entry)")
    return payload


def _unreadable_reason(path: str, exc: Exception) -> str:
    # torch's own messages for these cases are "[Errno 22] Invalid argument", an empty string
    # or advice to turn off the safe loader; say what is wrong with the file instead.
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):
        return f"not a PyTorch checkpoint ({size} bytes, not a zip archive: truncated or another format)"
    if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
        return (
            "it holds Python objects other than tensors and plain containers, which the safe "
            "loader refuses (liftplus_fast and the published LIFT+ code store only tensors)"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"the archive is damaged or truncated ({first})"
