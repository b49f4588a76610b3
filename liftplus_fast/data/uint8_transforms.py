"""MDA, test and five-crop TTE transforms on uint8 tensors of cached images, and batched normalisation.

The reference transforms (:mod:`liftplus_fast.data.transforms`) work on the decoded source
image with PIL and return normalised float tensors. These work on the image stored in the
decode-once cache (short side at most ``cache_size``) and return uint8 tensors, normalised
later per batch (:func:`normalize_batch`, in the main process or on the GPU), which also
moves 4x fewer bytes from the DataLoader workers.

* Crop boxes are drawn exactly as the reference draws them: the same function
  (:func:`~liftplus_fast.data.transforms.sample_square_box`), with the *source* image's size,
  so a seeded run draws the same boxes with and without the cache; the box is then mapped onto
  the stored image (the identity when the cache kept the image at full size).
* The test resize keeps the reference's output size (computed from the source size), so the
  centre crop and the five TTE crops have exactly the reference geometry.
* The MDA schedule takes the epoch as an argument (tagged onto every index by
  :class:`EpochTaggedSampler`), so persistent workers and GPU-side augmentation need no
  per-epoch call into a worker.

Resizes are bicubic with antialiasing (torchvision's uint8 kernels, which match PIL's to
~0.1/255 mean absolute error) and run on whatever device the image tensor is on.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torchvision.transforms.v2.functional as F
from torch.utils.data import Sampler
from torchvision.transforms import InterpolationMode

from ..errors import UserInputError
from .transforms import MDA_FUNCS, mda_min_scale, sample_square_box

HW = Tuple[int, int]


def resized_output_size(orig_hw: HW, short: int) -> HW:
    """``torchvision.transforms.Resize(short)``'s output (height, width) for an image of ``orig_hw``."""
    h, w = orig_hw
    lo, hi = min(h, w), max(h, w)
    new_long = int(short * hi / lo)
    return (short, new_long) if h <= w else (new_long, short)


def map_box(box: Tuple[int, int, int, int], orig_hw: HW, stored_hw: HW) -> Tuple[int, int, int, int]:
    """A ``(top, left, height, width)`` box on the source image, on the stored image instead.

    Edges are scaled and rounded to the nearest stored pixel (at least one pixel wide); the
    identity when the image was stored at full size.
    """
    if tuple(orig_hw) == tuple(stored_hw):
        return box
    top, left, h, w = box
    sy, sx = stored_hw[0] / orig_hw[0], stored_hw[1] / orig_hw[1]
    t, b = int(round(top * sy)), int(round((top + h) * sy))
    lft, r = int(round(left * sx)), int(round((left + w) * sx))
    t, lft = min(t, stored_hw[0] - 1), min(lft, stored_hw[1] - 1)
    return t, lft, max(1, b - t), max(1, r - lft)


def _resize(image: torch.Tensor, hw: HW) -> torch.Tensor:
    return F.resize(image, list(hw), interpolation=InterpolationMode.BICUBIC, antialias=True)


class CachedMDACrop:
    """MDA's square random-resized crop on a stored uint8 image; call with the epoch.

    ``crop(image, orig_hw, epoch)`` draws ``(top, left, side, side)`` for the source size
    ``orig_hw`` at ``mda_min_scale(epoch, num_epochs, sched_func)``, maps it onto ``image``
    and returns the ``[3, size, size]`` uint8 crop.
    """

    def __init__(
        self, size: int, num_epochs: int, sched_func: str = "convex", scale: Tuple[float, float] = (0.08, 1.0)
    ):
        if sched_func not in MDA_FUNCS:
            raise UserInputError(f"unknown MDA schedule {sched_func!r}; expected one of {MDA_FUNCS}")
        if num_epochs < 1:
            raise UserInputError(f"num_epochs must be >= 1; got {num_epochs!r}")
        self.size = int(size)
        self.num_epochs = int(num_epochs)
        self.sched_func = sched_func
        self.scale = tuple(scale)

    def sample(self, orig_hw: HW, epoch: int) -> Tuple[int, int, int, int]:
        """The crop box on the source image (the reference's draws)."""
        if epoch is None:
            raise UserInputError(
                "CachedMDACrop needs the epoch: index the data set with (epoch, index), e.g. through EpochTaggedSampler"
            )
        lo = mda_min_scale(int(epoch), self.num_epochs, self.sched_func, self.scale[0], self.scale[1])
        return sample_square_box(int(orig_hw[0]), int(orig_hw[1]), lo, self.scale[1])

    def output_shape(self) -> Tuple[int, ...]:
        """The shape of one output, ``(3, size, size)``."""
        return (3, self.size, self.size)

    def __call__(self, image: torch.Tensor, orig_hw: HW, epoch: int) -> torch.Tensor:
        top, left, h, w = map_box(self.sample(orig_hw, epoch), orig_hw, tuple(image.shape[-2:]))
        return F.resized_crop(
            image, top, left, h, w, [self.size, self.size], interpolation=InterpolationMode.BICUBIC, antialias=True
        )

    def write(self, out: torch.Tensor, image: torch.Tensor, orig_hw: HW, epoch: int, affine=None) -> None:
        """The crop of :meth:`__call__` written into ``out`` (a slot of a batch).

        ``affine``: ``(scale, shift)`` of :func:`normalization_affine` to write it normalised
        into a float ``out``; ``None`` copies the uint8 pixels.
        """
        crop = self(image, orig_hw, epoch)
        out.copy_(crop) if affine is None else normalize_into(out, crop, affine)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, num_epochs={self.num_epochs}, "
            f"sched_func={self.sched_func!r}, scale={self.scale})"
        )


