"""Train / plain / test transforms, the minimalist augmentation (MDA) and five-crop TTE."""

from __future__ import annotations

import math
from typing import Callable, List, Sequence, Tuple

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import get_dimensions, resized_crop

# mda_func: the schedule s(t) of MDA's smallest crop area over training (see mda_min_scale).
MDA_FUNCS = ("min", "max", "linear", "convex", "concave")


def check_mda_func(func: str) -> None:
    """``ValueError`` unless ``func`` names an MDA schedule (:data:`MDA_FUNCS`)."""
    if func not in MDA_FUNCS:
        raise ValueError(f"unknown MDA schedule {func!r}; expected one of {MDA_FUNCS}")


def _schedule(func: str, t: float) -> float:
    if func == "min":
        return 0.0
    if func == "max":
        return 1.0
    if func == "linear":
        return t
    if func == "convex":
        return 1.0 - math.sqrt(max(0.0, 1.0 - t * t))
    check_mda_func(func)
    return math.sqrt(max(0.0, 1.0 - (1.0 - t) ** 2))  # concave


def mda_min_scale(epoch: int, num_epochs: int, func: str = "convex", lo: float = 0.08, hi: float = 1.0) -> float:
    """Lower bound of the crop-area fraction at ``epoch`` (0-based) of ``num_epochs``.

    ``lo + (hi - lo) * s(t)`` with ``t = epoch / (num_epochs - 1)`` and ``s`` one of
    ``min`` (0), ``max`` (1), ``linear`` (t), ``convex`` (1 - sqrt(1 - t^2)) and ``concave``
    (sqrt(1 - (1 - t)^2)). With ``num_epochs == 1`` the published formula divides by zero;
    here ``t = 0`` then, i.e. the single epoch uses the schedule's starting point.
    """
    check_mda_func(func)
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1; got {num_epochs!r}")
    if not 0 <= epoch <= num_epochs - 1:
        raise ValueError(f"epoch must be in [0, {num_epochs - 1}] for num_epochs={num_epochs}; got {epoch!r}")
    t = 0.0 if num_epochs == 1 else epoch / (num_epochs - 1)
    return lo + (hi - lo) * _schedule(func, t)


def sample_square_box(height: int, width: int, lo: float, hi: float) -> Tuple[int, int, int, int]:
    """``(top, left, side, side)`` of a random square crop of a ``height`` x ``width`` image.

    The area fraction is uniform in ``[lo, hi]``, both capped so that the square fits; three
    draws from torch's global generator (the fraction, then top, then left), the order of the
    published transform. Every MDA implementation (PIL, cached uint8, GPU) draws through this.
    """
    area = height * width
    cap = min(height, width) ** 2 / area
    frac = torch.empty(1).uniform_(min(lo, cap), min(hi, cap)).item()
    # At least one pixel: only matters for degenerate (1-2 px) inputs.
    side = max(1, int(round(math.sqrt(area * frac))))
    top = torch.randint(0, height - side + 1, size=(1,)).item()
    left = torch.randint(0, width - side + 1, size=(1,)).item()
    return top, left, side, side


