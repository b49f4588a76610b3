"""Tuner-only checkpoints in the published format, written atomically.

``checkpoint.pth.tar`` is a dict whose ``"tuner"`` entry is the published code's tuner state
dict (so the published ``load_model`` reads it). liftplus_fast adds the training state needed to
resume (``epoch``, ``optimizer``, ``scheduler``, ``config``) under other keys, which the
published loader ignores. Nothing of the frozen backbone is stored.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Dict

import torch

from .errors import MissingInputError, OutputWriteError, UserInputError
from .files import atomic_write

# OutputWriteError: what save_checkpoint raises when the file cannot be written.
__all__ = ["CHECKPOINT_NAME", "FORMAT", "OutputWriteError", "load_checkpoint", "save_checkpoint"]
CHECKPOINT_NAME = "checkpoint.pth.tar"
FORMAT = "liftplus_fast/1"


def save_checkpoint(path: str, tuner_state: Dict[str, torch.Tensor], **extra: Any) -> None:
    """Save ``{"tuner": tuner_state, **extra}`` atomically to ``path``."""
    payload = {"tuner": {k: v.detach().cpu() for k, v in tuner_state.items()}, "format": FORMAT}
    payload.update(extra)
    atomic_write(path, lambda f: torch.save(payload, f))


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
