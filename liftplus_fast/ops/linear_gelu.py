"""Public MLP in-projection + GELU op of the ViT block: ``gelu(x Wᵀ + b)``.

The reference is the published structure: ``F.linear`` (bias inside the GEMM) then the
activation module's own ops. On CPU the GEMM runs without its bias and the native kernel
``liftplus_fast::bias_gelu_fwd`` / ``bias_gelu_bwd`` adds the bias and applies the activation
in one fp32 pass, saving only the GEMM output for the backward (whose one pass also yields the
bias gradient); eager QuickGELU is three element-wise passes each way and saves two
activations. Other devices use the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _library, gemm
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._dispatch import dispatch, register
from ._native import native_status

OP = "linear_gelu"
# kind names -> native kind ids
KINDS = {"quick": 0, "erf": 1, "tanh": 2}


def gelu(u, kind: str = "quick"):
    """The activation alone, with PyTorch ops (QuickGELU as open_clip writes it)."""
    if kind == "quick":
        return u * torch.sigmoid(1.702 * u)
    return F.gelu(u, approximate="tanh" if kind == "tanh" else "none")


def reference_linear_gelu(x, weight, bias, kind: str = "quick"):
    """``gelu(F.linear(x, weight, bias))``: the published computation, in the dtype of ``x``
    (the GEMM through :func:`~liftplus_fast.ops.gemm.linear`, which is ``F.linear`` wherever the
    hardware has half GEMMs or autocast is on)."""
    return gelu(gemm.linear(x, weight, bias), kind)


def linear_gelu(x, weight, bias, kind: str = "quick"):
    """``gelu(x Wᵀ + b)``: ``kind`` = ``"quick"`` (QuickGELU ``u·σ(1.702u)``, OpenAI CLIP),
    ``"erf"`` (``nn.GELU()``) or ``"tanh"`` (``nn.GELU(approximate="tanh")``).

    Args:
        x: ``[..., D]`` fp32/bf16/fp16 (fp64 too).
        weight: ``[F, D]`` in the dtype of ``x``, or fp32 (a trained master, or a frozen weight
            stored as rounded fp32 on a CPU without half GEMMs; see :mod:`.gemm`).
        bias: ``[F]`` in the dtype of ``x``, or fp32 when it is trained (BitFit).

    Returns:
        ``[..., F]`` like ``x``; differentiable in every tensor argument.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES + (torch.float64,))
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension; got shape {tuple(x.shape)}")
    check_tensor("weight", weight, dtypes=(x.dtype,) if x.dtype == torch.float32 else (x.dtype, torch.float32), dim=2)
    if weight.shape[1] != x.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (F, {x.shape[-1]}); got {tuple(weight.shape)}")
    check_tensor("bias", bias, dtypes=FLOAT_DTYPES + (torch.float64,), shape=(weight.shape[0],))
    check_same_device(x=x, weight=weight, bias=bias)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}; got {kind!r}")
    return dispatch(OP, x.device)(x, weight, bias, kind)


def linear_gelu_kind(module) -> str | None:
    """The ``kind`` of an activation module (open_clip QuickGELU, ``nn.GELU``), else ``None``."""
    if isinstance(module, torch.nn.GELU):
        return "tanh" if module.approximate == "tanh" else "erf"
    if type(module).__name__ == "QuickGELU":
        return "quick"
    return None


def _reference(x, weight, bias, kind):
    return reference_linear_gelu(x, weight, bias, kind)


register(OP, "reference", _reference)


def kernel_call(namespace: str):
    """The backend function: the library GEMM, then ``namespace::bias_gelu_fwd``."""
    fwd = _library.op(namespace, "bias_gelu_fwd")

    def run(x, weight, bias, kind):
        return fwd(gemm.linear(x, weight), bias, KINDS[kind])

    return run


def _fake_fwd(x, bias, kind):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_bwd(grad_y, x, bias, kind):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, bias, kind = inputs
    ctx.save_for_backward(x, bias)
    ctx.kind = kind


def _make_backward(namespace: str):
    bwd = _library.op(namespace, "bias_gelu_bwd")

    def backward(ctx, grad_y):
        x, bias = ctx.saved_tensors
        gx, gb = bwd(grad_y.contiguous(), x, bias, ctx.kind)
        return gx, gb, None

    return backward


if native_status().loaded:
    _library.register_fakes(_library.NATIVE, bias_gelu_fwd=_fake_fwd, bias_gelu_bwd=_fake_bwd)
    _library.register_autograd(_library.NATIVE, "bias_gelu_fwd", _make_backward, _setup_context)
    register(OP, "cpu", kernel_call(_library.NATIVE), native_name="bias_gelu_fwd")
