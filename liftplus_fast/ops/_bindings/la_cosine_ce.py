"""LA cosine cross-entropy binding: ``la_cosine_ce_fwd`` / ``la_cosine_ce_bwd`` of one namespace
(native or Triton) as a differentiable call.

When a gradient is needed the forward runs with ``compute_grad=True`` and also returns the
gradients for ``grad_loss = 1``; the backward then only scales them, so the logits GEMM is not
recomputed. Without ``compute_grad`` the forward keeps only the per-row logsumexp and
``la_cosine_ce_bwd`` recomputes."""

from __future__ import annotations

import torch

from .. import _library


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


def register_autograd(namespace: str) -> None:
    """Attach the one autograd definition of the op to ``namespace::la_cosine_ce_fwd``."""
    _library.register_autograd(namespace, "la_cosine_ce_fwd", _make_backward, _setup_context)


def register_fakes(namespace: str) -> None:
    """The fake kernels of a namespace whose kernels are not Triton ops (those trace themselves)."""
    _library.register_fakes(namespace, la_cosine_ce_fwd=_fake_fwd, la_cosine_ce_bwd=_fake_bwd)
