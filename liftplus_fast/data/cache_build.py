"""Building the decode-once cache: parallel, resumable, reporting every file it cannot decode.

The images of a split are cut into chunks. Worker processes decode each chunk with the same
function the reference path uses (:func:`liftplus_fast.data.images.load_rgb_image`), resize
images whose short side exceeds ``cache_size`` (PIL bicubic, antialiased, never upsampling),
encode them and write the chunk into a build folder ``C/.<split>.build-<fingerprint>/`` (its
pixels first, then a small manifest, each by rename, so a manifest means a finished chunk). A
build that is interrupted resumes from the finished chunks. When every chunk is there the data
file is assembled, then the index is written (see :mod:`liftplus_fast.data.cache_store`).

``cache_format auto`` (the default) is resolved to raw or jpeg before anything is built
(:func:`~liftplus_fast.data.cache_format.choose_format`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..errors import UserInputError
from ..files import atomic_write, atomic_write_bytes
from ..stop_signals import check_stop, handle_stop_signals, requested, safe_points, stop_error
from .cache_format import choose_format
from .cache_store import (
    AUTO_FORMAT,
    MAGIC,
    VERSION,
    CachedImageDataset,
    CacheError,
    CacheOptions,
    build_dir,
    cached_size,
    check_source_stats,
    data_path,
    index_path,
    read_index,
    skipped_path,
    source_fingerprint,
    write_index,
)
from .images import load_rgb_image
from .list_datasets import ImageFileDataset
from .registry import build_dataset
from .source_stat import changed_sources, stat_file, stat_files

logger = logging.getLogger("liftplus_fast")

CHUNK = 256
CACHE_SPLITS = ("train", "test")


def encode_for_cache(img: Image.Image, options: CacheOptions) -> Tuple[bytes, Tuple[int, int], Tuple[int, int]]:
    """``(bytes, stored_hw, orig_hw)`` of one decoded RGB image."""
    orig = (img.height, img.width)
    h, w = cached_size(img.height, img.width, options.cache_size)
    if (h, w) != orig:
        img = img.resize((w, h), Image.BICUBIC)
    if options.cache_format == "raw":
        return np.asarray(img, dtype=np.uint8).tobytes(), (h, w), orig
    buf = io.BytesIO()
    # 4:4:4 chroma: subsampled chroma alone costs ~1/255 of error on colour edges.
    img.save(buf, format="JPEG", quality=options.cache_quality, subsampling=0)
    return buf.getvalue(), (h, w), orig


def build_chunk(
    work_dir: str, chunk: int, paths: Sequence[str], options: CacheOptions, previous: Optional[Tuple] = None
) -> Dict[str, Any]:
    """Decode, resize and encode ``paths`` into ``work_dir/chunk_<n>.{bin,json}``; return the manifest.

    ``previous`` (a refresh): ``(old data file, entries)`` with one entry per path: ``None`` to
    decode the file, else what the old cache holds for the unchanged file, copied instead of
    decoded again: ``(offset, nbytes, stored_hw, orig_hw)`` of its stored image, or the reason
    (a string) it could not be decoded. Each file's size and modification time are recorded
    before it is read, so a file rewritten meanwhile shows as changed.
    """
    blobs: List[bytes] = []
    manifest: Dict[str, Any] = {
        "nbytes": [],
        "stored_hw": [],
        "orig_hw": [],
        "ok": [],
        "skipped": [],
        "source_bytes": 0,
        "stat": [],
        "decoded": 0,
    }
    old_file, entries = previous if previous is not None else (None, [None] * len(paths))
    with open(old_file, "rb") if old_file else contextlib.nullcontext() as old:
        for path, entry in zip(paths, entries):
            st = stat_file(path)
            manifest["stat"].append(list(st))
            reason = entry if isinstance(entry, str) else None
            if entry is None:
                manifest["decoded"] += 1
                try:
                    blob, stored, orig = encode_for_cache(load_rgb_image(path), options)
                except Exception as exc:  # noqa: BLE001 - every undecodable file is reported, whatever failed
                    reason = str(exc) if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {exc}"
            elif reason is None:
                offset, nbytes, stored, orig = entry
                old.seek(offset)
                blob = old.read(nbytes)
            if reason is not None:
                manifest["skipped"].append({"path": path, "reason": reason})
                manifest["ok"].append(False)
                continue
            manifest["source_bytes"] += st[0]
            blobs.append(blob)
            manifest["nbytes"].append(len(blob))
            manifest["stored_hw"].append(list(stored))
            manifest["orig_hw"].append(list(orig))
            manifest["ok"].append(True)
    atomic_write_bytes(os.path.join(work_dir, f"chunk_{chunk:06d}.bin"), b"".join(blobs))
    atomic_write_bytes(os.path.join(work_dir, f"chunk_{chunk:06d}.json"), json.dumps(manifest).encode())
    return manifest


def _load_manifest(work_dir: str, chunk: int, paths: Sequence[str]) -> Optional[Dict[str, Any]]:
    """A finished chunk of an interrupted build, if its files are whole and its sources unchanged."""
    path = os.path.join(work_dir, f"chunk_{chunk:06d}.json")
    blob = os.path.join(work_dir, f"chunk_{chunk:06d}.bin")
    try:
        with open(path) as f:
            manifest = json.load(f)
        if os.path.getsize(blob) == sum(manifest["nbytes"]) and manifest["stat"] == stat_files(paths).tolist():
            return manifest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _previous_entries(header, arrays, changed: np.ndarray) -> List[Any]:
    """Per source file, what a refresh copies from the old cache (see :func:`build_chunk`), or
    ``None`` for the changed files it decodes again."""
    rows = np.cumsum(arrays["source_ok"]) - 1
    skipped = iter(header["skipped"])  # in source order, one per file the build could not decode
    entries: List[Any] = []
    for i, ok in enumerate(arrays["source_ok"].tolist()):
        if not ok:
            entries.append(str(next(skipped, {}).get("reason", "could not be decoded")))
            continue
        r = int(rows[i])
        offset, nbytes = int(arrays["offsets"][r]), int(arrays["nbytes"][r])
        entries.append((offset, nbytes, arrays["stored_hw"][r].tolist(), arrays["orig_hw"][r].tolist()))
    for i in changed:
        entries[int(i)] = None
    return entries


def _up_to_date(cache_dir: str, split: str, fp: str, paths: Sequence[str]):
    """``(header, arrays, changed source indices)`` of the split's current cache when it was built
    from this list with these options, else ``None`` (it is rebuilt whole)."""
    try:
        header, arrays = read_index(cache_dir, split, fp)
    except CacheError:
        return None
    return header, arrays, changed_sources(paths, arrays["source_stat"])


def build_split(
    source: ImageFileDataset,
    dataset: str,
    split: str,
    cache_dir: str,
    options: CacheOptions,
    workers: int = 0,
    progress: bool = True,
    chunk_size: int = CHUNK,
) -> Dict[str, Any]:
    """Build (or resume, refresh, or keep when up to date) one split's cache; return its summary.

    A cache built from this list with these options is kept when no source file's size or
    modification time changed, and refreshed otherwise: the changed files are decoded again,
    the others copied from the old data file. The summary: ``images``, ``skipped``,
    ``data_bytes``, ``source_bytes``, ``seconds``, ``decoded`` (images decoded by this call),
    ``chunks_built`` and ``chunks_reused`` (of an interrupted build; both 0 when up to date).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if options.cache_format == AUTO_FORMAT:
        options, _ = choose_format({split: source}, dataset, cache_dir, options)
    os.makedirs(cache_dir, exist_ok=True)
    fp = source_fingerprint(dataset, split, source.root, source.paths, source.labels, source.classnames, options)
    current = _up_to_date(cache_dir, split, fp, source.paths)
    if current is not None and not len(current[2]):
        header = current[0]
        logger.info("cache %s/%s is up to date (%d images)", cache_dir, split, header["images"])
        return {
            **{k: header[k] for k in ("images", "data_bytes", "source_bytes")},
            "skipped": len(header["skipped"]),
            "seconds": time.perf_counter() - t0,
            "decoded": 0,
            "chunks_built": 0,
            "chunks_reused": 0,
        }
    entries = None
    if current is not None:
        logger.info(
            "cache %s/%s: %d of %d source images changed since it was built; decoding them again",
            *(cache_dir, split, len(current[2]), len(source.paths)),
        )
        entries = _previous_entries(*current)
    work_dir = build_dir(cache_dir, split, fp)
    starts = list(range(0, len(source.paths), chunk_size))
    manifests = _resumable_chunks(cache_dir, split, work_dir, source.paths, starts, chunk_size)
    reused = len(manifests)
    todo = [k for k in range(len(starts)) if k not in manifests]
    bar = tqdm(
        total=len(source.paths),
        initial=sum(len(m["ok"]) for m in manifests.values()),
        desc=f"cache {split}",
        unit="img",
        disable=not progress,
    )
    old_data = data_path(cache_dir, split)
    jobs = []
    for k in todo:
        chunk = slice(starts[k], starts[k] + chunk_size)
        refresh = () if entries is None else ((old_data, entries[chunk]),)
        jobs.append((work_dir, k, source.paths[chunk], options) + refresh)
    try:
        with safe_points():
            where = f"while building the {split!r} cache in {cache_dir!r}"
            _build_chunks(jobs, workers, manifests, bar, where, len(starts))
    finally:
        bar.close()
    summary = _assemble(source, dataset, split, cache_dir, options, fp, work_dir, manifests, len(starts))
    shutil.rmtree(work_dir, ignore_errors=True)
    decoded = sum(manifests[k].get("decoded", 0) for k in todo)
    summary.update(seconds=time.perf_counter() - t0, decoded=decoded, chunks_built=len(todo), chunks_reused=reused)
    return summary


