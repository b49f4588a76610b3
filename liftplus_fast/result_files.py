"""The result files of a run or test folder: metrics, per-class table, plots, confusion matrix.

* ``metrics.json``: the accuracies (``overall``, ``mean``, ``many``, ``med``, ``few``,
  ``per_class``), the wall times, the per-epoch history and the training class sizes;
* ``per_class.csv``: one row per class, :data:`PER_CLASS_COLUMNS`;
* ``per_class_accuracy.png``: accuracy against training-set size, with the shot groups;
* with ``confusion_matrix True``: ``confusion.npy`` (``K x K`` int64, rows the true classes,
  columns the predicted ones) and, up to
  :data:`~liftplus_fast.plotting.CONFUSION_PICTURE_MAX` classes, ``confusion.png``.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .data.groups import shot_groups
from .files import atomic_write, atomic_write_bytes, atomic_write_json
from .plotting import CONFUSION_PICTURE_MAX, plot_confusion, plot_per_class_accuracy

__all__ = ["PER_CLASS_COLUMNS", "per_class_csv", "write_results"]

PER_CLASS_COLUMNS = ("class", "name", "train_images", "group", "test_images", "accuracy")


def per_class_csv(metrics: Dict[str, Any], classnames: Sequence[str], cls_num_list: Sequence[int]) -> str:
    """The text of ``per_class.csv``: class index, name, training images, shot group
    (many > 100, med 20-100, few < 20 training images), test images and accuracy in percent
    (empty for a class without test images)."""
    group = [""] * len(cls_num_list)
    for name, indices in shot_groups(cls_num_list).items():
        for i in indices.tolist():
            group[i] = name
    tested = metrics.get("per_class_count") or [None] * len(cls_num_list)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PER_CLASS_COLUMNS)
    for k, (name, train, acc, test) in enumerate(zip(classnames, cls_num_list, metrics["per_class"], tested)):
        writer.writerow(
            [k, name, int(train), group[k], "" if test is None else test, "" if acc is None else f"{acc:.4f}"]
        )
    return out.getvalue()


def write_results(
    folder: str,
    metrics: Dict[str, Any],
    *,
    classnames: Sequence[str],
    cls_num_list: Sequence[int],
    label: str,
    title: str,
    timings: Optional[Dict[str, float]] = None,
    history: Optional[List[Dict[str, float]]] = None,
) -> List[str]:
    """Write the result files of ``metrics`` (from :func:`liftplus_fast.evaluate.evaluate`) into
    ``folder``; returns the names written. ``metrics["confusion"]``, when present, goes to
    ``confusion.npy`` (and ``confusion.png``), not into ``metrics.json``."""
    scalars = {k: v for k, v in metrics.items() if k != "confusion"}
    atomic_write_json(
        os.path.join(folder, "metrics.json"),
        {"metrics": scalars, "timings": timings or {}, "history": history or [], "cls_num_list": list(cls_num_list)},
    )
    atomic_write_bytes(os.path.join(folder, "per_class.csv"), per_class_csv(scalars, classnames, cls_num_list).encode())
    plot_per_class_accuracy(os.path.join(folder, "per_class_accuracy.png"), cls_num_list, {label: scalars}, title=title)
    written = ["metrics.json", "per_class.csv", "per_class_accuracy.png"]
    confusion = metrics.get("confusion")
    if confusion is not None:
        atomic_write(os.path.join(folder, "confusion.npy"), lambda f: np.save(f, np.asarray(confusion)))
        written.append("confusion.npy")
        if len(classnames) <= CONFUSION_PICTURE_MAX:
            plot_confusion(os.path.join(folder, "confusion.png"), confusion, classnames, title=f"{title}: confusion")
            written.append("confusion.png")
    return written
