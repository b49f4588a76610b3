"""Choosing the implementation of each fused op: reference, native CPU/CUDA, or Triton.

``LIFTPLUS_FAST_BACKEND`` (``auto`` by default) picks the backend:

* ``auto``: native CPU kernels for CPU tensors, Triton (or the CUDA extension) for CUDA
  tensors, the reference path when neither is available;
* ``reference``: the pure-PyTorch oracle everywhere;
* ``cpu`` / ``cuda`` / ``triton``: that backend or a clear error saying why it cannot run.

Each op module registers its implementations with :func:`register`; the choice made for
each (op, backend) is logged once.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict

import torch

from ..errors import UserInputError
from ._native import has_kernel, native_status

logger = logging.getLogger("liftplus_fast")

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
ENV_VAR = "LIFTPLUS_FAST_BACKEND"

# op name -> backend name -> implementation
_IMPLS: Dict[str, Dict[str, Callable]] = {}
# op name -> name of the native op whose kernels back the "cpu"/"cuda" implementations
_NATIVE_NAMES: Dict[str, str] = {}
# (op, device type, LIFTPLUS_FAST_BACKEND, TRITON_INTERPRET) -> backend; cleared by register().
_CHOICES: Dict[tuple, str] = {}


class BackendUnavailableError(UserInputError, RuntimeError):
    """The backend ``LIFTPLUS_FAST_BACKEND`` asks for cannot run an op on these tensors."""


def register(op: str, backend: str, fn: Callable, native_name: str | None = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = fn
    _CHOICES.clear()
    if native_name is not None:
        _NATIVE_NAMES[op] = native_name


def register_native(op: str, fn: Callable, native_name: str) -> None:
    """Register ``fn`` (a call of ``liftplus_fast::native_name``) as the cpu and cuda backends."""
    for backend in ("cpu", "cuda"):
        register(op, backend, fn, native_name=native_name)


def requested_backend() -> str:
    """The backend asked for through ``LIFTPLUS_FAST_BACKEND`` (validated)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise UserInputError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)}; got {value!r}")
    return value


def triton_usable(device_type: str) -> tuple[bool, str]:
    """Whether Triton kernels can run on tensors of ``device_type``, and why not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton ships with the CUDA torch build
        return False, f"triton is not importable ({exc})"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type == "cuda" and not interpret:
        return True, ""
    if device_type == "cpu" and interpret:
        return True, ""
    if device_type == "cpu":
        return False, "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
    return False, f"Triton kernels do not run on {device_type} tensors"


def _native_ok(op: str, device_type: str) -> tuple[bool, str]:
    name = _NATIVE_NAMES.get(op)
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if name is None or key is None:
        return False, f"no native kernel of {op} for {device_type} tensors"
    status = native_status()
    if not status.loaded:
        return False, status.reason
    if not has_kernel(name, key):
        return False, f"the native extension has no {key} kernel for {op}"
    return True, ""


def _available(op: str, backend: str, device_type: str) -> tuple[bool, str]:
    if backend not in _IMPLS.get(op, {}):
        if backend == "triton":
            _load_triton()
        if backend not in _IMPLS.get(op, {}):
            return False, f"{op} has no {backend} implementation"
    if backend == "reference":
        return True, ""
    if backend == "triton":
        return triton_usable(device_type)
    if backend in ("cpu", "cuda") and backend != device_type:
        return False, f"the {backend} backend needs {backend} tensors, got {device_type} tensors"
    return _native_ok(op, device_type)


def _load_triton() -> None:
    try:
        from . import triton as _triton_ops  # noqa: F401  (registers the Triton implementations)
    except ImportError as exc:
        logger.debug("Triton implementations unavailable: %s", exc)


def choose(op: str, device: torch.device) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``."""
    device_type = torch.device(device).type
    requested = requested_backend()
    if requested != "auto":
        ok, why = _available(op, requested, device_type)
        if not ok:
            raise BackendUnavailableError(f"{ENV_VAR}={requested} cannot run {op}: {why}")
        return requested
    if device_type == "cuda":
        order = ("triton", "cuda", "reference")
    elif device_type == "cpu":
        order = ("cpu", "reference")
    else:
        order = ("reference",)
    for backend in order:
        if _available(op, backend, device_type)[0]:
            return backend
    return "reference"


@torch.compiler.assume_constant_result
def _choose_and_log(op: str, device_type: str) -> str:
    # Evaluated eagerly even under torch.compile: the choice is a constant of the graph. It is
    # cached because the checks behind it cost more than a small kernel.
    key = (op, device_type, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"))
    backend = _CHOICES.get(key)
    if backend is None:
        backend = choose(op, torch.device(device_type))
        _CHOICES[key] = backend
        logger.info("liftplus_fast: %s on %s tensors runs the %s backend", op, device_type, backend)
    return backend


def dispatch(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` to call for tensors on ``device``; logs the choice once."""
    return _IMPLS[op][_choose_and_log(op, device.type)]


def describe() -> dict:
    """For each registered op: the backend used for CPU and for CUDA tensors (or the error)."""
    table = {}
    for op in sorted(_IMPLS):
        row = {}
        for device_type in ("cpu", "cuda"):
            try:
                row[device_type] = choose(op, torch.device(device_type))
            except RuntimeError as exc:
                row[device_type] = f"unavailable: {exc}"
        row["implementations"] = sorted(_IMPLS[op])
        table[op] = row
    return table
