"""Loading the native extension (``liftplus_fast/_C*.so``) and what it was built with.

The library registers its ops under ``torch.ops.liftplus_fast``. It is loaded at most once;
when it is missing, fails to load or was built against another torch, the package keeps
working on the reference path and warns once with the reason (not for an install made without
it on purpose, ``LIFTPLUS_FAST_NO_EXTENSION=1``).

Its CPU kernels come in builds for several instruction sets; the library picks one per kernel
file when it loads (``csrc/cpu_dispatch.cpp``), and :func:`cpu_capability` says which and why.
``LIFTPLUS_FAST_CPU_CAPABILITY`` (``default``, ``avx2``, ``avx512``, ``avx512_bf16``, ``amx``)
caps the choice: a value above what the CPU supports gives the widest it supports. An unknown
value leaves the native kernels unused (the import warns, naming the variable) and
:func:`check_cpu_capability_setting` (called by ``fast_train`` and the command line) raises a
:class:`~liftplus_fast.errors.UserInputError` naming it.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import UserInputError
from ._library import NATIVE, define_native, op

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_INFO_FILE = os.path.join(_PKG_DIR, "_build_info.json")
NAMESPACE = NATIVE


@dataclass
class NativeStatus:
    """Outcome of loading the native library."""

    loaded: bool
    reason: str = ""
    path: Optional[str] = None
    build_info: dict = field(default_factory=dict)
    # What cpu_capability() returns; empty when the library is not loaded.
    cpu: dict = field(default_factory=dict)
    # Whether the reference path is the user's choice (no warning then).
    chosen: bool = False
    # A LIFTPLUS_FAST_CPU_CAPABILITY value the library refused (then nothing runs natively).
    setting_error: str = ""


_STATUS: Optional[NativeStatus] = None


def _torch_version_key(version: str) -> str:
    # "2.14.1+cu130" and "2.14.1" are ABI compatible only when the base release matches.
    return version.split("+")[0]


def _find_library() -> Optional[str]:
    candidates = sorted(glob.glob(os.path.join(_PKG_DIR, "_C*.so")) + glob.glob(os.path.join(_PKG_DIR, "_C*.pyd")))
    return candidates[0] if candidates else None


def _read_build_info() -> dict:
    with open(BUILD_INFO_FILE) as f:
        info = json.load(f)
    if not isinstance(info, dict):
        raise ValueError("expected a JSON object")
    return info


def _load() -> NativeStatus:
    path = _find_library()
    info = {}
    if os.path.exists(BUILD_INFO_FILE):
        try:
            info = _read_build_info()
        except (OSError, ValueError) as exc:
            return NativeStatus(False, f"unreadable build info {BUILD_INFO_FILE}: {exc}", path)
    if path is None:
        if info.get("extension") is False:
            why = info.get("why") or "installed without the native extension"
            return NativeStatus(False, why, None, info, chosen=True)
        return NativeStatus(
            False,
            "the native extension was not built (no liftplus_fast/_C*.so); "
            "install with `pip install --no-build-isolation .` to build it",
        )
    built_for = info.get("torch_version")
    if built_for and _torch_version_key(built_for) != _torch_version_key(torch.__version__):
        return NativeStatus(
            False,
            f"the native extension was built for torch {built_for}, running {torch.__version__}; rebuild it",
            path,
            info,
        )
    if not info.get("schemas_from_python"):
        # An older build defines the schemas itself; loading it over ours would abort the process.
        return NativeStatus(
            False,
            "the native extension was built from older sources that define "
            "their own op schemas; rebuild it (make build)",
            path,
            info,
        )
    if not info.get("cpu_dispatch"):
        # A library without the cpu_capability op has every kernel compiled for its build machine alone.
        return NativeStatus(
            False,
            "the native extension was built from older sources without run-time CPU dispatch; rebuild it (make build)",
            path,
            info,
        )
    try:
        # The schemas come from Python; the library only registers kernels for them.
        define_native()
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as exc:
        return NativeStatus(False, f"could not load {path}: {exc}", path, info)
    selected, supported, why, error, kernels = op(NATIVE, "cpu_capability")()
    if error:
        return NativeStatus(False, f"{error}; the native kernels are not used", path, info, setting_error=error)
    cpu = {
        "selected": selected,
        "supported": supported,
        "why": why,
        "kernels": dict(item.split("=", 1) for item in kernels.split(",") if item),
    }
    return NativeStatus(True, "", path, info, cpu)


def native_status() -> NativeStatus:
    """Load the native library once and return what happened."""
    global _STATUS
    if _STATUS is None:
        disabled = os.environ.get("LIFTPLUS_FAST_DISABLE_NATIVE", "0") == "1"
        _STATUS = NativeStatus(False, "disabled by LIFTPLUS_FAST_DISABLE_NATIVE=1") if disabled else _load()
        if not _STATUS.loaded and not disabled and not _STATUS.chosen:
            warnings.warn(
                f"liftplus_fast: using the pure-PyTorch reference path because {_STATUS.reason}",
                RuntimeWarning,
                stacklevel=2,
            )
    return _STATUS


def check_cpu_capability_setting() -> None:
    """:class:`UserInputError` naming ``LIFTPLUS_FAST_CPU_CAPABILITY`` when its value is refused."""
    error = native_status().setting_error
    if error:
        raise UserInputError(error)


def cpu_capability() -> dict:
    """Which build of the CPU kernels runs and why: ``selected`` (``default``, ``avx2``,
    ``avx512``, ``avx512_bf16``, ``amx``, or ``native`` for a ``-march=native`` build),
    ``supported`` (the widest this CPU and OS support), ``why`` and ``kernels`` (the build of
    each kernel file); without the native library, ``selected`` is None and ``why`` the reason."""
    status = native_status()
    if not status.loaded:
        return {"selected": None, "supported": None, "why": f"no native CPU kernels: {status.reason}", "kernels": {}}
    return dict(status.cpu)


def cpu_capability_line() -> str:
    """:func:`cpu_capability` in one line, for logs."""
    cpu = cpu_capability()
    if cpu["selected"] is None:
        return cpu["why"]
    return f"{cpu['selected']} builds ({cpu['why']})"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``liftplus_fast::op`` is loaded and has a kernel for ``dispatch_key`` (CPU, CUDA)."""
    if not native_status().loaded:
        return False
    qualname = f"{NAMESPACE}::{op}"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
    except RuntimeError:
        return False


def native_op(name: str):
    """The ``torch.ops.liftplus_fast.<name>`` overload packet."""
    return op(NATIVE, name)
