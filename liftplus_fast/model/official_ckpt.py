"""Reading and writing the published LIFT+ checkpoint format (``checkpoint.pth.tar["tuner"]``).

The model's ``tuner`` module is laid out like the published ``PEFT_Model.tuner``
(``image_encoder.blocks.{i}.<tuner>``, ``classifier``). Inside a transformer block the published
code keeps the attention and MLP tuners in ``attn`` / ``mlp`` sub-dicts and names backbone
tensors after its own ``in_proj`` / ``out_proj`` linears; :func:`published_key` and
:func:`package_key` translate those names both ways, so every tuner (AdaptFormer, VPT, LoRA,
Adapter, SSF, AFT, full fine-tuning, BitFit, the ResNet tuners, the classifier) moves between
this package and the published code. This module adds the checks (key sets, shapes) and copying.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, Mapping

import torch
import torch.nn as nn

from ..errors import UserInputError

__all__ = ["export_official", "import_official", "package_key", "published_key"]

# Sites of a transformer block: package name -> (published sub-dict, published linear name).
_SITES = {
    "attn_in": ("attn", "in_proj"),
    "attn_out": ("attn", "out_proj"),
    "mlp_in": ("mlp", "in_proj"),
    "mlp_out": ("mlp", "out_proj"),
}
_BLOCK = re.compile(r"^((?:image|text)_encoder\.blocks\.\d+\.)(.*)$")


def published_key(key: str) -> str:
    """The published checkpoint's name of a package tuner key."""
    m = _BLOCK.match(key)
    if not m:
        return key
    head, rest = m.groups()
    first, _, tail = rest.partition(".")
    if first == "lora":
        return f"{head}attn.lora.{tail}"
    if first == "adapter":
        return f"{head}mlp.adapter.{tail}"
    if first in ("ssf", "aft"):
        site, _, leaf = tail.partition(".")
        if site in _SITES:
            part, linear = _SITES[site]
            return f"{head}{part}.{first}.{linear}.{leaf}"
    for site, (part, linear) in _SITES.items():  # full fine-tuning / BitFit: backbone tensors
        for kind in ("weight", "bias"):
            if rest == f"{site}_{kind}":
                return f"{head}{part}_{linear}_{kind}"
    return key


def package_key(key: str) -> str:
    """Inverse of :func:`published_key`."""
    m = _BLOCK.match(key)
    if not m:
        return key
    head, rest = m.groups()
    parts = rest.split(".")
    if parts[0] == "attn" and len(parts) > 1 and parts[1] == "lora":
        return head + ".".join(["lora"] + parts[2:])
    if parts[0] == "mlp" and len(parts) > 1 and parts[1] == "adapter":
        return head + ".".join(["adapter"] + parts[2:])
    if parts[0] in ("attn", "mlp") and len(parts) > 2 and parts[1] in ("ssf", "aft"):
        for site, (part, linear) in _SITES.items():
            if part == parts[0] and linear == parts[2]:
                return head + ".".join([parts[1], site] + parts[3:])
    for site, (part, linear) in _SITES.items():
        for kind in ("weight", "bias"):
            if rest == f"{part}_{linear}_{kind}":
                return f"{head}{site}_{kind}"
    return key


def export_official(tuner: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The tuner's tensors under the published key names (detached copies)."""
    return OrderedDict((published_key(k), v.detach().clone()) for k, v in tuner.state_dict().items())


def _unwrap(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    if "tuner" in state_dict and isinstance(state_dict["tuner"], Mapping):
        state_dict = state_dict["tuner"]  # a whole checkpoint.pth.tar was passed
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise UserInputError(f"a tuner state dict maps parameter names to tensors; got {type(state_dict).__name__}")
    # DataParallel checkpoints prefix every key with "module." (the published saver strips it).
    return {package_key(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def import_official(tuner: nn.Module, state_dict: Mapping, strict: bool = True) -> None:
    """Copy a published-format tuner state dict into ``tuner``.

    Raises ``ValueError`` naming the first key that is not a float tensor of the model's shape
    with finite values (always), and with ``strict`` the keys missing from or unexpected in the
    checkpoint. Nothing is copied unless every check
    passes.
    """
    src = _unwrap(state_dict)
    own = tuner.state_dict(keep_vars=True)
    missing = [published_key(k) for k in own if k not in src]
    unexpected = [published_key(k) for k in src if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise UserInputError(
            "checkpoint does not match this model's tuner (different tuner, backbone "
            "depth or method?): " + "; ".join(parts)
        )
    for k, v in src.items():
        if k not in own:
            continue
        if not isinstance(v, torch.Tensor) or not (v.is_floating_point() or v.dtype == own[k].dtype):
            raise UserInputError(
                f"checkpoint key {published_key(k)!r} holds {type(v).__name__}"
                f"{f' of {v.dtype}' if isinstance(v, torch.Tensor) else ''}, not a float tensor"
            )
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserInputError(
                f"checkpoint key {published_key(k)!r} has shape {tuple(v.shape)} but the "
                f"model expects {tuple(own[k].shape)} (different backbone width, "
                "bottleneck or class count?)"
            )
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserInputError(f"checkpoint key {published_key(k)!r} holds non-finite values (NaN or inf)")
    with torch.no_grad():
        for k, v in src.items():
            if k in own:
                own[k].copy_(v.to(device=own[k].device, dtype=own[k].dtype))
