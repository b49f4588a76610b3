"""Broken files, full disks and bad data: one sentence naming the file and the cause, nothing lost."""

import argparse
import errno
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import liftplus_fast as lf
from liftplus_fast import checkpoint as ckpt_mod
from liftplus_fast import train as train_mod
from liftplus_fast.checkpoint import OutputWriteError, load_checkpoint, save_checkpoint
from liftplus_fast.cli import error_sentence
from liftplus_fast.cli import main as cli_main
from liftplus_fast.data import CorruptImageError, load_rgb_image
from tests.data.tiny_run import tiny_argv

from .conftest import list_run_args, make_list_dataset, snapshot

# --- images -------------------------------------------------------------------------------------


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    path = str(tmp_path / "g16.png")
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_rgb_image(path))
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert rgb.shape == (64, 64, 3) and np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert (rgb == 255).mean() < 0.01  # Pillow's own convert() makes 99.6 % of them 255


def test_cmyk_and_palette_images_become_rgb(tmp_path):
    cmyk = str(tmp_path / "c.jpg")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    r, g, b = np.asarray(load_rgb_image(cmyk)).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60
    pal = str(tmp_path / "p.png")
    Image.new("P", (8, 8), 3).save(pal)
    assert load_rgb_image(pal).mode == "RGB"


def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    path = str(tmp_path / "huge.png")
    Image.new("L", (100, 100)).save(path)
    # A 100x100 image against a 2,000-pixel limit is what a 14000x14000 one is against Pillow's.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)
    with pytest.raises(CorruptImageError, match=r"huge\.png.*too large to decode safely"):
        load_rgb_image(path)


def test_worker_errors_are_reported_as_the_original_sentence(tmp_path):
    root = make_list_dataset(str(tmp_path / "data"))
    bad = os.path.join(root, "img", "train_0_1.png")
    open(bad, "wb").write(b"not a png")
    out = str(tmp_path / "out")
    with pytest.raises(CorruptImageError) as err:
        lf.fast_train(method="lift+", output_dir=out, **list_run_args(root, num_workers=1))
    sentence = error_sentence(err.value)
    assert sentence.startswith("cannot decode image") and "train_0_1.png" in sentence
    assert "\n" not in sentence and "Traceback" not in sentence
    assert not os.path.exists(os.path.join(out, "checkpoint.pth.tar"))


# --- list files and class names -----------------------------------------------------------------


def test_utf8_bom_in_list_file_is_not_part_of_the_first_path(tmp_path):
    root = make_list_dataset(str(tmp_path / "data"))
    for split in ("train", "test"):
        path = os.path.join(root, f"{split}.txt")
        text = open(path, encoding="utf-8").read()
        open(path, "wb").write(b"\xef\xbb\xbf" + text.encode())
    ds = lf.build_dataset("imagenet_lt", root, "train")
    assert ds.paths[0] == os.path.join(root, "img", "train_0_0.png")


