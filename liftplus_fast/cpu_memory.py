"""Freed CPU memory kept for reuse while a process trains on the CPU (glibc's malloc).

A training step allocates and frees the same large tensors every step: a ViT-B/16 MLP
activation at B = 32 is 39 MB in bf16. glibc serves every allocation above its mmap threshold
(32 MB at most) with a fresh mapping and unmaps it on free, and trims the top of its heap above
another threshold, so each step faults those pages in again and the kernel zeroes them. On a
2-core Zen 4 EPYC a ViT-B/16 step at B = 32 took 200-280 thousand page faults; the fused
bias + QuickGELU forward at that size ran 16.7 ms with glibc's defaults and 5.1 ms with its memory
kept (docs/benchmarks.md). :func:`keep_freed_memory` sets ``M_MMAP_MAX = 0`` (every allocation
from the heap) and the largest trim threshold (2 GiB of free memory at the heap's top), once per
process: the process then keeps its high-water mark of heap memory until it exits, which a
training process reaches in its first step anyway.

``LIFTPLUS_FAST_MALLOC=system`` leaves glibc's defaults; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from typing import Optional

from .errors import UserInputError

__all__ = ["ENV_VAR", "keep_freed_memory", "malloc_state"]

logger = logging.getLogger("liftplus_fast")

ENV_VAR = "LIFTPLUS_FAST_MALLOC"
_MODES = ("keep", "system")
# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_AT = 2**31 - 1  # bytes: the largest C int mallopt takes

_STATE: Optional[str] = None


def _mode() -> str:
    value = os.environ.get(ENV_VAR, "keep").strip().lower() or "keep"
    if value not in _MODES:
        raise UserInputError(f"{ENV_VAR}={value!r} is not a malloc mode; expected one of {', '.join(_MODES)}")
    return value


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def keep_freed_memory() -> str:
    """Keep freed memory in this process's heap (see the module doc); returns :func:`malloc_state`.

    Decided once per process: later calls return the first decision. Raises
    :class:`~liftplus_fast.errors.UserInputError` for a bad ``LIFTPLUS_FAST_MALLOC``.
    """
    global _STATE
    mode = _mode()
    if _STATE is not None:
        return _STATE
    if mode == "system":
        _STATE = f"system ({ENV_VAR}=system)"
    elif (libc := _glibc()) is None:
        _STATE = "system (not glibc: its allocator is left as it is)"
    else:
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_AT) == 1
        kept = "kept (glibc: no mmap allocations, heap trimmed above 2 GiB)"
        _STATE = kept if ok else "system (glibc refused mallopt)"
    logger.info("CPU memory: %s", _STATE)
    return _STATE


def malloc_state() -> str:
    """What :func:`keep_freed_memory` did in this process ("" before it ran)."""
    return _STATE or ""
