"""Public test-time-ensembling ops: crop-logit aggregation and the feature-space shortcut.

Math: ``docs/ops.md``, "Test-time ensembling".
"""

from __future__ import annotations

import torch

from . import _library, reference
from ._bindings import tte as _binding
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._dispatch import dispatch, register, register_native
from ._native import native_status
from .reference import TTEResult

OP = "tte_aggregate"
OP_FEATURES = "tte_mean_unit_features"


def tte_aggregate(crop_logits, labels=None) -> TTEResult:
    """Mean over crops, argmax (first maximum wins) and per-class hit counts in one pass.

    Args:
        crop_logits: ``[C, B, K]`` logits of C crops of B images (fp32, bf16 or fp16).
        labels: optional ``int64`` ``[B]`` targets in ``[0, K)``.

    Returns:
        :class:`TTEResult` ``(logits [B, K] in the input dtype, pred int64 [B],
        correct int64 [K] or None, total int64 [K] or None)``.
    """
    check_tensor("crop_logits", crop_logits, dtypes=FLOAT_DTYPES, dim=3)
    c, b, k = crop_logits.shape
    if c == 0 or k == 0:
        raise ValueError(f"crop_logits needs at least one crop and one class; got shape {(c, b, k)}")
    if labels is not None:
        check_tensor("labels", labels, dtypes=(torch.int64,), shape=(b,))
        check_same_device(crop_logits=crop_logits, labels=labels)
    return dispatch(OP, crop_logits.device)(crop_logits, labels)


def tte_mean_unit_features(crop_feats):
    """Mean over crops of the L2-normalised features: ``[C, B, D] -> [B, D]``.

    With a cosine classifier, ``scale * tte_mean_unit_features(f) @ normalize(W).T`` equals the
    mean of the crops' logits up to rounding, at the cost of one classifier GEMM instead of C.
    """
    check_tensor("crop_feats", crop_feats, dtypes=FLOAT_DTYPES, dim=3)
    if crop_feats.shape[0] == 0:
        raise ValueError(f"crop_feats needs at least one crop; got shape {tuple(crop_feats.shape)}")
    return dispatch(OP_FEATURES, crop_feats.device)(crop_feats)


register(OP, "reference", reference.tte_aggregate)
register(OP_FEATURES, "reference", reference.tte_mean_unit_features)


if native_status().loaded:
    _binding.register_fakes(_library.NATIVE)
    _aggregate, _unit_mean = _binding.kernel_calls(_library.NATIVE)
    register_native(OP, _aggregate, "tte_aggregate")
    register_native(OP_FEATURES, _unit_mean, "tte_mean_unit_features")
