"""Evaluation: overall, mean-class and many/medium/few-shot accuracy, with test-time ensembling.

With TTE each test image arrives as ``[C, 3, H, W]`` crops. All crops of a batch go through the
encoder in one forward; with a cosine classifier the crops' normalised features are averaged
first (one classifier GEMM instead of C, exact up to rounding), otherwise the crops' logits are
averaged by the fused ``tte_aggregate`` op. Per-class hits are counted by the same op.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Optional, Sequence

import torch

from . import ops
from .data import group_accuracies
from .distributed import all_reduce_sum
from .model.precision import half_dtype_of
from .progress import progress_bar
from .stop_signals import check_stop, safe_points

__all__ = [
    "autocast_context",
    "batch_logits",
    "evaluate",
    "feature_tte_usable",
    "format_accuracy",
    "metrics_from_counts",
    "precision_context",
]


def format_accuracy(value) -> str:
    """``"12.34%"``, or ``"n/a"`` for a group with no classes (NaN) or no value."""
    if value is None or value != value:
        return "n/a"
    return f"{value:.2f}%"


def autocast_context(device: torch.device, precision: str):
    """Autocast for ``precision``: "fp32" (none), "amp"/"fp16"/"bf16" (half precision).

    On CUDA "amp"/"fp16" autocast to fp16 and "bf16" to bf16; on CPU every half precision is
    bf16 (fp16 matmuls have no fast path on CPUs). LayerNorms stay fp32 inside the model.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in ("amp", "fp16", "bf16"):
        raise ValueError(f"precision must be 'fp32', 'amp', 'fp16' or 'bf16'; got {precision!r}")
    if device.type == "cuda":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def precision_context(model, device: torch.device, precision: Optional[str]):
    """What to wrap ``model``'s evaluation in for ``precision``.

    A model that owns its precision (a :class:`~liftplus_fast.model.LiftModel` built with a
    half ``prec_train``) already computes in its dtype: nothing is needed when ``precision``
    asks for that dtype, or for fp32 (its frozen weights were rounded once; an fp32 pass over
    them would not recover the fp32 numbers). Other models and other half types get autocast.
    """
    own = getattr(model, "compute_dtype", None)
    if precision is None or own is None:
        return contextlib.nullcontext() if precision in (None, "fp32") else autocast_context(device, precision)
    wanted = half_dtype_of(precision, device)
    if wanted is None or wanted == own:
        return contextlib.nullcontext()
    return autocast_context(device, precision)


def metrics_from_counts(correct: torch.Tensor, total: torch.Tensor, cls_num_list: Sequence[int]) -> dict:
    """Accuracy metrics (in %) from per-class correct and total test counts.

    ``mean`` averages the classes that have test images (as the published evaluator);
    ``many``/``med``/``few`` group the classes by their training-set size (>100, 20-100, <20).
    """
    correct = correct.double().cpu()
    total = total.double().cpu()
    if len(cls_num_list) != correct.numel():
        raise ValueError(f"cls_num_list has {len(cls_num_list)} classes but the counts have {correct.numel()}")
    n = float(total.sum())
    if n == 0:
        raise ValueError("no test samples were evaluated")
    per_class = torch.where(total > 0, 100.0 * correct / total.clamp_min(1), torch.full_like(total, math.nan))
    present = total > 0
    metrics = {
        "overall": float(100.0 * correct.sum() / n),
        "mean": float(per_class[present].mean()),
        "num_samples": int(n),
    }
    metrics.update(group_accuracies(per_class.tolist(), list(cls_num_list)))
    metrics["per_class"] = [None if math.isnan(v) else float(v) for v in per_class.tolist()]
    metrics["per_class_count"] = [int(t) for t in total.tolist()]
    return metrics


def batch_logits(model, images: torch.Tensor, use_feature_tte: bool) -> torch.Tensor:
    """Unadjusted logits ``[B, K]`` of ``[B, 3, H, W]`` images, or of ``[B, C, 3, H, W]`` TTE crops
    (averaged unit features when ``use_feature_tte``, else averaged crop logits)."""
    if images.dim() == 4:
        return model(images)
    if images.dim() != 5:
        raise ValueError(
            f"test images must be [B, 3, H, W] or [B, C, 3, H, W] (TTE crops); got shape {tuple(images.shape)}"
        )
    b, c = images.shape[:2]
    flat = images.flatten(0, 1)  # every crop in one forward
    if use_feature_tte:
        feats = model.encode_image(flat).reshape(b, c, -1).transpose(0, 1)
        unit = ops.tte_mean_unit_features(feats)
        return model.classifier_logits_from_unit(unit)
    logits = model(flat).reshape(b, c, -1).transpose(0, 1)
    return ops.tte_aggregate(logits.contiguous()).logits


def evaluate(
    model,
    loader: Iterable,
    cls_num_list: Sequence[int],
    tte: Optional[bool] = None,
    device=None,
    precision: str = "fp32",
    progress: bool = True,
    feature_tte: bool = True,
    distributed: bool = False,
    confusion: bool = False,
) -> dict:
    """Evaluate ``model`` on ``loader`` and return the metrics dict.

    Args:
        model: a :class:`~liftplus_fast.model.LiftModel` (or any module mapping images to logits;
            the feature-space TTE shortcut needs ``encode_image`` and
            ``classifier_logits_from_unit``).
        loader: yields ``(images, labels)``; images ``[B, 3, H, W]`` or, with TTE,
            ``[B, C, 3, H, W]``.
        cls_num_list: training-set class sizes (for the many/med/few groups).
        tte: force (True) or forbid (False) TTE; ``None`` follows the shape of the images.
        device: where to run; default the model's device.
        precision: "fp32", or a half precision ("fp16"/"amp"/"bf16"; bf16 on CPU). A model
            built with a half ``prec_train`` runs in its own dtype unless another half type
            is asked for (see :func:`precision_context`).
        progress: show a tqdm bar.
        feature_tte: average normalised crop features (exact for cosine classifiers).
        distributed: ``loader`` holds this process's shard of the test set; the per-class
            counts are summed over the default ``torch.distributed`` process group, so every
            process returns the metrics of the whole set.
        confusion: also count the confusion matrix (``K x K`` int64, ``K**2 * 8`` bytes).

    Returns:
        ``{"overall", "mean", "many", "med", "few", "per_class", "per_class_count",
        "num_samples"}``, accuracies in percent (``per_class_count``: test images per class);
        with ``confusion``, ``"confusion"``: a NumPy array, rows the true classes, columns the
        predicted ones.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    k = len(cls_num_list)
    correct = torch.zeros(k, dtype=torch.int64)
    total = torch.zeros(k, dtype=torch.int64)
    use_feature_tte = feature_tte and feature_tte_usable(model)
    confusion_counts = torch.zeros(k, k, dtype=torch.int64) if confusion else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), precision_context(model, device, precision), safe_points():
            for images, labels in progress_bar(loader, desc="Testing", disable=not progress, leave=False):
                check_stop("during evaluation")
                if tte is True and images.dim() != 5:
                    raise ValueError(
                        "tte=True needs [B, C, 3, H, W] crops from the test transform "
                        f"(build it with tte=True); got shape {tuple(images.shape)}"
                    )
                if tte is False and images.dim() == 5:
                    images = images[:, -1]  # the centre crop (FiveCrop's last)
                images = images.to(device, non_blocking=True)
                labels = labels.to(device=device, dtype=torch.int64)
                logits = batch_logits(model, images, use_feature_tte)
                if logits.shape[-1] != k:
                    raise ValueError(f"the model predicts {logits.shape[-1]} classes but cls_num_list has {k}")
                _count(ops.tte_aggregate(logits.float().unsqueeze(0), labels), labels, correct, total, confusion_counts)
    finally:
        model.train(was_training)
    # NCCL reduces device tensors only; Gloo takes CPU ones.
    reduce_on = device if device.type == "cuda" else "cpu"
    if distributed:
        correct, total = all_reduce_sum(torch.stack([correct, total]).to(reduce_on)).cpu()
    metrics = metrics_from_counts(correct, total, cls_num_list)
    if confusion_counts is not None:
        if distributed:
            confusion_counts = all_reduce_sum(confusion_counts.to(reduce_on)).cpu()
        metrics["confusion"] = confusion_counts.numpy()
    return metrics


def _count(hits, labels, correct, total, confusion) -> None:
    correct += hits.correct.cpu()
    total += hits.total.cpu()
    if confusion is not None:
        pairs = (labels.cpu(), hits.pred.cpu().to(torch.int64))
        confusion.index_put_(pairs, torch.ones_like(pairs[0]), accumulate=True)


def feature_tte_usable(model) -> bool:
    """Whether ``model``'s crops can be averaged as unit features (a cosine classifier head)."""
    return hasattr(model, "classifier_logits_from_unit") and getattr(model, "supports_feature_tte", False)
