"""DigitsLT: an offline long-tailed data set built from scikit-learn's bundled 8x8 digits.

It needs no download, so it is the default for demos and end-to-end tests. The split is
deterministic for a given ``seed``: per class a balanced test set of ``test_per_class``
images is held out first; the remaining pool is subsampled to
``n_k = int(150 * imbalance_ratio ** (-k / 9))`` (150, 89, 53, 32, 19, 11, 6, 4, 2, 1 at
ratio 100: one many-shot, three medium and six few-shot classes).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .cifar import long_tail_counts
from .splits import count_per_class

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MAX_PER_CLASS = 150
# 25 is the largest round number that still leaves 150 pool images in class 0 (178 in total).
TEST_PER_CLASS = 25


class DigitsLT(Dataset):
    """Long-tailed split of ``sklearn.datasets.load_digits`` as RGB PIL images.

    Args:
        split: ``"train"`` (long-tailed) or ``"test"`` (balanced; ``"val"`` is the same).
        transform: applied to the PIL image.
        imbalance_ratio: n_max / n_min of the training profile (>= 1).
        image_size: side of the returned images (8x8 digits upsampled bicubically), so the
            usual CLIP transforms apply.
        seed: seed of the split.
        test_per_class: held-out images per class.
    """

    def __init__(
        self,
        split: str = "train",
        transform: Optional[Callable] = None,
        imbalance_ratio: float = 100,
        image_size: int = 32,
        seed: int = 0,
        test_per_class: int = TEST_PER_CLASS,
    ):
        from sklearn.datasets import load_digits  # deferred: only this data set needs sklearn

        if split not in ("train", "val", "test"):
            raise ValueError(f"DigitsLT: unknown split {split!r}; expected 'train' or 'test'")
        if imbalance_ratio < 1:
            raise ValueError(f"imbalance_ratio must be >= 1; got {imbalance_ratio!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive; got {image_size!r}")
        digits = load_digits()
        images, targets = digits.images, digits.target.astype(np.int64)
        self.num_classes = len(DIGIT_NAMES)
        counts = long_tail_counts(MAX_PER_CLASS, self.num_classes, 1.0 / imbalance_ratio)
        rng = np.random.RandomState(seed)
        chosen = []
        for cls in range(self.num_classes):
            idx = rng.permutation(np.where(targets == cls)[0])
            test_idx, pool = idx[:test_per_class], idx[test_per_class:]
            if split == "train":
                if len(pool) < counts[cls]:
                    raise ValueError(
                        f"DigitsLT: class {cls} has {len(pool)} pool images, "
                        f"fewer than the {counts[cls]} requested; lower test_per_class"
                    )
                chosen.append(pool[: counts[cls]])
            else:
                chosen.append(test_idx)
        keep = np.concatenate(chosen)
        # 8x8 values are 0..16; scale to the full 8-bit range before resizing.
        self._pixels = np.round(images[keep] * (255.0 / 16.0)).astype(np.uint8)
        self.indices = keep
        self.split = split
        self.transform = transform
        self.image_size = image_size
        self.labels: List[int] = [int(t) for t in targets[keep]]
        self.classnames: List[str] = list(DIGIT_NAMES)
        self.cls_num_list: List[int] = count_per_class(self.labels, self.num_classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        img = Image.fromarray(self._pixels[index]).convert("RGB")
        if self.image_size != img.width:
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[index]
