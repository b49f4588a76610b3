"""Test-time-ensembling binding: ``tte_aggregate`` / ``tte_mean_unit_features`` of one namespace
(native or Triton) as the calls the public ops make (no autograd: evaluation only)."""

from __future__ import annotations

import torch

from .. import _library
from ..reference import TTEResult


def kernel_calls(namespace: str):
    """The backend functions running ``namespace::tte_aggregate`` and ``tte_mean_unit_features``."""
    agg = _library.op(namespace, "tte_aggregate")
    unit = _library.op(namespace, "tte_mean_unit_features")

    def aggregate(crop_logits, labels):
        mean, pred, correct, total = agg(crop_logits, labels)
        if labels is None:
            return TTEResult(mean, pred, None, None)
        return TTEResult(mean, pred, correct, total)

    def unit_mean(crop_feats):
        return unit(crop_feats)

    return aggregate, unit_mean


def _fake_tte(crop_logits, labels):
    _c, b, k = crop_logits.shape
    counts = (k,) if labels is not None else (0,)
    return (
        crop_logits.new_empty((b, k)),
        crop_logits.new_empty((b,), dtype=torch.int64),
        crop_logits.new_empty(counts, dtype=torch.int64),
        crop_logits.new_empty(counts, dtype=torch.int64),
    )


def _fake_unit_mean(crop_feats):
    return crop_feats.new_empty(crop_feats.shape[1:])


def register_fakes(namespace: str) -> None:
    """The fake kernels of a namespace whose kernels are not Triton ops (those trace themselves)."""
    _library.register_fakes(namespace, tte_aggregate=_fake_tte, tte_mean_unit_features=_fake_unit_mean)
