"""``liftplus-fast``: the command line, mirroring the published ``main.py``.

liftplus-fast train -d cifar100_ir100 -b clip_vit_b16 -m lift+ [key value ...]
liftplus-fast test  -d cifar100_ir100 -b clip_vit_b16 -m lift+ model_dir output/run tte True
liftplus-fast cache -d imagefolder --root R [split_dir S] [cache_dir C] [cache_size 256] [cache_format auto|jpeg|raw]
liftplus-fast demo                       # offline, embedded default, < 3 minutes on 2 cores
liftplus-fast info                       # what was built, where each op dispatches
torchrun --nproc_per_node=N -m liftplus_fast train ...   # data-parallel
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from ._info import backend_info
from .config import METHODS, LiftConfig
from .data.cache_build import build_cache
from .data.cache_store import CacheOptions
from .demo import run_demo
from .distributed import is_main_process
from .errors import LiftPlusError
from .evaluate import format_accuracy
from .options import describe
from .train import build_run_config, fast_train

BACKBONE_HELP = (
    "backbone config name (clip_vit_b16, clip_vit_l14@336px, clip_rn50, in21k_vit_b16, in1k_rn50, "
    "...), open_clip or timm model name, or tiny_vit"
)


def _output_dir(args, opts: List[str], suffix: str = "") -> str:
    if args.output_dir:
        return args.output_dir
    name = "_".join([args.data, args.backbone, args.method]) + "".join("_" + o for o in opts) + suffix
    return os.path.join("output", name.replace("/", "-"))


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-d",
        "--data",
        required=True,
        help="data set name (cifar100_ir100, imagenet_lt, places_lt, inat2018, digits_lt, ...)",
    )
    p.add_argument("-b", "--backbone", default=LiftConfig.backbone, help=BACKBONE_HELP)
    p.add_argument("-m", "--method", default=LiftConfig.method, help=f"method ({', '.join(METHODS)})")
    p.add_argument("--root", default=None, help=f"data root (default {LiftConfig.root})")
    p.add_argument(
        "--pretrained", default=None, help="open_clip tag or local checkpoint path (default: openai for CLIP backbones)"
    )
    p.add_argument(
        "--output-dir", default=None, help="output folder (default output/<data>_<backbone>_<method>_<opts>)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run an existing output folder holds (otherwise refused)"
    )
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, help="published-style 'key value' overrides, e.g. num_epochs 15 tte True"
    )


def _pretrained_default(args) -> Optional[str]:
    if args.pretrained is not None:
        return None if args.pretrained.lower() == "none" else args.pretrained
    if args.backbone.startswith("clip_"):
        return "openai"
    # The published ImageNet backbones load timm's pretrained weights (pretrained=True there).
    return "default" if args.backbone.startswith(("in21k_", "in1k_")) else None


def resolve_command(args, test_only: bool = False) -> LiftConfig:
    """The :class:`~liftplus_fast.config.LiftConfig` a ``train``/``test`` command runs with
    (presets, published option names, output folder), without running anything: every argument
    of the command is resolved here."""
    opts = list(args.opts)
    overrides = {"test_only": True} if test_only else {}
    if args.root is not None:
        overrides["root"] = args.root
    return build_run_config(
        dataset=args.data,
        backbone=args.backbone,
        pretrained=_pretrained_default(args),
        method=args.method,
        output_dir=_output_dir(args, opts),
        opts=opts,
        **overrides,
    )


def cmd_train(args, test_only: bool = False) -> int:
    cfg = resolve_command(args, test_only)
    result = fast_train(
        config=cfg, progress=not args.no_progress, resume=getattr(args, "resume", False), overwrite=args.overwrite
    )
    if not is_main_process():
        return 0  # under torchrun, rank 0 reports
    m = {k: format_accuracy(v) for k, v in result.metrics.items() if k != "per_class"}
    print(f"* overall accuracy: {m['overall']}")
    print(f"* mean class accuracy: {m['mean']}")
    print(f"* many: {m['many']}  med: {m['med']}  few: {m['few']}")
    print(f"outputs in {result.output_dir}")
    return 0


def cmd_cache(args) -> int:
    options = CacheOptions.from_pairs(list(args.opts))
    root = args.root or LiftConfig.root
    cache_dir = options.folder(root)
    summary = build_cache(args.data, root, options=options, progress=not args.no_progress)
    first = next(iter(summary.values()))
    print(f"format {first['cache_format']}: {first['format_reason']}")
    for split, s in summary.items():
        ratio = s["data_bytes"] / max(s["source_bytes"], 1)
        print(
            f"{split}: {s['images']} images, {s['skipped']} skipped, {s['data_bytes'] / 2**20:.1f} MiB "
            f"({ratio:.2f}x the source files' {s['source_bytes'] / 2**20:.1f} MiB), {s['seconds']:.1f} s"
        )
        if s["skipped"]:
            print(f"  skipped files are listed in {os.path.join(cache_dir, split + '.skipped.txt')}")
    print(f"cache in {cache_dir}; train from it with: data_cache {cache_dir}")
    return 0


def cmd_demo(args) -> int:
    run_demo(
        output_dir=args.output_dir or os.path.join("output", "demo"), epochs=args.epochs, progress=not args.no_progress
    )
    return 0


def cmd_info(_args) -> int:
    print(json.dumps(backend_info(), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liftplus-fast", description="Fast LIFT+ for long-tailed recognition")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train and evaluate")
    _add_run_args(p_train)
    p_train.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    p_test = sub.add_parser("test", help="evaluate a trained tuner (give the published option 'model_dir PATH')")
    _add_run_args(p_test)
    p_cache = sub.add_parser("cache", help="decode every image once into a memory-mappable cache (data_cache C)")
    p_cache.add_argument(
        "-d",
        "--data",
        required=True,
        help="image-file data set (imagefolder, listfile, imagenet_lt, places_lt, inat2018)",
    )
    p_cache.add_argument("--root", default=None, help=f"data root (default {LiftConfig.root})")
    p_cache.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_cache.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="'key value' options: " + ", ".join(f"{o.name} (default {o.default})" for o in describe(CacheOptions)),
    )
    p_demo = sub.add_parser("demo", help="offline demo on the embedded long-tailed digits")
    p_demo.add_argument("--output-dir", default=None)
    p_demo.add_argument("--epochs", type=int, default=None, help="training epochs per run")
    p_demo.add_argument("--no-progress", action="store_true")
    sub.add_parser("info", help="native build and op dispatch")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``liftplus-fast`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "test":
            return cmd_train(args, test_only=True)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "cache":
            return cmd_cache(args)
        return cmd_info(args)
    except (LiftPlusError, OSError) as exc:
        # One clear sentence for what the package raises on purpose (bad input, a failed write)
        # and for what the environment refused (OSError: a full disk, a missing permission); any
        # other failure (a kernel bug, an assertion) is the package's and keeps its traceback.
        if os.environ.get("LIFTPLUS_FAST_DEBUG") == "1":
            raise
        print(f"liftplus-fast: error: {error_sentence(exc)}", file=sys.stderr)
        return 2


def error_sentence(exc: BaseException) -> str:
    """The one line a user needs from ``exc``.

    An error raised in a DataLoader worker arrives wrapped in the worker's whole traceback
    ("Caught X in DataLoader worker process 0. Original Traceback ..."): its last line, the
    original error, is what is reported.
    """
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        name, sep, message = last.partition(": ")
        return message if sep else last
    return text


if __name__ == "__main__":
    sys.exit(main())
