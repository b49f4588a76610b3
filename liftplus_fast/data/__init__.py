"""Long-tailed data sets, the LIFT+ transforms (MDA, test / five-crop TTE), samplers and shot groups."""

from .cache_build import build_cache
from .cache_store import CachedImageDataset, CacheError
from .cifar import CIFAR100LT, DatasetUnavailableError, long_tail_counts, select_long_tail_indices
from .digits import DigitsLT
from .groups import group_accuracies, shot_groups
from .image_folder import ImageFolderLT
from .images import CorruptImageError, load_rgb_image
from .list_datasets import ImageFileDataset, ImageNetLT, INaturalist2018, ListFileDataset, LongTailListDataset, PlacesLT
from .registry import DATASETS, build_dataset, check_split
from .samplers import DownSampler
from .transforms import (
    MDA_FUNCS,
    MinimalistRandomResizedCrop,
    StackCrops,
    build_plain_transform,
    build_test_transform,
    build_train_transform,
    mda_min_scale,
    set_transform_epoch,
)

__all__ = [
    "CIFAR100LT",
    "CacheError",
    "CachedImageDataset",
    "CorruptImageError",
    "DATASETS",
    "DatasetUnavailableError",
    "DigitsLT",
    "DownSampler",
    "ImageFileDataset",
    "ImageFolderLT",
    "ImageNetLT",
    "INaturalist2018",
    "ListFileDataset",
    "LongTailListDataset",
    "MDA_FUNCS",
    "MinimalistRandomResizedCrop",
    "PlacesLT",
    "StackCrops",
    "build_cache",
    "build_dataset",
    "build_plain_transform",
    "build_test_transform",
    "build_train_transform",
    "check_split",
    "group_accuracies",
    "load_rgb_image",
    "long_tail_counts",
    "mda_min_scale",
    "select_long_tail_indices",
    "set_transform_epoch",
    "shot_groups",
]