class CachedResizeCrop:
    """Resize the short side to ``resize_to`` (the reference's output size), then crop ``size``.

    ``five_crop=False``: the centre crop, ``[3, size, size]``; ``True``: the five crops of
    ``torchvision.transforms.FiveCrop`` in its order, ``[5, 3, size, size]``.
    """

    def __init__(self, size: int, resize_to: int, five_crop: bool = False):
        self.size = int(size)
        self.resize_to = int(resize_to)
        self.five_crop = bool(five_crop)

    def output_shape(self) -> Tuple[int, ...]:
        """The shape of one output: ``(3, size, size)``, or ``(5, 3, size, size)`` with five crops."""
        return ((5,) if self.five_crop else ()) + (3, self.size, self.size)

    def _crops(self, image: torch.Tensor) -> List[torch.Tensor]:
        # Views of the resized image: FiveCrop's order, or the one centre crop.
        if self.five_crop:
            return list(F.five_crop(image, [self.size, self.size]))
        return [F.center_crop(image, [self.size, self.size])]

    def __call__(self, image: torch.Tensor, orig_hw: HW, epoch: Optional[int] = None) -> torch.Tensor:
        image = _resize(image, resized_output_size(orig_hw, self.resize_to))
        crops = self._crops(image)
        return torch.stack(crops) if self.five_crop else crops[0]

    def write(
        self, out: torch.Tensor, image: torch.Tensor, orig_hw: HW, epoch: Optional[int] = None, affine=None
    ) -> None:
        """The crops of :meth:`__call__` written into ``out`` (a slot of a batch), without stacking first.

        ``affine`` as for :meth:`CachedMDACrop.write`. Five crops are cut from the resized image
        normalised once, which is a third of the arithmetic of normalising each crop.
        """
        image = _resize(image, resized_output_size(orig_hw, self.resize_to))
        if affine is not None:
            image = normalize_into(self._scratch(image.shape, out.dtype), image, affine)
        for dst, crop in zip(out if self.five_crop else out.unsqueeze(0), self._crops(image)):
            dst.copy_(crop)

    def _scratch(self, shape, dtype) -> torch.Tensor:
        # The normalised resized image, in one buffer this process reuses: a fresh 1 MiB each
        # image costs a page fault per 4 KiB, as much as normalising it.
        numel = int(torch.Size(shape).numel())
        buf = getattr(self, "_buffer", None)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = self._buffer = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_buffer", None)
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize_to={self.resize_to}, five_crop={self.five_crop})"


def build_cached_train_transform(cfg):
    """The cached counterpart of :func:`~liftplus_fast.data.transforms.build_train_transform` (MDA only)."""
    if not cfg.mda:
        raise UserInputError(
            "data_cache trains with MDA (mda True); the RandomResizedCrop + flip "
            "augmentation of mda False runs on the reference path (data_cache None)"
        )
    return CachedMDACrop(cfg.resolution, cfg.num_epochs, cfg.mda_func)


