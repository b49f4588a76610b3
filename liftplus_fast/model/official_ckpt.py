"""Reading and writing the published LIFT+ checkpoint format (``checkpoint.pth.tar["tuner"]``).

The model's ``tuner`` module is laid out like the published ``PEFT_Model.tuner``, so the key
names match one to one; this module adds the checks (key sets, shapes) and the copying.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Mapping

import torch
import torch.nn as nn

from ..errors import UserInputError

__all__ = ["export_official", "import_official"]


def export_official(tuner: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The tuner's tensors under the published key names (detached copies)."""
    return OrderedDict((k, v.detach().clone()) for k, v in tuner.state_dict().items())


def _unwrap(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    if "tuner" in state_dict and isinstance(state_dict["tuner"], Mapping):
        state_dict = state_dict["tuner"]  # a whole checkpoint.pth.tar was passed
    # DataParallel checkpoints prefix every key with "module." (the published saver strips it).
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def import_official(tuner: nn.Module, state_dict: Mapping, strict: bool = True) -> None:
    """Copy a published-format tuner state dict into ``tuner``.

    Raises ``ValueError`` naming the first key whose shape differs (always), and with ``strict``
    the keys missing from or unexpected in the checkpoint. Nothing is copied unless every check
    passes.
    """
    src = _unwrap(state_dict)
    own = tuner.state_dict(keep_vars=True)
    missing = [k for k in own if k not in src]
    unexpected = [k for k in src if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise UserInputError("checkpoint does not match this model's tuner (different tuner, backbone "
                         "depth or method?): " + "; ".join(parts))
    for k, v in src.items():
        if k in own and tuple(torch.as_tensor(v).shape) != tuple(own[k].shape):
            raise UserInputError(f"checkpoint key {k!r} has shape {tuple(torch.as_tensor(v).shape)} but the "
                             f"model expects {tuple(own[k].shape)} (different backbone width, "
                             "bottleneck or class count?)")
    with torch.no_grad():
        for k, v in src.items():
            if k in own:
                own[k].copy_(torch.as_tensor(v).to(device=own[k].device, dtype=own[k].dtype))