def _resumable_chunks(
    cache_dir: str, split: str, work_dir: str, paths: Sequence[str], starts: List[int], chunk_size: int
) -> Dict[int, Dict[str, Any]]:
    """The chunks an interrupted build of this split left in ``work_dir`` (created if missing),
    by index; builds of the split for another source or options are removed (they cannot be resumed)."""
    for name in os.listdir(cache_dir):
        if name.startswith(f".{split}.build-") and os.path.join(cache_dir, name) != work_dir:
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
    os.makedirs(work_dir, exist_ok=True)
    manifests: Dict[int, Dict[str, Any]] = {}
    for k, start in enumerate(starts):
        m = _load_manifest(work_dir, k, paths[start : start + chunk_size])
        if m is not None:
            manifests[k] = m
    return manifests


def _build_chunks(jobs, workers: int, manifests: Dict[int, Dict[str, Any]], bar, where: str, n_chunks: int) -> None:
    """Build ``jobs`` (in ``workers`` processes), a stop signal taking effect between chunks."""

    def stop_point() -> None:
        check_stop(f"{where} ({len(manifests)} of {n_chunks} chunks are built and kept; the build resumes from them)")

    if workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending = {pool.submit(build_chunk, *job): job[1] for job in jobs}
            try:
                while pending:
                    done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    for future in done:
                        manifests[pending.pop(future)] = m = future.result()
                        _report(m, bar)
                    stop_point()
            finally:
                # Chunks being built finish (each is written whole); those not started are dropped.
                pool.shutdown(wait=True, cancel_futures=True)
        return
    for job in jobs:
        stop_point()
        manifests[job[1]] = m = build_chunk(*job)
        _report(m, bar)


