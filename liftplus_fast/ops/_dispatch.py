"""Choosing the implementation of each fused op: reference, native CPU/CUDA, or Triton.

``LIFTPLUS_FAST_BACKEND`` (``auto`` by default) picks the backend:

* ``auto``: native CPU kernels for CPU tensors; for CUDA tensors the CUDA extension's kernels,
  else Triton's (on an H200 the extension ran each fused op 1.2-13x faster than the Triton
  kernels at the model's shapes, docs/gpu.md); the reference path when neither is available;
* ``reference``: the pure-PyTorch oracle everywhere;
* ``cpu`` / ``cuda`` / ``triton``: that backend for every op it implements (or a clear error
  saying why it cannot run on these tensors), and the automatic order for the ops it does not
  implement (attention and the MLP's bias + GELU have CPU kernels only: on CUDA PyTorch's own
  kernels are the fast path), so a forced backend never stops a model.

Each op module registers its implementations with :func:`register`; a backend package that
registers implementations later (the Triton kernels, imported on first need) is announced with
:func:`add_loader`. The choice made for each (op, device type) is logged once, with the reason
when the forced backend does not implement the op.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict

import torch

# BackendUnavailableError (defined in errors.py) stays importable from here, where dispatch raises it.
from ..errors import BackendUnavailableError, UserInputError
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
# backend name -> function that imports the package registering that backend's implementations
_LOADERS: Dict[str, Callable[[], None]] = {}


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


def add_loader(backend: str, load: Callable[[], None]) -> None:
    """Announce that ``load()`` registers ``backend``'s implementations (called on first need).

    The loader is handed in by the package above the backend, so this module never imports a
    backend package (which imports this module to register).
    """
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _LOADERS[backend] = load


def load_backends() -> None:
    """Run every announced loader once (each registers its backend's implementations)."""
    while _LOADERS:
        _LOADERS.popitem()[1]()


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


def implements(op: str, backend: str) -> bool:
    """Whether ``backend`` has an implementation of ``op`` (loading announced backends first)."""
    if backend not in _IMPLS.get(op, {}) and backend in _LOADERS:
        _LOADERS.pop(backend)()
    return backend in _IMPLS.get(op, {})


def _available(op: str, backend: str, device_type: str) -> tuple[bool, str]:
    if not implements(op, backend):
        return False, f"{op} has no {backend} implementation"
    if backend == "reference":
        return True, ""
    if backend == "triton":
        return triton_usable(device_type)
    if backend in ("cpu", "cuda") and backend != device_type:
        return False, f"the {backend} backend needs {backend} tensors, got {device_type} tensors"
    return _native_ok(op, device_type)


def choose(op: str, device: torch.device) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``."""
    return _choose(op, torch.device(device).type)[0]


def _choose(op: str, device_type: str) -> tuple[str, str]:
    """The backend for ``op`` on ``device_type`` tensors and, when it is not the one asked for,
    why (empty otherwise)."""
    requested = requested_backend()
    if requested != "auto":
        if implements(op, requested):
            ok, why = _available(op, requested, device_type)
            if not ok:
                raise BackendUnavailableError(f"{ENV_VAR}={requested} cannot run {op}: {why}")
            return requested, ""
        backend = _automatic(op, device_type)
        return backend, f"{ENV_VAR}={requested} has no {op} implementation; automatic order"
    return _automatic(op, device_type), ""


def _automatic(op: str, device_type: str) -> str:
    if device_type == "cuda":
        order = ("cuda", "triton", "reference")
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
        backend, why = _choose(op, device_type)
        _CHOICES[key] = backend
        note = f" ({why})" if why else ""
        logger.info("liftplus_fast: %s on %s tensors runs the %s backend%s", op, device_type, backend, note)
    return backend


def dispatch(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` to call for tensors on ``device``; logs the choice once."""
    return _IMPLS[op][_choose_and_log(op, device.type)]


def describe() -> dict:
    """For each registered op: the backend used for CPU and for CUDA tensors (or the error),
    its implementations and, under ``notes``, why an op does not run the forced backend."""
    load_backends()
    table = {}
    for op in sorted(_IMPLS):
        row, notes = {}, {}
        for device_type in ("cpu", "cuda"):
            try:
                row[device_type], why = _choose(op, device_type)
                if why:
                    notes[device_type] = why
            except RuntimeError as exc:
                row[device_type] = f"unavailable: {exc}"
        row["implementations"] = sorted(_IMPLS[op])
        if notes:
            row["notes"] = notes
        table[op] = row
    return table
