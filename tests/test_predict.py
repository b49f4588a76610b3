"""predict: top-k classes with names and probabilities for a folder or list of images, bad images
listed and skipped."""

import csv
import errno
import os

import pytest
import torch

from liftplus_fast import run_lock
from liftplus_fast.config import make_config
from liftplus_fast.data.images import load_rgb_image
from liftplus_fast.data.synthetic_images import write_image_folder
from liftplus_fast.data.transforms import build_test_transform
from liftplus_fast.errors import MissingInputError, RunInUseError, UserInputError
from liftplus_fast.model import build_lift_model, load_clip
from liftplus_fast.predict import PredictOptions, list_images, predict
from liftplus_fast.run_lock import LOCK_NAME
from liftplus_fast.runtime import seed_everything
from tests.reliability.test_run_lock import child_pids, end_holder, start_holder

NAMES = ["red_fox", "blue_jay", "green_frog"]


@pytest.fixture(scope="module")
def tuner_and_images(tmp_path_factory):
    """A saved tuner on the tiny random ViT (seed 0, as a run with seed 0 draws it) and images."""
    root = tmp_path_factory.mktemp("predict")
    write_image_folder(str(root / "data"), [6, 3, 2], test_per_class=2, sizes=((40, 48),), classnames=NAMES)
    cfg = make_config("lift+", {"backbone": "tiny_vit", "pretrained": None, "num_classes": 3, "resolution": 32})
    seed_everything(cfg.seed)
    clip, tok = load_clip("tiny_vit")
    model = build_lift_model(clip, cfg, [6, 3, 2], [n.replace("_", " ") for n in NAMES], tok)
    with torch.no_grad():  # stand-in for training
        for p in model.tuner.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    model.save_tuner(str(root / "run" / "tuner"))
    return root, model.eval()


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_are_the_models_probabilities(tuner_and_images, tmp_path):
    root, model = tuner_and_images
    out = tmp_path / "preds.csv"
    summary = predict(str(root / "run"), str(root / "data" / "test"), str(out), PredictOptions(top_k=2, num_workers=0))
    rows = _rows(out)
    assert summary.predicted == len(rows) == 6 and not summary.skipped and summary.skipped_file is None
    assert list(rows[0]) == ["image", "class_1", "name_1", "prob_1", "class_2", "name_2", "prob_2"]
    transform = build_test_transform(model.cfg)
    for row in rows:
        with torch.no_grad():
            probs = torch.softmax(model(transform(load_rgb_image(row["image"]))[None]).float(), -1)[0]
        top = probs.topk(2)
        assert [int(row["class_1"]), int(row["class_2"])] == top.indices.tolist()
        assert row["name_1"] == model.classnames[top.indices[0]]
        assert float(row["prob_1"]) == pytest.approx(float(top.values[0]), abs=2e-3)
        assert float(row["prob_1"]) >= float(row["prob_2"])


def test_bad_images_are_listed_and_skipped(tuner_and_images, tmp_path):
    root, _ = tuner_and_images
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    good = os.path.join(root, "data", "test", "red_fox", "00000.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{good} 0\n\nbroken.jpg\nmissing.png 2\n{good}\n")
    out = tmp_path / "preds.csv"
    options = PredictOptions(top_k=5, tte=True, batch_size=2, num_workers=0)
    summary = predict(str(root / "run" / "tuner"), str(listing), str(out), options, progress=False)
    rows = _rows(out)
    assert summary.predicted == len(rows) == 2 and [r["image"] for r in rows] == [good, good]
    assert list(rows[0])[-1] == "prob_3"  # top 5 of 3 classes: 3
    assert [os.path.basename(p) for p, _ in summary.skipped] == ["broken.jpg", "missing.png"]
    text = open(summary.skipped_file).read()
    assert "cannot decode image" in text and "not found" in text
    # A later call without bad images removes the old list rather than leave it describing them.
    listing.write_text(f"{good}\n")
    assert predict(str(root / "run"), str(listing), str(out), options).skipped_file is None
    assert not os.path.exists(str(out) + ".skipped.txt")


def test_image_lists_and_folders(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.JPG", "a/y.png", "a/notes.txt", "b.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert list_images(str(tmp_path)) == [str(tmp_path / n) for n in ("b.jpg", "a/x.JPG", "a/y.png")]
    (tmp_path / "l.txt").write_text("a/x.JPG 3\nsome dir/with space.jpg\n/abs/z.jpg 1\n")
    assert list_images(str(tmp_path / "l.txt")) == [
        str(tmp_path / "a/x.JPG"),
        str(tmp_path / "some dir/with space.jpg"),
        "/abs/z.jpg",
    ]
    assert list_images(str(tmp_path / "l.txt"), root="/data")[0] == "/data/a/x.JPG"
    with pytest.raises(MissingInputError, match="neither a folder of images nor a list file"):
        list_images(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no image files"):
        list_images(str(tmp_path / "empty"))


def test_predict_needs_a_tuner_folder_and_checked_options(tmp_path):
    with pytest.raises(MissingInputError, match="holds no safetensors tuner"):
        predict(str(tmp_path), str(tmp_path), str(tmp_path / "p.csv"))
    with pytest.raises(UserInputError, match="option top_k must be an integer >= 1; got 0"):
        PredictOptions(top_k=0)


def test_predict_reads_a_run_only_while_no_training_writes_it(tuner_and_images, tmp_path, monkeypatch, caplog):
    root, _ = tuner_and_images
    folder = root / "run" / "tuner"  # a tuner folder outside a run folder is its own run folder
    writer = start_holder(folder)
    children = child_pids(writer.pid)
    try:
        with pytest.raises(RunInUseError, match=f"is in use by a live run: pid {writer.pid}"):
            predict(
                str(root / "run"), str(root / "data" / "test"), str(tmp_path / "p.csv"), PredictOptions(num_workers=0)
            )
        assert not (tmp_path / "p.csv").exists()
    finally:
        end_holder(writer, children)
    (folder / LOCK_NAME).unlink()  # what the killed holder left
    # A run this user cannot write into (a shared read-only copy) is read without its lock.
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if os.path.basename(path) == LOCK_NAME:
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(run_lock.os, "open", read_only)
    with caplog.at_level("WARNING", logger="liftplus_fast"):
        summary = predict(
            str(root / "run"), str(root / "data" / "test"), str(tmp_path / "p.csv"), PredictOptions(num_workers=0)
        )
    assert (
        summary.predicted == 6 and "reading" in caplog.text and "without its lock: Read-only file system" in caplog.text
    )
    assert not (folder / LOCK_NAME).exists()
