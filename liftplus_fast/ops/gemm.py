"""Half-precision GEMMs on hardware with and without half-precision GEMM units.

A bf16 GEMM multiplies bf16 operands and accumulates in fp32: each product of two bf16 values
is exact in fp32 (8-bit mantissas), so the only roundings are the fp32 accumulation and the
final rounding of the result to bf16. An fp32 GEMM of the same bf16 values, rounded to bf16
afterwards, computes the same numbers (up to the order of the fp32 sums).

CUDA GPUs and CPUs with AVX512-BF16 or AMX run bf16 GEMMs natively and fast. Other CPUs
(AVX2-only x86, e.g. AMD Zen 1-3, Intel before Cooper Lake) have no bf16 arithmetic: PyTorch's
bf16 GEMM there converts element by element and is 10-80x slower than fp32 (measured on a
2-core AMD EPYC: 10.6 GFLOP/s forward, 0.9 GFLOP/s for the transposed backward product, against
66 GFLOP/s in fp32). On those CPUs the model keeps bf16 numerics — every activation between ops
is bf16, frozen weights hold bf16 values — but stores the frozen weights as fp32 tensors holding
bf16-rounded values, and runs each GEMM as an fp32 GEMM of the bf16 values (:func:`linear`).

``LIFTPLUS_FAST_HALF_GEMM`` = ``native`` / ``fp32`` forces either path on CPU (tests run both on
any machine); unset, the CPU's features decide (:func:`native_half_gemm`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "ENV_VAR",
    "first_layer",
    "linear",
    "native_half_gemm",
    "rounded_fp32",
    "runs_in_fp32",
    "stores_rounded_fp32",
]

ENV_VAR = "LIFTPLUS_FAST_HALF_GEMM"
_HALF = (torch.bfloat16, torch.float16)


def _cpu_has_bf16_units() -> bool:
    mode = os.environ.get(ENV_VAR, "").strip().lower()
    if mode in ("native", "fp32"):
        return mode == "native"
    if mode:
        raise ValueError(f"{ENV_VAR} must be 'native' or 'fp32' (or unset); got {mode!r}")
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(torch.cpu, name)()) for name in probes if hasattr(torch.cpu, name))
    except Exception:  # a torch without the probes: assume the fast native path, as before
        return True


# Read once at import (a plain bool, so torch.compile never traces the probe); tests patch it.
_CPU_NATIVE_BF16 = _cpu_has_bf16_units()


def native_half_gemm(device, dtype: torch.dtype) -> bool:
    """Whether ``device`` runs GEMMs in ``dtype`` natively (always on CUDA; bf16 CPUs only)."""
    device = torch.device(device)
    if dtype not in _HALF or device.type == "cuda":
        return True
    return device.type == "cpu" and dtype == torch.bfloat16 and _CPU_NATIVE_BF16


def stores_rounded_fp32(device, dtype: torch.dtype) -> bool:
    """Whether frozen weights for ``dtype`` on ``device`` are stored as fp32 holding ``dtype``
    values (no native half GEMMs) rather than in ``dtype`` itself."""
    return dtype in _HALF and not native_half_gemm(device, dtype)


def runs_in_fp32(x: torch.Tensor) -> bool:
    """Whether a GEMM-like op on half ``x`` runs in fp32 on its values: ``x`` is half, its device
    has no half GEMMs and autocast (which decides itself) is off."""
    return x.dtype in _HALF and not native_half_gemm(x.device, x.dtype) and not torch.is_autocast_enabled(x.device.type)


def rounded_fp32(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t``'s values rounded to ``dtype``, as fp32 (differentiable).

    A frozen fp32 tensor is taken as already rounded: ``convert_frozen`` rounded it once, so no
    step pays the two casts. Trained tensors (fp32 masters) are rounded at every use, as autocast
    casts them.
    """
    if t.dtype == torch.float32 and not t.requires_grad:
        return t
    return t.to(dtype).float()


def first_layer(layer, x: torch.Tensor, dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.Tensor:
    """``layer(x)`` for the first layer (patch embedding) of a backbone computing in ``dtype``
    whose weights are stored in ``weight_dtype``.

    Half ``dtype`` with fp32 weights (rounded fp32 storage): the layer runs in fp32 on the
    ``dtype`` values of ``x`` and its output is rounded to ``dtype``, so the activations are in
    ``dtype`` from there on. Otherwise (and under autocast, which decides itself)
    ``layer(x.to(dtype))``.
    """
    if weight_dtype == dtype or dtype not in _HALF or torch.is_autocast_enabled(x.device.type):
        return layer(x.to(dtype))
    return layer(x.to(dtype).to(weight_dtype)).to(dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x Wᵀ + b`` at the precision of ``x``: operands rounded to ``x.dtype``, products
    accumulated in fp32, the result in ``x.dtype``.

    ``weight`` / ``bias`` may be in ``x.dtype`` or fp32 (trained masters, or frozen weights stored
    as rounded fp32 on CPUs without half GEMMs). Under autocast the call is left to autocast.
    """
    if not runs_in_fp32(x):
        return F.linear(x, _as(weight, x.dtype), _as(bias, x.dtype))
    b = None if bias is None else rounded_fp32(bias, x.dtype)
    return F.linear(x.float(), rounded_fp32(weight, x.dtype), b).to(x.dtype)


def _as(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)
