"""Long-tailed data sets described by list files: ImageNet-LT, Places-LT, iNaturalist 2018.

Each list file holds ``relative/path label`` lines with paths relative to the image ``root``.
The split files live in ``split_dir`` (default ``root``) under the names ``train.txt``,
``val.txt``, ``test.txt``, ``classnames.txt`` / ``categories.json``.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

from torch.utils.data import Dataset

from ..errors import MissingInputError, UserInputError
from .images import load_rgb_image
from .splits import (
    count_per_class,
    read_classnames,
    read_inat_categories,
    read_list_file,
    resolve_split_file,
    split_files,
)


class ImageFileDataset(Dataset):
    """Images on disk given as ``paths`` with ``labels``, loaded lazily as RGB PIL images.

    The shared base of the list-file and folder data sets (and what the decode-once cache
    reads its sources from). Subclasses set ``root``, ``paths`` (absolute), ``labels``,
    ``classnames``, ``num_classes``, ``cls_num_list`` and ``transform``.
    """

    root: str
    paths: List[str]
    labels: List[int]
    transform: Optional[Callable] = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = load_rgb_image(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


class LongTailListDataset(ImageFileDataset):
    """Images listed in a ``relative/path label`` file, loaded lazily as RGB PIL images.

    Args:
        root: folder the listed paths are relative to.
        list_file: the list file.
        classnames: class names in label order; their number is ``num_classes``.
        transform: applied to the PIL image in ``__getitem__``.
        label_map: optional remap from the labels written in the file to class labels
            (the written labels are then checked against ``len(label_map)``).

    Attributes: ``paths`` (absolute), ``labels``, ``classnames``, ``num_classes`` and
    ``cls_num_list`` (per class, zeros included). A label out of range raises ``ValueError``
    naming the file and line; a missing or undecodable image raises when that item is loaded.
    """

    def __init__(
        self,
        root: str,
        list_file: str,
        classnames: Sequence[str],
        transform: Optional[Callable] = None,
        label_map: Optional[Sequence[int]] = None,
    ):
        self.root = root
        self.list_file = list_file
        self.transform = transform
        self.classnames: List[str] = list(classnames)
        self.num_classes = len(self.classnames)
        if not os.path.isfile(list_file):
            raise MissingInputError(f"list file not found: {list_file!r} (expected 'relative/path label' lines)")
        rel_paths, raw, linenos = read_list_file(list_file)
        n_raw = len(label_map) if label_map is not None else self.num_classes
        for y, lineno in zip(raw, linenos):
            if not 0 <= y < n_raw:
                raise UserInputError(
                    f"{list_file}:{lineno}: label {y} is out of range for {n_raw} classes (expected 0..{n_raw - 1})"
                )
        self.labels: List[int] = list(raw) if label_map is None else [int(label_map[y]) for y in raw]
        self.paths: List[str] = [os.path.join(root, p) for p in rel_paths]
        self.cls_num_list: List[int] = count_per_class(self.labels, self.num_classes)


class _NamedListDataset(LongTailListDataset):
    """A list-file data set whose split files follow the shared layout (see module doc)."""

    display_name = ""
    split_to_file = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}

    def __init__(
        self, root: str, split: str = "train", transform: Optional[Callable] = None, split_dir: Optional[str] = None
    ):
        split_dir = root if split_dir is None else split_dir
        self.split = split
        fname = split_files(self.split_to_file, split, self.display_name)
        list_file = resolve_split_file(split_dir, fname, self.display_name, f"{split} split")
        classnames, label_map = self._classes(split_dir)
        super().__init__(root, list_file, classnames, transform, label_map=label_map)

    def _classes(self, split_dir: str):
        path = resolve_split_file(split_dir, "classnames.txt", self.display_name, "class names")
        return read_classnames(path), None


class ImageNetLT(_NamedListDataset):
    """ImageNet-LT: 1000 classes, train 115,846 (max 1280, min 5 per class), test 50,000."""

    display_name = "ImageNet-LT"


class PlacesLT(_NamedListDataset):
    """Places-LT: 365 classes, train 62,500 (max 4980, min 5 per class), test 36,500."""

    display_name = "Places-LT"


class INaturalist2018(_NamedListDataset):
    """iNaturalist 2018: 8142 species; the official val list (24,426) is the test split.

    Labels are remapped as the published code does: the category id written in the list file
    indexes ``categories.json``; the label is the position of that category's name among the
    sorted unique names, which are also the ``classnames``. ``split="val"`` reads the same
    ``val.txt`` as ``"test"``.
    """

    display_name = "iNaturalist 2018"
    split_to_file = {"train": "train.txt", "val": "val.txt", "test": "val.txt"}
    # The categories.json field that names a class: "name" (species) or a taxonomy level.
    category_key = "name"

    def _classes(self, split_dir: str):
        path = resolve_split_file(split_dir, "categories.json", self.display_name, "categories")
        return read_inat_categories(path, self.category_key)


# The published iNaturalist taxonomy data sets (inat2018_k ... inat2018_s): the same images,
# each labelled by one taxonomy level of categories.json instead of the species.
INAT_LEVELS = {"k": "kingdom", "p": "phylum", "c": "class", "o": "order", "f": "family", "g": "genus", "s": "name"}


def inat_level_dataset(level: str) -> type:
    """The iNaturalist 2018 class labelled by ``level`` (a key or value of :data:`INAT_LEVELS`)."""
    key = INAT_LEVELS.get(level, level)
    if key not in INAT_LEVELS.values():
        raise ValueError(
            f"unknown iNaturalist taxonomy level {level!r}; expected one of {sorted(INAT_LEVELS.values())}"
        )
    title = "species" if key == "name" else key
    return type(
        f"INaturalist2018_{title.capitalize()}",
        (INaturalist2018,),
        {
            "category_key": key,
            "display_name": f"iNaturalist 2018 ({title})",
            "__doc__": f"iNaturalist 2018 labelled by {title} (from categories.json).",
        },
    )


class ListFileDataset(_NamedListDataset):
    """Your own data described by list files: ``-d listfile --root R split_dir S``.

    ``S/train.txt`` and ``S/test.txt`` (``S/val.txt`` when there is no ``test.txt``) hold
    ``relative/path label`` lines relative to ``R``; ``S/classnames.txt`` the class names in
    label order. ``split_dir`` defaults to ``root``.
    """

    display_name = "listfile"

    def __init__(
        self, root: str, split: str = "train", transform: Optional[Callable] = None, split_dir: Optional[str] = None
    ):
        if split == "test":
            folder = root if split_dir is None else split_dir
            if not os.path.isfile(os.path.join(folder, "test.txt")) and os.path.isfile(os.path.join(folder, "val.txt")):
                split = "val"
        super().__init__(root, split, transform, split_dir)
