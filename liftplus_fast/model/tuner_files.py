"""Tuner files the PEFT way: ``tuner.safetensors`` plus ``tuner_config.json`` in one folder.

``tuner.safetensors`` holds only the trained tensors, under the published checkpoint's key
names (``image_encoder.blocks.{i}.adaptformer.*``, ``classifier.weight``). ``tuner_config.json``
holds everything needed to rebuild the model around its backbone: the method and every option,
the backbone name and weights tag, the image encoder it was trained on (family, feature width,
block count), the class names and training class counts. The published-format
``checkpoint.pth.tar`` (see :mod:`liftplus_fast.checkpoint`) stays the interchange format with
the published code; these files are for sharing and deploying a tuner without pickles. This module reads and
writes the files only; :func:`liftplus_fast.model.load_tuner` rebuilds the model from them.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import torch

from ..errors import MissingInputError, UserInputError
from ..files import atomic_write_bytes, atomic_write_json
from .encoders import describe_encoder

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "TENSORS_NAME",
    "format_trainable_parameters",
    "read_tuner",
    "read_tuner_config",
    "save_tuner",
    "trainable_parameters",
]

TENSORS_NAME = "tuner.safetensors"
CONFIG_NAME = "tuner_config.json"
FORMAT = "liftplus_fast.tuner/1"


def trainable_parameters(model) -> tuple:
    """``(trainable, total)`` parameter counts of ``model`` (tuner vs. everything)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_tuner(model, path: str) -> None:
    """Write ``path/tuner.safetensors`` and ``path/tuner_config.json`` for a ``LiftModel``.

    Both files are written to temporary names and renamed, the tensors first, so a reader never
    sees a config without its tensors.
    """
    from safetensors.torch import save

    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"path must be a folder for {TENSORS_NAME} and {CONFIG_NAME}; {path!r} is a file")
    # safetensors refuses tensors that share storage; the export already holds separate copies.
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.official_tuner_state_dict().items()}
    trainable, total = trainable_parameters(model)
    config = {
        "format": FORMAT,
        "method": model.cfg.method,
        "backbone": model.cfg.backbone,
        "pretrained": model.cfg.pretrained,
        "num_classes": model.num_classes,
        "classnames": model.classnames,
        "cls_num_list": [int(c) for c in model.cls_num.tolist()],
        **describe_encoder(model.image_encoder),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "config": model.cfg.to_dict(),
    }
    os.makedirs(path, exist_ok=True)
    payload = save(tensors, metadata={"format": FORMAT})
    atomic_write_bytes(os.path.join(path, TENSORS_NAME), payload)
    atomic_write_json(os.path.join(path, CONFIG_NAME), config)


def read_tuner_config(path: str) -> dict:
    """The parsed ``tuner_config.json`` of folder ``path`` (:class:`MissingInputError` /
    :class:`UserInputError` naming the file when it is missing or not one of these configs).

    The file is data: JSON whose every part is checked here (the options by
    ``LiftConfig.from_dict`` when the model is rebuilt); nothing in it is run."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise MissingInputError(f"no {CONFIG_NAME} in {path!r}: pass the folder written by model.save_tuner")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise UserInputError(f"{file!r} is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserInputError(f"{file!r} is not a liftplus_fast tuner config (format {FORMAT!r} expected)")
    problem = _config_problem(config)
    if problem:
        raise UserInputError(f"{file!r}: {problem}")
    return config


def _config_problem(config: dict) -> str:
    """What is wrong with the parts of a tuner config the model is rebuilt from ('' if nothing)."""
    k = config.get("num_classes")
    if type(k) is not int or k < 1:
        return f"num_classes must be an integer >= 1; got {k!r}"
    names, counts = config.get("classnames"), config.get("cls_num_list")
    if not isinstance(names, list) or len(names) != k or not all(isinstance(n, str) for n in names):
        return f"classnames must be a list of {k} strings"
    if not isinstance(counts, list) or len(counts) != k or not all(type(c) is int and c >= 0 for c in counts):
        return f"cls_num_list must be a list of {k} integers >= 0"
    if not isinstance(config.get("config"), dict):
        return "config (the options) must be a mapping of option names to values"
    for key in ("feature_dim", "blocks"):
        value = config.get(key)
        if value is not None and (type(value) is not int or value < 1):
            return f"{key} must be an integer >= 1; got {value!r}"
    family = config.get("image_encoder")
    if family is not None and not isinstance(family, str):
        return f"image_encoder must be a string (the encoder family); got {family!r}"
    return ""


def read_tuner(path: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """``(tuner_config.json as a dict, the tensors of tuner.safetensors)`` of folder ``path``.

    Reads files only: the model is rebuilt from them by :func:`liftplus_fast.model.load_tuner`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_tuner_config(path)
    tensors_file = os.path.join(path, TENSORS_NAME)
    if not os.path.isfile(tensors_file):
        raise MissingInputError(f"no {TENSORS_NAME} in {path!r} (the config is there: a partial copy?)")
    try:
        return config, load_file(tensors_file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserInputError(f"could not read {tensors_file!r}: {exc}") from None


def format_trainable_parameters(model) -> str:
    """``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330`` (PEFT's line)."""
    trainable, total = trainable_parameters(model)
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100.0 * trainable / max(total, 1):.4f}"
    )
