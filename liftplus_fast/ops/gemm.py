"""Half-precision GEMMs on hardware with and without half-precision GEMM units.

A bf16 GEMM multiplies bf16 operands and accumulates in fp32: each product of two bf16 values
is exact in fp32 (8-bit mantissas), so the only roundings are the fp32 accumulation and the
final rounding of the result to bf16. An fp32 GEMM of the same bf16 values, rounded to bf16
afterwards, computes the same numbers (up to the order of the fp32 sums).

CUDA GPUs run bf16 GEMMs natively and fast. On CPUs it depends on the chip:

* AVX2-only x86 (e.g. AMD Zen 1-3, Intel before Cooper Lake) has no bf16 arithmetic: PyTorch's
  bf16 GEMM there converts element by element and is 10-80x slower than fp32 (measured on a
  2-core AMD EPYC: 10.6 GFLOP/s forward, 0.9 GFLOP/s for the transposed backward product,
  against 66 GFLOP/s in fp32).
* AVX512-BF16 without AMX can be slower in bf16 than in fp32, too: on a 2-core Intel Xeon VM
  (AVX512-BF16, AMX not exposed) oneDNN's bf16 GEMM ran 145-157 GFLOP/s against 225-290 GFLOP/s
  for fp32 at every ViT-B/16 shape, forward and backward.
* On another 2-core machine with AVX512-BF16 (measured 2026-11-30) the same bf16 step ran 1.9x
  faster than in fp32. The feature flags alone do not tell.

So on a CPU with bf16 units the choice is measured, once, the first time it is needed
(:func:`native_half_gemm`): a bf16 GEMM against the fp32 path for the same bf16 values
(conversions included), at the shape of a ViT-B MLP in-projection of five images, best of four
each, interleaved (≈ 0.25 s on 2 cores). The fp32 path is taken only when it is clearly faster
(by :data:`FP32_MARGIN`), so a machine near the tie keeps the native path run after run. Without
bf16 units nothing is measured.

Where the fp32 path is taken the model keeps bf16 numerics — every activation between ops is
bf16, frozen weights hold bf16 values — but stores the frozen weights as fp32 tensors holding
bf16-rounded values and runs each GEMM as an fp32 GEMM of the bf16 values (:func:`linear`).

The decision is the measured choice ``half_gemm`` (:mod:`.choices`): ``LIFTPLUS_FAST_HALF_GEMM`` =
``native`` / ``fp32`` forces either path on CPU (tests run both on any machine);
:func:`cpu_bf16_gemm_path` says which one runs and why.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import choices, packed_linear

__all__ = [
    "ENV_VAR",
    "FP32_MARGIN",
    "cpu_bf16_gemm_path",
    "cpu_has_bf16_units",
    "first_layer",
    "linear",
    "native_half_gemm",
    "rounded_fp32",
    "runs_in_fp32",
    "stores_rounded_fp32",
]

ENV_VAR = "LIFTPLUS_FAST_HALF_GEMM"
_HALF = (torch.bfloat16, torch.float16)
_PATHS = ("native", "fp32")


# The fp32 path is chosen only when its measured time is below the bf16 GEMM's divided by this.
FP32_MARGIN = 1.2


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX) per PyTorch's probes."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(torch.cpu, name)()) for name in probes if hasattr(torch.cpu, name))
    except Exception:  # a torch without the probes: assume bf16 units (the choice is measured)
        return True


def _time_bf16_against_fp32(m: int = 1024, k: int = 768, n: int = 3072, rounds: int = 3) -> Dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    w32 = w.float()
    runs = {
        "native": lambda: F.linear(x, w),
        "fp32": lambda: F.linear(x.float(), w32).to(torch.bfloat16),
    }
    return {name: 2 * m * k * n / t for name, t in choices.best_seconds(runs, rounds).items()}


def _decide_cpu_bf16() -> Tuple[str, str]:
    if not cpu_has_bf16_units():
        return "fp32", "this CPU has no bf16 units"
    rate = _time_bf16_against_fp32()
    faster = rate["fp32"] > FP32_MARGIN * rate["native"]
    words = "clearly faster" if faster else "not clearly faster"
    why = (
        f"measured: fp32 GEMMs of bf16 values ({rate['fp32'] / 1e9:.0f} GFLOP/s) are {words} than "
        f"this CPU's bf16 GEMMs ({rate['native'] / 1e9:.0f} GFLOP/s)"
    )
    return ("fp32" if faster else "native"), why


HALF_GEMM = choices.define(choices.Choice("half_gemm", _PATHS, ENV_VAR, _decide_cpu_bf16))


def _cpu_native_bf16() -> bool:
    return choices.get(HALF_GEMM.name) == "native"


def cpu_bf16_gemm_path() -> Dict[str, str]:
    """Which path bf16 GEMMs take on this CPU: ``{"path": "native" | "fp32", "why": ...}``
    (decided on the first call, see the module's docstring)."""
    decided = choices.explain(HALF_GEMM.name)
    return {"path": decided["option"], "why": decided["why"]}


def native_half_gemm(device, dtype: torch.dtype) -> bool:
    """Whether ``device`` runs GEMMs in ``dtype`` natively: always on CUDA; on CPU bf16 when
    :func:`cpu_bf16_gemm_path` chose the native path, fp16 never."""
    device = torch.device(device)
    if dtype not in _HALF or device.type == "cuda":
        return True
    return device.type == "cpu" and dtype == torch.bfloat16 and _cpu_native_bf16()


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
    as rounded fp32 on CPUs without half GEMMs). Under autocast the call is left to autocast. A
    frozen bf16 weight on CPU may run on its packed copy (:mod:`.packed_linear`, a measured choice).
    """
    if not runs_in_fp32(x):
        if packed_linear.applies(x, weight):
            return packed_linear.linear(x, weight, _as(bias, x.dtype))
        return F.linear(x, _as(weight, x.dtype), _as(bias, x.dtype))
    b = None if bias is None else rounded_fp32(bias, x.dtype)
    return F.linear(x.float(), rounded_fp32(weight, x.dtype), b).to(x.dtype)


def _as(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)
