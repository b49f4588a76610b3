"""Many / medium / few-shot class groups and their accuracies."""

from __future__ import annotations

import math
from typing import Dict, Sequence

import torch


def shot_groups(cls_num_list: Sequence[int], many: int = 100, few: int = 20) -> Dict[str, torch.Tensor]:
    """Class indices by training-set size: ``many`` (> many), ``med`` (few..many inclusive), ``few`` (< few).

    Each value is a 1-D ``LongTensor`` (possibly empty), never a 0-d scalar.
    """
    counts = torch.as_tensor(list(cls_num_list), dtype=torch.long)
    return {
        "many": torch.nonzero(counts > many).flatten(),
        "med": torch.nonzero((counts >= few) & (counts <= many)).flatten(),
        "few": torch.nonzero(counts < few).flatten(),
    }


def group_accuracies(per_class_acc, cls_num_list: Sequence[int], many: int = 100, few: int = 20) -> Dict[str, float]:
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