def test_latin1_classnames_file_is_named(tmp_path):
    root = make_list_dataset(str(tmp_path / "data"))
    open(os.path.join(root, "classnames.txt"), "wb").write("caf\xe9\nna\xefve\nthree\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"classnames\.txt is not UTF-8 text \(byte 0xe9.*save it as UTF-8"):
        lf.build_dataset("imagenet_lt", root, "train")


def test_blank_class_name_is_named(tmp_path):
    root = make_list_dataset(str(tmp_path / "data"))
    open(os.path.join(root, "classnames.txt"), "w").write("a\n\nc\n")
    with pytest.raises(ValueError, match=r"classnames\.txt:2: blank class name"):
        lf.build_dataset("imagenet_lt", root, "train")


def test_one_class_data_set_is_refused(tmp_path):
    root = make_list_dataset(str(tmp_path / "data"), n_classes=1)
    with pytest.raises(ValueError, match="the train split has 1 class.*at least 2"):
        lf.fast_train(method="lift+", output_dir=None, **list_run_args(root))


# --- late failures become early ones ------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, match",
    [
        ("missing_test_image", r"1 of 6 images listed in .*test\.txt are missing: .*test_2_1\.png"),
        ("empty_test_list", r"the test split has no images \(.*test\.txt is empty\)"),
    ],
)
def test_test_split_problems_are_found_before_training(damage, match, tmp_path, monkeypatch):
    root = make_list_dataset(str(tmp_path / "data"))
    if damage == "missing_test_image":
        os.remove(os.path.join(root, "img", "test_2_1.png"))
    else:
        open(os.path.join(root, "test.txt"), "w").close()
    trained = []
    monkeypatch.setattr(train_mod, "train_epochs", lambda *a, **k: trained.append(1) or [])
    out = tmp_path / "out"
    with pytest.raises((FileNotFoundError, ValueError), match=match):
        lf.fast_train(method="lift+", output_dir=str(out), **list_run_args(root))
    assert trained == [] and snapshot(out) == {}  # nothing trained, nothing written


# --- checkpoints --------------------------------------------------------------------------------


@pytest.fixture
def good_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pth.tar")
    save_checkpoint(path, {"classifier.weight": torch.randn(3, 4)}, epoch=1)
    return path


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("empty", "the file is empty"),
        ("truncated", r"not a PyTorch checkpoint \(\d+ bytes, not a zip archive: truncated or another format\)"),
        ("random", r"not a PyTorch checkpoint"),
        ("pickled_object", "it holds Python objects other than tensors"),
    ],
)
def test_unreadable_checkpoint_says_why(damage, reason, good_checkpoint):
    data = open(good_checkpoint, "rb").read()
    if damage == "empty":
        data = b""
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "random":
        data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    if damage == "pickled_object":
        torch.save({"tuner": {}, "args": argparse.Namespace(lr=0.1)}, good_checkpoint)
    else:
        open(good_checkpoint, "wb").write(data)
    with pytest.raises(ValueError, match=r"could not read checkpoint .*checkpoint\.pth\.tar': " + reason):
        load_checkpoint(good_checkpoint)


def test_full_disk_keeps_the_previous_checkpoint(good_checkpoint, monkeypatch):
    before = open(good_checkpoint, "rb").read()

    def save_until_full(obj, f):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", save_until_full)
    with pytest.raises(OutputWriteError) as err:
        save_checkpoint(good_checkpoint, {"w": torch.zeros(2)}, epoch=2)
    msg = str(err.value)
    assert msg == (f"could not write {good_checkpoint} (its previous version is kept): No space left on device")
    assert err.value.__cause__ is None and err.value.__suppress_context__  # one error, not three chained
    assert open(good_checkpoint, "rb").read() == before
    assert os.listdir(os.path.dirname(good_checkpoint)) == ["checkpoint.pth.tar"]  # no temp file left


def test_full_disk_during_training_is_one_sentence_on_the_command_line(tmp_path, monkeypatch, capsys):
    root = make_list_dataset(str(tmp_path / "data"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.os, "fsync", full)
    code = cli_main(tiny_argv(tmp_path / "out", dataset="imagenet_lt", root=root, batch_size=4, prec_train="fp32"))
    lines = capsys.readouterr().err.strip().splitlines()
    # Log lines of the run may come first (when this process logs to the console); the error is
    # one sentence, the last line.
    said = [line for line in lines if line.startswith("liftplus-fast:")]
    assert code == 2 and said == lines[-1:] and "Traceback" not in "\n".join(lines), lines
    assert lines[-1].startswith("liftplus-fast: error: could not write ") and "No space left on device" in lines[-1]


# --- precision ----------------------------------------------------------------------------------


def test_fp16_on_cpu_is_logged_as_the_bf16_it_runs(tmp_path):
    root = make_list_dataset(str(tmp_path / "data"), n_train=2, n_test=1)
    seen = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    train_mod.logger.addHandler(handler)
    try:
        lf.fast_train(method="lift+", output_dir=None, **list_run_args(root, prec_train="fp16"))
    finally:
        train_mod.logger.removeHandler(handler)
    line = next(m for m in seen if "precision train" in m)
    assert "precision train bf16 (asked fp16; half precision is bf16 on CPU)" in line, line