def _report(manifest: Dict[str, Any], bar) -> None:
    for bad in manifest["skipped"]:
        logger.warning("cache: skipping %s (%s)", bad["path"], bad["reason"])
    bar.update(len(manifest["ok"]))


def _assemble(source, dataset, split, cache_dir, options, fp, work_dir, manifests, n_chunks) -> Dict[str, Any]:
    labels, nbytes, stored, orig, skipped, stats, ok_flags = [], [], [], [], [], [], []
    source_bytes, base = 0, 0
    for k in range(n_chunks):
        m = manifests[k]
        labels.extend(source.labels[base + i] for i, ok in enumerate(m["ok"]) if ok)
        base += len(m["ok"])
        nbytes.extend(m["nbytes"])
        stored.extend(m["stored_hw"])
        orig.extend(m["orig_hw"])
        skipped.extend(m["skipped"])
        stats.extend(m["stat"])
        ok_flags.extend(m["ok"])
        source_bytes += m["source_bytes"]

    def concatenate(out) -> None:
        for k in range(n_chunks):
            with open(os.path.join(work_dir, f"chunk_{k:06d}.bin"), "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)

    def drop_old_index() -> None:
        # A new data file must never pair with an old index.
        if os.path.exists(index_path(cache_dir, split)):
            os.remove(index_path(cache_dir, split))

    atomic_write(data_path(cache_dir, split), concatenate, before_replace=drop_old_index)
    listing = "".join(f"{s['path']}\t{s['reason']}\n" for s in skipped)
    atomic_write_bytes(skipped_path(cache_dir, split), listing.encode())
    sizes = np.asarray(nbytes, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else sizes
    data_bytes = int(sizes.sum())
    header = {
        "magic": MAGIC,
        "version": VERSION,
        "fingerprint": fp,
        "dataset": dataset.lower(),
        "split": split,
        "cache_size": options.cache_size,
        "cache_format": options.cache_format,
        "quality": options.cache_quality,
        "data_bytes": data_bytes,
        "source_bytes": source_bytes,
        "images": len(labels),
        "source_images": len(source.paths),
        "classnames": list(source.classnames),
        "skipped": skipped,
        "root": os.path.abspath(source.root),
    }
    arrays = {
        "offsets": offsets,
        "nbytes": sizes,
        "stored_hw": np.asarray(stored, dtype=np.int32).reshape(-1, 2),
        "orig_hw": np.asarray(orig, dtype=np.int32).reshape(-1, 2),
        "labels": np.asarray(labels, dtype=np.int64),
        "source_stat": np.asarray(stats, dtype=np.int64).reshape(-1, 2),
        "source_ok": np.asarray(ok_flags, dtype=bool),
    }
    write_index(index_path(cache_dir, split), arrays, header)
    return {"images": len(labels), "skipped": len(skipped), "data_bytes": data_bytes, "source_bytes": source_bytes}


def build_cache(
    dataset: str,
    root: str,
    cache_dir: Optional[str] = None,
    *,
    options: Optional[CacheOptions] = None,
    splits: Sequence[str] = CACHE_SPLITS,
    progress: bool = True,
    **values,
) -> Dict[str, Dict[str, Any]]:
    """Build the decode-once cache of ``dataset``'s ``splits``; summaries per split.

    The build follows ``options`` (a :class:`CacheOptions`), or the :class:`CacheOptions`
    fields given as keywords (``cache_size=128``, ``cache_format="raw"``, ``num_workers=2``);
    ``cache_dir`` overrides the options' folder. ``dataset`` must be an image-file data set
    (``imagefolder``, ``listfile``, ``imagenet_lt``, ``places_lt``, ``inat2018``). Up-to-date
    splits are kept, interrupted builds resume, stale ones are rebuilt. Files that cannot be
    decoded are logged, listed in ``<split>.skipped.txt`` and left out. ``cache_format auto``
    is resolved once for all splits (:func:`~liftplus_fast.data.cache_format.choose_format`);
    each summary holds the stored
    ``cache_format`` and ``format_reason``.
    """
    if options is not None and values:
        raise TypeError("give either options or CacheOptions fields as keywords, not both")
    options = options if options is not None else CacheOptions(**values)
    folder = cache_dir or options.folder(root)
    out = {}
    with handle_stop_signals():
        try:
            sources = {}
            for split in splits:
                sources[split] = source = build_dataset(dataset, root, split, None, options.split_dir)
                if not isinstance(source, ImageFileDataset):
                    raise UserInputError(
                        f"the decode-once cache reads image files; dataset {dataset!r} is not an "
                        "image-file data set (use imagefolder, listfile, imagenet_lt, places_lt or inat2018)"
                    )
            options, why = choose_format(sources, dataset, folder, options)
            logger.info("cache format %s: %s", options.cache_format, why)
            for split, source in sources.items():
                summary = build_split(source, dataset, split, folder, options, options.workers(), progress)
                out[split] = {**summary, "cache_format": options.cache_format, "format_reason": why}
        except KeyboardInterrupt:
            if requested() is None:
                raise
            raise stop_error(f"while preparing the cache in {folder!r} (built chunks are kept)") from None
    return out


def open_source_cache(
    dataset: str,
    root: str,
    split: str,
    cache_dir: str,
    split_dir: Optional[str] = None,
    transform=None,
    allow_skipped: bool = False,
):
    """The cached split of ``dataset``, checked against the current source (stale caches refused).

    The options the cache was built with are read from its index; the fingerprint of the
    current list under those options must match, and every source file must have the size and
    modification time it had when it was decoded.
    """
    header, arrays = read_index(cache_dir, split)
    options = CacheOptions(
        cache_size=int(header["cache_size"]), cache_format=header["cache_format"], cache_quality=int(header["quality"])
    )
    source = build_dataset(dataset, root, split, None, split_dir)
    if not isinstance(source, ImageFileDataset):
        raise UserInputError(f"data_cache applies to image-file data sets; {dataset!r} is not one")
    fp = source_fingerprint(dataset, split, source.root, source.paths, source.labels, source.classnames, options)
    cached = CachedImageDataset(cache_dir, split, transform, fingerprint=fp, allow_skipped=allow_skipped)
    words = ["liftplus-fast", "cache", "-d", dataset, "--root", root] + (["split_dir", split_dir] if split_dir else [])
    words += ["cache_dir", cache_dir, "cache_size", str(options.cache_size), "cache_format", options.cache_format]
    words += ["cache_quality", str(options.cache_quality)] if options.cache_format == "jpeg" else []
    check_source_stats(cache_dir, split, source.paths, arrays["source_stat"], " ".join(shlex.quote(w) for w in words))
    return cached
