"""Helpers shared by the Triton ops: lazy kernel construction, configs, launch geometry.

``@triton.jit`` decides at decoration time whether a kernel is compiled for the GPU or run by
the CPU interpreter (``TRITON_INTERPRET=1``). The package may be imported before a test sets
that variable (``lf.backend_info()`` probes the Triton backend), so kernels are not decorated
at import: :class:`LazyKernel` builds the jitted (and autotuned) kernel on first launch for the
interpreter state in force at that moment and caches one build per state and config variant.

Triton launches on the *current* CUDA device, whatever device the tensors are on, so every
launch runs inside :func:`on_device` of its tensors.
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import Callable, Dict, List, Mapping, Sequence, Union

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class LazyKernel:
    """A Triton kernel source plus its GPU autotune configs, jitted on first use.

    ``gpu_configs`` is one list, or a mapping from a variant name to a list: the caller picks the
    variant (say, ``"fp32"``) from what it launches, so a sweep runs only where it can pay off
    and a cold start compiles one config elsewhere. Under the interpreter only
    ``interp_config`` is used: autotuning there would only multiply the (slow, numpy-backed)
    runs without telling anything about GPU speed.
    """

    def __init__(
        self,
        fn: Callable,
        gpu_configs: Union[Sequence[triton.Config], Mapping[str, Sequence[triton.Config]]],
        interp_config: triton.Config,
        key: List[str],
        helpers: Sequence[Callable] = (),
    ):
        self.fn = fn
        self.helpers = tuple(helpers)
        variants = gpu_configs if isinstance(gpu_configs, Mapping) else {"": gpu_configs}
        self.gpu_configs = {name: list(configs) for name, configs in variants.items()}
        self.interp_config = interp_config
        self.key = key
        self._built: Dict[tuple, object] = {}

    def get(self, variant: str = ""):
        flag = interpreting()
        build = (flag, "" if flag else variant)
        kernel = self._built.get(build)
        if kernel is None:
            configs = [self.interp_config] if flag else self.gpu_configs[variant]
            kernel = triton.autotune(configs=configs, key=self.key)(triton.jit(self._with_helpers()))
            self._built[build] = kernel
        return kernel

    def _with_helpers(self) -> Callable:
        """A fresh copy of the kernel function (triton caches state on it) whose globals name
        each helper jitted for the interpreter state in force: a kernel calls only jitted
        functions, and the interpreter only interpreted ones."""
        fn = self.fn
        scope = {**fn.__globals__, **{h.__name__: triton.jit(h) for h in self.helpers}}
        fresh = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
        fresh.__qualname__, fresh.__annotations__ = fn.__qualname__, dict(fn.__annotations__)
        return fresh

    def config_count(self) -> int:
        """GPU configs over all variants (what a cold start may compile per specialisation)."""
        return sum(len(c) for c in self.gpu_configs.values())


def on_device(t: torch.Tensor):
    """Make ``t``'s CUDA device current for the launches inside (a no-op for CPU tensors)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def cfg(num_warps: int = 4, num_stages: int = 2, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Next power of two ≥ n and ≥ ``floor`` (``tl.dot`` needs every tile side ≥ 16)."""
    return max(floor, triton.next_power_of_2(int(n)))


_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dot_meta(dtype: torch.dtype) -> dict:
    """Element type, ``tl.dot`` operand type and precision for inputs of ``dtype``.

    * fp32 inputs use ``ieee``: TF32 (10-bit mantissa) would miss the 1e-5 tolerance.
    * Operands are first rounded to the input dtype (as the reference's GEMMs see them); on the
      GPU the dot then runs on tensor cores in that dtype with fp32 accumulation.
    * Triton 3.8's interpreter computes bf16 ``tl.dot`` wrongly (garbage of order 1e10), so
      there the rounded operands are widened to fp32 first. A product of two bf16/fp16 values is
      exact in fp32, so this equals a tensor-core dot with fp32 accumulation up to summation
      order.
    """
    import triton.language as tl

    elem = getattr(tl, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[_TL[dtype]])
    if interpreting() or dtype == torch.float32:
        return {"ELEM_T": elem, "DOT_T": tl.float32, "PREC": "ieee"}
    return {"ELEM_T": elem, "DOT_T": elem, "PREC": "tf32"}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a small fixed number under the interpreter)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))
