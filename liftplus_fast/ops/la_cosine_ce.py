"""Public logit-adjusted cosine cross-entropy op with fused backends.

``loss = mean_b CE(scale * F̂_b Ŵᵀ + tau * log_prior, y_b)``. The native op pair
``liftplus_fast::la_cosine_ce_fwd`` / ``la_cosine_ce_bwd`` keeps only the per-row logsumexp
between forward and backward, so large class counts run in O(B × chunk) extra memory.
"""
from __future__ import annotations

import torch

from . import reference
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._dispatch import dispatch, register
from ._native import native_op, native_status

OP = "la_cosine_cross_entropy"


def check_la_ce_args(feat, weight, labels, log_prior) -> None:
    """Validate shapes, dtypes and devices of the loss arguments."""
    check_tensor("feat", feat, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, dim=2)
    b, d = feat.shape
    k = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"weight must have shape (K, {d}) to match feat {tuple(feat.shape)}; "
                         f"got {tuple(weight.shape)}")
    if k == 0:
        raise ValueError("weight must have at least one class (row); got shape "
                         f"{tuple(weight.shape)}")
    check_tensor("labels", labels, dtypes=(torch.int64,), shape=(b,))
    check_tensor("log_prior", log_prior, dtypes=FLOAT_DTYPES, shape=(k,))
    check_same_device(feat=feat, weight=weight, labels=labels, log_prior=log_prior)


def la_cosine_cross_entropy(feat, weight, labels, log_prior, scale: float = 25.0, tau: float = 1.0,
                            return_logits: bool = False):
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


def _native_la_ce(feat, weight, labels, log_prior, scale, tau, return_logits):
    loss, logits, _lse = native_op("la_cosine_ce_fwd")(feat, weight, labels, log_prior, scale, tau,
                                                       return_logits)
    return (loss, logits) if return_logits else loss


def _register_native() -> None:
    fwd = "liftplus_fast::la_cosine_ce_fwd"
    bwd = "liftplus_fast::la_cosine_ce_bwd"

    @torch.library.register_fake(fwd)
    def _fwd_fake(feat, weight, labels, log_prior, scale, tau, return_logits):
        b, k = feat.shape[0], weight.shape[0]
        loss = feat.new_empty((), dtype=torch.float32)
        logits = feat.new_empty((b, k) if return_logits else (0,))
        lse = feat.new_empty((b,), dtype=torch.float32)
        return loss, logits, lse

    @torch.library.register_fake(bwd)
    def _bwd_fake(grad_loss, feat, weight, labels, log_prior, lse, scale, tau):
        return torch.empty_like(feat), torch.empty_like(weight)

    def setup_context(ctx, inputs, output):
        feat, weight, labels, log_prior, scale, tau, _ret = inputs
        _loss, _logits, lse = output
        ctx.save_for_backward(feat, weight, labels, log_prior, lse)
        ctx.scale, ctx.tau = scale, tau
        ctx.mark_non_differentiable(_logits, lse)

    def backward(ctx, grad_loss, _g_logits, _g_lse):
        feat, weight, labels, log_prior, lse = ctx.saved_tensors
        g_feat, g_weight = native_op("la_cosine_ce_bwd")(grad_loss.float(), feat, weight, labels,
                                                          log_prior, lse, ctx.scale, ctx.tau)
        return g_feat, g_weight, None, None, None, None, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


if native_status().loaded:
    _register_native()
    register(OP, "cpu", _native_la_ce, native_name="la_cosine_ce_fwd")
    register(OP, "cuda", _native_la_ce, native_name="la_cosine_ce_fwd")
