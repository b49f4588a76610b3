"""Precision owned by the model: the frozen backbone stored once in the compute dtype.

``prec_train`` = ``fp32`` / ``bf16`` / ``fp16`` / ``amp`` (the published default, mixed
precision: fp16 on CUDA). On CPU every half precision is bf16, whose GEMMs have a fast path
on CPUs with bf16 units and fp16's do not; on CPUs without them the same bf16 numbers come from
fp32 GEMMs of bf16 values (:mod:`liftplus_fast.ops.gemm`). In half precision
every frozen weight of the image encoder is converted once, so no step pays autocast's
per-call casts (autocast caches casts only for weights that require grad, i.e. never for a
frozen backbone). What autocast keeps in fp32 stays in fp32: the backbone's LayerNorms
(weights kept fp32, computed in fp32), the loss and the classifier; the trained parameters
(adapters, classifier, and backbone tensors that fft/bitfit train) stay fp32 and are cast at
the point of use, as autocast casts them. So ``amp`` computes the numbers bf16/fp16 autocast
computes, without autocast.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

__all__ = ["PRECISIONS", "compute_dtype", "convert_frozen", "half_dtype_of", "needs_grad_scaler"]

PRECISIONS = ("fp32", "amp", "fp16", "bf16")


def compute_dtype(precision: str, device) -> torch.dtype:
    """The dtype the backbone computes in for ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if precision == "fp32":
        return torch.float32
    if torch.device(device).type != "cuda":
        # fp16 has no fast GEMMs on CPUs: every half precision is bf16 there.
        return torch.bfloat16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def needs_grad_scaler(dtype: torch.dtype, device) -> bool:
    """fp16 needs loss scaling (its range is narrow); bf16 has fp32's range and does not."""
    return dtype == torch.float16 and torch.device(device).type == "cuda"


def convert_frozen(
    module: nn.Module, dtype: torch.dtype, trained: Iterable[torch.Tensor], rounded_fp32: bool = False
) -> int:
    """Store every frozen floating tensor of ``module`` in ``dtype``, in place; returns how many.

    With ``rounded_fp32`` the weights of GEMM modules (linear, attention projections,
    convolutions) keep fp32 storage and only their values are rounded to ``dtype`` (CPUs without
    half GEMMs, see :mod:`liftplus_fast.ops.gemm`). Skipped: tensors in
    ``trained`` (kept fp32), LayerNorm parameters (kept fp32: they are applied in fp32) and
    non-floating buffers. Parameters keep their identity (``.data`` is replaced), so references
    held elsewhere (masked fine-tuning bases) follow.
    """
    keep = {id(t) for t in trained}
    converted = 0
    for sub in module.modules():
        is_norm = isinstance(sub, nn.LayerNorm)
        # Only what a GEMM reads needs fp32 storage; embeddings and the like are added to
        # activations in ``dtype`` and are stored in it.
        keep_fp32 = rounded_fp32 and isinstance(sub, _GEMM_MODULES)
        for p in list(sub.parameters(recurse=False)):
            if is_norm or id(p) in keep or not p.is_floating_point() or p.dtype == dtype:
                continue
            p.data = p.data.to(dtype).to(p.dtype) if keep_fp32 else p.data.to(dtype)
            converted += 1
        for name, b in list(sub.named_buffers(recurse=False)):
            if is_norm or b is None or id(b) in keep or not b.is_floating_point() or b.dtype == dtype:
                continue
            setattr(sub, name, b.to(dtype))
            converted += 1
    return converted


_GEMM_MODULES = (nn.Linear, nn.MultiheadAttention, nn.modules.conv._ConvNd)


def half_dtype_of(precision: Optional[str], device) -> Optional[torch.dtype]:
    """The compute dtype ``precision`` asks for, or ``None`` for fp32 / no request."""
    if precision is None:
        return None
    dtype = compute_dtype(precision, device)
    return None if dtype == torch.float32 else dtype
