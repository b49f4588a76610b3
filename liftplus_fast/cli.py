"""``liftplus-fast``: the command line, mirroring the published ``main.py``.

liftplus-fast train -d cifar100_ir100 -b clip_vit_b16 -m lift+ [key value ...] [--flags]
liftplus-fast test  -d cifar100_ir100 -b clip_vit_b16 -m lift+ model_dir output/run tte True
liftplus-fast predict --model-dir output/run --images photos/ --output preds.csv
liftplus-fast options                    # every key value option: type, default, meaning
liftplus-fast cache -d imagefolder --root R [split_dir S] [cache_dir C] [cache_size 256] [cache_format auto|jpeg|raw]
liftplus-fast demo                       # offline, embedded default, < 3 minutes on 2 cores
liftplus-fast info                       # what was built, where each op dispatches
torchrun --nproc_per_node=N -m liftplus_fast train ...   # data-parallel
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import List, Optional

from ._info import backend_info
from .config import METHODS, LiftConfig
from .config_files import config_source
from .data.cache_build import build_cache
from .data.cache_store import CacheOptions
from .demo import run_demo
from .distributed import is_main_process
from .errors import LiftPlusError, RunStoppedError, UserInputError
from .evaluate import format_accuracy
from .ops._native import check_cpu_capability_setting
from .option_listing import options_markdown, options_text
from .options import describe, key_value_pairs, parse_value
from .predict import PredictOptions, predict
from .run_folder import model_run_folder, new_test_folder, own_model_dir
from .stop_signals import handle_stop_signals, requested, signal_name
from .train import build_run_config, fast_train

BACKBONE_HELP = (
    "backbone: a published name (clip_vit_b16, clip_vit_l14@336px, clip_rn50, in21k_vit_b16, in1k_rn50, ...), "
    "an open_clip or timm model name, tiny_vit, or a backbone config file (.yaml)"
)
EXAMPLES = """examples:
  liftplus-fast train -d imagenet_lt -b clip_vit_b16 -m lift+ --root /data/ImageNet
  liftplus-fast train -d listfile --root /data/images -m lift+ split_dir /data/splits num_epochs 10 --no-progress
  liftplus-fast train -d imagenet_lt -b clip_vit_b16 -m my_method.yaml --root /data/ImageNet
  liftplus-fast train --config-dir my_configs -d imagenet_lt -b clip_vit_b16 -m my_method
  liftplus-fast test -d imagenet_lt -b clip_vit_b16 -m lift+ model_dir output/imagenet_lt_clip_vit_b16_lift+ tte True
  liftplus-fast predict --model-dir output/imagenet_lt_clip_vit_b16_lift+ --images photos/ --output preds.csv

'key value' options follow the published names and meanings; `liftplus-fast options` lists every
one with its type, default and meaning (also in docs/options.md). Flags may come anywhere.
"""


class _CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that takes flags anywhere on a command with ``key value`` options
    (``... num_epochs 1 --no-progress``): they are moved before the options, where argparse
    looks for them. A word in a value's place is a value, even when it starts with ``-``."""

    def parse_known_args(self, args=None, namespace=None):
        if args is not None and any(a.dest == "opts" for a in self._actions):
            args = _flags_first(list(args), self._option_string_actions)
        return super().parse_known_args(args, namespace)


def _flags_first(words: List[str], actions) -> List[str]:
    flags, pairs, i = [], [], 0
    while i < len(words):
        word = words[i]
        i += 1
        if word.startswith("-") and len(word) > 1 and len(pairs) % 2 == 0:  # a flag, not a value
            flags.append(word)
            action = actions.get(word.split("=", 1)[0])
            if action is not None and action.nargs != 0 and "=" not in word and i < len(words):
                flags.append(words[i])  # the flag's own value
                i += 1
        else:
            pairs.append(word)
    return flags + pairs


