"""The training loop: the published optimiser recipe over the tuner, epoch by epoch.

SGD (momentum 0.9, weight decay 5e-4, one multi-tensor update) over exactly the tuner's
parameters, cosine annealing stepped once per epoch, gradient accumulation (``accum_step``
micro-batches per optimiser step), minimalist data augmentation stepped per epoch, and the
precision the model owns (a gradient scaler only where fp16 needs one). After every epoch a
resumable checkpoint (tuner, optimiser, scheduler, random state) is written atomically. A step
whose loss is non-finite on any process stops the run, keeping the last checkpoint
(``nonfinite_loss error``), or is skipped (``skip``). Under ``torchrun`` the gradients are
averaged over the processes before each update (:class:`~liftplus_fast.distributed.DistContext`).

:class:`TrainStep` is the one optimiser step: :func:`train_epochs` runs it, and so do the step
benchmark and the GPU check.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DistributedSampler

from .checkpoint import save_checkpoint
from .data import set_transform_epoch
from .data.loaders import build_loader
from .distributed import DistContext
from .errors import DivergenceError, UserInputError
from .progress import progress_bar
from .run_folder import TORCHRUN_JOB_KEY, torchrun_job
from .stop_signals import requested, stop_error
from .train_log import TrainingLog

__all__ = ["TrainStep", "kept_checkpoint", "make_optimizer", "restore_rng", "train_epochs"]

logger = logging.getLogger("liftplus_fast")


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """The published SGD (momentum, weight decay) over ``params`` as one multi-tensor update.

    ``foreach`` updates all tuner tensors with a handful of fused multi-tensor kernels instead
    of a loop of small ops per parameter (LIFT+ trains ~90 small tensors); the arithmetic is
    the same as the per-tensor loop.
    """
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)


class TrainStep:
    """One optimiser step of ``model``'s tuner over ``accum_step`` micro-batches.

    :meth:`accumulate` runs one micro-batch: the model's training loss, and its backward
    (divided by ``accum_step``; through a gradient scaler where the model computes in fp16 on
    CUDA). :meth:`update` ends the step: unless some process saw a non-finite loss, the
    gradients are averaged over the processes and the optimiser steps; the gradients are
    cleared either way. Calling the step runs both, for ``accum_step`` 1::

        step = TrainStep(model, make_optimizer(params, cfg))
        loss, logits = step(images, labels)
    """

    def __init__(self, model, optimizer: torch.optim.Optimizer, accum_step: int = 1, ctx: Optional[DistContext] = None):
        self.model = model
        self.optimizer = optimizer
        self.accum_step = int(accum_step)
        self.ctx = ctx if ctx is not None else DistContext()
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # fp16 needs loss scaling; bf16 (CPU "amp", or "bf16") has fp32's range and does not.
        self.scaler = torch.amp.GradScaler("cuda") if model.needs_grad_scaler else None
        self._finite = True
        self.stop_requested = False

    @property
    def lr(self) -> float:
        """The learning rate the next update uses."""
        return self.optimizer.param_groups[0]["lr"]

    def accumulate(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """Forward and backward of one micro-batch; ``(loss, logits)`` with the loss as a float."""
        loss, logits = self.model.training_loss(images, labels)
        value = float(loss.detach())
        self._finite = self._finite and math.isfinite(value)
        scaled = loss / self.accum_step
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return value, logits

    def update(self) -> bool:
        """End the step; whether the parameters were updated (``False``: a non-finite loss somewhere).

        The processes also agree whether any of them received a stop signal
        (:mod:`~liftplus_fast.stop_signals`), in the same all-reduce: ``stop_requested`` then
        tells the loop to stop after this step, on every process alike.
        """
        nonfinite, self.stop_requested = self.ctx.any_processes(
            [not self._finite, requested() is not None], self.params[0].device
        )
        applied = not nonfinite
        if applied:
            # Before the scaler unscales: an inf on one process then skips the step on all.
            self.ctx.average_gradients(self.params)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._finite = True
        return applied

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[float, torch.Tensor]:
        value, logits = self.accumulate(images, labels)
        self.update()
        return value, logits


def restore_rng(state: Dict[str, Any], ctx: DistContext) -> None:
    """Restore the random state a checkpoint saved, per process when the run was data-parallel.

    The augmentation draws from the global generator: restored, a resumed run sees the crops an
    uninterrupted run would. With another process count it cannot, and says so.
    """
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


def kept_checkpoint(checkpoint_path: Optional[str], ctx: DistContext) -> str:
    """What a stopped run keeps, for its message: the checkpoint of which epoch, or none."""
    if checkpoint_path and os.path.exists(checkpoint_path):
        try:
            epoch = torch.load(checkpoint_path, map_location="cpu", weights_only=True).get("epoch")
        except Exception:  # only for the message: the checkpoint itself is left as it is
            epoch = None
        return f"the checkpoint of epoch {epoch} in {checkpoint_path} is kept"
    return "no checkpoint had been written" if ctx.is_main else "rank 0 keeps its last checkpoint"


def _on_nonfinite_loss(cfg, epoch: int, where, num_batches: int, checkpoint_path, ctx) -> None:
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
        f"non-finite loss ({value}) {at}; the run is stopped ({kept_checkpoint(checkpoint_path, ctx)}). "
        "Lower lr, or set nonfinite_loss skip to skip such steps"
    )


def _start_epoch(loader, train_set, epoch: int, seed: int, ctx: DistContext) -> None:
    # Each epoch re-seeds its shuffling so a resumed run sees the batches a full run would.
    loader.generator.manual_seed(ctx.rank_seed(seed + epoch))
    if hasattr(loader.sampler, "set_epoch"):  # DistributedSampler, or the cache's epoch tags
        loader.sampler.set_epoch(epoch)
    set_transform_epoch(train_set.transform, epoch)


def _run_epoch(step: TrainStep, loader, epoch: int, cfg, *, device, log, progress, checkpoint_path) -> Dict[str, Any]:
    """One pass over ``loader``; this process's sums of loss, hits and images, and the skipped steps."""
    num_batches = len(loader)
    loss_sum, correct, seen, skipped, where = 0.0, 0, 0, 0, None
    bar = progress_bar(
        loader, total=num_batches, desc=f"epoch {epoch + 1}/{cfg.num_epochs}", disable=not progress, leave=False
    )
    for batch_idx, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device=device, dtype=torch.int64, non_blocking=True)
        loss_value, logits = step.accumulate(images, labels)
        finite = math.isfinite(loss_value)
        if not finite and where is None:
            where = (batch_idx + 1, loss_value)
        if (batch_idx + 1) % cfg.accum_step == 0 or batch_idx + 1 == num_batches:
            if not step.update():
                skipped += 1
                _on_nonfinite_loss(cfg, epoch, where, num_batches, checkpoint_path, step.ctx)
            where = None
            if step.stop_requested:
                raise stop_error(f"at epoch {epoch + 1}, step {batch_idx + 1} of {num_batches}")
        if finite:
            with torch.no_grad():
                correct += int((logits.argmax(dim=-1) == labels).sum())
            seen += labels.numel()
            loss_sum += loss_value * labels.numel()
            if log is not None:
                log.update(epoch, batch_idx, loss_value, logits.detach(), labels, step.lr)
        if progress:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100.0 * correct / seen:.1f}", lr=f"{step.lr:.2e}")
    bar.close()
    return {"loss_sum": loss_sum, "correct": correct, "seen": seen, "skipped": skipped, "steps": num_batches}


