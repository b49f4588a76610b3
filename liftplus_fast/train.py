"""``fast_train``: one LIFT+ run, from its options to its metrics and output folder.

A run assembles its config (data, backbone and method presets or config files, then the options
given), joins the data-parallel group when ``torchrun`` launched it, checks the output folder,
opens its data, builds the model, initialises the classifier (or loads a trained tuner, or
resumes a checkpoint), trains (:mod:`liftplus_fast.train_loop`), evaluates
(:mod:`liftplus_fast.evaluate`) and writes its run folder (docs/run-folder.md): the resolved
config, ``run.json``, a log, the checkpoint and tuner, the metrics and per-class results.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .checkpoint import CHECKPOINT_NAME
from .config import (
    ConfigSource,
    LiftConfig,
    backbone_preset,
    merge_config,
    options_source,
    preset_source,
    validate,
)
from .config_files import config_source
from .data.loaders import RunDatasets, build_loader
from .distributed import (
    DistContext,
    explain_lost_process,
    explain_timeout,
    init_distributed,
    is_main_process,
    shutdown_distributed,
)
from .errors import RunStoppedError, UserInputError
from .evaluate import evaluate, format_accuracy
from .files import atomic_write_json
from .model import backbone_input_config
from .ops import choices
from .ops._native import check_cpu_capability_setting, cpu_capability_line
from .ops.gemm import cpu_bf16_gemm_path
from .options import key_value_pairs
from .result_files import write_results
from .run_folder import (
    clear_previous_run,
    lock_folders,
    place_test,
    restarted_run,
)
from .run_lock import RunLock
from .run_record import run_record
from .run_setup import build_model, open_data, set_up_tuner
from .runtime import attach_log, deterministic_mode, resolve_device, seed_everything
from .stop_signals import handle_stop_signals, requested, safe_points, stop_error
from .train_loop import kept_checkpoint, train_epochs
from .tuner_source import TUNER_FOLDER

__all__ = ["TrainResult", "build_run_config", "fast_train"]

logger = logging.getLogger("liftplus_fast")
RUN_RECORD = "run.json"


@dataclass
class TrainResult:
    """What :func:`fast_train` returns."""

    metrics: Dict[str, Any]
    config: LiftConfig
    output_dir: Optional[str]
    timings: Dict[str, float]
    tuner: torch.nn.Module
    model: torch.nn.Module = field(repr=False)
    history: List[Dict[str, float]] = field(default_factory=list)
    cls_num_list: List[int] = field(default_factory=list)


def _build_config(dataset, root, backbone, pretrained, method, output_dir, config, opts, overrides) -> LiftConfig:
    if config is not None:
        if not isinstance(config, LiftConfig):
            raise TypeError(f"config must be a LiftConfig; got {type(config).__name__}")
        # A copy: the run fills in options (num_classes) that must not leak into the caller's.
        cfg = copy.deepcopy(config)
        validate(cfg)
        return cfg
    return build_run_config(dataset, root, backbone, pretrained, method, output_dir, opts, **overrides)


Named = Union[str, ConfigSource]


def build_run_config(
    dataset: Named = LiftConfig.dataset,
    root: Optional[str] = None,
    backbone: Named = LiftConfig.backbone,
    pretrained: Optional[str] = LiftConfig.pretrained,
    method: Named = LiftConfig.method,
    output_dir: Optional[str] = None,
    opts: Sequence[str] = (),
    *,
    config_dir: Optional[str] = None,
    **overrides,
) -> LiftConfig:
    """The config :func:`fast_train` runs with for these arguments (see there), built in the
    published merge order: data, backbone and method (each a known name, a published-format
    config file, or a :class:`~liftplus_fast.config.ConfigSource`; see
    :mod:`liftplus_fast.config_files`), then the keyword options, then ``opts``. A backbone
    without a published preset brings its own input size (and a timm model its mean/std)."""
    pairs = key_value_pairs(opts)
    if any(k == "method" for k, _ in pairs):
        raise UserInputError("the method is chosen with -m (method=...), not as the option 'method'")
    sources = [
        s if isinstance(s, ConfigSource) else config_source(kind, s, config_dir)
        for kind, s in (("data", dataset), ("backbone", backbone), ("method", method))
    ]
    named = next((v for k, v in reversed(pairs) if k == "backbone"), sources[1].get("backbone", LiftConfig.backbone))
    if sources[1].path is None and named != sources[1].get("backbone"):
        sources[1] = preset_source("backbone", named)  # the backbone named last brings its preset
    if not backbone_preset(named):
        # Not a published name: the input size (and a timm model's mean/std) follow the backbone
        # unless the backbone's config file or a later source sets them.
        found = options_source(named, backbone_input_config(named).items())
        sources[1] = ConfigSource(sources[1].label, found.settings + sources[1].settings, sources[1].path)
    keywords = {"pretrained": pretrained, **overrides}
    # None: what the config files say (root: else ./data; output_dir: else no files).
    keywords.update({k: v for k, v in (("root", root), ("output_dir", output_dir)) if v is not None})
    return merge_config([*sources, options_source("keyword options", keywords.items()), options_source("opts", pairs)])


def fast_train(
    dataset: str = LiftConfig.dataset,
    root: Optional[str] = None,
    backbone: str = LiftConfig.backbone,
    pretrained: Optional[str] = LiftConfig.pretrained,
    method: str = LiftConfig.method,
    output_dir: Optional[str] = None,
    *,
    config: Optional[LiftConfig] = None,
    config_dir: Optional[str] = None,
    opts: Sequence[str] = (),
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    **overrides,
) -> TrainResult:
    """Train (unless zero-shot or test-only) and evaluate one LIFT+ run.

    Args:
        dataset: a name from :data:`liftplus_fast.data.DATASETS` (e.g. ``cifar100_ir100``), or
            a published-format data config file (``.yaml``).
        root: data root (images, or where CIFAR-100 is downloaded); ``None``: the data config
            file's, else ``./data``.
        backbone: ``clip_vit_b16`` style config name, an open_clip or timm model name,
            ``tiny_vit``, or a backbone config file.
        pretrained: open_clip tag (``"openai"``), a local checkpoint path, or ``None``.
        method: ``lift+`` (default) or another method of :data:`liftplus_fast.config.METHODS`,
            or a method config file.
        output_dir: where the run's files go (``None``: nothing written); see docs/run-folder.md.
        config: a ready :class:`LiftConfig` (then the arguments above are ignored).
        config_dir: a folder laid out as the published ``configs/``: names of ``dataset``,
            ``backbone`` and ``method`` are looked up there first (``config_dir/method/NAME.yaml``).
        opts: published-style ``key value`` overrides, e.g. ``["num_epochs", "15", "tte", "True"]``.
        progress: tqdm bars.
        resume: continue from ``output_dir``'s checkpoint when it holds a training state; the
            options that define the schedule must be those the run was started with.
        overwrite: replace the run an existing ``output_dir`` holds (without it, or ``resume``,
            such a folder is refused before anything runs).
        **overrides: any :class:`LiftConfig` option (``num_epochs=1``, ``batch_size=32``, ...).

    Returns:
        :class:`TrainResult` with ``metrics`` (``overall``, ``mean``, ``many``, ``med``, ``few``,
        ``per_class``), ``timings`` (seconds), ``tuner`` and the model.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1), or inside an initialised process group, the
    run is data-parallel: ``batch_size`` is the global batch, every process returns the same
    tuner and metrics, and only rank 0 writes ``output_dir``.
    """
    if config_dir is not None:
        overrides["config_dir"] = config_dir
    check_cpu_capability_setting()
    cfg = _build_config(dataset, root, backbone, pretrained, method, output_dir, config, opts, overrides)
    with handle_stop_signals():
        try:
            return _train_in_folder(cfg, progress=progress, resume=resume, overwrite=overwrite)
        except KeyboardInterrupt:
            if requested() is None:
                raise
            raise _stopped(stop_error("outside the training and evaluation loops"), cfg) from None
        except RunStoppedError as exc:
            raise _stopped(exc, cfg) from None


def _stopped(exc: RunStoppedError, cfg: LiftConfig) -> RunStoppedError:
    """``exc`` completed with what the run keeps and, when it can be resumed, how."""
    if not is_main_process():
        return exc
    path = os.path.join(cfg.output_dir, CHECKPOINT_NAME) if cfg.output_dir else None
    if cfg.test_only:
        return RunStoppedError(exc.detail, exc.signum)
    kept = kept_checkpoint(path, DistContext())
    hint = "continue with resume=True (--resume on the command line)" if path and os.path.exists(path) else None
    return RunStoppedError(f"{exc.detail}; {kept}", exc.signum, hint)


def _train_in_folder(cfg: LiftConfig, *, progress: bool, resume: bool, overwrite: bool) -> TrainResult:
    """:func:`fast_train` once its config is built: the process group, the locked output folder,
    the log, then the run."""
    place_test(cfg)
    ctx = init_distributed(resolve_device(cfg.device), timeout=cfg.dist_timeout)
    locks: List[RunLock] = []
    try:
        if ctx.is_main:
            restarted = restarted_run(cfg.output_dir)
            if restarted:
                resume, overwrite = True, False
            locks = lock_folders(cfg, resume, overwrite)
        handler = attach_log(cfg.output_dir, ctx.is_main)
        if ctx.is_main and restarted:
            logger.info("torchrun job %s restarted: resuming the run in %s", restarted, cfg.output_dir)
    except BaseException:
        for lock in locks:
            lock.release()
        shutdown_distributed(ctx)
        raise
    try:
        with deterministic_mode(bool(cfg.deterministic)):
            return _run(cfg, ctx, progress=progress and ctx.is_main, resume=resume, overwrite=overwrite)
    except RuntimeError as exc:
        if not ctx.enabled:
            raise
        if requested() is not None:  # a collective broken by a process that stopped first
            raise stop_error("while the processes stopped together") from None
        explained = explain_timeout(exc, cfg.dist_timeout)
        explained = explain_lost_process(exc) if explained is exc else explained
        if explained is exc:
            raise
        checkpoint_path = os.path.join(cfg.output_dir, CHECKPOINT_NAME) if cfg.output_dir else None
        resumable = bool(checkpoint_path) and os.path.exists(checkpoint_path)
        resume = "; start the job again with --resume (resume=True in Python)" if resumable else ""
        raise type(explained)(f"{explained} ({kept_checkpoint(checkpoint_path, ctx)}{resume})") from None
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        for lock in locks:
            lock.release()
        shutdown_distributed(ctx)


def _precision_label(device: torch.device, precision: str) -> str:
    # On CPU every half precision runs as bf16, through fp32 GEMMs of bf16 values where those
    # are faster (ops/gemm.py): say so rather than echo the option.
    if device.type == "cuda" or precision == "fp32":
        return precision
    label = "bf16" if precision == "bf16" else f"bf16 (asked {precision}; half precision is bf16 on CPU)"
    path = cpu_bf16_gemm_path()
    if path["path"] == "fp32":
        label += f" [fp32 GEMMs of bf16 values; {path['why']}]"
    return label


def _start_run(cfg: LiftConfig, ctx: DistContext) -> torch.device:
    """Seed, pick this process's device, resolve a test-only run's tuner, and say what runs."""
    seed_everything(cfg.seed)
    device = ctx.device(resolve_device(cfg.device))
    if cfg.test_only and not cfg.zero_shot:
        logger.info("test_only: evaluating the tuner in %s; results in %s", cfg.model_dir, cfg.output_dir)
    if ctx.enabled and device.type == "cpu":
        ctx.agree_on_choices()  # one implementation of each op for every process (ops/choices.py)
    logger.info(
        "liftplus_fast: %s on %s, backbone %s, method %s, device %s, precision train %s / test %s",
        cfg.dataset,
        cfg.root,
        cfg.backbone,
        cfg.method,
        device,
        _precision_label(device, cfg.prec_train),
        _precision_label(device, cfg.prec_test),
    )
    if device.type == "cpu":
        logger.info("CPU kernels: %s", cpu_capability_line())
        for name, decided in choices.table().items():
            logger.info("CPU implementation of %s: %s (%s)", name, decided["option"], decided["why"])
    if ctx.enabled:
        logger.info("data-parallel over %d processes (%s)", ctx.world_size, torch.distributed.get_backend())
    return device


@contextlib.contextmanager
def _phase(timings: Dict[str, float], name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - t0


@dataclass
class _Run:
    """What one run has set up before it trains: the parts the training and test steps share."""

    cfg: LiftConfig
    ctx: DistContext
    device: torch.device
    data: RunDatasets
    cls_num_list: List[int]
    model: Any
    record: Any  # run.json for a status: functools.partial of run_record
    timings: Dict[str, float]
    t_start: float
    progress: bool

    @property
    def writes(self) -> bool:
        return bool(self.cfg.output_dir) and self.ctx.is_main


def _run(cfg: LiftConfig, ctx: DistContext, *, progress: bool, resume: bool, overwrite: bool = False) -> TrainResult:
    started = datetime.datetime.now().astimezone()
    timings: Dict[str, float] = {}
    t_start = time.perf_counter()
    device = _start_run(cfg, ctx)
    # Data first: its errors (missing files, bad names) are the cheapest to report.
    with _phase(timings, "data_s"):
        data, cls_num_list = open_data(cfg)
    with _phase(timings, "model_s"):
        model, facts = build_model(cfg, data, cls_num_list, device)
    checkpoint_path = os.path.join(cfg.output_dir, CHECKPOINT_NAME) if cfg.output_dir else None
    with _phase(timings, "tuner_setup_s"):
        start_epoch, state = set_up_tuner(
            model, cfg, data, checkpoint_path, resume=resume, device=device, ctx=ctx, progress=progress
        )
    timings["setup_s"] = time.perf_counter() - t_start
    data_facts = {"dataset": cfg.dataset, "classes": cfg.num_classes, "train_images": sum(cls_num_list)}
    data_facts["test_images"] = len(data.test)
    record = functools.partial(
        run_record, started=started, device=device, model_facts=facts, data=data_facts, world_size=ctx.world_size
    )
    run = _Run(cfg, ctx, device, data, cls_num_list, model, record, timings, t_start, progress)
    if run.writes:
        _begin_outputs(cfg, overwrite, record(status="running", timings=timings))
    try:
        history = _train(run, start_epoch, state, checkpoint_path)
        return _test(run, history)
    except BaseException as exc:
        if run.writes:  # run.json says why the run stopped
            stopped = isinstance(exc, (RunStoppedError, KeyboardInterrupt))
            status = "stopped" if stopped else "failed"
            ended = record(status=status, timings=timings, error=f"{type(exc).__name__}: {exc}")
            atomic_write_json(os.path.join(cfg.output_dir, RUN_RECORD), ended)
        raise


def _train(run: _Run, start_epoch: int, state, checkpoint_path: Optional[str]) -> List[Dict[str, float]]:
    cfg = run.cfg
    if cfg.zero_shot or cfg.test_only:
        return []
    with _phase(run.timings, "train_s"), safe_points():
        history = train_epochs(
            run.model,
            cfg,
            run.data.train,
            device=run.device,
            cls_num_list=run.cls_num_list,
            ctx=run.ctx,
            start_epoch=start_epoch,
            state=state,
            checkpoint_path=checkpoint_path if run.writes else None,
            progress=run.progress,
        )
    if history:
        run.timings["train_images_per_s"] = sum(h["images"] for h in history) / max(run.timings["train_s"], 1e-9)
    if run.writes:  # the safetensors form of the trained tuner, beside the checkpoint
        run.model.save_tuner(os.path.join(cfg.output_dir, TUNER_FOLDER))
    return history


def _test(run: _Run, history: List[Dict[str, float]]) -> TrainResult:
    cfg, timings = run.cfg, run.timings
    with _phase(timings, "test_s"):
        test_loader = build_loader(run.ctx.shard(run.data.test), cfg, batch_size=64, shuffle=False, device=run.device)
        metrics = evaluate(
            run.model,
            test_loader,
            run.cls_num_list,
            tte=cfg.tte,
            device=run.device,
            precision=cfg.prec_test,
            progress=run.progress,
            distributed=run.ctx.enabled,
            confusion=cfg.confusion_matrix,
        )
    timings["total_s"] = time.perf_counter() - run.t_start
    logger.info(
        "* overall %s  mean %s  many %s  med %s  few %s",
        *(format_accuracy(metrics[k]) for k in ("overall", "mean", "many", "med", "few")),
    )
    if run.writes:
        what = "test" if cfg.test_only else "zero-shot" if cfg.zero_shot else "trained"
        write_results(
            cfg.output_dir,
            metrics,
            classnames=run.data.train.classnames,
            cls_num_list=run.cls_num_list,
            label=cfg.method,
            title=f"{cfg.method} on {cfg.dataset} ({what})",
            timings=timings,
            history=history,
        )
        atomic_write_json(os.path.join(cfg.output_dir, RUN_RECORD), run.record(status="finished", timings=timings))
    return TrainResult(metrics, cfg, cfg.output_dir, timings, run.model.tuner, run.model, history, run.cls_num_list)


def _begin_outputs(cfg: LiftConfig, overwrite: bool, record: Dict[str, Any]) -> None:
    # Only now, with every check passed, does this run replace what the folder held, so its
    # config, checkpoint and metrics always come from one run.
    if overwrite:
        removed = clear_previous_run(cfg.output_dir)
        if removed:
            logger.info("overwrite: removed the previous run's %s", ", ".join(removed))
    atomic_write_json(os.path.join(cfg.output_dir, "config.json"), cfg.to_dict())
    atomic_write_json(os.path.join(cfg.output_dir, RUN_RECORD), record)
