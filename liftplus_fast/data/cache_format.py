"""``cache_format auto``: raw pixels where the raw cache fits a disk budget, JPEGs otherwise.

Raw needs no decoding in the training workers (decoding the stored JPEG is most of a jpeg-cache
worker's time per image, docs/data.md), but takes 3-8x the source bytes. :func:`choose_format`
resolves ``auto`` once per cache, before anything is built: the stored format is what the
index records and the fingerprint holds, as with an explicit ``cache_format``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .cache_store import (
    AUTO_FORMAT,
    CACHE_FORMATS,
    CacheError,
    CacheOptions,
    build_dir,
    cached_size,
    read_index,
    source_fingerprint,
)
from .list_datasets import ImageFileDataset

__all__ = ["SIZE_SAMPLE", "choose_format", "estimate_raw_bytes", "raw_budget"]

# Images per split whose header sizes estimate a raw cache's bytes.
SIZE_SAMPLE = 256


def choose_format(
    sources: Dict[str, ImageFileDataset], dataset: str, cache_dir: str, options: CacheOptions
) -> Tuple[CacheOptions, str]:
    """``options`` with ``cache_format auto`` resolved to ``raw`` or ``jpeg`` for ``sources`` (split -> source
    list), and why.

    A cache (or an unfinished build) of these sources and options already in ``cache_dir`` keeps
    its format, so the command stays idempotent and resumable whatever the disk holds now.
    Otherwise ``raw`` when the raw cache, estimated from the header sizes of up to
    :data:`SIZE_SAMPLE` images per split, fits :func:`raw_budget`, else ``jpeg``.
    """
    if options.cache_format != AUTO_FORMAT:
        return options, f"cache_format {options.cache_format}"
    for fmt in CACHE_FORMATS:
        stored = replace(options, cache_format=fmt)
        if any(_present(src, dataset, split, cache_dir, stored) for split, src in sources.items()):
            return stored, f"keeps the {fmt} cache in {cache_dir}"
    need = sum(estimate_raw_bytes(src.paths, options.cache_size) for src in sources.values())
    budget, what = raw_budget(cache_dir, options)
    fmt = "raw" if need <= budget else "jpeg"
    fits = "fits" if fmt == "raw" else "exceeds"
    return replace(options, cache_format=fmt), (
        f"the raw cache (about {need / 2**30:.2f} GiB) {fits} the budget of {budget / 2**30:.2f} GiB ({what})"
    )


def _present(source, dataset: str, split: str, cache_dir: str, options: CacheOptions) -> bool:
    fp = source_fingerprint(dataset, split, source.root, source.paths, source.labels, source.classnames, options)
    if os.path.isdir(build_dir(cache_dir, split, fp)):
        return True
    try:
        read_index(cache_dir, split, fp)
    except CacheError:
        return False
    return True


def estimate_raw_bytes(paths: Sequence[str], cache_size: int, sample: int = SIZE_SAMPLE) -> int:
    """Bytes of a raw cache of ``paths``: the stored sizes of up to ``sample`` evenly spaced images
    (read from their headers; unreadable ones left out), scaled to all of them."""
    if not len(paths):
        return 0
    picks = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(sample, len(paths)))})
    sizes = []
    for i in picks:
        try:
            with Image.open(paths[i]) as img:
                h, w = cached_size(img.height, img.width, cache_size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
        sizes.append(3 * h * w)
    return int(np.mean(sizes) * len(paths)) if sizes else 0


def raw_budget(cache_dir: str, options: CacheOptions) -> Tuple[float, str]:
    """Bytes a raw cache may take under ``cache_format auto``, and what set them.

    ``cache_budget`` (GiB) when given; otherwise half the free space of the file system that
    will hold ``cache_dir`` (room is left for everything else) and half of this machine's memory
    (or of the container's limit): a cache the page cache cannot hold is read from the disk
    every epoch, 3-8x the source bytes, which on a disk slower than the JPEG decoders makes raw
    the slower format.
    """
    if options.cache_budget is not None:
        return options.cache_budget * 2**30, "cache_budget"
    folder = os.path.abspath(cache_dir)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    memory = _memory_bytes()
    if memory is not None and memory < free:
        return memory / 2, f"half of the {memory / 2**30:.1f} GiB of memory"
    return free / 2, f"half of the {free / 2**30:.1f} GiB free on the cache's disk"


def _memory_bytes() -> Optional[int]:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return None
    try:  # a container's cgroup (v2) limit
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total
