"""Data sets by name: :data:`DATASETS` and :func:`build_dataset`."""
from __future__ import annotations

from typing import Callable, Dict, Optional

from torch.utils.data import Dataset

from .cifar import CIFAR100LT
from .digits import DigitsLT
from .image_folder import ImageFolderLT
from .list_datasets import ImageNetLT, INaturalist2018, ListFileDataset, PlacesLT


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


def build_dataset(name: str, root: str, split: str = "train", transform: Optional[Callable] = None,
                  split_dir: Optional[str] = None, download: bool = True) -> Dataset:
    """The data set ``name`` (a key of :data:`DATASETS`, case-insensitive) for ``split``.

    ``root`` holds the images (CIFAR: the torchvision folder); ``split_dir`` the split files
    of list-file data sets (default ``root``); ``download`` applies to CIFAR only. ``digits_lt``
    ignores ``root``. Unknown names raise ``ValueError`` listing the known ones.
    """
    key = name.lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[key](root, split, transform, split_dir, download)
