"""Input pipeline: the reference per-sample PIL pipeline against the decode-once cache.

Candidates, same DataLoader worker count (``--workers``, default 2), interleaved:

* ``reference``: the source JPEGs decoded with PIL, the reference transforms (MDA crop, test
  resize + centre crop, five-crop TTE; bicubic, antialiased) and float normalisation per sample,
  collated per sample (``DataLoader(batch_size=32)``).
* ``cached``: the decode-once cache (JPEG format, short side 256) as training on the CPU reads
  it: the workers build whole batches (``dataset[list]``: memory-mapped, decoded with
  torchvision, cropped and resized on uint8 tensors, normalised image by image into one float
  batch in shared memory).
* ``cached_raw``: the same from a raw-pixel cache (no decode at all; bigger on disk).

Images are generated locally (JPEG, quality 90, 375x500 to 1024x768 like ImageNet, Places and
iNaturalist photographs) and reused between runs. The transforms are measured in the steady
state of a long training run: each candidate's loader is built once with persistent workers
(same worker count and batch size for all), and one call passes every image of the split
through it ``PASSES`` times, so worker start-up is not timed for any candidate. Images/s and
bytes on disk are in the notes. The last case trains one whole ``tiny_vit`` epoch
(``fast_train``, 32 px, so the data is the bottleneck) with and without the cache, worker
start-up included (as every epoch of a real run pays it).

Standalone: ``python benchmarks/bench_input_pipeline.py [--smoke]`` (under 3 minutes in full).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import common  # noqa: E402

from liftplus_fast import fast_train, make_config  # noqa: E402
from liftplus_fast.data import build_dataset, build_test_transform, build_train_transform  # noqa: E402
from liftplus_fast.data.cache_build import build_cache, open_source_cache  # noqa: E402
from liftplus_fast.data.cached_transforms import build_cached_test_transform, build_cached_train_transform  # noqa: E402
from liftplus_fast.data.loaders import build_loader  # noqa: E402
from liftplus_fast.data.synthetic_images import PHOTO_SIZES, write_image_folder  # noqa: E402
from liftplus_fast.files import atomic_write, atomic_write_bytes  # noqa: E402

NAME = "input_pipeline"
WORKERS = int(os.environ.get("LIFTPLUS_FAST_BENCH_WORKERS", "2"))
BATCH = 32
# Passes over the split per timed call (steady state; 1 in smoke mode).
PASSES = {"train": 4, "test": 4}
# The epoch case: 8 copies of each training image (1280 in all), batches of 64, so a 32-px
# tiny_vit step costs less than decoding its images (data-bound by construction).
EPOCH_COPIES, EPOCH_BATCH = 8, 64
# Smoke mode checks the machinery in the main process: worker start-up would dominate it.
_workers = WORKERS


def _folder(smoke: bool) -> str:
    classes, per_class, test = (4, 3, 2) if smoke else (10, 16, 6)
    sizes = ((60, 80), (80, 60), (96, 128)) if smoke else PHOTO_SIZES
    root = os.path.join(tempfile.gettempdir(), f"liftplus_fast_bench_input_{classes}x{per_class}_{len(sizes)}")
    done = os.path.join(root, "DONE")
    if not os.path.exists(done):
        write_image_folder(root, [per_class] * classes, test_per_class=test, sizes=sizes, quality=90)
        atomic_write_bytes(done, b"")
    return root


def _epoch_folder(smoke: bool, root: str, formats) -> tuple:
    """The epoch case's folder: ``EPOCH_COPIES`` hard links of each training image of ``root``, its test images once.

    A real epoch is long enough that starting the workers is a small part of it; the copies
    make this one long enough without generating more images (each copy is decoded, cropped and
    cached on its own, like a distinct image).
    """
    copies = 1 if smoke else EPOCH_COPIES
    out = root.rstrip(os.sep) + f"_x{copies}"
    done = os.path.join(out, "DONE")
    if not os.path.exists(done):
        for split in ("train", "test"):
            for d, _, files in os.walk(os.path.join(root, split)):
                rel = os.path.relpath(d, root)
                os.makedirs(os.path.join(out, rel), exist_ok=True)
                for f in files:
                    for k in range(copies if split == "train" else 1):
                        dst = os.path.join(out, rel, f"{k}_{f}")
                        if not os.path.exists(dst):
                            try:
                                os.link(os.path.join(d, f), dst)
                            except OSError:
                                with open(os.path.join(d, f), "rb") as src:
                                    atomic_write(dst, lambda out, src=src: shutil.copyfileobj(src, out))
        atomic_write_bytes(done, b"")
    return out, {fmt: _cache(out, fmt) for fmt in formats}


def _candidate(fmt: str) -> str:
    """The candidate name of a cache format: ``cached`` (jpeg, the default) or ``cached_<fmt>``."""
    return "cached" if fmt == "jpeg" else f"cached_{fmt}"


def _cache(root: str, fmt: str) -> str:
    cdir = os.path.join(root, f"cache_{fmt}")
    build_cache("imagefolder", root, cdir, cache_size=256, cache_format=fmt, num_workers=WORKERS, progress=False)
    return cdir


def _bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


class _Passes(torch.utils.data.Sampler):
    """``passes`` sequential passes over ``n`` indices."""

    def __init__(self, n: int, passes: int):
        self.n, self.passes = n, passes

    def __iter__(self):
        return (i for _ in range(self.passes) for i in range(self.n))

    def __len__(self) -> int:
        return self.n * self.passes


def _loader(dataset, cfg, training: bool, passes: int):
    """A loader built once by the training's own front door (``build_loader``), with persistent
    workers when there are any; the cached sets' workers normalise into batches they reuse."""
    sampler = _Passes(len(dataset), passes)
    return build_loader(
        dataset, cfg, batch_size=BATCH, shuffle=training, sampler=sampler, persistent_workers=_workers > 0
    )


