"""Public logit-adjusted cosine cross-entropy op with fused backends.

``loss = mean_b CE(scale * F̂_b Ŵᵀ + tau * log_prior, y_b)``. When a gradient is needed the
forward ``la_cosine_ce_fwd(..., compute_grad=True)`` (native or Triton) also returns the
gradients for ``grad_loss = 1`` and the backward only scales them, so the logits GEMM is not
recomputed (3 GEMMs per step, as the reference). Without ``compute_grad`` the forward keeps
only the per-row logsumexp and ``la_cosine_ce_bwd`` recomputes. Classes are processed in
chunks, so large class counts run in O(B × chunk) extra memory. The one autograd definition
below serves both backends' namespaces. Math: ``docs/ops.md``.
"""

from __future__ import annotations

import torch

from . import _library, reference
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


def kernel_call(namespace: str):
    """The backend function that runs ``namespace::la_cosine_ce_fwd`` (native or Triton)."""
    fwd = _library.op(namespace, "la_cosine_ce_fwd")

    def run(feat, weight, labels, log_prior, scale, tau, return_logits):
        # Gradients come out of the forward only when autograd will ask for them.
        compute_grad = torch.is_grad_enabled() and (feat.requires_grad or weight.requires_grad)
        loss, logits, _lse, _gf, _gw = fwd(feat, weight, labels, log_prior, scale, tau, return_logits, compute_grad)
        return (loss, logits) if return_logits else loss

    return run


def _is_one(t: torch.Tensor) -> bool:
    """Whether a CPU scalar equals 1, read eagerly; False while tracing (no data to read)."""
    if torch.compiler.is_compiling() or t.device.type != "cpu" or t.numel() != 1:
        return False
    if torch._guards.detect_fake_mode((t,)) is not None:
        return False
    try:
        return t.item() == 1.0
    except RuntimeError:  # a tracer's stand-in without data
        return False


def _acc_dtype(feat):
    return torch.float64 if feat.dtype == torch.float64 else torch.float32


def _fake_fwd(feat, weight, labels, log_prior, scale, tau, return_logits, compute_grad=False):
    b, k = feat.shape[0], weight.shape[0]
    acc = _acc_dtype(feat)
    loss = feat.new_empty((), dtype=acc)
    logits = feat.new_empty((b, k) if return_logits else (0,))
    lse = feat.new_empty((b,), dtype=acc)
    grad_feat = feat.new_empty(feat.shape if compute_grad else (0,))
    grad_weight = weight.new_empty(weight.shape if compute_grad else (0,))
    return loss, logits, lse, grad_feat, grad_weight


def _fake_bwd(grad_loss, feat, weight, labels, log_prior, lse, scale, tau):
    return feat.new_empty(feat.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    feat, weight, labels, log_prior, scale, tau, _ret, *rest = inputs
    compute_grad = bool(rest[0]) if rest else False
    _loss, logits, lse, grad_feat, grad_weight = output
    # The other outputs never get gradients; materialising zeros for them would allocate a
    # second [K, D] tensor (grad_weight's shape) in every backward.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(logits, lse, grad_feat, grad_weight)
    ctx.scale, ctx.tau = scale, tau
    ctx.pending = None
    ctx.traced = torch.compiler.is_compiling()
    if compute_grad and ctx.traced:
        ctx.save_for_backward(grad_feat, grad_weight)
        return
    # Inputs are saved for free (no copies): a second backward through a retained graph
    # recomputes from them.
    ctx.save_for_backward(feat, weight, labels, log_prior, lse)
    if compute_grad:
        # Held outside save_for_backward and dropped by the first backward, so the gradient
        # it returns has no other owner and autograd adopts it instead of copying [K, D].
        ctx.pending = [grad_feat, grad_weight]


def _make_backward(namespace: str):
    bwd = _library.op(namespace, "la_cosine_ce_bwd")

    def backward(ctx, grad_loss, _g_logits, _g_lse, _g_gf, _g_gw):
        if grad_loss is None:
            return (None,) * 8
        if ctx.traced and len(ctx.saved_tensors) == 2:
            grad_feat, grad_weight = ctx.saved_tensors
        elif ctx.pending is not None:
            grad_feat, grad_weight = ctx.pending
            ctx.pending = None
        else:
            feat, weight, labels, log_prior, lse = ctx.saved_tensors
            g_feat, g_weight = bwd(grad_loss, feat, weight, labels, log_prior, lse, ctx.scale, ctx.tau)
            return g_feat, g_weight, None, None, None, None, None, None
        # The forward's gradients are for grad_loss = 1, the usual case (loss.backward()).
        if _is_one(grad_loss):
            return grad_feat, grad_weight, None, None, None, None, None, None
        return (
            grad_feat * grad_loss.to(grad_feat.dtype),
            grad_weight * grad_loss.to(grad_weight.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )

    return backward


def register_backend(namespace: str) -> None:
    """Attach the one autograd definition of the op to ``namespace::la_cosine_ce_fwd``."""
    _library.register_autograd(namespace, "la_cosine_ce_fwd", _make_backward, _setup_context)


if native_status().loaded:
    _library.register_fakes(_library.NATIVE, la_cosine_ce_fwd=_fake_fwd, la_cosine_ce_bwd=_fake_bwd)
    register_backend(_library.NATIVE)
    register_native(OP, kernel_call(_library.NATIVE), "la_cosine_ce_fwd")
