"""Public AdaptFormer op: ``Y = A + M + s * up(relu(down(LN(A))))`` with fused backends.

The op pair ``adaptformer_fwd`` / ``adaptformer_bwd`` (schemas in :mod:`._library`) saves only
the row statistics and the pre-ReLU bottleneck ``Z``. Its one autograd definition is registered
here for the native and (from :mod:`.triton`) the Triton namespace; the fake (meta) kernel lets
``torch.compile(fullgraph=True)`` trace through the native op. Math: ``docs/ops.md``.
"""

from __future__ import annotations

import torch

from . import _library, reference
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._dispatch import dispatch, register, register_native
from ._native import native_status

OP = "adaptformer"


def check_adaptformer_args(a, mlp_out, ln_w, ln_b, down_w, down_b, up_w, up_b, scale) -> None:
    """Validate shapes, dtypes and devices of the AdaptFormer arguments."""
    check_tensor("a", a, dtypes=FLOAT_DTYPES)
    if a.dim() < 1 or a.shape[-1] == 0:
        raise ValueError(f"a must have a non-empty last (feature) dimension; got shape {tuple(a.shape)}")
    d = a.shape[-1]
    check_tensor("mlp_out", mlp_out, dtypes=(a.dtype,), shape=a.shape)
    check_tensor("down_w", down_w, dtypes=FLOAT_DTYPES, dim=2)
    r = down_w.shape[0]
    if down_w.shape[1] != d or r == 0:
        raise ValueError(f"down_w must have shape (r, {d}) with r >= 1; got {tuple(down_w.shape)}")
    check_tensor("ln_w", ln_w, dtypes=FLOAT_DTYPES, shape=(d,))
    check_tensor("ln_b", ln_b, dtypes=FLOAT_DTYPES, shape=(d,))
    check_tensor("down_b", down_b, dtypes=FLOAT_DTYPES, shape=(r,))
    check_tensor("up_w", up_w, dtypes=FLOAT_DTYPES, shape=(d, r))
    check_tensor("up_b", up_b, dtypes=FLOAT_DTYPES, shape=(d,))
    check_tensor("scale", scale, dtypes=FLOAT_DTYPES)
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one value; got shape {tuple(scale.shape)}")
    check_same_device(
        a=a, mlp_out=mlp_out, ln_w=ln_w, ln_b=ln_b, down_w=down_w, down_b=down_b, up_w=up_w, up_b=up_b, scale=scale
    )


def adaptformer(a, mlp_out, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, eps: float = 1e-5):
    """Block output with the AdaptFormer branch: ``a + (mlp_out + scale * up(relu(down(LN(a)))))``.

    Args:
        a: residual stream before ``ln_2``, shape ``[..., D]`` (fp32, bf16 or fp16).
        mlp_out: the block's MLP output, same shape and dtype as ``a``.
        ln_w, ln_b: adapter LayerNorm affine parameters ``[D]``.
        down_w, down_b: ``Linear(D, r)`` parameters ``[r, D]``, ``[r]``.
        up_w, up_b: ``Linear(r, D)`` parameters ``[D, r]``, ``[D]``.
        scale: the trainable scalar ``s`` (a one-element tensor).
        eps: LayerNorm epsilon (> 0).

    Returns:
        Tensor of the shape and dtype of ``a``. Differentiable in every tensor argument.
    """
    check_adaptformer_args(a, mlp_out, ln_w, ln_b, down_w, down_b, up_w, up_b, scale)
    if not (isinstance(eps, (int, float)) and 0 < eps < float("inf")):
        # At eps <= 0 a constant row divides by zero, and the backends disagree on the result.
        raise ValueError(f"eps must be a positive finite number; got {eps!r}")
    impl = dispatch(OP, a.device)
    return impl(a, mlp_out, ln_w, ln_b, down_w, down_b, up_w, up_b, scale.reshape(()), float(eps))


register(OP, "reference", reference.adaptformer)


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


def register_backend(namespace: str) -> None:
    """Attach the one autograd definition of the op to ``namespace::adaptformer_fwd``."""
    _library.register_autograd(namespace, "adaptformer_fwd", _make_backward, _setup_context)


if native_status().loaded:
    _library.register_fakes(_library.NATIVE, adaptformer_fwd=_fake_fwd, adaptformer_bwd=_fake_bwd)
    register_backend(_library.NATIVE)
    register_native(OP, kernel_call(_library.NATIVE), "adaptformer_fwd")