def _run_loader(loader):
    n = 0
    for images, _ in loader:
        assert images.dtype == torch.float32
        n += images.shape[0]
    return n


def _transform_case(name, split, cfg, root, caches, ref_transform, cached_transform, smoke):
    ref_set = build_dataset("imagefolder", root, split, ref_transform)
    sets = {"reference": ref_set}
    for fmt, cdir in caches.items():
        sets[_candidate(fmt)] = open_source_cache("imagefolder", root, split, cdir, transform=cached_transform)
    passes = 1 if smoke else PASSES[split]
    n = len(ref_set) * passes
    loaders = {cand: _loader(ds, cfg, split == "train", passes) for cand, ds in sets.items()}
    candidates = {cand: (lambda loader=loader: _run_loader(loader)) for cand, loader in loaders.items()}
    src_bytes = _bytes(os.path.join(root, split))
    notes = [
        f"{n} images per call ({passes} passes over {len(ref_set)}), batches of {BATCH}, {_workers} persistent "
        f"DataLoader workers each; source JPEGs {src_bytes / 2**20:.1f} MiB"
    ]
    for fmt, cdir in caches.items():
        b = os.path.getsize(os.path.join(cdir, f"{split}.data"))
        notes.append(f"{fmt} cache {b / 2**20:.1f} MiB ({b / src_bytes:.2f}x the source bytes)")
    return common.Case(
        name=f"{name} res={cfg.resolution} n={n}",
        params={"images": n, "workers": _workers, "batch": BATCH, "passes": passes},
        candidates=candidates,
        notes=notes,
        measure_memory=False,
        items=n,
        repeats=3,
    )


def _epoch_case(root, caches, smoke):
    kwargs = dict(
        dataset="imagefolder",
        root=root,
        backbone="tiny_vit",
        pretrained=None,
        resolution=32,
        batch_size=EPOCH_BATCH,
        num_epochs=1,
        num_workers=_workers,
        progress=False,
        output_dir=None,
        classifier_init="semantic",
        # As in the demo: the tiny model gains nothing from bf16, whose conversions would cost
        # more than its GEMMs and make the epoch less data-bound (both candidates alike).
        prec_train="fp32",
        prec_test="fp32",
    )
    timings: dict = {}

    def run(name, **extra):
        def call():
            r = fast_train(**kwargs, **extra)
            timings.setdefault(name, []).append(r.timings)
            return r

        return call

    def report():
        import statistics

        train_s = {c: statistics.median(t["train_s"] for t in ts) for c, ts in timings.items()}
        ratios = {c: train_s["reference"] / t for c, t in train_s.items() if c != "reference"}
        return {
            "train_epoch_s": train_s,
            "train_epoch_speedup": ratios,
            "notes": [
                "training epoch alone: reference "
                + f"{train_s['reference']:.2f} s, "
                + ", ".join(f"{c} {train_s[c]:.2f} s ({r:.2f}x)" for c, r in ratios.items())
            ],
        }

    candidates = {"reference": run("reference")}
    for fmt, cdir in caches.items():
        candidates[_candidate(fmt)] = run(_candidate(fmt), data_cache=cdir)
    return common.Case(
        name="tiny_vit epoch + test (fast_train)",
        params={"workers": _workers, "batch": EPOCH_BATCH},
        candidates=candidates,
        notes=[
            "one fast_train call: setup, one training epoch, evaluation (fp32, 32 px); "
            f"{EPOCH_COPIES} copies of each training image, batches of {EPOCH_BATCH}"
        ],
        measure_memory=False,
        repeats=1 if smoke else 3,
        report=report,
    )


def cases(smoke: bool):
    """Train (MDA), test and TTE transforms, reference vs cached, and one tiny_vit epoch."""
    import logging

    global _workers
    _workers = 0 if smoke else WORKERS
    logging.getLogger("liftplus_fast").setLevel(logging.WARNING)
    root = _folder(smoke)
    caches = {"jpeg": _cache(root, "jpeg")}
    if not smoke:
        caches["raw"] = _cache(root, "raw")
    res = 224
    cfg = make_config("lift+", {"resolution": res, "num_epochs": 5, "num_workers": _workers})
    tte_cfg = make_config("lift+", {"resolution": res, "tte": True, "num_workers": _workers})
    out = [
        _transform_case(
            "train (MDA)",
            "train",
            cfg,
            root,
            caches,
            build_train_transform(cfg),
            build_cached_train_transform(cfg),
            smoke,
        ),
        _transform_case(
            "test", "test", cfg, root, caches, build_test_transform(cfg), build_cached_test_transform(cfg), smoke
        ),
        _transform_case(
            "test TTE (5 crops)",
            "test",
            tte_cfg,
            root,
            caches,
            build_test_transform(tte_cfg),
            build_cached_test_transform(tte_cfg),
            smoke,
        ),
        _epoch_case(*_epoch_folder(smoke, root, caches), smoke),
    ]
    return out


def main(argv=None):
    import argparse

    import run as runner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rc = runner.main((["--smoke"] if args.smoke else []) + ["--only", "input_pipeline", "--out", args.out])
    print(f"input pipeline benchmark: {time.perf_counter() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
