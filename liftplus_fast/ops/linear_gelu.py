"""Public MLP in-projection + GELU op of the ViT block: ``gelu(x Wᵀ + b)``.

The reference is the published structure: ``F.linear`` (bias inside the GEMM) then the
activation module's own ops. On CPU the GEMM can run without its bias and the native kernel
``liftplus_fast::bias_gelu_fwd`` / ``bias_gelu_bwd`` add the bias and apply the activation in one
fp32 pass, saving only the GEMM output for the backward (whose one pass also yields the bias
gradient when the bias is trained; a frozen backbone's is not); eager QuickGELU is three
element-wise passes each way and saves two activations. Which of the two runs for bf16 and for
fp32 on CPU is a measured choice (:mod:`.choices`: ``bias_gelu_bf16``, ``bias_gelu_fp32``;
``LIFTPLUS_FAST_BIAS_GELU=fused|eager``). Other dtypes
take the fused kernel, other devices the reference.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from . import _library, choices, gemm
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


ENV_VAR = "LIFTPLUS_FAST_BIAS_GELU"


def _time_forms(dtype: torch.dtype, rows: int = 2 * 197, width: int = 768) -> Dict[str, float]:
    """Forward + backward seconds of the fused and eager forms on one ViT-B MLP in-projection."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(4 * width, width, generator=g) * width**-0.5).to(dtype)
    b = torch.randn(4 * width, generator=g).to(dtype)
    grad = torch.randn(rows, 4 * width, generator=g).to(dtype)
    fused = kernel_call(_library.NATIVE, "fused")
    return choices.best_seconds(
        {
            "fused": lambda: fused(x, w, b, "quick").backward(grad),
            "eager": lambda: reference_linear_gelu(x, w, b, "quick").backward(grad),
        }
    )


def _decider(dtype: torch.dtype):
    def decide():
        if not native_status().loaded:
            return "eager", f"the native extension is not loaded ({native_status().reason})"
        return choices.faster(_time_forms(dtype), prefer="fused")

    return decide


def _blocked() -> Dict[str, str]:
    return {} if native_status().loaded else {"fused": native_status().reason}


CHOICES = {
    dtype: choices.define(choices.Choice(f"bias_gelu_{label}", ("fused", "eager"), ENV_VAR, _decider(dtype), _blocked))
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32"))
}


def kernel_call(namespace: str, form: Optional[str] = None):
    """The backend function: the library GEMM, then ``namespace::bias_gelu_fwd`` (the ``fused``
    form), or the reference (``eager``); ``form`` None: the measured choice for the dtype."""
    fwd = _library.op(namespace, "bias_gelu_fwd")

    def run(x, weight, bias, kind):
        choice = CHOICES.get(x.dtype)
        chosen = form or ("fused" if choice is None else choices.get(choice.name))
        if chosen == "eager":
            return reference_linear_gelu(x, weight, bias, kind)
        return fwd(gemm.linear(x, weight), bias, KINDS[kind])

    return run


def _fake_fwd(x, bias, kind):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_bwd(grad_y, x, bias, kind, bias_grad=True):
    grad_bias = torch.empty_like(bias) if bias_grad else bias.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_bias


def _setup_context(ctx, inputs, output):
    x, bias, kind = inputs
    ctx.save_for_backward(x, bias)
    ctx.kind = kind


def _make_backward(namespace: str):
    bwd = _library.op(namespace, "bias_gelu_bwd")

    def backward(ctx, grad_y):
        x, bias = ctx.saved_tensors
        bias_grad = ctx.needs_input_grad[1]
        gx, gb = bwd(grad_y.contiguous(), x, bias, ctx.kind, bias_grad)
        return gx, gb if bias_grad else None, None

    return backward


if native_status().loaded:
    _library.register_fakes(_library.NATIVE, bias_gelu_fwd=_fake_fwd, bias_gelu_bwd=_fake_bwd)
    _library.register_autograd(_library.NATIVE, "bias_gelu_fwd", _make_backward, _setup_context)
    register(OP, "cpu", kernel_call(_library.NATIVE), native_name="bias_gelu_fwd")