def _check_epoch(totals: Dict[str, Any], epoch: int, cfg, params, checkpoint_path, ctx: DistContext) -> None:
    """Stop the run when the epoch diverged: every step skipped, or non-finite parameters."""
    kept = kept_checkpoint(checkpoint_path, ctx) if totals["skipped"] else None
    if totals["skipped"] and totals["skipped"] == -(-totals["steps"] // cfg.accum_step):
        raise DivergenceError(
            f"every step of epoch {epoch + 1} had a non-finite loss; the run is stopped ({kept}); lower lr"
        )
    if totals["skipped"]:
        logger.warning("epoch %d: skipped %d step(s) with a non-finite loss", epoch + 1, totals["skipped"])
    if not all(torch.isfinite(p).all() for p in params):
        raise DivergenceError(
            f"the tuner's parameters became non-finite during epoch {epoch + 1}; the "
            f"run is stopped ({kept_checkpoint(checkpoint_path, ctx)}); lower lr"
        )


def _save_epoch(checkpoint_path: Optional[str], model, step: TrainStep, scheduler, epoch: int, cfg) -> None:
    # Every process's random state, so a resumed run with the same process count draws the same crops.
    rng_states = step.ctx.gather_objects(torch.get_rng_state())
    if checkpoint_path:
        extra = {"torch_rng_ranks": rng_states} if step.ctx.enabled else {}
        if torchrun_job():  # so that the job's restarted processes continue this run
            extra[TORCHRUN_JOB_KEY] = torchrun_job()
        save_checkpoint(
            checkpoint_path,
            model.official_tuner_state_dict(),
            epoch=epoch + 1,
            optimizer=step.optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            config=cfg.to_dict(),
            torch_rng=rng_states[0],
            **extra,
        )


def train_epochs(
    model,
    cfg,
    train_set,
    *,
    device: torch.device,
    cls_num_list,
    ctx: Optional[DistContext] = None,
    start_epoch: int = 0,
    state: Optional[Dict[str, Any]] = None,
    checkpoint_path: Optional[str] = None,
    progress: bool = True,
) -> List[Dict[str, float]]:
    """Train the tuner of ``model`` on ``train_set`` for epochs ``start_epoch`` to ``cfg.num_epochs``.

    ``state``: a checkpoint whose optimiser, scheduler and random state are resumed.
    ``checkpoint_path``: where the checkpoint goes after every epoch (``None``: nowhere; pass it
    on rank 0 only). Returns one record per epoch: ``epoch``, ``loss``, ``acc``, ``lr``,
    ``seconds``, ``images``.
    """
    ctx = ctx if ctx is not None else DistContext()
    params = [p for p in model.tuner.parameters() if p.requires_grad]
    if not params:
        raise UserInputError(f"method {cfg.method!r} has nothing to train (empty tuner)")
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.num_epochs)
    step = TrainStep(model, optimizer, cfg.accum_step, ctx)
    if state is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state, ctx)
    seed = cfg.seed or 0
    # Every process gets the same number of equal batches (DistributedSampler pads), so the
    # gradient all-reduces line up.
    sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=seed) if ctx.enabled else None
    micro = ctx.micro_batch(cfg.batch_size, cfg.accum_step)
    loader = build_loader(train_set, cfg, batch_size=micro, shuffle=True, sampler=sampler, seed=seed, device=device)
    # The published per-batch report (every print_freq batches) and TensorBoard scalars.
    events = os.path.join(os.path.dirname(checkpoint_path), "tensorboard") if checkpoint_path else None
    log = TrainingLog(cls_num_list, cfg.print_freq, len(loader), cfg.num_epochs, events) if ctx.is_main else None
    history: List[Dict[str, float]] = []
    t_train = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.num_epochs):
            _start_epoch(loader, train_set, epoch, seed, ctx)
            model.tuner.train()
            t_epoch = time.perf_counter()
            totals = _run_epoch(
                step, loader, epoch, cfg, device=device, log=log, progress=progress, checkpoint_path=checkpoint_path
            )
            loss_sum, correct, seen = totals["loss_sum"], totals["correct"], totals["seen"]
            if ctx.enabled:
                summed = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
                loss_sum, correct, seen = ctx.all_reduce_sum(summed).tolist()
                correct, seen = int(correct), int(seen)
            _check_epoch(totals, epoch, cfg, params, checkpoint_path, ctx)
            lr_used = step.lr
            scheduler.step()
            record = {
                "epoch": epoch + 1,
                "loss": loss_sum / max(seen, 1),
                "acc": 100.0 * correct / max(seen, 1),
                "lr": lr_used,
                "seconds": time.perf_counter() - t_epoch,
                "images": seen,
            }
            history.append(record)
            eta = (time.perf_counter() - t_train) / (epoch + 1 - start_epoch) * (cfg.num_epochs - epoch - 1)
            logger.info(
                "epoch [%d/%d] loss %.4f acc %.2f lr %.4e time %.1fs eta %.0fs",
                *(epoch + 1, cfg.num_epochs, record["loss"], record["acc"], lr_used, record["seconds"], eta),
            )
            _save_epoch(checkpoint_path, model, step, scheduler, epoch, cfg)
    finally:
        if log is not None:
            log.close()
    return history
