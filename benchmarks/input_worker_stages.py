"""Where a DataLoader worker's time goes, per training image: each stage of each input path, one core.

    python benchmarks/input_worker_stages.py [--resolution 32] [--images 256] [--rounds 3]

Uses the command-line case's folder and caches of ``bench_input_pipeline.py`` (run that first;
its caches are ``<folder>/cli_cached_jpeg`` and ``cli_cached_raw``). Stages, in ms per image,
median of ``--rounds`` interleaved rounds, one intra-op thread (as in a DataLoader worker):

* reference: PIL decode of the source JPEG (``load_rgb_image``), then the whole reference MDA
  transform on it (crop, bicubic antialiased resize, float normalisation);
* jpeg / raw cache: reading the stored image (``CachedImageDataset.read``: for jpeg the
  torchvision decode), the crop and resize on uint8, the normalisation into the batch slot;
* jpeg, reduced-scale decode: PIL's DCT-domain decode at 1/2, 1/4 and 1/8 (``Image.draft``)
  of the same stored JPEGs, against torchvision's full decode.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_input_pipeline import EPOCH_COPIES, _folder  # noqa: E402

from liftplus_fast import make_config  # noqa: E402
from liftplus_fast.data import build_dataset, build_train_transform  # noqa: E402
from liftplus_fast.data.cache_build import open_source_cache  # noqa: E402
from liftplus_fast.data.cached_transforms import build_cached_train_transform  # noqa: E402
from liftplus_fast.data.images import load_rgb_image  # noqa: E402
from liftplus_fast.data.normalize import normalize_into  # noqa: E402


def _per_image_ms(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / n * 1e3


def stages(resolution: int, images: int):
    """``{stage: callable}`` over the first ``images`` training images of the command-line folder."""
    folder = _folder(False).rstrip(os.sep) + f"_x{EPOCH_COPIES}"
    cfg = make_config("lift+", {"resolution": resolution, "num_epochs": 1})
    ref = build_dataset("imagefolder", folder, "train", build_train_transform(cfg))
    paths = ref.paths[:images]
    decoded = [load_rgb_image(p) for p in paths]
    mda = ref.transform
    tr = build_cached_train_transform(cfg)
    out = {
        "reference: PIL decode": lambda: [load_rgb_image(p) for p in paths],
        "reference: MDA transform": lambda: [mda(img) for img in decoded],
    }
    for fmt in ("jpeg", "raw"):
        ds = open_source_cache("imagefolder", folder, "train", os.path.join(folder, f"cli_cached_{fmt}"), transform=tr)
        ds = ds.normalized(cfg.mean, cfg.std)
        idx = range(min(images, len(ds)))
        origs = [tuple(int(v) for v in ds.orig_hw[i]) for i in idx]
        stored = [ds.read(i) for i in idx]
        crops = [tr(img, o, 0) for img, o in zip(stored, origs)]
        slot = torch.empty(3, resolution, resolution)
        out[f"{fmt}: read"] = lambda ds=ds, idx=idx: [ds.read(i) for i in idx]
        out[f"{fmt}: crop + resize"] = lambda s=stored, o=origs: [tr(img, h, 0) for img, h in zip(s, o)]
        out[f"{fmt}: normalise"] = lambda c=crops, a=ds._affine: [normalize_into(slot, x, a) for x in c]
        if fmt == "jpeg":
            blobs = [bytes(ds._data[int(ds.offsets[i]) : int(ds.offsets[i] + ds.nbytes[i])]) for i in idx]
            for scale in (1, 2, 4, 8):
                out[f"jpeg: PIL decode at 1/{scale}"] = lambda b=blobs, s=scale: [_pil_decode(x, s) for x in b]
    return out, len(paths)


def _pil_decode(blob: bytes, scale: int) -> np.ndarray:
    img = Image.open(io.BytesIO(blob))
    if scale > 1:
        img.draft("RGB", (img.width // scale, img.height // scale))
    return np.asarray(img.convert("RGB"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fns, n = stages(args.resolution, args.images)
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(_per_image_ms(fn, n))
    load = os.getloadavg()[0]
    print(f"ms per image, {n} images, {args.resolution} px, 1 thread, median of {args.rounds} (load {load:.1f})")
    for name, ts in times.items():
        print(f"  {name:28s} {statistics.median(ts):7.3f}")


if __name__ == "__main__":
    main()
