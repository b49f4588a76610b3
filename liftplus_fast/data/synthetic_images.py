"""Generated image data sets on disk: JPEG class folders and list files for tests and benchmarks.

The images are smooth colour fields with a class-dependent pattern and some texture, so they
compress and resize like photographs rather than like noise, and a model can learn them.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..files import atomic_write, atomic_write_bytes

# Height x width of the photographs the published data sets hold (ImageNet/Places/iNaturalist).
PHOTO_SIZES: Tuple[Tuple[int, int], ...] = ((375, 500), (500, 375), (480, 640), (768, 1024), (600, 800))


def synthetic_image(label: int, height: int, width: int, rng: np.random.RandomState) -> Image.Image:
    """One RGB image of class ``label``: a coloured stripe pattern plus low-frequency texture."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = 0.7 * label + rng.uniform(-0.2, 0.2)
    freq = 2 * np.pi * (3 + label % 5) / max(height, width)
    wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
    coarse = rng.uniform(0, 1, size=(4, 4, 3)).astype(np.float32)
    texture = (
        np.asarray(
            Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC), dtype=np.float32
        )
        / 255.0
    )
    base = np.array([(label * 37) % 255, (label * 91) % 255, (label * 53) % 255], dtype=np.float32) / 255.0
    img = 0.45 * base + 0.3 * texture + 0.25 * (0.5 + 0.5 * wave[..., None])
    img += rng.normal(0, 0.03, size=img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8))


def write_image_folder(
    root: str,
    train_counts: Sequence[int],
    test_per_class: int = 2,
    sizes: Sequence[Tuple[int, int]] = PHOTO_SIZES,
    seed: int = 0,
    quality: int = 90,
    classnames: Optional[Sequence[str]] = None,
    listfiles: bool = True,
) -> Dict[str, List[str]]:
    """Write ``root/{train,test}/<class>/<n>.jpg`` and, with ``listfiles``, the list files.

    ``train_counts[k]`` images of class k go to ``train``, ``test_per_class`` of each to
    ``test``; image sizes cycle through ``sizes`` (height, width). The list files
    (``train.txt``, ``test.txt`` with ``relative/path label`` lines, ``classnames.txt``) go
    to ``root`` so the same images also load as ``-d listfile``. Returns the relative paths
    written per split.
    """
    rng = np.random.RandomState(seed)
    names = list(classnames) if classnames is not None else [f"class_{k:03d}" for k in range(len(train_counts))]
    if len(names) != len(train_counts):
        raise ValueError(f"classnames has {len(names)} entries but train_counts {len(train_counts)}")
    written: Dict[str, List[str]] = {"train": [], "test": []}
    lines: Dict[str, List[str]] = {"train": [], "test": []}
    n = 0
    for split, counts in (("train", list(train_counts)), ("test", [test_per_class] * len(names))):
        for label, (name, count) in enumerate(zip(names, counts)):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                h, w = sizes[n % len(sizes)]
                n += 1
                rel = f"{split}/{name}/{i:05d}.jpg"
                image = synthetic_image(label, h, w, rng)
                atomic_write(os.path.join(root, rel), lambda f, im=image: im.save(f, format="JPEG", quality=quality))
                written[split].append(rel)
                lines[split].append(f"{rel} {label}")
    if listfiles:
        for split in ("train", "test"):
            atomic_write_bytes(os.path.join(root, f"{split}.txt"), ("\n".join(lines[split]) + "\n").encode())
        text = "\n".join(n.replace("_", " ") for n in names) + "\n"
        atomic_write_bytes(os.path.join(root, "classnames.txt"), text.encode())
    return written
