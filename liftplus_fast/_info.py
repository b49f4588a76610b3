"""What was built and which backend each op dispatches to."""

from __future__ import annotations

import torch

from .ops import choices
from .ops._dispatch import describe, requested_backend, triton_usable
from .ops._native import cpu_capability, native_status
from .ops.gemm import cpu_bf16_gemm_path


def backend_info() -> dict:
    """Describe the native build and the dispatch of every op.

    Returns a dict with ``requested`` (``LIFTPLUS_FAST_BACKEND``), ``native`` (loaded, reason,
    path and build facts of the extension), ``triton`` (whether Triton kernels can run on CUDA
    and on CPU tensors here), ``cuda_available``, ``cpu_capability`` (which build of the CPU kernels
    runs, chosen when the library loads, and why; see :func:`liftplus_fast.ops._native.cpu_capability`),
    ``cpu_bf16_gemm`` (whether bf16 GEMMs run natively
    on this CPU or as fp32 GEMMs of bf16 values, and why; measured on first use, see
    :mod:`liftplus_fast.ops.gemm`) and ``ops``: for each op the backend used for
    CPU and for CUDA tensors, its implementations and, under ``notes``, why an op runs another
    backend than the forced one (that backend does not implement it); ``choices`` (for each
    measured choice of a CPU implementation, e.g. ``half_gemm``, ``attention_bf16``: the option
    that runs and why; those not made yet are made now, timing their options, see
    :mod:`liftplus_fast.ops.choices`).
    """
    status = native_status()
    return {
        "torch": torch.__version__,
        "requested": requested_backend(),
        "cuda_available": torch.cuda.is_available(),
        "native": {"loaded": status.loaded, "reason": status.reason, "path": status.path, **status.build_info},
        "triton": {dev: triton_usable(dev)[0] for dev in ("cuda", "cpu")},
        "cpu_capability": cpu_capability(),
        "cpu_bf16_gemm": cpu_bf16_gemm_path(),
        "choices": choices.table(),
        "ops": describe(),
    }
