"""Whether the source images of a cache changed since it was built, by ``stat`` (as make and rsync tell).

A cache's index records each source file's size and modification time (nanoseconds) as they
were just before the file was decoded. Comparing them with a fresh ``stat`` finds a file
rewritten in place (a re-export, a crop, an image replaced under the same name) without reading
any image: a file whose size and modification time both stay the same after an edit is the one
case left, and only tools that restore timestamps on purpose produce it. What the ``stat`` of a
whole list costs, per file and CPU class, is in docs/data.md.
"""

from __future__ import annotations

import datetime
import os
from typing import Sequence

import numpy as np

__all__ = ["MISSING", "changed_sources", "describe_change", "stat_file", "stat_files"]

MISSING = (-1, -1)  # the record of a file that could not be stat-ed


def stat_file(path: str) -> tuple:
    """``(size in bytes, modification time in ns)`` of ``path``, or :data:`MISSING`."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a path with a NUL byte
        return MISSING
    return st.st_size, st.st_mtime_ns


def stat_files(paths: Sequence[str]) -> np.ndarray:
    """``[len(paths), 2]`` int64: :func:`stat_file` of every path."""
    out = np.empty((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):
        out[i] = stat_file(path)
    return out


def changed_sources(paths: Sequence[str], recorded: np.ndarray) -> np.ndarray:
    """Indices of the ``paths`` whose ``stat`` differs from ``recorded`` (:func:`stat_files` rows)."""
    if len(paths) != len(recorded):
        raise ValueError(f"{len(paths)} paths but {len(recorded)} recorded stats")
    return np.flatnonzero((stat_files(paths) != recorded).any(axis=1))


def _when(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9).astimezone().isoformat(timespec="microseconds")


def describe_change(path: str, recorded: Sequence[int]) -> str:
    """``'path': size 1200 -> 1350 bytes, modified 2024-... -> 2025-...`` (what differs now)."""
    now = stat_file(path)
    old = (int(recorded[0]), int(recorded[1]))
    if now == MISSING:
        return f"{path!r} is gone"
    if old == MISSING:
        return f"{path!r} is there again (it was missing at build time)"
    parts = []
    if now[0] != old[0]:
        parts.append(f"size {old[0]} -> {now[0]} bytes")
    if now[1] != old[1]:
        parts.append(f"modified {_when(old[1])} -> {_when(now[1])}")
    return f"{path!r}: " + (", ".join(parts) if parts else "unchanged")
