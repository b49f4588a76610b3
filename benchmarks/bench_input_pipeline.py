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

In the command-line case ``cached`` is the cache of the default options (``cache_format auto``)
and ``cached_jpeg`` the JPEG one.

Images are generated locally (JPEG, quality 90, 375x500 to 1024x768 like ImageNet, Places and
iNaturalist photographs) and reused between runs. The transforms are measured in the steady
state of a long training run: each candidate's loader is built once with persistent workers
(same worker count and batch size for all), and one call passes every image of the split
through it ``PASSES`` times, so worker start-up is not timed for any candidate. Images/s and
bytes on disk are in the notes.

The last case goes through the command line as a user would: ``liftplus-fast cache`` builds
the caches (default options, then each stored format), and ``liftplus-fast train`` trains a
32-px ``tiny_vit`` (so the data is the bottleneck) for two epochs from the folder (the PIL
path) and from each cache, every run a fresh process; its figure is the training images/s the
run reports (worker start-up included, as every epoch of a real run pays it).

Standalone: ``python benchmarks/bench_input_pipeline.py [--smoke] [--filter CLI]`` (under 10
minutes in full; ``--filter CLI`` runs the command-line case alone).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import common  # noqa: E402

from liftplus_fast import make_config  # noqa: E402
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
# The command-line case: 8 copies of each training image (1280 in all), batches of 64, so a
# 32-px tiny_vit step costs less than decoding its images (data-bound by construction).
EPOCH_COPIES, EPOCH_BATCH, EPOCHS = 8, 64, 2
CLI_REPEATS = 5
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


def _epoch_folder(smoke: bool, root: str) -> str:
    """The command-line case's folder: ``EPOCH_COPIES`` hard links of each training image, the test images once.

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
    return out


def _cli(args) -> str:
    """``python -m liftplus_fast ARGS`` with this checkout's package; its output (stdout, then stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "liftplus_fast", *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"liftplus-fast {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def _cli_caches(folder: str, smoke: bool) -> tuple:
    """The caches of ``folder`` built by ``liftplus-fast cache``: the default options (``cached``)
    and, unless ``smoke``, each stored format; and the line saying which format the default chose."""
    formats = {"cached": []} if smoke else {"cached": [], "cached_jpeg": ["cache_format", "jpeg"]}
    if not smoke:
        formats["cached_raw"] = ["cache_format", "raw"]
    caches, chosen = {}, ""
    for cand, extra in formats.items():
        cdir = os.path.join(folder, f"cli_{cand}")
        args = ["cache", "-d", "imagefolder", "--root", folder, "--no-progress", "cache_dir", cdir]
        out = _cli(args + ["num_workers", str(WORKERS)] + extra)
        caches[cand] = cdir
        if cand == "cached":
            chosen = next((line for line in out.splitlines() if line.startswith("format ")), "")
    return caches, chosen


def _cpu_class() -> str:
    """The CPU's model and its widest vector/matrix units (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    units = [name for flag, name in _UNITS if flag in flags]
    return f"{model}, {os.cpu_count()} CPUs, " + (", ".join(units) or "no AVX2")


_UNITS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))


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


def _epoch_case(root, smoke):
    """Training through the command line: ``liftplus-fast train`` from the folder (the PIL path)
    and from the caches ``liftplus-fast cache`` built, each a fresh process; images/s of its
    training epochs (worker start-up included, as every epoch of a real run pays it)."""
    folder = _epoch_folder(smoke, root)
    caches, chosen = _cli_caches(folder, smoke)
    out_root = tempfile.mkdtemp(prefix="liftplus_fast_bench_cli_")
    epochs = 1 if smoke else EPOCHS
    rates: dict = {}
    threads: dict = {}

    def run(name, cdir):
        args = ["train", "-d", "imagefolder", "--root", folder, "-b", "tiny_vit", "--pretrained", "none"]
        args += ["--no-progress", "--overwrite", "--output-dir", os.path.join(out_root, name)]
        args += ["resolution", "32", "num_workers", str(_workers), "batch_size", str(EPOCH_BATCH)]
        # As in the demo: the tiny model gains nothing from bf16, whose conversions would cost
        # more than its GEMMs and make the run less data-bound (every candidate alike).
        args += ["num_epochs", str(epochs), "prec_train", "fp32", "prec_test", "fp32", "classifier_init", "semantic"]
        args += ["data_cache", cdir] if cdir else []

        def call():
            out = _cli(args)
            with open(os.path.join(out_root, name, "metrics.json")) as f:
                rates.setdefault(name, []).append(json.load(f)["timings"]["train_images_per_s"])
            line = next((ln for ln in out.splitlines() if "intra-op thread" in ln), "")
            threads.setdefault(name, []).append(line.split("training step: ")[-1])

        return call

    load = [os.getloadavg()[0]]

    def report():
        load.append(os.getloadavg()[0])
        shutil.rmtree(out_root, ignore_errors=True)  # the runs' folders: only their images/s are kept
        # The first run of each candidate is run.py's warm-up (the page cache, compiled code).
        rates.update({c: r[1:] for c, r in rates.items() if len(r) > 1})
        med = {c: statistics.median(r) for c, r in rates.items()}
        # Each repeat runs every candidate back to back: the ratio within a repeat, then the
        # median over repeats, is steadier than a ratio of medians on a machine whose load drifts.
        ref = rates["reference"]
        ratios = {c: statistics.median(v / r for v, r in zip(vs, ref)) for c, vs in rates.items() if c != "reference"}
        notes = [
            f"CPU: {_cpu_class()}; load average {load[0]:.1f} at the start, {load[-1]:.1f} at the end",
            f"default cache: {chosen}",
            "train images/s per run: " + "; ".join(f"{c} {', '.join(f'{v:.0f}' for v in r)}" for c, r in rates.items()),
            "median: " + ", ".join(f"{c} {v:.0f}" for c, v in med.items()),
            "vs reference (median of the ratios within each repeat): "
            + ", ".join(f"{c} {r:.2f}x" for c, r in ratios.items()),
        ]
        notes += [f"{c}: {t[-1]}" for c, t in threads.items() if t and t[-1]]
        return {"train_images_per_s": med, "train_speedup": ratios, "notes": notes}

    candidates = {"reference": run("reference", None)}
    candidates.update({cand: run(cand, cdir) for cand, cdir in caches.items()})
    n = sum(len(files) for _, _, files in os.walk(os.path.join(folder, "train")))
    return common.Case(
        name="CLI train, tiny_vit 32 px",
        params={"workers": _workers, "batch": EPOCH_BATCH, "epochs": epochs},
        candidates=candidates,
        notes=[
            f"liftplus-fast cache / train, each a fresh process; {epochs} epoch(s) of {n} training images, "
            f"batches of {EPOCH_BATCH}, {_workers} DataLoader workers",
            "ms: the whole command (start-up, setup, training, test); the figure is the training images/s",
        ],
        measure_memory=False,
        repeats=1 if smoke else CLI_REPEATS,
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
        _epoch_case(root, smoke),
    ]
    return out


def main(argv=None):
    import argparse

    import run as runner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--filter", nargs="*", help="cases whose name contains all of these (e.g. CLI)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    extra = (["--smoke"] if args.smoke else []) + (["--filter", *args.filter] if args.filter else [])
    rc = runner.main(extra + ["--only", "input_pipeline", "--out", args.out])
    print(f"input pipeline benchmark: {time.perf_counter() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
