"""The decode-once cache on disk: its layout, fingerprint, validation and the data set reading it.

One split of a cache folder ``C`` is two files:

* ``C/<split>.data``: every image once, decoded and resized so its short side is at most
  ``cache_size``, stored back to back (``raw``: H x W x 3 uint8 pixels; ``jpeg``: one JPEG
  each). A plain file, memory-mapped by each DataLoader worker.
* ``C/<split>.index.npz``: per image its offset and byte count in the data file, its stored
  and original (height, width) and its label; per source file (decoded or skipped) its size
  and modification time when it was decoded (:mod:`liftplus_fast.data.source_stat`); and a
  JSON header: format version, the fingerprint of the source list and options, the data file's
  size, the class names and the files that could not be decoded (also listed in
  ``C/<split>.skipped.txt``).

The index is written last, by rename, after the data file is complete, so an interrupted or
failed build never leaves a split that opens. Opening checks the header, every array, the data
file's size and (when the caller knows the source) the fingerprint and the source files' sizes
and modification times, and refuses with :class:`CacheError` otherwise. The index is data: a
JSON header and plain arrays, read without pickle.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import CacheError, UserInputError
from ..files import atomic_write
from ..options import check_fields, choice, integer, key_value_pairs, number, option, parse_value, text
from .normalize import normalization_affine
from .source_stat import changed_sources, describe_change
from .splits import count_per_class

MAGIC = "liftplus_fast.decode_once_cache"
VERSION = 2
# What a split stores; ``auto`` (the cache command's default) picks one of them per cache.
CACHE_FORMATS = ("jpeg", "raw")
AUTO_FORMAT = "auto"


# torchvision 0.29 flags its image codecs as deprecated in favour of TorchCodec; they are the
# ones that decode on the GPU, and the warning would repeat for every cached image.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)


def data_path(cache_dir: str, split: str) -> str:
    """The data file of ``split``."""
    return os.path.join(cache_dir, f"{split}.data")


def index_path(cache_dir: str, split: str) -> str:
    """The index file of ``split`` (present only once the split is complete)."""
    return os.path.join(cache_dir, f"{split}.index.npz")


def skipped_path(cache_dir: str, split: str) -> str:
    """The list of source files the build of ``split`` could not decode."""
    return os.path.join(cache_dir, f"{split}.skipped.txt")


def build_dir(cache_dir: str, split: str, fingerprint: str) -> str:
    """The folder of an unfinished build of ``split`` (its finished chunks)."""
    return os.path.join(cache_dir, f".{split}.build-{fingerprint[:16]}")


def cached_size(height: int, width: int, cache_size: int) -> Tuple[int, int]:
    """Stored (height, width): short side ``min(short, cache_size)``, long side ``int(cache_size * long / short)``.

    The long side follows ``torchvision.transforms.Resize``'s rounding; images are never upsampled.
    """
    short, long = min(height, width), max(height, width)
    if short <= cache_size:
        return height, width
    new_long = int(cache_size * long / short)
    return (cache_size, new_long) if height <= width else (new_long, cache_size)


@dataclass(frozen=True)
class CacheOptions:
    """The options of ``liftplus-fast cache`` (``key value`` on its command line), checked.

    ``cache_size``, ``cache_format`` and ``cache_quality`` define what is stored and enter the
    cache's fingerprint (``cache_format auto`` as the format it chose, see
    :func:`~liftplus_fast.data.cache_build.choose_format`); the others say where it goes, how
    many processes build it and how much disk ``auto`` lets a raw cache take.
    """

    split_dir: Optional[str] = option(
        None, text(optional=True), "folder of a list-file data set's split files; None: the data root"
    )
    cache_dir: Optional[str] = option(None, text(optional=True), "cache folder; None: ROOT/liftplus_fast_cache")
    cache_size: int = option(256, integer(lo=1), "short side the images are stored at, in pixels (never upsampled)")
    cache_format: str = option(
        AUTO_FORMAT,
        choice((AUTO_FORMAT,) + CACHE_FORMATS),
        "auto (raw where the raw cache fits cache_budget, else jpeg), jpeg (4:4:4 chroma, cache_quality) "
        "or raw pixels (no decoding, larger)",
    )
    cache_quality: int = option(95, integer(lo=1, hi=100), "JPEG quality of a jpeg cache")
    num_workers: Optional[int] = option(
        None, integer(lo=0, optional=True), "decoding processes (0: this one); None: min(4, CPU count)"
    )
    cache_budget: Optional[float] = option(
        None,
        number(float, lo=0, lo_open=True, optional=True),
        "GiB a raw cache may take under cache_format auto; None: half the free disk and half the memory",
    )

    def __post_init__(self):
        check_fields(self)

    @classmethod
    def from_pairs(cls, opts: Sequence[str]) -> "CacheOptions":
        """The options given as ``key value`` words (``["cache_size", "128"]``)."""
        known = [f.name for f in fields(cls)]
        values = {}
        for key, value in key_value_pairs(opts):
            if key not in known:
                raise UserInputError(f"unknown cache option {key!r}; known: {', '.join(known)}")
            values[key] = parse_value(value)
        return cls(**values)

    def folder(self, root: str) -> str:
        """The cache folder for the data root ``root``."""
        return self.cache_dir or os.path.join(root, "liftplus_fast_cache")

    def workers(self) -> int:
        """How many processes decode."""
        return self.num_workers if self.num_workers is not None else min(4, os.cpu_count() or 1)


def source_fingerprint(
    dataset: str,
    split: str,
    root: str,
    paths: Sequence[str],
    labels: Sequence[int],
    classnames: Sequence[str],
    options: CacheOptions,
) -> str:
    """SHA-256 over the source list (paths relative to ``root``, labels, class names) and options.

    Paths enter relative to the root, so moving the data root keeps the cache valid; a changed
    list, label, class name or option gives another fingerprint (a stale cache). Image contents
    are not hashed (that would read the whole data set): rebuild after editing images in place.
    """
    if options.cache_format not in CACHE_FORMATS:
        raise ValueError(f"a fingerprint is of a stored format {CACHE_FORMATS}; got {options.cache_format!r}")
    h = hashlib.sha256()
    head = {
        "magic": MAGIC,
        "version": VERSION,
        "dataset": dataset.lower(),
        "split": split,
        "cache_size": options.cache_size,
        "cache_format": options.cache_format,
        "quality": options.cache_quality if options.cache_format == "jpeg" else None,
        "classnames": list(classnames),
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for path, label in zip(paths, labels):
        h.update(f"{os.path.relpath(path, root)}\t{int(label)}\n".encode())
    return h.hexdigest()


def write_index(path: str, arrays: Dict[str, np.ndarray], header: Dict[str, Any]) -> None:
    """Write an index atomically."""
    header_bytes = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, header=header_bytes, **arrays))


INDEX_ARRAYS = ("offsets", "nbytes", "stored_hw", "orig_hw", "labels")  # one row per stored image
SOURCE_ARRAYS = ("source_stat", "source_ok")  # one row per source file, skipped ones included
# Header fields and their types, checked on open: an index is data from disk, trusted for nothing.
HEADER_FIELDS = {
    "fingerprint": str,
    "dataset": str,
    "cache_size": int,
    "cache_format": str,
    "quality": int,
    "data_bytes": int,
    "source_bytes": int,
    "images": int,
    "source_images": int,
    "classnames": list,
    "skipped": list,
}


def read_index(
    cache_dir: str, split: str, fingerprint: Optional[str] = None
) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """``(header, arrays)`` of a complete, intact split, or :class:`CacheError` saying what is wrong.

    With ``fingerprint`` (of the source the caller is about to train on), a cache built from
    another list or with other options is refused as stale; :func:`check_source_stats` compares
    the source files themselves.
    """
    ipath, dpath = index_path(cache_dir, split), data_path(cache_dir, split)
    rebuild = f"build it with: liftplus-fast cache -d <dataset> --root <root> cache_dir {cache_dir}"
    if not os.path.isfile(ipath):
        if os.path.exists(dpath) or any(n.startswith(f".{split}.build-") for n in _listdir(cache_dir)):
            raise CacheError(
                f"the {split!r} cache in {cache_dir!r} is incomplete (an interrupted or failed "
                f"build: {ipath!r} is missing); run the cache command again to resume it"
            )
        raise CacheError(f"no {split!r} cache in {cache_dir!r} ({ipath!r} not found); {rebuild}")
    try:
        with np.load(ipath, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            version = header.get("version") if isinstance(header, dict) else None
            arrays = {k: z[k] for k in INDEX_ARRAYS + SOURCE_ARRAYS} if version == VERSION else {}
    except Exception as exc:  # any unreadable index is the same problem for the user
        raise CacheError(
            f"{ipath!r} is not a readable cache index ({type(exc).__name__}: {exc}); delete the folder and {rebuild}"
        ) from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise CacheError(f"{ipath!r} is not a liftplus_fast cache index")
    if version != VERSION:
        raise CacheError(
            f"{ipath!r} has cache format version {version}, this package "
            f"reads version {VERSION}; rebuild it with the cache command"
        )
    problem = _header_problem(header) or _arrays_problem(header, arrays)
    if problem:
        raise CacheError(f"{ipath!r} is damaged ({problem}); delete the folder and {rebuild}")
    if not os.path.isfile(dpath):
        raise CacheError(f"the {split!r} cache data file {dpath!r} is missing; rebuild it with the cache command")
    size = os.path.getsize(dpath)
    if size != header["data_bytes"]:
        raise CacheError(
            f"the {split!r} cache data file {dpath!r} is truncated or was replaced "
            f"({size} bytes, the index expects {header['data_bytes']}); rebuild it with the cache command"
        )
    if len(arrays["labels"]) and int((arrays["offsets"] + arrays["nbytes"]).max()) > size:
        raise CacheError(f"{ipath!r} is inconsistent with its data file; rebuild it with the cache command")
    if fingerprint is not None and header["fingerprint"] != fingerprint:
        raise CacheError(
            f"the {split!r} cache in {cache_dir!r} is stale: it was built from another image list "
            f"or with other options (dataset {header.get('dataset')!r}, cache_size "
            f"{header.get('cache_size')}, cache_format {header.get('cache_format')!r}); "
            "rebuild it with the cache command"
        )
    return header, arrays


def _header_problem(header: Dict[str, Any]) -> str:
    for name, kind in HEADER_FIELDS.items():
        value = header.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"header field {name!r} should be of type {kind.__name__}; got {value!r:.80}"
    if header["cache_format"] not in CACHE_FORMATS:
        return f"unknown cache_format {header['cache_format']!r}"
    if not all(isinstance(n, str) for n in header["classnames"]):
        return "class names are not all strings"
    if not all(isinstance(x, dict) and isinstance(x.get("path"), str) for x in header["skipped"]):
        return "the skipped-file list is malformed"
    return ""


def _arrays_problem(header: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> str:
    n, n_source = header["images"], header["source_images"]
    shapes = {"stored_hw": (n, 2), "orig_hw": (n, 2), "source_stat": (n_source, 2)}
    for name, a in arrays.items():
        want = shapes.get(name, (n_source,) if name in SOURCE_ARRAYS else (n,))
        kind = "b" if name == "source_ok" else "iu"
        if a.shape != want or a.dtype.kind not in kind:
            return f"array {name!r} is {a.dtype}{list(a.shape)}, expected {want} of {'bool' if kind == 'b' else 'int'}"
    if int(arrays["source_ok"].sum()) != n:
        return "the source flags do not count the stored images"
    if n and (arrays["offsets"].min() < 0 or arrays["nbytes"].min() < 0 or arrays["stored_hw"].min() < 1):
        return "negative offsets, sizes or image sides"
    if n and not 0 <= arrays["labels"].min() <= arrays["labels"].max() < len(header["classnames"]):
        return f"labels outside 0..{len(header['classnames']) - 1}"
    return ""


def check_source_stats(cache_dir: str, split: str, paths: Sequence[str], recorded: np.ndarray, refresh: str) -> None:
    """:class:`CacheError` naming the first of ``paths`` whose size or modification time differs
    from ``recorded`` (the index's ``source_stat``): the cache holds older images than these.
    ``refresh`` is the command that refreshes the cache."""
    changed = changed_sources(paths, recorded)
    if len(changed):
        first = describe_change(paths[changed[0]], recorded[changed[0]])
        raise CacheError(
            f"the {split!r} cache in {cache_dir!r} is stale: {len(changed)} of {len(paths)} source images "
            f"changed since it was built ({first}{' and others' if len(changed) > 1 else ''}); refresh it with: "
            f"{refresh} (only the changed images are decoded again)"
        )


def _listdir(folder: str) -> List[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def decode_stored(buffer: np.ndarray, height: int, width: int, cache_format: str) -> torch.Tensor:
    """A stored image as a ``[3, H, W]`` uint8 tensor (``buffer``: its bytes, e.g. a memmap slice)."""
    if cache_format == "raw":
        return torch.from_numpy(np.array(buffer)).view(height, width, 3).permute(2, 0, 1)
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.from_numpy(np.array(buffer)), mode=ImageReadMode.RGB)


def new_batch(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch; in shared memory inside a DataLoader worker.

    A worker's batch travels to the main process through shared memory: allocated there from
    the start (as ``default_collate`` does), it is sent without another copy.
    """
    shape = tuple(int(v) for v in shape)
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape)) if shape else 1
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class BatchRing:
    """``depth`` shared-memory batch tensors one DataLoader worker fills in turn.

    The first write to a fresh page of shared memory costs a page fault (1.5-5 µs per 4 KiB
    on the VMs this was measured on): for a float batch of 224-px crops that is as much as the
    crops themselves, and for five-crop TTE most of the work. Reusing a few batches pays it
    once. Reuse is safe while the main process holds fewer than ``depth`` of this worker's
    batches: a DataLoader keeps at most ``prefetch_factor`` batches per worker in flight, and a
    training loop holds the one it trains on while asking for the next, so ``depth =
    prefetch_factor + 2`` (:func:`~liftplus_fast.data.loaders.ring_depth`). A caller that keeps
    batches longer must clone them.
    """

    def __init__(self, depth: int):
        if not isinstance(depth, int) or depth < 2:
            raise ValueError(f"BatchRing depth must be an integer >= 2; got {depth!r}")
        self.depth = depth
        # per (item shape, dtype): the slots and the last one handed out
        self._rings: Dict[Tuple, Tuple[List[torch.Tensor], int]] = {}

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """The next batch of ``shape`` (a view of a slot at least that long; contents undefined)."""
        shape = tuple(int(v) for v in shape)
        key = (shape[1:], dtype)
        slots, turn = self._rings.get(key, (None, -1))
        if slots is None or slots[0].shape[0] < shape[0]:
            # New memory: nothing handed out before can be overwritten by it.
            slots, turn = [new_batch(shape, dtype) for _ in range(self.depth)], -1
        turn = (turn + 1) % self.depth
        self._rings[key] = (slots, turn)
        return slots[turn][: shape[0]]


