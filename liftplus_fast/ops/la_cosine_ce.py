"""Public logit-adjusted cosine cross-entropy op with fused backends.

``loss = mean_b CE(scale * F̂_b Ŵᵀ + tau * log_prior, y_b)``. When a gradient is needed the
forward also returns the gradients for ``grad_loss = 1`` and the backward only scales them, so
the logits GEMM is not recomputed (3 GEMMs per step, as the reference); the call, autograd and
fake kernel are in :mod:`._bindings.la_cosine_ce`, registered here for the native namespace
(and by :mod:`.triton` for the Triton one). Classes are processed in chunks, so large class
counts run in O(B × chunk) extra memory. Math: ``docs/ops.md``.
"""

from __future__ import annotations

import torch

from . import _library, reference
from ._bindings import la_cosine_ce as _binding
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._dispatch import dispatch, register, register_native
from ._native import native_status

OP = "la_cosine_cross_entropy"


def check_la_ce_args(feat, weight, labels, log_prior) -> None:
    """Validate shapes, dtypes and devices of the loss arguments."""
    check_tensor("feat", feat, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, dim=2)
    b, d = feat.shape
    k = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(
            f"weight must have shape (K, {d}) to match feat {tuple(feat.shape)}; got {tuple(weight.shape)}"
        )
    if k == 0:
        raise ValueError(f"weight must have at least one class (row); got shape {tuple(weight.shape)}")
    check_tensor("labels", labels, dtypes=(torch.int64,), shape=(b,))
    check_tensor("log_prior", log_prior, dtypes=FLOAT_DTYPES, shape=(k,))
    check_same_device(feat=feat, weight=weight, labels=labels, log_prior=log_prior)


def la_cosine_cross_entropy(
    feat, weight, labels, log_prior, scale: float = 25.0, tau: float = 1.0, return_logits: bool = False
):
    """Mean logit-adjusted cross-entropy of the cosine classifier ``scale * F̂ Ŵᵀ``.

    Args:
        feat: image features ``[B, D]`` (fp32, bf16 or fp16).
        weight: classifier weight ``[K, D]`` (not normalised; normalised inside).
        labels: ``int64`` targets ``[B]`` in ``[0, K)``.
        log_prior: ``log(class count / total)``, ``[K]``.
        scale: cosine-classifier scale (25 in LIFT+).
        tau: logit-adjustment strength (1 in LIFT+; 0 gives plain CE).
        return_logits: also return the unadjusted cosine logits ``[B, K]`` (detached, dtype of
            ``feat``), for training accuracy.

    Returns:
        The fp32 scalar loss, or ``(loss, logits)`` with ``return_logits``.
    """
    check_la_ce_args(feat, weight, labels, log_prior)
    if feat.shape[0] == 0:
        raise ValueError("feat must hold at least one row; got an empty batch")
    impl = dispatch(OP, feat.device)
    return impl(feat, weight, labels, log_prior, float(scale), float(tau), bool(return_logits))


register(OP, "reference", reference.la_cosine_cross_entropy)


if native_status().loaded:
    _binding.register_fakes(_library.NATIVE)
    _binding.register_autograd(_library.NATIVE)
    register_native(OP, _binding.kernel_call(_library.NATIVE), "la_cosine_ce_fwd")