def _pretrained_default(given: Optional[str], backbone: str) -> Optional[str]:
    if given is not None:
        return None if given.lower() == "none" else given
    name = str(backbone).lower()
    if name.startswith("clip"):
        return "openai"
    # The published ImageNet backbones load timm's pretrained weights (pretrained=True there).
    return "default" if name.startswith(("in21k", "in1k")) else None


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-d",
        "--data",
        required=True,
        help="data set (cifar100_ir100, imagenet_lt, places_lt, inat2018, listfile, imagefolder, digits_lt, ...) "
        "or a data config file (.yaml)",
    )
    p.add_argument("-b", "--backbone", default=LiftConfig.backbone, help=BACKBONE_HELP)
    p.add_argument(
        "-m",
        "--method",
        default=LiftConfig.method,
        help=f"method ({', '.join(METHODS)}) or a method config file in the published format (.yaml)",
    )
    p.add_argument(
        "--config-dir",
        default=None,
        help="a folder laid out as the published configs/: names given to -d/-b/-m are looked up as "
        "DIR/{data,backbone,method}/NAME.yaml first",
    )
    p.add_argument("--root", default=None, help=f"data root (default: the data config's, else {LiftConfig.root})")
    p.add_argument(
        "--pretrained", default=None, help="open_clip tag or local checkpoint path (default: openai for CLIP backbones)"
    )
    p.add_argument(
        "--output-dir",
        default=None,
        help="output folder, as written (default output/<data>_<backbone>_<method>_<opts>; the option "
        "output_dir X means output/X, as published)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run an existing output folder holds (otherwise refused)"
    )
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="published 'key value' options, e.g. num_epochs 15 tte True (liftplus-fast options lists them)",
    )


def resolve_command(args, test_only: bool = False) -> LiftConfig:
    """The :class:`~liftplus_fast.config.LiftConfig` a ``train``/``test`` command runs with, without
    running anything: every argument of the command is resolved here.

    ``-d``/``-b``/``-m`` are merged as the published ``main.py`` merges its config files (data,
    backbone, method, then the ``key value`` options). The output folder is ``--output-dir`` as
    written, ``output/X`` for the option ``output_dir X`` (the published meaning), else
    ``output/<data>_<backbone>_<method>_<opts>``. A test reads ``model_dir`` (default: the
    published rule, :func:`~liftplus_fast.run_folder.own_model_dir`) and writes, unless told where,
    into a new ``test-<date>-<time>`` folder of that run, never over the run's own files.
    """
    opts = list(args.opts)
    pairs = key_value_pairs(opts)
    config_dir = getattr(args, "config_dir", None)
    data, backbone, method = (
        config_source(kind, name, config_dir)
        for kind, name in (("data", args.data), ("backbone", args.backbone), ("method", args.method))
    )
    named = next((v for k, v in reversed(pairs) if k == "backbone"), backbone.get("backbone", LiftConfig.backbone))
    cfg = build_run_config(
        dataset=data,
        root=args.root,
        backbone=backbone,
        pretrained=_pretrained_default(args.pretrained, named),
        method=method,
        opts=opts,
        **({"test_only": True} if test_only else {}),
    )
    given = cfg.output_dir is not None or args.output_dir is not None
    if cfg.output_dir is not None:
        if args.output_dir is not None:
            raise UserInputError(
                f"the output folder is given twice: --output-dir {args.output_dir} (that folder) and "
                f"the option output_dir {cfg.output_dir} (the folder output/{cfg.output_dir}); give one"
            )
        cfg.output_dir = os.path.join("output", cfg.output_dir)
    elif args.output_dir is not None:
        cfg.output_dir = args.output_dir
    else:
        name = "_".join(s.label for s in (data, backbone, method)) + "".join("_" + str(o) for o in opts)
        cfg.output_dir = os.path.join("output", name.replace("/", "-"))
    if cfg.test_only and not cfg.zero_shot:
        if cfg.model_dir is None:
            cfg.model_dir = own_model_dir(cfg.output_dir)
        if not given:
            cfg.output_dir = new_test_folder(model_run_folder(cfg.model_dir))
    return cfg


def cmd_train(args, test_only: bool = False) -> int:
    cfg = resolve_command(args, test_only)
    result = fast_train(
        config=cfg, progress=not args.no_progress, resume=getattr(args, "resume", False), overwrite=args.overwrite
    )
    if not is_main_process():
        return 0  # under torchrun, rank 0 reports
    m = {k: format_accuracy(v) for k, v in result.metrics.items() if k in ("overall", "mean", "many", "med", "few")}
    print(f"* overall accuracy: {m['overall']}")
    print(f"* mean class accuracy: {m['mean']}")
    print(f"* many: {m['many']}  med: {m['med']}  few: {m['few']}")
    print(f"outputs in {result.output_dir}")
    return 0


