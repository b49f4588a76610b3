"""CIFAR-100-LT: the balanced CIFAR-100 training set subsampled to an exponential profile.

Selection replays the published procedure so the same images are chosen: class k keeps
``int(img_max * imb_factor ** (k / 99))`` images (``img_max = len(train) / 100 = 500``); a
numpy RandomState seeded with 0 shuffles each class's indices in class order and the first
``n_k`` are kept. IR 100 gives 10,847 images. The test split is the full balanced 10,000.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np
from torchvision.datasets import CIFAR100

from ..errors import DatasetUnavailableError, UserInputError
from .splits import count_per_class

NUM_CLASSES = 100
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def long_tail_counts(img_max: float, num_classes: int, imb_factor: float) -> List[int]:
    """Per-class sizes ``int(img_max * imb_factor ** (k / (num_classes - 1)))``.

    The float expression is written exactly as the published code evaluates it, because
    truncation makes the counts sensitive to the last bit.
    """
    if num_classes < 2:
        return [int(img_max)] * num_classes
    return [int(img_max * (imb_factor ** (k / (num_classes - 1.0)))) for k in range(num_classes)]


def select_long_tail_indices(targets: Sequence[int], counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Indices kept for a long-tailed subset: per class in order, shuffle, keep the first n_k.

    Uses a private ``np.random.RandomState(seed)``, which yields the same stream as the
    published ``np.random.seed(seed); np.random.shuffle(...)`` without resetting numpy's
    global generator.
    """
    rng = np.random.RandomState(seed)
    targets = np.asarray(targets, dtype=np.int64)
    kept = []
    for cls, n in zip(np.unique(targets), counts):
        idx = np.where(targets == cls)[0]
        rng.shuffle(idx)
        kept.append(idx[:n])
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


class CIFAR100LT(CIFAR100):
    """CIFAR-100, optionally long-tailed (``imb_factor`` = 1 / imbalance ratio).

    Args:
        root: folder holding (or receiving) ``cifar-100-python``.
        imb_factor: ``None`` (balanced), or e.g. 0.1 / 0.02 / 0.01 for IR 10 / 50 / 100;
            applied to the train split only.
        split: ``"train"`` or ``"test"``.
        transform: applied to the PIL image.
        download: fetch the archive with torchvision when missing.

    Attributes: ``labels``, ``classnames``, ``cls_num_list``, ``num_classes`` and, for a
    long-tailed train split, ``selected_indices`` into the balanced training set.
    """

    def __init__(
        self,
        root: str,
        imb_factor: Optional[float] = None,
        split: str = "train",
        transform: Optional[Callable] = None,
        download: bool = True,
        seed: int = 0,
    ):
        if split not in ("train", "test"):
            raise UserInputError(f"CIFAR-100: unknown split {split!r}; expected 'train' or 'test'")
        if imb_factor is not None and not 0 < imb_factor <= 1:
            raise UserInputError(f"imb_factor must be in (0, 1] (1 / imbalance ratio); got {imb_factor!r}")
        try:
            super().__init__(root, train=(split == "train"), transform=transform, download=download)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; torchvision raises both
            raise DatasetUnavailableError(
                f"CIFAR-100 is not in {root!r} and could not be downloaded ({exc}); on a machine "
                f"without network, fetch {CIFAR100_URL} elsewhere and extract it into {root!r} "
                "(giving cifar-100-python/)"
            ) from None
        self.split = split
        self.imb_factor = imb_factor
        self.selected_indices: Optional[np.ndarray] = None
        if split == "train" and imb_factor is not None:
            counts = long_tail_counts(len(self.data) / NUM_CLASSES, NUM_CLASSES, imb_factor)
            keep = select_long_tail_indices(self.targets, counts, seed)
            self.selected_indices = keep
            self.data = self.data[keep]
            self.targets = [int(self.targets[i]) for i in keep]
        self.labels: List[int] = self.targets
        self.classnames: List[str] = list(self.classes)
        self.num_classes = NUM_CLASSES
        self.cls_num_list: List[int] = count_per_class(self.labels, self.num_classes)
