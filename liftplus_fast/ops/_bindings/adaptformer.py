"""AdaptFormer binding: ``adaptformer_fwd`` / ``adaptformer_bwd`` of one namespace (native or
Triton) as a differentiable call. The forward saves only the row statistics and the pre-ReLU
bottleneck ``Z``; the fake (meta) kernel lets ``torch.compile(fullgraph=True)`` trace through the
native op."""

from __future__ import annotations

import torch

from .. import _library


def kernel_call(namespace: str):
    """The backend function that runs ``namespace::adaptformer_fwd`` (native or Triton)."""
    fwd = _library.op(namespace, "adaptformer_fwd")

    def run(a, mlp_out, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, eps):
        return fwd(a, mlp_out, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, eps)[0]

    return run


def _fake_fwd(a, mlp_out, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, eps):
    rows = a.numel() // a.shape[-1]
    # Saved statistics are fp32, or float64 for float64 inputs (used by gradcheck).
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    stats = a.new_empty((rows,), dtype=acc)
    z = a.new_empty((rows, down_w.shape[0]), dtype=acc)
    return torch.empty_like(a), stats, torch.empty_like(stats), z


def _fake_bwd(grad_y, a, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, mean, rstd, z):
    return (
        torch.empty_like(a),
        torch.empty_like(ln_w),
        torch.empty_like(ln_b),
        torch.empty_like(down_w),
        torch.empty_like(down_b),
        torch.empty_like(up_w),
        torch.empty_like(up_b),
        torch.empty_like(scale),
    )


def _setup_context(ctx, inputs, output):
    a, _m, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, _eps = inputs
    _y, mean, rstd, z = output
    ctx.save_for_backward(a, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, mean, rstd, z)
    # mean/rstd/z are saved statistics, never differentiated: no zero gradients for them.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(mean, rstd, z)


def _make_backward(namespace: str):
    bwd = _library.op(namespace, "adaptformer_bwd")

    def backward(ctx, grad_y, _g_mean, _g_rstd, _g_z):
        if grad_y is None:
            return (None,) * 10
        a, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, mean, rstd, z = ctx.saved_tensors
        g_a, g_lnw, g_lnb, g_dw, g_db, g_uw, g_ub, g_s = bwd(
            grad_y.contiguous(), a, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, mean, rstd, z
        )
        # dM = G: the incoming gradient itself, no copy.
        return g_a, grad_y, g_lnw, g_lnb, g_dw, g_db, g_uw, g_ub, g_s, None

    return backward


def register_autograd(namespace: str) -> None:
    """Attach the one autograd definition of the op to ``namespace::adaptformer_fwd``."""
    _library.register_autograd(namespace, "adaptformer_fwd", _make_backward, _setup_context)


def register_fakes(namespace: str) -> None:
    """The fake kernels of a namespace whose kernels are not Triton ops (those trace themselves)."""
    _library.register_fakes(namespace, adaptformer_fwd=_fake_fwd, adaptformer_bwd=_fake_bwd)
