"""Per-class test accuracy against training-set class size, with many/medium/few bands."""

from __future__ import annotations

import os
from typing import Dict, Sequence

from .data.groups import FEW_SHOT, MANY_SHOT
from .files import atomic_write


def plot_per_class_accuracy(
    path: str, cls_num_list: Sequence[int], runs: Dict[str, dict], title: str = "Per-class test accuracy"
) -> str:
    """Write a PNG of per-class accuracy (y) against training images per class (x, log scale).

    ``runs`` maps a label (e.g. "LIFT+") to a metrics dict with ``per_class`` and the group
    accuracies; each run is one series, its many/med/few accuracies in the legend. Returns
    ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = list(cls_num_list)
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=120)
    lo, hi = max(min(counts) * 0.8, 0.5), max(counts) * 1.25
    bands = [
        (lo, FEW_SHOT, f"few (<{FEW_SHOT})", "#fde0dd"),
        (FEW_SHOT, MANY_SHOT + 0.5, f"medium ({FEW_SHOT}-{MANY_SHOT})", "#fff7bc"),
        (MANY_SHOT + 0.5, hi, f"many (>{MANY_SHOT})", "#e5f5e0"),
    ]
    for start, end, label, colour in bands:
        if end > lo and start < hi:
            ax.axvspan(max(start, lo), min(end, hi), color=colour, alpha=0.8, lw=0)
            ax.text((max(start, lo) * min(end, hi)) ** 0.5, 103, label, ha="center", va="bottom", fontsize=8)
    markers = "os^Dv<>"
    for i, (name, metrics) in enumerate(runs.items()):
        pts = [(c, a) for c, a in zip(counts, metrics["per_class"]) if a is not None]
        xs, ys = zip(*pts) if pts else ((), ())

        def fmt(key, metrics=metrics):
            v = metrics.get(key)
            return "n/a" if v is None or v != v else f"{v:.1f}"

        label = f"{name}: overall {fmt('overall')}, many {fmt('many')}, med {fmt('med')}, few {fmt('few')}"
        ax.scatter(xs, ys, s=18, marker=markers[i % len(markers)], alpha=0.75, label=label)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    # Class sizes are counts: label 1-2-5 steps as "20", not "2×10¹".
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(-3, 112)
    ax.set_xlabel("training images in the class")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_title(title)
    # Below the axes so no point is hidden behind it.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


# A confusion picture is drawn up to this many classes; the names label the axes up to LABELLED.
CONFUSION_PICTURE_MAX, CONFUSION_LABELLED_MAX = 100, 40


def plot_confusion(path: str, confusion, classnames: Sequence[str], title: str = "Confusion matrix") -> str:
    """Write a PNG of the row-normalised confusion matrix (rows: true class, columns: predicted).

    Meant for up to :data:`CONFUSION_PICTURE_MAX` classes; class names label the axes up to
    :data:`CONFUSION_LABELLED_MAX`, class indices beyond. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(confusion, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    k = share.shape[0]
    side = min(12.0, 4.0 + 0.12 * k)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=120)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's test images")
    if k <= CONFUSION_LABELLED_MAX:
        ax.set_xticks(range(k), [str(n) for n in classnames], rotation=90, fontsize=7)
        ax.set_yticks(range(k), [str(n) for n in classnames], fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path
