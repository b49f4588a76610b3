"""Data sets by name: :data:`DATASETS` and :func:`build_dataset`."""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional

from torch.utils.data import Dataset

from ..errors import MissingInputError, UserInputError
from .cifar import CIFAR100LT
from .digits import DigitsLT
from .image_folder import ImageFolderLT
from .list_datasets import INAT_LEVELS, ImageNetLT, INaturalist2018, ListFileDataset, PlacesLT, inat_level_dataset


def _cifar(imb_factor):
    def make(root, split, transform, split_dir, download):
        return CIFAR100LT(root, imb_factor=imb_factor, split=split, transform=transform, download=download)

    return make


def _listed(cls):
    def make(root, split, transform, split_dir, download):
        return cls(root, split=split, transform=transform, split_dir=split_dir)

    return make


def _folder(root, split, transform, split_dir, download):
    return ImageFolderLT(root, split=split, transform=transform)


def _digits(root, split, transform, split_dir, download):
    return DigitsLT(split=split, transform=transform)


# name -> factory(root, split, transform, split_dir, download)
DATASETS: Dict[str, Callable[..., Dataset]] = {
    "cifar100": _cifar(None),
    "cifar100_ir10": _cifar(0.1),
    "cifar100_ir50": _cifar(0.02),
    "cifar100_ir100": _cifar(0.01),
    "imagenet_lt": _listed(ImageNetLT),
    "places_lt": _listed(PlacesLT),
    "inat2018": _listed(INaturalist2018),
    "imagefolder": _folder,
    "listfile": _listed(ListFileDataset),
    "digits_lt": _digits,
}
DATASETS.update({f"inat2018_{k}": _listed(inat_level_dataset(k)) for k in INAT_LEVELS})

# The published data configs' class names (configs/data/*.yaml ``dataset:``) -> our names.
DATASET_ALIASES = {
    "cifar100_ir10": "cifar100_ir10",
    "cifar100_ir50": "cifar100_ir50",
    "cifar100_ir100": "cifar100_ir100",
    "imagenet_lt": "imagenet_lt",
    "places_lt": "places_lt",
    "inaturalist2018": "inat2018",
    **{f"inaturalist2018_{('species' if v == 'name' else v)}": f"inat2018_{k}" for k, v in INAT_LEVELS.items()},
}


def build_dataset(
    name: str,
    root: str,
    split: str = "train",
    transform: Optional[Callable] = None,
    split_dir: Optional[str] = None,
    download: bool = True,
) -> Dataset:
    """The data set ``name`` (a key of :data:`DATASETS`, case-insensitive) for ``split``.

    ``root`` holds the images (CIFAR: the torchvision folder); ``split_dir`` the split files
    of list-file data sets (default ``root``); ``download`` applies to CIFAR only. ``digits_lt``
    ignores ``root``. The published class names (``iNaturalist2018``, ``ImageNet_LT``,
    ``iNaturalist2018_Genus``, ...) are accepted too. Unknown names raise ``ValueError``
    listing the known ones.
    """
    key = name.lower()
    key = DATASET_ALIASES.get(key, key)
    if key not in DATASETS:
        raise UserInputError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[key](root, split, transform, split_dir, download)


def check_split(dataset: Dataset, name: str, split: str, min_classes: int = 1, max_missing_shown: int = 5) -> None:
    """Fail before any training if ``dataset`` (split ``split`` of ``name``) cannot be used whole.

    Raises ``ValueError`` when the split is empty or has fewer than ``min_classes`` classes,
    and ``FileNotFoundError`` naming the list file and the first missing images when any listed
    image (``dataset.paths``) does not exist, so a missing test image is found before training
    rather than after it.
    """
    if len(dataset) == 0:
        where = getattr(dataset, "list_file", None)
        raise UserInputError(f"{name}: the {split} split has no images" + (f" ({where} is empty)" if where else ""))
    num_classes = getattr(dataset, "num_classes", None)
    if num_classes is not None and num_classes < min_classes:
        raise UserInputError(
            f"{name}: the {split} split has {num_classes} class(es); long-tailed "
            f"classification needs at least {min_classes}"
        )
    paths = getattr(dataset, "paths", None)
    if paths is None:
        return
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        where = getattr(dataset, "list_file", f"the {split} split")
        shown = ", ".join(repr(p) for p in missing[:max_missing_shown])
        more = f" and {len(missing) - max_missing_shown} more" if len(missing) > max_missing_shown else ""
        raise MissingInputError(
            f"{name}: {len(missing)} of {len(paths)} images listed in {where} are missing: {shown}{more}"
        )
