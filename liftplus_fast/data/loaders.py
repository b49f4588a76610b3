"""The input pipeline's front door: the data sets of a run, and the loader that feeds each one.

:func:`build_run_datasets` opens the training and test sets (source images, or the decode-once
cache when ``data_cache`` is set) and the set the classifier is initialised from;
:func:`build_loader` chooses how a set is loaded:

* source images: a ``DataLoader`` of per-image transformed float tensors (the published path);
* a cache, CPU training: the workers build whole batches (``dataset[list of indices]``) and
  normalise them into shared-memory batches they reuse (:func:`cached_batch_loader`);
* a cache, GPU training: the same workers send uint8 batches (4x fewer bytes), normalised on
  the GPU (:class:`NormalizedLoader`);
* a cache with ``augment_on_device``: the workers only slice the stored bytes; decoding,
  augmentation and normalisation run in batches on the device (:class:`GPUAugmentLoader`).

A training loader on the CPU with workers also chooses the step's intra-op threads by
measurement (:class:`~liftplus_fast.data.step_threads.StepThreadsLoader`).

Every loader yields ``(images, labels)`` and exposes ``sampler`` and ``generator``: the training
loop re-seeds the generator and tags the sampler with the epoch at the start of each epoch
(:class:`EpochTaggedSampler`, which the cached MDA crop reads its schedule from).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, Subset

from ..errors import UserInputError
from .cache_build import open_source_cache
from .cache_store import CachedImageDataset
from .cached_transforms import build_cached_plain_transform, build_cached_test_transform, build_cached_train_transform
from .gpu_augment import augment_batch, collate_encoded
from .normalize import normalize_batch
from .registry import build_dataset
from .step_threads import StepThreadsLoader
from .transforms import build_plain_transform, build_test_transform, build_train_transform
from .wrapped_loader import WrappedLoader

__all__ = [
    "EpochTaggedSampler",
    "GPUAugmentLoader",
    "NormalizedLoader",
    "PREFETCH_FACTOR",
    "RunDatasets",
    "build_loader",
    "build_run_datasets",
    "cached_batch_loader",
    "ring_depth",
    "view_of",
]

logger = logging.getLogger("liftplus_fast")

# Batches each DataLoader worker prepares ahead (DataLoader's default, stated so the workers'
# batch rings can be sized from it).
PREFETCH_FACTOR = 2


def ring_depth(prefetch_factor: int) -> int:
    """How many batches a worker's :class:`~liftplus_fast.data.cache_store.BatchRing` needs under
    ``DataLoader(prefetch_factor=...)``: those in flight, the one trained on and the next."""
    return int(prefetch_factor) + 2


@dataclass
class RunDatasets:
    """The data sets of one run: ``train``, ``test`` and a maker of the classifier-initialisation set."""

    train: Dataset
    test: Dataset
    make_init: Callable[[], Dataset]


def build_run_datasets(cfg) -> RunDatasets:
    """The training and test sets of ``cfg`` (a :class:`~liftplus_fast.config.LiftConfig`), from
    the source images or, with ``cfg.data_cache``, from the decode-once cache (stale caches refused)."""
    if cfg.data_cache is None:

        def source(split, transform):
            return build_dataset(cfg.dataset, cfg.root, split, transform, cfg.split_dir)

        return RunDatasets(
            source("train", build_train_transform(cfg)),
            source("test", build_test_transform(cfg)),
            lambda: source("train", build_plain_transform(cfg)),
        )

    def cached(split, transform):
        return open_source_cache(
            cfg.dataset, cfg.root, split, cfg.data_cache, cfg.split_dir, transform, allow_skipped=cfg.allow_skipped
        )

    train_set = cached("train", build_cached_train_transform(cfg))
    if train_set.skipped:
        logger.warning(
            "data_cache: training without %d image(s) the cache build could not decode (allow_skipped True)",
            len(train_set.skipped),
        )
    return RunDatasets(
        train_set,
        cached("test", build_cached_test_transform(cfg)),
        lambda: cached("train", build_cached_plain_transform(cfg)),
    )


def _base(dataset):
    return dataset.dataset if isinstance(dataset, Subset) else dataset


def build_loader(
    dataset,
    cfg,
    *,
    batch_size: int,
    shuffle: bool,
    sampler: Optional[Sampler] = None,
    seed: int = 0,
    device=None,
    persistent_workers: bool = False,
):
    """The loader of ``dataset`` (a data set of :func:`build_run_datasets`, or a ``Subset`` of one).

    ``shuffle`` marks the training set: shuffled (unless ``sampler`` is given) and, from a
    cache, tagged with the epoch. ``cfg.num_workers`` (at most the CPU count) workers; ``seed``
    seeds the loader's generator (shuffling and worker seeds); ``device`` is where the batches
    go (``None``: the CPU). See the module docstring for the four shapes of loader.
    """
    workers = max(0, min(cfg.num_workers, os.cpu_count() or 1))
    loader = _build_loader(dataset, cfg, batch_size, shuffle, sampler, seed, device, persistent_workers, workers)
    if shuffle and workers > 0 and (device is None or torch.device(device).type == "cpu"):
        # The step's threads and the workers share the cores: the split is measured.
        return StepThreadsLoader(loader, workers)
    return loader


def _build_loader(dataset, cfg, batch_size, shuffle, sampler, seed, device, persistent_workers, workers):
    generator = torch.Generator().manual_seed(seed)
    cached = isinstance(_base(dataset), CachedImageDataset)
    on_device = cached and cfg.augment_on_device
    if cached and sampler is None:
        # The sampler DataLoader would build, so the shuffling and the workers' seeds match the
        # uncached path.
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    if cached and not on_device:
        # The workers build whole uint8 batches from the same groups of indices
        # DataLoader(batch_size=...) would form, drawing the boxes in the same order.
        batches = EpochTaggedSampler(sampler, batch_size) if shuffle else BatchSampler(sampler, batch_size, False)
        return cached_batch_loader(
            dataset, batches, workers, cfg.mean, cfg.std, device, generator, persistent_workers=persistent_workers
        )
    if cached and shuffle:
        sampler = EpochTaggedSampler(sampler)
    loader = DataLoader(
        view_of(dataset, lambda d: d.encoded()) if on_device else dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        persistent_workers=persistent_workers and workers > 0,
        collate_fn=collate_encoded if on_device else None,
    )
    if not on_device:
        return loader
    base = _base(dataset)
    return GPUAugmentLoader(
        loader, base.transform, base.cache_format, cfg.mean, cfg.std, device if device is not None else "cpu"
    )


class EpochTaggedSampler(Sampler):
    """Yields ``(epoch, index)`` for each index of ``sampler``, so transforms receive the epoch.

    With ``batch_size``, yields lists of ``batch_size`` such pairs instead (the last one
    shorter), grouped as ``DataLoader(batch_size=...)`` groups them, for data sets that build
    whole batches (``CachedImageDataset[list]`` under ``DataLoader(batch_size=None)``).

    :meth:`set_epoch` sets the tag (and forwards to the wrapped sampler when it has one, e.g.
    ``DistributedSampler``). The order of the wrapped sampler is unchanged.
    """

    def __init__(self, sampler: Sampler, batch_size: Optional[int] = None):
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise UserInputError(f"batch_size must be a positive integer or None; got {batch_size!r}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Tag the following indices with ``epoch``."""
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        epoch = self.epoch
        pairs = ((epoch, int(i)) for i in self.sampler)
        if self.batch_size is None:
            return pairs
        return _batched(pairs, self.batch_size)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n if self.batch_size is None else -(-n // self.batch_size)


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class NormalizedLoader(WrappedLoader):
    """Wraps a DataLoader of batches: moves each to ``device`` and normalises the uint8 ones there.

    Iterates like the wrapped loader, ``(images, labels)``, with float32 images and int64 label
    tensors; batches the workers already normalised (float, from
    :meth:`CachedImageDataset.normalized`) are only moved. Other attributes (``sampler``,
    ``generator``, ``dataset``, ``len``) are the wrapped loader's.
    """

    def __init__(self, loader, mean: Sequence[float], std: Sequence[float], device=None):
        super().__init__(loader)
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = torch.device(device) if device is not None else None

    def _wrap(self, batches):
        for images, labels in batches:
            if self.device is not None:
                images = images.to(self.device, non_blocking=True)
            if images.dtype == torch.uint8:
                images = normalize_batch(images, self.mean, self.std)
            yield images, torch.as_tensor(labels, dtype=torch.int64)


class GPUAugmentLoader(WrappedLoader):
    """Iterates a DataLoader over :meth:`CachedImageDataset.encoded` items as normalised batches on ``device``.

    ``transform`` and ``cache_format`` are the cached data set's; other attributes (``sampler``,
    ``generator``, ``len``) are the wrapped loader's.
    """

    def __init__(self, loader, transform: Callable, cache_format: str, mean, std, device):
        super().__init__(loader)
        self.transform = transform
        self.cache_format = cache_format
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = torch.device(device)

    def _wrap(self, batches):
        for items, labels in batches:
            yield augment_batch(items, self.transform, self.cache_format, self.device, self.mean, self.std), labels


def view_of(dataset, make):
    """``make(dataset)`` (a view such as ``normalized()``) of a cached data set, through a ``Subset`` (a shard)."""
    if isinstance(dataset, Subset):
        return Subset(make(dataset.dataset), dataset.indices)
    return make(dataset)


def cached_batch_loader(
    dataset,
    batches: Sampler,
    num_workers: int,
    mean: Sequence[float],
    std: Sequence[float],
    device=None,
    generator: Optional[torch.Generator] = None,
    persistent_workers: bool = False,
) -> NormalizedLoader:
    """Whole batches of a :class:`~liftplus_fast.data.cache_store.CachedImageDataset`, as training reads them.

    ``batches`` yields lists of indices (or of ``(epoch, index)`` pairs); each worker builds a
    whole batch per list (``dataset[list]``). For a CPU ``device`` (or ``None``) the workers
    normalise, in parallel with the training step, into shared-memory batches they reuse in turn
    (:class:`~liftplus_fast.data.cache_store.BatchRing`: a yielded batch stays valid until two
    more have been asked for; clone it to keep it longer). Otherwise they send uint8 batches
    (4x fewer bytes), normalised on ``device``.
    """
    if device is None or torch.device(device).type == "cpu":
        dataset = view_of(dataset, lambda d: d.normalized(mean, std))
    if num_workers > 0:
        dataset = view_of(dataset, lambda d: d.reusing_batches(ring_depth(PREFETCH_FACTOR)))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=batches,
        num_workers=num_workers,
        prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
    )
    return NormalizedLoader(loader, mean, std, device)
