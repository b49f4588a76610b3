"""Loading the native extension (``liftplus_fast/_C*.so``) and what it was built with.

The library registers its ops under ``torch.ops.liftplus_fast``. It is loaded at most once;
when it is missing, fails to load or was built against another torch, the package keeps
working on the reference path and warns once with the reason.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

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


_STATUS: Optional[NativeStatus] = None


def _torch_version_key(version: str) -> str:
    # "2.14.1+cu130" and "2.14.1" are ABI compatible only when the base release matches.
    return version.split("+")[0]


def _find_library() -> Optional[str]:
    candidates = sorted(glob.glob(os.path.join(_PKG_DIR, "_C*.so")) + glob.glob(os.path.join(_PKG_DIR, "_C*.pyd")))
    return candidates[0] if candidates else None


def _load() -> NativeStatus:
    path = _find_library()
    if path is None:
        return NativeStatus(
            False,
            "the native extension was not built (no liftplus_fast/_C*.so); "
            "install with `pip install --no-build-isolation .` to build it",
        )
    info = {}
    if os.path.exists(BUILD_INFO_FILE):
        try:
            with open(BUILD_INFO_FILE) as f:
                info = json.load(f)
        except (OSError, ValueError) as exc:
            return NativeStatus(False, f"unreadable build info {BUILD_INFO_FILE}: {exc}", path)
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
    try:
        # The schemas come from Python; the library only registers kernels for them.
        define_native()
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as exc:
        return NativeStatus(False, f"could not load {path}: {exc}", path, info)
    return NativeStatus(True, "", path, info)


def native_status() -> NativeStatus:
    """Load the native library once and return what happened."""
    global _STATUS
    if _STATUS is None:
        disabled = os.environ.get("LIFTPLUS_FAST_DISABLE_NATIVE", "0") == "1"
        _STATUS = NativeStatus(False, "disabled by LIFTPLUS_FAST_DISABLE_NATIVE=1") if disabled else _load()
        if not _STATUS.loaded and not disabled:
            warnings.warn(
                f"liftplus_fast: using the pure-PyTorch reference path because {_STATUS.reason}",
                RuntimeWarning,
                stacklevel=2,
            )
    return _STATUS


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