class MinimalistRandomResizedCrop(T.RandomResizedCrop):
    """MDA: a square random crop whose minimum area grows over the epochs, resized to ``size``.

    The crop has aspect ratio 1 and an area fraction drawn uniformly from
    ``[mda_min_scale(epoch), scale[1]]``, both bounds capped at ``min(h, w)^2 / (h * w)`` so a
    square fits; its side is ``round(sqrt(area))`` and its position uniform. No flip.
    Randomness comes from torch's global generator in the same call order as the published
    code, so seeded runs reproduce its crops. Call :meth:`set_epoch` (or :meth:`step` once per
    epoch) to advance the schedule.
    """

    def __init__(
        self,
        size,
        num_epochs: int,
        sched_func: str = "convex",
        scale: Tuple[float, float] = (0.08, 1.0),
        interpolation: InterpolationMode = InterpolationMode.BICUBIC,
        antialias: bool = True,
    ):
        super().__init__(size, scale=scale, ratio=(1.0, 1.0), interpolation=interpolation, antialias=antialias)
        check_mda_func(sched_func)
        if num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1; got {num_epochs!r}")
        self.num_epochs = int(num_epochs)
        self.sched_func = sched_func
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the schedule value of ``epoch`` (0-based) for the following crops."""
        mda_min_scale(epoch, self.num_epochs, self.sched_func)  # validates the range now
        self.epoch = int(epoch)

    def step(self) -> None:
        """Advance to the next epoch (call once at the end of each epoch)."""
        self.epoch += 1

    def min_scale(self) -> float:
        """The current lower bound of the area fraction (before the square cap)."""
        return mda_min_scale(self.epoch, self.num_epochs, self.sched_func, self.scale[0], self.scale[1])

    @staticmethod
    def sample_square(img, lo: float, hi: float) -> Tuple[int, int, int, int]:
        """``(top, left, side, side)`` of a random square crop with area fraction in [lo, hi]."""
        _, height, width = get_dimensions(img)
        return sample_square_box(height, width, lo, hi)

    def forward(self, img):
        """Crop ``img`` (PIL image or tensor) at the current epoch's scale and resize it."""
        i, j, h, w = self.sample_square(img, self.min_scale(), self.scale[1])
        return resized_crop(img, i, j, h, w, self.size, self.interpolation, antialias=self.antialias)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, num_epochs={self.num_epochs}, "
            f"sched_func={self.sched_func!r}, scale={self.scale}, epoch={self.epoch}, "
            f"interpolation={self.interpolation.value})"
        )


def _iter_transforms(transform) -> List:
    found = [transform]
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple, torch.nn.ModuleList)):
        for t in inner:
            found.extend(_iter_transforms(t))
    elif isinstance(transform, torch.nn.Sequential):
        for t in transform:
            found.extend(_iter_transforms(t))
    return found


def set_transform_epoch(transform, epoch: int) -> int:
    """Set ``epoch`` on every MDA crop inside ``transform`` (nested Compose/Sequential too).

    Returns how many crops were updated (0 when the transform has none).
    """
    n = 0
    for t in _iter_transforms(transform):
        if isinstance(t, MinimalistRandomResizedCrop):
            t.set_epoch(epoch)
            n += 1
    return n


class StackCrops:
    """Turn a tuple of PIL crops into one ``[n_crops, C, H, W]`` float tensor.

    A class rather than a lambda so the test transform pickles into DataLoader workers.
    """

    def __call__(self, crops: Sequence) -> torch.Tensor:
        to_tensor = T.ToTensor()
        return torch.stack([to_tensor(c) for c in crops])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def build_train_transform(cfg) -> T.Compose:
    """Training transform: MDA crop (``cfg.mda``) or RandomResizedCrop + flip, then normalise."""
    res = cfg.resolution
    if cfg.mda:
        crop: List[Callable] = [MinimalistRandomResizedCrop(res, cfg.num_epochs, sched_func=cfg.mda_func)]
    else:
        crop = [T.RandomResizedCrop(res, interpolation=InterpolationMode.BICUBIC), T.RandomHorizontalFlip()]
    return T.Compose(crop + [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


def build_plain_transform(cfg) -> T.Compose:
    """Transform for classifier initialisation from training images: resize + centre crop."""
    res = cfg.resolution
    return T.Compose(
        [
            T.Resize(res, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(res),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


def build_test_transform(cfg) -> T.Compose:
    """Test transform.

    Without TTE: resize the short side to ``res + (expand or res // 7)`` and centre-crop.
    With ``cfg.tte``: resize to ``res + (expand or 24)`` and return the five ``res`` crops of
    ``torchvision.transforms.FiveCrop`` (top-left, top-right, bottom-left, bottom-right,
    centre) as a ``[5, 3, res, res]`` tensor.
    """
    res = cfg.resolution
    if cfg.tte:
        expand = cfg.expand if cfg.expand is not None else 24
        return T.Compose(
            [
                T.Resize(res + expand, interpolation=InterpolationMode.BICUBIC),
                T.FiveCrop(res),
                StackCrops(),
                T.Normalize(cfg.mean, cfg.std),
            ]
        )
    expand = cfg.expand if cfg.expand is not None else res // 7
    return T.Compose(
        [
            T.Resize(res + expand, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(res),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )
