"""Per-batch training log as the published trainer writes it: a line every ``print_freq``
batches with the running loss, accuracy and many/medium/few training accuracy, and TensorBoard
scalars for every batch in ``<output_dir>/tensorboard``.

The running values are exponential moving averages (weight 0.9 on the past, starting at the
first value), per class for the class accuracies, as the published meters compute them.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from typing import Optional, Sequence

import torch

from .data.groups import shot_masks

__all__ = ["EMAMeter", "TrainingLog"]

logger = logging.getLogger("liftplus_fast")


class EMAMeter:
    """Last value and its exponential moving average (``avg = 0.9 avg + 0.1 val``)."""

    def __init__(self):
        self.val, self.avg, self.count = 0.0, 0.0, 0

    def update(self, val: float) -> None:
        """Add one value."""
        self.val = float(val)
        self.avg = self.val if self.count == 0 else self.avg * 0.9 + self.val * 0.1
        self.count += 1


class TrainingLog:
    """The published per-batch report for one training run.

    Args:
        cls_num_list: training images per class (many > 100, medium 20-100, few < 20).
        print_freq: a log line every this many batches (every batch when an epoch has fewer).
        num_batches: batches per epoch; num_epochs: epochs (for the ETA).
        tensorboard_dir: where the event file goes; ``None`` writes none.
    """

    def __init__(
        self,
        cls_num_list: Sequence[int],
        print_freq: int,
        num_batches: int,
        num_epochs: int,
        tensorboard_dir: Optional[str] = None,
    ):
        self.groups = shot_masks(cls_num_list)
        self.cls_avg = torch.zeros(len(cls_num_list), dtype=torch.float64)
        self.cls_seen = torch.zeros(len(cls_num_list), dtype=torch.bool)
        self.loss, self.acc, self.batch_time = EMAMeter(), EMAMeter(), EMAMeter()
        self.batch_time_sum = 0.0
        self.print_freq = max(1, int(print_freq))
        self.num_batches, self.num_epochs = num_batches, num_epochs
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tensorboard_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self._end = time.perf_counter()

    def _group_mean(self, mask: torch.Tensor) -> float:
        return float(self.cls_avg[mask].mean()) if bool(mask.any()) else float("nan")

    def update(
        self, epoch: int, batch_idx: int, loss: float, logits: torch.Tensor, labels: torch.Tensor, lr: float
    ) -> None:
        """Record one (micro-)batch; ``epoch`` and ``batch_idx`` count from 0."""
        now = time.perf_counter()
        self.batch_time.update(now - self._end)
        self.batch_time_sum += now - self._end
        correct = (logits.argmax(dim=-1) == labels).double().mul(100.0).cpu()
        self.loss.update(loss)
        self.acc.update(float(correct.mean()))
        for c, y in zip(correct.tolist(), labels.cpu().tolist()):  # sequential, as the meters are
            self.cls_avg[y] = c if not self.cls_seen[y] else self.cls_avg[y] * 0.9 + c * 0.1
            self.cls_seen[y] = True
        mean = float(self.cls_avg.mean())
        groups = {k: self._group_mean(m) for k, m in self.groups.items()}
        if (batch_idx + 1) % self.print_freq == 0 or self.num_batches < self.print_freq:
            done = epoch * self.num_batches + batch_idx + 1
            remain = self.num_epochs * self.num_batches - done
            eta = datetime.timedelta(seconds=int(self.batch_time_sum / done * remain))
            logger.info(
                "epoch [%d/%d] batch [%d/%d] time %.3f (%.3f) loss %.4f (%.4f) acc %.2f (%.2f) "
                "(mean %.2f many %.2f med %.2f few %.2f) lr %.4e eta %s",
                epoch + 1,
                self.num_epochs,
                batch_idx + 1,
                self.num_batches,
                self.batch_time.val,
                self.batch_time.avg,
                self.loss.val,
                self.loss.avg,
                self.acc.val,
                self.acc.avg,
                mean,
                groups["many"],
                groups["med"],
                groups["few"],
                lr,
                eta,
            )
        if self.writer is not None:
            step = epoch * self.num_batches + batch_idx
            for tag, value in (
                ("lr", lr),
                ("loss.val", self.loss.val),
                ("loss.avg", self.loss.avg),
                ("acc.val", self.acc.val),
                ("acc.avg", self.acc.avg),
                ("mean_acc", mean),
                ("many_acc", groups["many"]),
                ("med_acc", groups["med"]),
                ("few_acc", groups["few"]),
            ):
                self.writer.add_scalar(f"train/{tag}", value, step)
        self._end = time.perf_counter()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
