"""Shared pieces of the fault-injection suite: tiny runs, a tiny list-file data set, folder snapshots."""

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

# The tiny embedded setting of the other tests: digits, a random 32x32 ViT, one epoch of 3 steps.
TINY = dict(
    dataset="digits_lt",
    backbone="tiny_vit",
    pretrained=None,
    resolution=32,
    batch_size=128,
    num_workers=0,
    progress=False,
    prec_train="fp32",
    prec_test="fp32",
)


def snapshot(folder):
    """``{file name: sha256}`` of every file in ``folder`` (log.txt excluded: it is appended to)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and name != "log.txt":
            out[name] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def make_list_dataset(root, n_classes=3, n_train=4, n_test=2, size=36, image_writer=None):
    """An ImageNet-LT-layout data set in ``root``: PNG images, train.txt, test.txt, classnames.txt.

    ``image_writer(path, label, index)`` replaces the default random RGB PNG writer.
    """
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)

    def write(path, label, i):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)

    writer = image_writer or write
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for c in range(n_classes):
            for i in range(n):
                rel = f"img/{split}_{c}_{i}.png"
                writer(os.path.join(root, rel), c, i)
                lines.append(f"{rel} {c}")
        with open(os.path.join(root, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "classnames.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(f"class {c}" for c in range(n_classes)) + "\n")
    return root


@pytest.fixture
def list_root(tmp_path):
    return make_list_dataset(str(tmp_path / "data"))


def list_run_args(root, **kw):
    """fast_train arguments for a one-epoch run on the data set of :func:`make_list_dataset`."""
    args = dict(TINY, dataset="imagenet_lt", root=root, batch_size=4, num_epochs=1)
    args.update(kw)
    return args