def cmd_predict(args) -> int:
    values = {o.name: getattr(args, o.name) for o in describe(PredictOptions) if getattr(args, o.name) is not None}
    summary = predict(
        args.model_dir,
        args.images,
        args.output,
        PredictOptions(**values),
        root=args.root,
        progress=not args.no_progress,
    )
    print(f"{summary.predicted} images predicted; top classes in {summary.output}")
    if summary.skipped:
        print(f"{len(summary.skipped)} images skipped (listed with the reason in {summary.skipped_file}):")
        for path, why in summary.skipped[:10]:
            print(f"  {why}" if path in why else f"  {path}: {why}")
    return 0


def cmd_options(args) -> int:
    print(options_markdown() if args.markdown else options_text(), end="")
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
            f"({ratio:.2f}x the source files' {s['source_bytes'] / 2**20:.1f} MiB), {s['seconds']:.1f} s, "
            f"{s['decoded']} decoded"
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


def _add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", required=True, help="a training run's folder (its tuner/) or a tuner folder")
    p.add_argument("--images", required=True, help="a folder of images (searched recursively) or a list file")
    p.add_argument("--output", default="predictions.csv", help="the CSV written (default predictions.csv)")
    p.add_argument("--root", default=None, help="folder a list file's relative paths start from (default: its own)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for o in describe(PredictOptions):
        flag = "--" + o.name.replace("_", "-")
        if o.type == "bool":
            p.add_argument(flag, action="store_true", default=None, help=o.help)
        else:
            p.add_argument(flag, type=parse_value, default=None, help=f"{o.help} (default {o.default})")


def build_parser() -> argparse.ArgumentParser:
    parser = _CommandParser(
        prog="liftplus-fast",
        description="Fast LIFT+ for long-tailed recognition",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run_help = dict(epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p_train = sub.add_parser("train", help="train and evaluate", **run_help)
    _add_run_args(p_train)
    p_train.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    p_test = sub.add_parser(
        "test",
        help="evaluate a trained tuner (model_dir RUN) into RUN/test-<date>-<time>/; the run's files stay as they are",
        **run_help,
    )
    _add_run_args(p_test)
    p_predict = sub.add_parser("predict", help="top-k classes, with names and probabilities, of new images")
    _add_predict_args(p_predict)
    p_options = sub.add_parser("options", help="every option: type, default, meaning (docs/options.md)")
    p_options.add_argument("--markdown", action="store_true", help="as docs/options.md (Markdown tables)")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        check_cpu_capability_setting()
        with handle_stop_signals():  # still handled while the stop is reported
            try:
                return _run_command(args)
            except (RunStoppedError, KeyboardInterrupt) as exc:
                return _report_stop(exc, argv, args.command)
    except (LiftPlusError, OSError) as exc:
        # One clear sentence for what the package raises on purpose (bad input, a failed write)
        # and for what the environment refused (OSError: a full disk, a missing permission); any
        # other failure (a kernel bug, an assertion) is the package's and keeps its traceback.
        if os.environ.get("LIFTPLUS_FAST_DEBUG") == "1":
            raise
        print(f"liftplus-fast: error: {error_sentence(exc)}", file=sys.stderr)
        return 2


def _run_command(args) -> int:
    if args.command in ("train", "test"):
        return cmd_train(args, test_only=args.command == "test")
    if args.command == "predict":
        return cmd_predict(args)
    if args.command == "options":
        return cmd_options(args)
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "cache":
        return cmd_cache(args)
    return cmd_info(args)


def _report_stop(exc: BaseException, argv: List[str], command: str) -> int:
    """One line for work a signal stopped (on rank 0), and the exit status 128 + the signal."""
    signum = exc.signum if isinstance(exc, RunStoppedError) else requested()
    if signum is None:
        raise exc
    if is_main_process():
        detail = exc.detail if isinstance(exc, RunStoppedError) else f"stopped by {signal_name(signum)}"
        hint = _continue_hint(argv, command) if getattr(exc, "hint", None) or command == "cache" else ""
        print(f"liftplus-fast: {detail}{hint}", file=sys.stderr)
    return 128 + signum


def _continue_hint(argv: List[str], command: str) -> str:
    """How to continue stopped work: the same command, resumed (a cache build resumes by itself)."""
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        return "; resume with the same torchrun command and --resume" if command == "train" else ""
    words = [a for a in argv if a != "--overwrite"]
    if command == "train" and "--resume" not in words:
        words.insert(1, "--resume")  # after the command: later words are its key value options
    line = " ".join(["liftplus-fast"] + [shlex.quote(w) for w in words])
    return f"; resume with: {line}" if command == "train" else f"; continue with: {line}"


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
