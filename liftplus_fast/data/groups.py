"""Many / medium / few-shot class groups and their accuracies."""

from __future__ import annotations

import math
from typing import Dict, Sequence

import torch

# The published evaluation's thresholds: few < FEW_SHOT <= medium <= MANY_SHOT < many.
MANY_SHOT, FEW_SHOT = 100, 20


def shot_masks(cls_num_list: Sequence[int], many: int = MANY_SHOT, few: int = FEW_SHOT) -> Dict[str, torch.Tensor]:
    """Boolean mask over classes per group: ``many`` (> many), ``med`` (few..many inclusive), ``few`` (< few)."""
    counts = torch.as_tensor(list(cls_num_list), dtype=torch.long)
    return {"many": counts > many, "med": (counts >= few) & (counts <= many), "few": counts < few}


def shot_groups(cls_num_list: Sequence[int], many: int = MANY_SHOT, few: int = FEW_SHOT) -> Dict[str, torch.Tensor]:
    """Class indices per group of :func:`shot_masks`.

    Each value is a 1-D ``LongTensor`` (possibly empty), never a 0-d scalar.
    """
    return {name: torch.nonzero(mask).flatten() for name, mask in shot_masks(cls_num_list, many, few).items()}


def group_accuracies(
    per_class_acc, cls_num_list: Sequence[int], many: int = MANY_SHOT, few: int = FEW_SHOT
) -> Dict[str, float]:
    """Mean of ``per_class_acc`` over each shot group; ``nan`` for an empty group."""
    acc = torch.as_tensor(per_class_acc, dtype=torch.float64).flatten()
    if acc.numel() != len(cls_num_list):
        raise ValueError(
            f"per_class_acc has {acc.numel()} entries but cls_num_list has {len(cls_num_list)}; expected one per class"
        )
    out = {}
    for name, idx in shot_groups(cls_num_list, many, few).items():
        out[name] = float(acc[idx].mean()) if idx.numel() else math.nan
    return out
