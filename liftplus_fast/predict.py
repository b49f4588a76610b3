"""``predict``: the classes a trained tuner gives new images, with names and probabilities.

The model is rebuilt from a run's safetensors tuner folder (``RUN/tuner/``, written when
training ends, or any folder written by ``model.save_tuner``): the backbone named there with its
weights, the tuner, the class names. Images come from a folder (searched recursively) or a list
file (one path per line; a trailing integer label, as in the split files, is ignored). Each
image goes through the run's test transform (five-crop TTE when asked) in batches; the output
CSV has one row per image: ``image``, then ``class_i``, ``name_i``, ``prob_i`` for the top
``k`` classes (softmax of the model's logits). Images that cannot be read are skipped and
listed, with the reason, in ``<output>.skipped.txt``; they never stop the run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .config import LiftConfig
from .data.image_folder import image_files
from .data.images import load_rgb_image
from .data.transforms import build_test_transform
from .errors import MissingInputError, UserInputError
from .evaluate import batch_logits, feature_tte_usable, precision_context
from .files import atomic_write_bytes
from .model import load_tuner
from .model.tuner_files import read_tuner_config
from .options import check_fields, flag, integer, option
from .options import device as device_check
from .progress import progress_bar
from .run_folder import model_run_folder
from .run_lock import lock_run_folder
from .runtime import resolve_device, seed_everything
from .tuner_source import tuner_folder

__all__ = ["PredictOptions", "PredictSummary", "list_images", "predict"]


@dataclass
class PredictOptions:
    """The options of ``liftplus-fast predict`` (``--top-k 5`` ... on its command line), checked."""

    top_k: int = option(5, integer(lo=1), "classes listed per image, most probable first")
    tte: bool = option(False, flag, "five-crop test-time ensembling (as the run's test with tte True)")
    batch_size: int = option(64, integer(lo=1), "images per forward pass")
    num_workers: int = option(4, integer(lo=0), "image-loading processes (at most the CPU count; 0: this one)")
    device: str = option("auto", device_check, "where to run: auto (CUDA when available), cpu, cuda or cuda:N")

    def __post_init__(self):
        check_fields(self)


@dataclass
class PredictSummary:
    """What :func:`predict` did: the CSV written, images predicted, images skipped (path, reason)."""

    output: str
    predicted: int
    skipped: List[Tuple[str, str]]
    skipped_file: Optional[str]


def _list_file_paths(list_file: str, root: Optional[str]) -> List[str]:
    base = root if root is not None else os.path.dirname(os.path.abspath(list_file))
    paths = []
    with open(list_file, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                line = parts[0]  # "path label", the split files' format
            paths.append(os.path.normpath(os.path.join(base, line)))
    return paths


def list_images(images: str, root: Optional[str] = None) -> List[str]:
    """The image paths ``images`` names: a folder's image files (recursively, sorted), or the
    lines of a list file (relative paths are taken from ``root``, else the list file's folder)."""
    if os.path.isdir(images):
        found = image_files(images)
        if not found:
            raise UserInputError(f"--images {images!r}: no image files in that folder")
        return found
    if not os.path.isfile(images):
        raise MissingInputError(f"--images {images!r} is neither a folder of images nor a list file")
    try:
        found = _list_file_paths(images, root)
    except UnicodeDecodeError:
        raise UserInputError(f"--images {images!r} is not a text list file (one image path per line)") from None
    if not found:
        raise UserInputError(f"--images {images!r}: the list file names no images")
    return found


class _Images(Dataset):
    # A bad image becomes (None, reason) rather than an exception, so the batch goes on without it.
    def __init__(self, paths: List[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(load_rgb_image(self.paths[index])), None
        except (UserInputError, OSError) as exc:  # missing, unreadable or undecodable: named
            return index, None, str(exc)
        except Exception as exc:  # whatever else one file does to the decoder must not stop the others
            return index, None, f"{self.paths[index]}: {type(exc).__name__}: {exc}"


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, why) for i, x, why in items if x is None]
    if not good:
        return [], None, bad
    return [i for i, _ in good], torch.stack([x for _, x in good]), bad


def _csv_text(rows: List[list], k: int) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["image"]
    for j in range(1, k + 1):
        header += [f"class_{j}", f"name_{j}", f"prob_{j}"]
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def predict(
    model_dir: str,
    images: str,
    output: str,
    options: Optional[PredictOptions] = None,
    *,
    root: Optional[str] = None,
    progress: bool = True,
) -> PredictSummary:
    """Predict the ``options.top_k`` classes of every image ``images`` names and write them to
    ``output`` (CSV, one row per image read; see the module docstring). ``model_dir``: a run
    folder or a tuner folder. Returns a :class:`PredictSummary`."""
    options = options or PredictOptions()
    folder = tuner_folder(model_dir) if os.path.isdir(model_dir) else None
    if folder is None:
        raise MissingInputError(
            f"--model-dir {model_dir!r} holds no safetensors tuner: give a run folder (its tuner/ "
            "is written when training ends) or a folder written by model.save_tuner"
        )
    paths = list_images(images, root)
    dev = resolve_device(options.device)
    # Read while no training writes the run (the lock is shared with tests and other predictions).
    with lock_run_folder(model_run_folder(folder), shared=True):
        # A randomly initialised backbone is drawn as the training run drew it.
        seed_everything(LiftConfig.from_dict(read_tuner_config(folder)["config"]).seed)
        model = load_tuner(folder, device=dev)
    cfg = dataclasses.replace(model.cfg, tte=options.tte, apply_preset=False)
    k = min(options.top_k, model.num_classes)
    loader = DataLoader(
        _Images(paths, build_test_transform(cfg)),
        batch_size=options.batch_size,
        num_workers=min(options.num_workers, os.cpu_count() or 1),
        collate_fn=_collate,
    )
    rows, skipped, feature_tte = [], [], feature_tte_usable(model)
    with torch.inference_mode(), precision_context(model, dev, cfg.prec_test):
        for indices, batch, bad in progress_bar(loader, desc="Predicting", disable=not progress):
            skipped += [(paths[i], why) for i, why in bad]
            if batch is None:
                continue
            probs = torch.softmax(batch_logits(model, batch.to(dev), feature_tte).float(), dim=-1).cpu()
            top = probs.topk(k, dim=-1)
            for i, p, c in zip(indices, top.values.tolist(), top.indices.tolist()):
                row = [paths[i]]
                for cls, prob in zip(c, p):
                    row += [cls, model.classnames[cls], f"{prob:.6f}"]
                rows.append(row)
    atomic_write_bytes(output, _csv_text(rows, k).encode())
    skipped_file = output + ".skipped.txt"
    if skipped:
        atomic_write_bytes(skipped_file, "".join(f"{p}\t{why}\n" for p, why in skipped).encode())
    else:
        if os.path.exists(skipped_file):  # a list from an earlier call would describe other images
            os.remove(skipped_file)
        skipped_file = None
    return PredictSummary(output, len(rows), skipped, skipped_file)
