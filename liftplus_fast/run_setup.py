"""What a run sets up before it trains: its data sets (every listed image checked), its model
(the backbone loaded and wrapped), and the tuner's starting point (a trained tuner from
``model_dir``, a resumed checkpoint, or the classifier initialised from image features), with
every process given rank 0's tuner."""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Tuple

import torch

from .checkpoint import load_checkpoint
from .config import LiftConfig
from .data import DownSampler, check_split
from .data.loaders import RunDatasets, build_loader, build_run_datasets
from .distributed import DistContext
from .errors import UserInputError
from .model import build_lift_model, check_resolution, load_backbone
from .model.inits import FEATURE_INITS
from .progress import progress_bar
from .run_folder import check_resume
from .run_record import model_facts
from .stop_signals import check_stop, safe_points
from .tuner_source import load_trained_tuner

__all__ = ["build_model", "open_data", "set_up_tuner"]

logger = logging.getLogger("liftplus_fast")


def open_data(cfg: LiftConfig) -> Tuple[RunDatasets, List[int]]:
    """The run's data sets, every listed image checked now, and the training class sizes."""
    data = build_run_datasets(cfg)
    # Every listed image of both splits must exist before training, not when evaluation reaches it.
    check_split(data.train, cfg.dataset, "train", min_classes=2)
    check_split(data.test, cfg.dataset, "test")
    cls_num_list = list(data.train.cls_num_list)
    if cfg.num_classes not in (None, data.train.num_classes):
        raise UserInputError(f"num_classes={cfg.num_classes} but {cfg.dataset} has {data.train.num_classes} classes")
    cfg.num_classes = data.train.num_classes
    logger.info(
        "training images %d in %d classes (max %d, min %d); test images %d",
        sum(cls_num_list),
        cfg.num_classes,
        max(cls_num_list),
        min(cls_num_list),
        len(data.test),
    )
    return data, cls_num_list


def build_model(cfg: LiftConfig, data: RunDatasets, cls_num_list: List[int], device: torch.device):
    clip_model, tokenizer = load_backbone(cfg.backbone, cfg.pretrained, device=device)
    check_resolution(clip_model, cfg.resolution, cfg.backbone)
    # A test-only run loads its trained tuner over the classifier: no text-encoder pass for it.
    model = build_lift_model(
        clip_model, cfg, cls_num_list, data.train.classnames, tokenizer=tokenizer, init_classifier=not cfg.test_only
    ).to(device)
    facts = model_facts(model)
    for tuner in facts["tuners"]:
        logger.info("tuner: %s", tuner)
    if facts["sizes"]:
        logger.info("resolved sizes: %s", ", ".join(f"{k} {v}" for k, v in facts["sizes"].items()))
    trainable, total = facts["trainable_parameters"], facts["total_parameters"]
    logger.info("tuned parameters: %d of %d (%.3f%%)", trainable, total, 100.0 * trainable / max(total, 1))
    return model, facts


@torch.no_grad()
def _image_features(model, loader, device, progress: bool):
    feats, labels = [], []
    with safe_points():
        for images, y in progress_bar(loader, desc="Features for classifier init", disable=not progress, leave=False):
            check_stop("while computing the features the classifier is initialised from")
            feats.append(model.encode_image(images.to(device)).float().cpu())
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _read_tuner_state(cfg: LiftConfig, checkpoint_path, resume: bool, ctx: DistContext):
    """``(what, checkpoint)``: the trained tuner of ``model_dir`` (``"model_dir"``), the run's own
    checkpoint to resume (``"resume"``), or ``(None, None)``. Rank 0 reads the file and hands it
    to the other processes, so nodes need not share the output folder."""
    found: Tuple[Optional[str], Any] = (None, None)
    if ctx.is_main:
        if cfg.model_dir is not None:
            found = ("model_dir", load_trained_tuner(cfg.model_dir))
        elif resume:
            found = ("resume", load_checkpoint(checkpoint_path))  # prepare_output_dir saw it there
    return ctx.broadcast_object(found)


def set_up_tuner(model, cfg: LiftConfig, data: RunDatasets, checkpoint_path, *, resume, device, ctx, progress):
    """Load a trained tuner (model_dir), resume a checkpoint, or initialise the classifier from
    image features; then give every process rank 0's tuner. Returns ``(start epoch, checkpoint)``."""
    start_epoch = 0
    what, state = _read_tuner_state(cfg, checkpoint_path, resume, ctx)
    if what == "model_dir":
        model.load_official_tuner(state["tuner"])
        logger.info("loaded tuner from %s", cfg.model_dir)
    elif what == "resume":
        if "config" not in state:
            logger.warning("resume: %s does not record its options; continuing with those given", checkpoint_path)
        check_resume(state.get("config"), cfg.to_dict(), checkpoint_path)
        model.load_official_tuner(state["tuner"])
        start_epoch = int(state.get("epoch", cfg.num_epochs))
        logger.info("resuming from %s after epoch %d", checkpoint_path, start_epoch)
    elif (
        not (cfg.zero_shot or cfg.test_only) and cfg.classifier and ctx.is_main and cfg.classifier_init in FEATURE_INITS
    ):
        # Rank 0 alone: the broadcast below hands its classifier to the other processes.
        init_set = data.make_init()
        sampler = DownSampler(init_set.labels, n_max=100, generator=torch.Generator().manual_seed(cfg.seed or 0))
        loader = build_loader(init_set, cfg, batch_size=64, shuffle=False, sampler=sampler, device=device)
        feats, labels = _image_features(model, loader, device, progress)
        model.init_classifier_from_features(feats.to(device), labels.to(device), cfg.classifier_init)
    if ctx.enabled:
        ctx.broadcast_module(model.tuner)
        if cfg.seed is not None:
            # Different augmentation draws on every process.
            torch.manual_seed(ctx.rank_seed(cfg.seed))
    return start_epoch, state
