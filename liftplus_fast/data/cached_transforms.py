"""MDA, test and five-crop TTE transforms on the uint8 images of the decode-once cache.

The reference transforms (:mod:`liftplus_fast.data.transforms`) work on the decoded source
image with PIL and return normalised float tensors. These work on the image stored in the
decode-once cache (short side at most ``cache_size``) and return uint8 tensors, normalised
later per batch (:mod:`liftplus_fast.data.normalize`, in the DataLoader workers or on the
GPU), which also moves 4x fewer bytes from the workers.

* Crop boxes are drawn exactly as the reference draws them: the same function
  (:func:`~liftplus_fast.data.transforms.sample_square_box`), with the *source* image's size,
  so a seeded run draws the same boxes with and without the cache; the box is then mapped onto
  the stored image (the identity when the cache kept the image at full size).
* The test resize keeps the reference's output size (computed from the source size), so the
  centre crop and the five TTE crops have exactly the reference geometry.
* The MDA schedule takes the epoch as an argument (tagged onto every index by
  :class:`~liftplus_fast.data.loaders.EpochTaggedSampler`), so persistent workers and
  GPU-side augmentation need no per-epoch call into a worker.

Resizes are bicubic with antialiasing (torchvision's uint8 kernels, which match PIL's to
~0.1/255 mean absolute error) and run on whatever device the image tensor is on.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from ..errors import UserInputError
from .normalize import normalize_into
from .transforms import MDA_FUNCS, mda_min_scale, sample_square_box

__all__ = [
    "CachedMDACrop",
    "CachedResizeCrop",
    "build_cached_plain_transform",
    "build_cached_test_transform",
    "build_cached_train_transform",
    "map_box",
    "resized_output_size",
]

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

        ``affine``: ``(scale, shift)`` of :func:`~liftplus_fast.data.normalize.normalization_affine`
        to write it normalised into a float ``out``; ``None`` copies the uint8 pixels.
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