def build_cached_test_transform(cfg) -> CachedResizeCrop:
    """The cached counterpart of :func:`~liftplus_fast.data.transforms.build_test_transform`."""
    res = cfg.resolution
    if cfg.tte:
        return CachedResizeCrop(res, res + (cfg.expand if cfg.expand is not None else 24), five_crop=True)
    return CachedResizeCrop(res, res + (cfg.expand if cfg.expand is not None else res // 7))


def build_cached_plain_transform(cfg) -> CachedResizeCrop:
    """The cached counterpart of :func:`~liftplus_fast.data.transforms.build_plain_transform`."""
    return CachedResizeCrop(cfg.resolution, cfg.resolution)


def normalization_affine(
    mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32, device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)``, each ``[3, 1, 1]``, with ``(x / 255 - mean) / std == x * scale + shift``."""
    if len(mean) != 3 or len(std) != 3:
        raise UserInputError(f"mean and std need 3 values (RGB); got mean={mean!r}, std={std!r}")
    m = torch.as_tensor(mean, dtype=dtype, device=device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=dtype, device=device).view(3, 1, 1)
    return 1.0 / (255.0 * s), -m / s


# Elements per normalisation chunk: the float chunk (2 MiB) stays in cache between the
# conversion and the multiply-add, instead of a batch-sized second pass through memory.
_CHUNK = 1 << 19


def normalize_into(out: torch.Tensor, images: torch.Tensor, affine: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """uint8 ``images`` ``[..., 3, H, W]`` written into the float tensor ``out`` as ``images * scale + shift``.

    Returns ``out``. The chunks keep the float data in cache between the passes.
    """
    scale, shift = affine
    if out.shape != images.shape:
        raise ValueError(f"normalize_into: out has shape {tuple(out.shape)}, images {tuple(images.shape)}")
    if out.device.type != "cpu" or out.dim() <= 3:
        chunks = [(out, images)]
    else:
        flat_out, flat_in = out.view(-1, *out.shape[-3:]), images.reshape(-1, *images.shape[-3:])
        step = max(1, _CHUNK // max(1, flat_out[0].numel()))
        chunks = [(flat_out[i : i + step], flat_in[i : i + step]) for i in range(0, flat_out.shape[0], step)]
    for dst, src in chunks:
        # Convert, scale, shift: three cache-resident passes, each vectorised. A mixed
        # uint8/float addcmul does not vectorise, and a float addcmul with two broadcast
        # [3, 1, 1] operands runs 5x slower than a broadcast multiply or add.
        dst.copy_(src)
        dst.mul_(scale).add_(shift)
    return out


def normalize_batch(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` images to ``(x / 255 - mean) / std`` in ``dtype`` (one float copy per batch)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_batch expects uint8 images; got {images.dtype}")
    affine = normalization_affine(mean, std, dtype, images.device)
    return normalize_into(torch.empty(images.shape, dtype=dtype, device=images.device), images, affine)


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


class NormalizedLoader:
    """Wraps a DataLoader of batches: moves each to ``device`` and normalises the uint8 ones there.

    Iterates like the wrapped loader, ``(images, labels)``, with float32 images and int64 label
    tensors; batches the workers already normalised (float, from
    :meth:`CachedImageDataset.normalized`) are only moved. Other attributes (``sampler``,
    ``generator``, ``dataset``, ``len``) are the wrapped loader's.
    """

    def __init__(self, loader, mean: Sequence[float], std: Sequence[float], device=None):
        self.loader = loader
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = torch.device(device) if device is not None else None

    def __iter__(self):
        # Start the wrapped iterator now, as iterating the loader itself would: its seed draws
        # (and so the crops) then match those of an unwrapped loader.
        return self._normalized(iter(self.loader))

    def _normalized(self, batches):
        for images, labels in batches:
            if self.device is not None:
                images = images.to(self.device, non_blocking=True)
            if images.dtype == torch.uint8:
                images = normalize_batch(images, self.mean, self.std)
            yield images, torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        if name == "loader":  # not yet set (unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


# Batches each DataLoader worker prepares ahead (DataLoader's default, stated so the workers'
# batch rings can be sized from it).
PREFETCH_FACTOR = 2


def view_of(dataset, make):
    """``make(dataset)`` (a view such as ``normalized()``) of a cached data set, through a ``Subset`` (a shard)."""
    from torch.utils.data import Subset

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
    from .cache_store import ring_depth

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