class CachedImageDataset(Dataset):
    """One split of a decode-once cache, as a data set of uint8 images.

    ``dataset[i]`` or ``dataset[(epoch, i)]`` (the form :class:`~liftplus_fast.data.loaders.EpochTaggedSampler` yields)
    returns ``(image, label)``: with ``transform=None`` the stored ``[3, h, w]`` uint8 tensor,
    otherwise ``transform(image, orig_hw, epoch)`` where ``orig_hw`` is the source image's
    (height, width), so crop boxes are drawn as on the source and mapped onto the stored image.

    ``dataset[list_of_items]`` returns a whole batch, ``(images, labels)``: the transformed
    images written straight into one ``[B, ...]`` tensor (in shared memory inside a DataLoader
    worker, so sending it costs no copy; uint8, or float32 normalised for a :meth:`normalized`
    view) and the labels as a list. Load it with
    ``DataLoader(dataset, batch_size=None, sampler=<a sampler of index lists>)``
    (:class:`~liftplus_fast.data.loaders.EpochTaggedSampler` with ``batch_size``, or
    ``BatchSampler``) and normalise with :class:`~liftplus_fast.data.loaders.NormalizedLoader`;
    the boxes are drawn in the same order as item by item.

    Args:
        cache_dir: the cache folder.
        split: ``"train"`` or ``"test"``.
        transform: a transform of :mod:`liftplus_fast.data.cached_transforms` (or ``None``).
        fingerprint: the fingerprint of the source the caller expects (``None``: not checked).
        allow_skipped: accept a training split whose build skipped undecodable files.

    Attributes: ``labels``, ``classnames``, ``num_classes``, ``cls_num_list``, ``orig_hw``,
    ``stored_hw``, ``cache_format``, ``skipped`` (list of ``{"path", "reason"}``).
    """

    def __init__(
        self,
        cache_dir: str,
        split: str,
        transform: Optional[Callable] = None,
        fingerprint: Optional[str] = None,
        allow_skipped: bool = False,
    ):
        header, arrays = read_index(cache_dir, split, fingerprint)
        self.skipped: List[Dict[str, str]] = list(header.get("skipped", []))
        if self.skipped and split == "train" and not allow_skipped:
            raise CacheError(
                f"the training cache in {cache_dir!r} skipped {len(self.skipped)} image(s) that "
                f"could not be decoded (listed in {skipped_path(cache_dir, split)!r}, first: "
                f"{self.skipped[0]['path']!r}); fix or remove them and rebuild, or pass "
                "allow_skipped True to train without them"
            )
        self.cache_dir = cache_dir
        self.split = split
        self.transform = transform
        self.header = header
        self.cache_format: str = header["cache_format"]
        self.cache_size: int = int(header["cache_size"])
        self.offsets = arrays["offsets"].astype(np.int64)
        self.nbytes = arrays["nbytes"].astype(np.int64)
        self.stored_hw = arrays["stored_hw"].astype(np.int64)
        self.orig_hw = arrays["orig_hw"].astype(np.int64)
        self.labels: List[int] = [int(y) for y in arrays["labels"]]
        self.classnames: List[str] = list(header["classnames"])
        self.num_classes = len(self.classnames)
        self.cls_num_list: List[int] = count_per_class(self.labels, self.num_classes)
        self._data: Optional[np.memmap] = None
        self._encoded = False
        self._affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._ring_depth = 0
        self._ring: Optional[BatchRing] = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):
        # Each DataLoader worker maps the file itself rather than pickling the mapping.
        state = dict(self.__dict__)
        state["_data"] = None
        state["_ring"] = None
        return state

    def read(self, index: int) -> torch.Tensor:
        """The stored image ``index`` as a ``[3, h, w]`` uint8 tensor."""
        if self._data is None:
            self._data = np.memmap(data_path(self.cache_dir, self.split), dtype=np.uint8, mode="r")
        start = int(self.offsets[index])
        h, w = (int(v) for v in self.stored_hw[index])
        return decode_stored(self._data[start : start + int(self.nbytes[index])], h, w, self.cache_format)

    def encoded(self) -> "CachedImageDataset":
        """A view whose items are the stored bytes, undecoded: ``((bytes, stored_hw, orig_hw, epoch), label)``.

        For decoding and augmenting on the GPU (:mod:`liftplus_fast.data.gpu_augment`): the
        workers only slice the memory map.
        """
        view = copy.copy(self)
        view._encoded = True
        return view

    def normalized(self, mean: Sequence[float], std: Sequence[float]) -> "CachedImageDataset":
        """A view whose batches (``dataset[list]``) are normalised float32, ``(x / 255 - mean) / std``.

        For training on the CPU: each worker normalises its images while they are in its cache,
        in parallel with the others and with the training step, instead of the main process
        normalising whole batches between steps.
        """
        view = copy.copy(self)
        view._affine = normalization_affine(mean, std)
        return view

    def reusing_batches(self, depth: int) -> "CachedImageDataset":
        """A view whose batches (``dataset[list]``) in a DataLoader worker reuse ``depth`` buffers in turn.

        See :class:`BatchRing` for why and for when it is safe (``depth``:
        :func:`~liftplus_fast.data.loaders.ring_depth` of the loader's ``prefetch_factor``).
        Outside a worker every batch is a fresh tensor.
        """
        view = copy.copy(self)
        view._ring_depth = int(depth)
        view._ring = None
        return view

    def batch(self, items: Sequence) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of ``items`` (indices or ``(epoch, index)`` pairs), transformed into one tensor."""
        if self.transform is None or not hasattr(self.transform, "write"):
            raise UserInputError(
                "batched reads (dataset[list]) need a transform of liftplus_fast.data.cached_transforms; "
                f"got transform={self.transform!r}"
            )
        pairs = [item if isinstance(item, tuple) else (None, item) for item in items]
        dtype = torch.uint8 if self._affine is None else self._affine[0].dtype
        shape = (len(pairs),) + tuple(self.transform.output_shape())
        if self._ring_depth and torch.utils.data.get_worker_info() is not None:
            if self._ring is None:
                self._ring = BatchRing(self._ring_depth)
            out = self._ring.take(shape, dtype)
        else:
            out = new_batch(shape, dtype)
        for dst, (epoch, index) in zip(out, pairs):
            index = int(index)
            orig = (int(self.orig_hw[index][0]), int(self.orig_hw[index][1]))
            self.transform.write(dst, self.read(index), orig, epoch, self._affine)
        # Labels as a list: a tensor would travel from a worker through its own shared-memory
        # file and descriptor, which costs more than the 32-128 numbers are worth.
        return out, [self.labels[int(i)] for _, i in pairs]

    def __getitem__(self, item):
        if isinstance(item, list):
            return self.batch(item)
        epoch, index = item if isinstance(item, tuple) else (None, item)
        if self._encoded:
            if self._data is None:
                self._data = np.memmap(data_path(self.cache_dir, self.split), dtype=np.uint8, mode="r")
            start = int(self.offsets[index])
            blob = torch.from_numpy(np.array(self._data[start : start + int(self.nbytes[index])]))
            return (
                blob,
                tuple(int(v) for v in self.stored_hw[index]),
                tuple(int(v) for v in self.orig_hw[index]),
                epoch,
            ), self.labels[index]
        image = self.read(index)
        if self.transform is not None:
            image = self.transform(image, tuple(int(v) for v in self.orig_hw[index]), epoch)
        return image, self.labels[index]
