"""Your own data as class folders: ``R/train/<class>/*`` and ``R/test/<class>/*`` (or ``R/val/``)."""

from __future__ import annotations

import os
from typing import Callable, List, Optional

from ..errors import MissingInputError, UserInputError
from .list_datasets import ImageFileDataset
from .splits import count_per_class

# What PIL decodes that image folders commonly hold; other files (notes, .DS_Store) are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TEST_FOLDERS = ("test", "val")


def _class_folders(split_root: str) -> List[str]:
    return sorted(e.name for e in os.scandir(split_root) if e.is_dir() and not e.name.startswith("."))


def image_files(folder: str) -> List[str]:
    """Image files (by :data:`IMAGE_EXTENSIONS`) below ``folder``, recursively, in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return found


class ImageFolderLT(ImageFileDataset):
    """Images sorted into one folder per class: ``-d imagefolder --root R``.

    Classes are the sub-folders of ``R/train`` in sorted order (label = position); their
    display names, used for the text initialisation of the classifier, replace underscores by
    spaces. The test split reads ``R/test`` or, when absent, ``R/val``; its folders must be
    training classes. Files are found recursively below each class folder and filtered by
    :data:`IMAGE_EXTENSIONS`; ``split="val"`` reads ``R/val``.
    """

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable] = None):
        if split not in ("train", "val", "test"):
            raise UserInputError(f"imagefolder: unknown split {split!r}; expected 'train', 'val' or 'test'")
        train_root = os.path.join(root, "train")
        if not os.path.isdir(train_root):
            raise MissingInputError(
                f"imagefolder: {train_root!r} not found; expected "
                "root/train/<class>/<image> and root/test/<class>/<image> (or root/val/)"
            )
        folders = _class_folders(train_root)
        if not folders:
            raise UserInputError(f"imagefolder: {train_root!r} holds no class folders")
        if split == "train":
            split_root = train_root
        else:
            names = (split,) if split == "val" else TEST_FOLDERS
            split_root = next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)
            if split_root is None:
                raise MissingInputError(
                    f"imagefolder: no {' or '.join(names)} folder in {root!r}; "
                    "expected root/test/<class>/<image> (or root/val/)"
                )
        index = {name: i for i, name in enumerate(folders)}
        split_folders = _class_folders(split_root)
        unknown = sorted(set(split_folders) - set(index))
        if unknown:
            raise UserInputError(
                f"imagefolder: {split_root!r} has class folders that are not in {train_root!r}: {unknown[:5]}"
            )
        self.root = root
        self.split = split
        self.transform = transform
        self.folder_names: List[str] = folders
        self.classnames: List[str] = [name.replace("_", " ") for name in folders]
        self.num_classes = len(folders)
        self.paths: List[str] = []
        self.labels: List[int] = []
        for name in split_folders:
            files = image_files(os.path.join(split_root, name))
            self.paths.extend(files)
            self.labels.extend([index[name]] * len(files))
        if not self.paths:
            raise UserInputError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_root!r}")
        self.cls_num_list: List[int] = count_per_class(self.labels, self.num_classes)
