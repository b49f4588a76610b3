"""Public AdaptFormer op: ``Y = A + M + s * up(relu(down(LN(A))))`` with fused backends.

The op pair ``adaptformer_fwd`` / ``adaptformer_bwd`` (schemas in :mod:`._library`) saves only
the row statistics and the pre-ReLU bottleneck ``Z``; its call, autograd and fake kernel are in
:mod:`._bindings.adaptformer`, registered here for the native namespace (and by :mod:`.triton`
for the Triton one). Math: ``docs/ops.md``.
"""

from __future__ import annotations

from . import _library, reference
from ._bindings import adaptformer as _binding
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


if native_status().loaded:
    _binding.register_fakes(_library.NATIVE)
    _binding.register_autograd(_library.NATIVE)
    register_native(OP, _binding.kernel_call(_library.NATIVE), "adaptformer_fwd")
