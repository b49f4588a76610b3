"""Frozen bf16 linear layers on CPU with their weights packed once for oneDNN.

    forward:  y = x Wᵀ + b        backward: ∂x = ∂y W,   ∂b = colsum(∂y)  (W is frozen: no ∂W)

PyTorch's CPU ``F.linear`` / ``mm`` in bf16 hand the weight to oneDNN in its plain row-major
layout, and oneDNN reorders it into its blocked GEMM layout at every call. The backbone's
weights never change during LIFT+ training, so each is packed once per orientation it is read
in — ``W`` for the forward (``mkldnn._reorder_linear_weight``), ``Wᵀ`` for the input gradient —
and every later call runs oneDNN's GEMM on the packed copy (``mkldnn._linear_pointwise``, the
bias added inside it). The products are the same bf16 GEMMs (same operands, fp32 accumulation);
only the weight's memory layout differs. Measured per GEMM at ViT-B/16 shapes (B = 32, Zen 4
EPYC): 1-11 % faster, the MLP's in-projection most.

The packed copies are kept per weight tensor (dropped with it, repacked if it is changed in
place), created at the first call that needs each: about twice the frozen weights' bf16 memory
for a model that trains (forward and backward copies), once for evaluation alone.

Whether this runs is the measured choice ``linear_bf16`` (:mod:`.choices`): ``packed`` when it
is clearly faster than ``plain`` on a ViT-B MLP in-projection, forward and backward;
``LIFTPLUS_FAST_LINEAR_BF16=packed|plain`` forces either. It applies to bf16 activations with a
frozen bf16 weight on CPU outside autocast and outside ``torch.compile`` (which traces the plain
``F.linear``); everything else takes ``F.linear``.
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import choices

__all__ = ["CHOICE", "ENV_VAR", "applies", "linear"]

ENV_VAR = "LIFTPLUS_FAST_LINEAR_BF16"
# (id(weight), transposed) -> (weakref to the weight, its version when packed, packed copy)
_PACKED: Dict[Tuple[int, bool], Tuple[weakref.ref, int, torch.Tensor]] = {}


def _ops_missing() -> Optional[str]:
    """Why the packed path cannot run in this torch build (None when it can)."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if mkldnn is None or not all(hasattr(mkldnn, n) for n in ("_reorder_linear_weight", "_linear_pointwise")):
        return "this torch build has no mkldnn._reorder_linear_weight / _linear_pointwise"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN has no bf16 GEMMs on this CPU"
    return None


def _packed(weight: torch.Tensor, transposed: bool, rows: int) -> torch.Tensor:
    """The packed copy of ``weight`` (``Wᵀ`` when ``transposed``), made on first use for GEMMs of
    about ``rows`` rows (oneDNN's layout hint; any row count runs on it)."""
    key = (id(weight), transposed)
    version = -1 if weight.is_inference() else weight._version  # inference tensors keep no version
    entry = _PACKED.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == version:
        return entry[2]
    w = weight.detach()
    packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous() if transposed else w, rows)
    _PACKED[key] = (weakref.ref(weight, lambda _ref, key=key: _PACKED.pop(key, None)), version, packed)
    return packed


def _gemm(x2d: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2d, packed, bias, "none", [], "")


class _PackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # frozen: read again by the backward, never differentiated
        rows = x.numel() // x.shape[-1]
        y = _gemm(x.reshape(rows, x.shape[-1]), _packed(weight, False, rows), bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _gemm(g, _packed(ctx.weight, True, g.shape[0]), None).reshape(*grad_y.shape[:-1], -1)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0, dtype=torch.float32).to(grad_y.dtype)
        return grad_x, None, grad_b


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` runs for these operands (see the module doc)."""
    return (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and weight.dim() == 2
        and not weight.requires_grad
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
        and choices.get(CHOICE.name) == "packed"
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x Wᵀ + b`` for bf16 ``x`` and a frozen bf16 ``weight`` (``bias`` bf16 or None) on the
    packed copy of ``weight``; differentiable in ``x`` and ``bias``."""
    return _PackedLinear.apply(x, weight, bias)


def _time_paths(rows: int = 4 * 197, width: int = 768) -> Dict[str, float]:
    """Forward + input-gradient seconds of one ViT-B MLP in-projection, packed and plain."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(4 * width, width, generator=g) * width**-0.5).to(torch.bfloat16)
    b = torch.randn(4 * width, generator=g).to(torch.bfloat16)
    grad = torch.randn(rows, 4 * width, generator=g).to(torch.bfloat16)
    return choices.best_seconds(
        {"packed": lambda: linear(x, w, b).backward(grad), "plain": lambda: F.linear(x, w, b).backward(grad)}
    )


def _decide() -> Tuple[str, str]:
    missing = _ops_missing()
    if missing is not None:
        return "plain", missing
    return choices.faster(_time_paths(), prefer="plain", margin=1.03)


def _blocked() -> Dict[str, str]:
    missing = _ops_missing()
    return {} if missing is None else {"packed": missing}


CHOICE = choices.define(choices.Choice("linear_bf16", ("packed", "plain"), ENV_VAR, _decide, _blocked))
