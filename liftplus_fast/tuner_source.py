"""Where a trained tuner is read from: a checkpoint file, a run folder, or a safetensors tuner folder.

A run folder holds both forms: ``checkpoint.pth.tar`` (the published format, written after every
epoch) and ``tuner/`` (``tuner.safetensors`` + ``tuner_config.json``, written when training
ends). The checkpoint is read when the folder holds one, so a folder whose run stopped early
gives its last epoch; a folder written by ``model.save_tuner`` (or a copy of a run's
``tuner/``) is read without any pickle.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .errors import MissingInputError, UserInputError
from .model.tuner_files import CONFIG_NAME, TENSORS_NAME, read_tuner

__all__ = ["TUNER_FOLDER", "load_trained_tuner", "tuner_folder"]

TUNER_FOLDER = "tuner"  # a run folder's safetensors tuner


def tuner_folder(path: str) -> Optional[str]:
    """The safetensors tuner folder ``path`` is or holds (``path`` or ``path/tuner``), or ``None``."""
    for folder in (path, os.path.join(path, TUNER_FOLDER)):
        if os.path.isfile(os.path.join(folder, TENSORS_NAME)):
            return folder
    return None


def load_trained_tuner(model_dir: str) -> Dict[str, Any]:
    """``{"tuner": tensors in the published key layout, ...}`` from ``model_dir``: a checkpoint
    file, a folder holding ``checkpoint.pth.tar``, or a tuner folder (``tuner.safetensors`` and
    ``tuner_config.json``, or a run folder's ``tuner/``). A tuner folder's config comes back
    under ``"tuner_config"``."""
    if os.path.isdir(model_dir) and not os.path.isfile(os.path.join(model_dir, CHECKPOINT_NAME)):
        folder = tuner_folder(model_dir)
        if folder is None:
            raise MissingInputError(
                f"model_dir {model_dir!r} holds no trained tuner: expected {CHECKPOINT_NAME}, "
                f"{TENSORS_NAME} with {CONFIG_NAME}, or a {TUNER_FOLDER}/ folder holding them"
            )
        try:
            config, tensors = read_tuner(folder)
        except ValueError as exc:  # a damaged or foreign file: the user's input, named
            raise UserInputError(str(exc)) from None
        return {"tuner": tensors, "tuner_config": config}
    return load_checkpoint(model_dir)
