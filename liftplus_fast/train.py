"""``fast_train``: the LIFT+ training and evaluation loop with the published optimiser recipe.

SGD (momentum 0.9, weight decay 5e-4, one multi-tensor update) over exactly the tuner's
parameters, cosine annealing stepped once per epoch, gradient accumulation, minimalist data
augmentation stepped per epoch, mixed precision owned by the model (``prec_train="amp"``: the
frozen backbone stored in fp16 with a gradient scaler on CUDA, in bf16 on CPU), then evaluation
with optional test-time ensembling. The output folder gets the
resolved config, a log, the metrics, a tuner-only checkpoint (written atomically after every
epoch, resumable) and a plot. Under ``torchrun`` the same loop runs data-parallel (see
:mod:`liftplus_fast.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler, Subset

from .checkpoint import CHECKPOINT_NAME, atomic_write_json, load_checkpoint, save_checkpoint
from .config import LiftConfig, backbone_preset, make_config, validate
from .data import (
    DownSampler,
    build_dataset,
    build_plain_transform,
    build_test_transform,
    build_train_transform,
    check_split,
    set_transform_epoch,
)
from .data.cache_build import open_source_cache
from .data.gpu_augment import GPUAugmentLoader, collate_encoded
from .data.uint8_transforms import (
    EpochTaggedSampler,
    build_cached_plain_transform,
    build_cached_test_transform,
    build_cached_train_transform,
    cached_batch_loader,
    view_of,
)
from .distributed import (
    DistContext,
    agree_on_choices,
    all_reduce_sum,
    average_gradients,
    broadcast_module,
    check_batch_split,
    explain_timeout,
    gather_objects,
    init_distributed,
    rank_device,
    rank_seed,
    shard,
    shutdown_distributed,
)
from .errors import UserInputError
from .evaluate import evaluate, format_accuracy
from .model import backbone_input_config, build_lift_model, check_resolution, load_backbone
from .ops import choices
from .ops.gemm import cpu_bf16_gemm_path
from .plotting import plot_per_class_accuracy
from .run_folder import check_resume, clear_previous_run, prepare_output_dir
from .train_log import TrainingLog

__all__ = [
    "DivergenceError",
    "TrainResult",
    "build_run_config",
    "deterministic_mode",
    "fast_train",
    "own_model_dir",
    "resolve_device",
    "seed_everything",
]

logger = logging.getLogger("liftplus_fast")


class DivergenceError(UserInputError, RuntimeError):
    """Training produced a non-finite loss or parameters; the last good checkpoint is kept."""


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


def seed_everything(seed: Optional[int]) -> None:
    """Seed Python, NumPy and torch (the published code's seeding)."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def own_model_dir(output_dir: str) -> str:
    """Where ``test_only`` finds the tuner when ``model_dir`` is not given: the run's own output
    folder, i.e. the training run's folder when the name carries the published
    ``_test_only_True`` suffix (``output/..._lift+_test_only_True_tte_True`` ->
    ``output/..._lift+``), else ``output_dir`` itself."""
    marker = "_test_only_True"
    return output_dir[: output_dir.index(marker)] if marker in output_dir else output_dir


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """``deterministic True`` as the published code sets it (deterministic algorithms, a fixed
    cuBLAS workspace, cuDNN deterministic without benchmarking), restored on exit.

    Unlike the published code an op without a deterministic implementation warns instead of
    failing the run (``warn_only``)."""
    if not enabled:
        yield
        return
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    if prev[2] is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        if prev[2] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[3], prev[4]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device={name!r} was requested but no CUDA device is available")
    return device


def _setup_logging(output_dir: Optional[str], is_main: bool = True) -> Optional[logging.Handler]:
    # Under torchrun only rank 0 reports; the other processes speak only of trouble.
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if not any(
        isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in logger.handlers
    ):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
        logger.propagate = False
    if output_dir is None or not is_main:
        return None
    os.makedirs(output_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(output_dir, "log.txt"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    return handler


def _loader(dataset, batch_size: int, cfg: LiftConfig, shuffle: bool, sampler=None, seed: int = 0, device=None):
    workers = max(0, min(cfg.num_workers, os.cpu_count() or 1))
    generator = torch.Generator().manual_seed(seed)
    cached = cfg.data_cache is not None
    on_device = cached and cfg.augment_on_device
    if cached and sampler is None:
        # The sampler DataLoader would build, so the shuffling and the workers' seeds match the
        # uncached path.
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    if cached and not on_device:
        # The workers build whole uint8 batches (dataset[list of indices]) from the same groups
        # of indices DataLoader(batch_size=...) would form, drawing the boxes in the same order;
        # the training sampler tags every index with its epoch for the MDA schedule.
        batches = EpochTaggedSampler(sampler, batch_size) if shuffle else BatchSampler(sampler, batch_size, False)
        # On the CPU the workers normalise, in parallel with the training step; for a GPU they
        # send uint8 batches (4x fewer bytes), normalised there.
        return cached_batch_loader(dataset, batches, workers, cfg.mean, cfg.std, device, generator)
    if cached and shuffle:
        sampler = EpochTaggedSampler(sampler)
    loader = DataLoader(
        view_of(dataset, lambda d: d.encoded()) if on_device else dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        persistent_workers=False,
        collate_fn=collate_encoded if on_device else None,
    )
    if not on_device:
        return loader
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return GPUAugmentLoader(
        loader, base.transform, base.cache_format, cfg.mean, cfg.std, device if device is not None else "cpu"
    )


def _datasets(cfg: LiftConfig):
    """Training and test sets, and a maker of the classifier-initialisation set."""
    if cfg.data_cache is None:

        def init_set():
            return build_dataset(cfg.dataset, cfg.root, "train", build_plain_transform(cfg), cfg.split_dir)

        return (
            build_dataset(cfg.dataset, cfg.root, "train", build_train_transform(cfg), cfg.split_dir),
            build_dataset(cfg.dataset, cfg.root, "test", build_test_transform(cfg), cfg.split_dir),
            init_set,
        )

    def cached(split, transform):
        return open_source_cache(
            cfg.dataset, cfg.root, split, cfg.data_cache, cfg.split_dir, transform, allow_skipped=cfg.allow_skipped
        )

    train_set = cached("train", build_cached_train_transform(cfg))
    if train_set.skipped:
        logger.warning(
            "data_cache: training without %d image(s) the cache build could not decode (allow_skipped True)",
            len(train_set.skipped),
        )
    return (
        train_set,
        cached("test", build_cached_test_transform(cfg)),
        lambda: cached("train", build_cached_plain_transform(cfg)),
    )


@torch.no_grad()
def _features(model, loader, device, progress: bool):
    from .progress import progress_bar as tqdm  # tqdm on a terminal, plain lines in a log file

    feats, labels = [], []
    for images, y in tqdm(loader, desc="Features for classifier init", disable=not progress, leave=False):
        feats.append(model.encode_image(images.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _build_config(dataset, root, backbone, pretrained, method, output_dir, config, opts, overrides) -> LiftConfig:
    if config is not None:
        if not isinstance(config, LiftConfig):
            raise TypeError(f"config must be a LiftConfig; got {type(config).__name__}")
        # A copy: the run fills in options (num_classes) that must not leak into the caller's.
        cfg = copy.deepcopy(config)
        validate(cfg)
        return cfg
    return build_run_config(dataset, root, backbone, pretrained, method, output_dir, opts, **overrides)


def build_run_config(
    dataset: str = "cifar100_ir100",
    root: str = "./data",
    backbone: str = "clip_vit_b16",
    pretrained: Optional[str] = "openai",
    method: str = "lift+",
    output_dir: Optional[str] = None,
    opts: Sequence[str] = (),
    **overrides,
) -> LiftConfig:
    """The config :func:`fast_train` runs with for these arguments (see there), built in the
    published merge order: method preset, backbone preset, keyword options, ``opts``. A backbone
    without a published preset brings its own input size (and a timm model its mean/std)."""
    base = {"dataset": dataset, "root": root, "backbone": backbone, "pretrained": pretrained, "output_dir": output_dir}
    base.update(overrides)
    opt_keys = set(list(opts)[::2])
    named = next(
        (v for k, v in reversed(list(zip(list(opts)[::2], list(opts)[1::2]))) if k == "backbone"), base["backbone"]
    )
    if not backbone_preset(named):
        # Not a published name: the input size (and a timm model's mean/std) follow the backbone
        # unless given.
        for key, value in backbone_input_config(named).items():
            if key not in base and key not in opt_keys:
                base[key] = value
    return make_config(method, base, opts)


def fast_train(
    dataset: str = "cifar100_ir100",
    root: str = "./data",
    backbone: str = "clip_vit_b16",
    pretrained: Optional[str] = "openai",
    method: str = "lift+",
    output_dir: Optional[str] = None,
    *,
    config: Optional[LiftConfig] = None,
    opts: Sequence[str] = (),
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    **overrides,
) -> TrainResult:
    """Train (unless zero-shot or test-only) and evaluate one LIFT+ run.

    Args:
        dataset: a name from :data:`liftplus_fast.data.DATASETS` (e.g. ``cifar100_ir100``).
        root: data root (images, or where CIFAR-100 is downloaded).
        backbone: ``clip_vit_b16`` style config name, an open_clip model name, or ``tiny_vit``.
        pretrained: open_clip tag (``"openai"``), a local checkpoint path, or ``None``.
        method: ``lift+`` (default) or another method of :data:`liftplus_fast.config.METHODS`.
        output_dir: where config, log, metrics, checkpoint and plot go (``None``: nothing written).
        config: a ready :class:`LiftConfig` (then the arguments above are ignored).
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
    from .progress import progress_bar as tqdm  # tqdm on a terminal, plain lines in a log file

    cfg = _build_config(dataset, root, backbone, pretrained, method, output_dir, config, opts, overrides)
    ctx = init_distributed(resolve_device(cfg.device), timeout=cfg.dist_timeout)
    try:
        if ctx.is_main:
            # test_only without model_dir evaluates the run this folder holds: not a new run over it
            own_test = bool(
                cfg.test_only
                and cfg.model_dir is None
                and cfg.output_dir
                and own_model_dir(cfg.output_dir) == cfg.output_dir
            )
            prepare_output_dir(cfg.output_dir, resume or (own_test and not overwrite), overwrite)
        handler = _setup_logging(cfg.output_dir, ctx.is_main)
    except BaseException:
        shutdown_distributed(ctx)
        raise
    try:
        with deterministic_mode(bool(cfg.deterministic)):
            return _run(cfg, progress and ctx.is_main, resume, tqdm, ctx, overwrite)
    except RuntimeError as exc:
        if not ctx.enabled:
            raise
        explained = explain_timeout(exc, cfg.dist_timeout)
        if explained is exc:
            raise
        raise explained from None
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
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


def _run(cfg: LiftConfig, progress: bool, resume: bool, tqdm, ctx: DistContext, overwrite: bool = False) -> TrainResult:
    timings: Dict[str, float] = {}
    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    device = rank_device(resolve_device(cfg.device), ctx)
    writes = bool(cfg.output_dir) and ctx.is_main
    if cfg.test_only and cfg.model_dir is None and not cfg.zero_shot:
        if not cfg.output_dir:
            raise UserInputError(
                "test_only needs model_dir: the folder or checkpoint file of a trained tuner "
                "(on the command line: liftplus-fast test ... model_dir PATH), or an "
                "output_dir holding it"
            )
        cfg.model_dir = own_model_dir(cfg.output_dir)
        logger.info("test_only without model_dir: evaluating the tuner in %s", cfg.model_dir)
    if ctx.enabled and device.type == "cpu":
        agree_on_choices(ctx)  # one implementation of each op for every process (ops/choices.py)
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
        for name, decided in choices.table().items():
            logger.info("CPU implementation of %s: %s (%s)", name, decided["option"], decided["why"])
    if ctx.enabled:
        logger.info("data-parallel over %d processes (%s)", ctx.world_size, torch.distributed.get_backend())

    # Data first: its errors (missing files, bad names) are the cheapest to report.
    train_set, test_set, make_init_set = _datasets(cfg)
    # Every listed image of both splits must exist now, not when evaluation reaches it.
    check_split(train_set, cfg.dataset, "train", min_classes=2)
    check_split(test_set, cfg.dataset, "test")
    cls_num_list = list(train_set.cls_num_list)
    if cfg.num_classes not in (None, train_set.num_classes):
        raise UserInputError(f"num_classes={cfg.num_classes} but {cfg.dataset} has {train_set.num_classes} classes")
    cfg.num_classes = train_set.num_classes
    logger.info(
        "training images %d in %d classes (max %d, min %d); test images %d",
        sum(cls_num_list),
        cfg.num_classes,
        max(cls_num_list),
        min(cls_num_list),
        len(test_set),
    )

    clip_model, tokenizer = load_backbone(cfg.backbone, cfg.pretrained, device=device)
    check_resolution(clip_model, cfg.resolution, cfg.backbone)
    # A test-only run loads its trained tuner over the classifier: no text-encoder pass for it.
    model = build_lift_model(
        clip_model, cfg, cls_num_list, train_set.classnames, tokenizer=tokenizer, init_classifier=not cfg.test_only
    ).to(device)
    n_tuned = sum(p.numel() for p in model.tuner.parameters())
    n_total = sum(p.numel() for p in model.parameters())
    logger.info("tuned parameters: %d of %d (%.3f%%)", n_tuned, n_total, 100.0 * n_tuned / max(n_total, 1))

    ckpt_path = os.path.join(cfg.output_dir, CHECKPOINT_NAME) if cfg.output_dir else None
    start_epoch, state = 0, None
    if resume and not (ckpt_path and os.path.exists(ckpt_path)):
        logger.warning("resume: no checkpoint at %s; training from the start", ckpt_path or "(no output_dir)")
    if cfg.model_dir is not None:
        state = load_checkpoint(cfg.model_dir)
        model.load_official_tuner(state["tuner"])
        logger.info("loaded tuner from %s", cfg.model_dir)
    elif resume and ckpt_path and os.path.exists(ckpt_path):
        state = load_checkpoint(ckpt_path)
        if "config" not in state:
            logger.warning("resume: %s does not record its options; continuing with those given", ckpt_path)
        check_resume(state.get("config"), cfg.to_dict(), ckpt_path)
        model.load_official_tuner(state["tuner"])
        start_epoch = int(state.get("epoch", cfg.num_epochs))
        logger.info("resuming from %s after epoch %d", ckpt_path, start_epoch)
    elif (
        not (cfg.zero_shot or cfg.test_only)
        and cfg.classifier
        and ctx.is_main
        and cfg.classifier_init in ("class_mean", "linear_probing")
    ):
        # Rank 0 alone: the broadcast below hands its classifier to the other processes.
        init_set = make_init_set()
        sampler = DownSampler(init_set.labels, n_max=100, generator=torch.Generator().manual_seed(cfg.seed or 0))
        feats, labels = _features(model, _loader(init_set, 64, cfg, False, sampler, device=device), device, progress)
        model.init_classifier_from_features(feats.to(device), labels.to(device), cfg.classifier_init)
    if ctx.enabled:
        broadcast_module(model.tuner, ctx)
        if cfg.seed is not None:
            # Different augmentation draws on every process.
            torch.manual_seed(rank_seed(cfg.seed, ctx))
    if writes:
        # Only now, with every check passed, does this run replace what the folder held, so its
        # config, checkpoint and metrics always come from one run.
        if overwrite:
            removed = clear_previous_run(cfg.output_dir)
            if removed:
                logger.info("overwrite: removed the previous run's %s", ", ".join(removed))
        atomic_write_json(os.path.join(cfg.output_dir, "config.json"), cfg.to_dict())
    timings["setup_s"] = time.perf_counter() - t_start

    history: List[Dict[str, float]] = []
    if not (cfg.zero_shot or cfg.test_only):
        t0 = time.perf_counter()
        history = _train(
            model,
            cfg,
            train_set,
            device,
            start_epoch,
            state,
            ckpt_path if writes else None,
            cls_num_list,
            progress,
            tqdm,
            ctx,
        )
        timings["train_s"] = time.perf_counter() - t0
        if history:
            timings["train_images_per_s"] = sum(h["images"] for h in history) / max(timings["train_s"], 1e-9)

    t0 = time.perf_counter()
    test_loader = _loader(shard(test_set, ctx), 64, cfg, False, device=device)
    metrics = evaluate(
        model,
        test_loader,
        cls_num_list,
        tte=cfg.tte,
        device=device,
        precision=cfg.prec_test,
        progress=progress,
        distributed=ctx.enabled,
    )
    timings["test_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    logger.info(
        "* overall %s  mean %s  many %s  med %s  few %s",
        *(format_accuracy(metrics[k]) for k in ("overall", "mean", "many", "med", "few")),
    )

    if writes:
        atomic_write_json(
            os.path.join(cfg.output_dir, "metrics.json"),
            {"metrics": metrics, "timings": timings, "history": history, "cls_num_list": cls_num_list},
        )
        plot_per_class_accuracy(
            os.path.join(cfg.output_dir, "per_class_accuracy.png"),
            cls_num_list,
            {cfg.method: metrics},
            title=f"{cfg.method} on {cfg.dataset}",
        )
    return TrainResult(metrics, cfg, cfg.output_dir, timings, model.tuner, model, history, cls_num_list)


def _restore_rng(state: Dict[str, Any], ctx: DistContext) -> None:
    # The augmentation draws from the global generator: restore it so a resumed run sees the
    # crops an uninterrupted run would (per process when the run was data-parallel).
    per_rank = state.get("torch_rng_ranks")
    if ctx.enabled and per_rank is not None and len(per_rank) == ctx.world_size:
        torch.set_rng_state(per_rank[ctx.rank])
    elif not ctx.enabled and "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    elif "torch_rng" in state:
        logger.warning(
            "the checkpoint's random state is for another process count; the resumed "
            "run's augmentation will differ from an uninterrupted one"
        )


def make_optimizer(params, cfg: LiftConfig) -> torch.optim.Optimizer:
    """The published SGD (momentum, weight decay) over ``params`` as one multi-tensor update.

    ``foreach`` updates all tuner tensors with a handful of fused multi-tensor kernels instead
    of a loop of small ops per parameter (LIFT+ trains ~90 small tensors); the arithmetic is
    the same as the per-tensor loop.
    """
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)


def _any_process(flag: bool, device, ctx: DistContext) -> bool:
    # Every process must take the same branch, or the next gradient all-reduce would hang.
    if not ctx.enabled:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def _kept(ckpt_path: Optional[str], ctx: DistContext) -> str:
    if ckpt_path and os.path.exists(ckpt_path):
        try:
            epoch = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("epoch")
        except Exception:  # only for the message: the checkpoint itself is left as it is
            epoch = None
        return f"the checkpoint of epoch {epoch} in {ckpt_path} is kept"
    return "no checkpoint had been written" if ctx.is_main else "rank 0 keeps its last checkpoint"


def _on_nonfinite_loss(cfg: LiftConfig, epoch: int, where, num_batches: int, ckpt_path, ctx) -> None:
    step, value = where if where is not None else (None, None)
    at = (
        f"at epoch {epoch + 1}, step {step} of {num_batches}"
        if step is not None
        else f"on another process at epoch {epoch + 1}"
    )
    if cfg.nonfinite_loss == "skip":
        logger.warning("non-finite loss (%s) %s: step skipped (nonfinite_loss skip)", value, at)
        return
    raise DivergenceError(
        f"non-finite loss ({value}) {at}; the run is stopped ({_kept(ckpt_path, ctx)}). "
        "Lower lr, or set nonfinite_loss skip to skip such steps"
    )


def _train(
    model,
    cfg: LiftConfig,
    train_set,
    device,
    start_epoch,
    state,
    ckpt_path,
    cls_num_list,
    progress,
    tqdm,
    ctx: Optional[DistContext] = None,
) -> List[Dict[str, float]]:
    ctx = ctx if ctx is not None else DistContext()
    params = [p for p in model.tuner.parameters() if p.requires_grad]
    if not params:
        raise UserInputError(f"method {cfg.method!r} has nothing to train (empty tuner)")
    optim = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, cfg.num_epochs)
    # The model runs in cfg.prec_train by itself (frozen weights stored in the compute dtype);
    # fp16 needs loss scaling, bf16 (CPU "amp", or "bf16") has fp32's range and does not.
    scaler = torch.amp.GradScaler("cuda") if model.needs_grad_scaler else None
    if state is not None and "optimizer" in state:
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _restore_rng(state, ctx)
    micro = check_batch_split(cfg.batch_size, cfg.accum_step, ctx)
    # Every process gets the same number of equal batches (DistributedSampler pads), so the
    # gradient all-reduces line up.
    sampler = (
        DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed or 0)
        if ctx.enabled
        else None
    )
    loader = _loader(train_set, micro, cfg, True, sampler=sampler, seed=(cfg.seed or 0), device=device)
    num_batches = len(loader)
    history: List[Dict[str, float]] = []
    # The published per-batch report (every print_freq batches) and TensorBoard scalars.
    tlog = (
        TrainingLog(
            cls_num_list,
            cfg.print_freq,
            num_batches,
            cfg.num_epochs,
            os.path.join(os.path.dirname(ckpt_path), "tensorboard") if ckpt_path else None,
        )
        if ctx.is_main
        else None
    )
    t_train = time.perf_counter()
    for epoch in range(start_epoch, cfg.num_epochs):
        # Each epoch re-seeds its shuffling so a resumed run sees the batches a full run would.
        loader.generator.manual_seed(rank_seed((cfg.seed or 0) + epoch, ctx))
        if hasattr(loader.sampler, "set_epoch"):  # DistributedSampler, or the cache's epoch tags
            loader.sampler.set_epoch(epoch)
        set_transform_epoch(train_set.transform, epoch)
        model.tuner.train()
        loss_sum, correct, seen, skipped, step_bad = 0.0, 0, 0, 0, None
        bar = tqdm(
            loader, total=num_batches, desc=f"epoch {epoch + 1}/{cfg.num_epochs}", disable=not progress, leave=False
        )
        t_epoch = time.perf_counter()
        for batch_idx, (images, labels) in enumerate(bar):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device=device, dtype=torch.int64, non_blocking=True)
            loss, logits = model.training_loss(images, labels)
            loss_value = float(loss.detach())
            finite = math.isfinite(loss_value)
            if not finite and step_bad is None:
                step_bad = (batch_idx + 1, loss_value)
            if scaler is not None:
                scaler.scale(loss / cfg.accum_step).backward()
            else:
                (loss / cfg.accum_step).backward()
            if (batch_idx + 1) % cfg.accum_step == 0 or batch_idx + 1 == num_batches:
                if _any_process(step_bad is not None, device, ctx):
                    skipped += 1
                    _on_nonfinite_loss(cfg, epoch, step_bad, num_batches, ckpt_path, ctx)
                else:
                    # Before the scaler unscales: an inf on one process then skips the step on all.
                    average_gradients(params, ctx)
                    if scaler is not None:
                        scaler.step(optim)
                        scaler.update()
                    else:
                        optim.step()
                optim.zero_grad(set_to_none=True)
                step_bad = None
            if finite:
                with torch.no_grad():
                    correct += int((logits.argmax(dim=-1) == labels).sum())
                seen += labels.numel()
                loss_sum += loss_value * labels.numel()
                if tlog is not None:
                    tlog.update(epoch, batch_idx, loss_value, logits.detach(), labels, optim.param_groups[0]["lr"])
            if progress:
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.4f}",
                    acc=f"{100.0 * correct / seen:.1f}",
                    lr=f"{optim.param_groups[0]['lr']:.2e}",
                )
        bar.close()
        if ctx.enabled:
            totals = all_reduce_sum(
                torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
            ).tolist()
            loss_sum, correct, seen = totals[0], int(totals[1]), int(totals[2])
        if skipped and skipped == -(-num_batches // cfg.accum_step):
            raise DivergenceError(
                f"every step of epoch {epoch + 1} had a non-finite loss; the run is "
                f"stopped ({_kept(ckpt_path, ctx)}); lower lr"
            )
        if skipped:
            logger.warning("epoch %d: skipped %d step(s) with a non-finite loss", epoch + 1, skipped)
        if not all(torch.isfinite(p).all() for p in params):
            raise DivergenceError(
                f"the tuner's parameters became non-finite during epoch {epoch + 1}; the "
                f"run is stopped ({_kept(ckpt_path, ctx)}); lower lr"
            )
        lr_used = optim.param_groups[0]["lr"]
        sched.step()
        epoch_time = time.perf_counter() - t_epoch
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(seen, 1),
            "acc": 100.0 * correct / max(seen, 1),
            "lr": lr_used,
            "seconds": epoch_time,
            "images": seen,
        }
        history.append(record)
        done = epoch + 1 - start_epoch
        eta = (time.perf_counter() - t_train) / done * (cfg.num_epochs - epoch - 1)
        logger.info(
            "epoch [%d/%d] loss %.4f acc %.2f lr %.4e time %.1fs eta %.0fs",
            epoch + 1,
            cfg.num_epochs,
            record["loss"],
            record["acc"],
            lr_used,
            epoch_time,
            eta,
        )
        rng_states = gather_objects(torch.get_rng_state(), ctx)
        if ckpt_path:
            extra = {"torch_rng_ranks": rng_states} if ctx.enabled else {}
            save_checkpoint(
                ckpt_path,
                model.official_tuner_state_dict(),
                epoch=epoch + 1,
                optimizer=optim.state_dict(),
                scheduler=sched.state_dict(),
                config=cfg.to_dict(),
                torch_rng=rng_states[0],
                **extra,
            )
    if tlog is not None:
        tlog.close()
    return history
