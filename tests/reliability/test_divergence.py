"""A diverging run stops with an error naming epoch and step, and keeps its last good checkpoint."""

import json
import os

import pytest
import torch

import liftplus_fast as lf
from liftplus_fast import train_loop
from liftplus_fast.checkpoint import load_checkpoint
from liftplus_fast.errors import DivergenceError
from liftplus_fast.model.lift_model import LiftModel

from .conftest import list_run_args, make_list_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_list_dataset(str(tmp_path_factory.mktemp("data")))


def nan_loss_at(monkeypatch, epoch, step):
    """Make the loss of (1-based) ``epoch``/``step`` NaN (``step=None``: every step of it)."""
    real = LiftModel.training_loss
    state = {"epoch": 0, "step": 0}
    real_set_epoch = train_loop.set_transform_epoch

    def set_epoch(transform, e):
        state["epoch"], state["step"] = e + 1, 0
        real_set_epoch(transform, e)

    def loss(self, images, labels):
        state["step"] += 1
        value, logits = real(self, images, labels)
        if state["epoch"] == epoch and step in (None, state["step"]):
            value = value * float("nan")
        return value, logits

    monkeypatch.setattr(train_loop, "set_transform_epoch", set_epoch)
    monkeypatch.setattr(LiftModel, "training_loss", loss)


def test_huge_lr_stops_with_the_epoch_and_step(root, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(
        DivergenceError,
        match=r"non-finite loss \(nan\) at epoch 1, step \d+ of 3; the run is "
        r"stopped \(no checkpoint had been written\)",
    ):
        lf.fast_train(method="lift+", output_dir=out, **list_run_args(root, lr=1e6, num_epochs=2))
    # no NaN checkpoint, no metrics (the training log's TensorBoard folder is there); run.json says why
    assert sorted(os.listdir(out)) == ["config.json", "log.txt", "run.json", "tensorboard"]
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["status"] == "failed" and record["error"].startswith("DivergenceError: non-finite loss")


def test_nan_in_a_later_epoch_keeps_the_last_good_checkpoint(root, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    nan_loss_at(monkeypatch, epoch=2, step=2)
    with pytest.raises(DivergenceError, match=r"at epoch 2, step 2 of 3; .*the checkpoint of epoch 1 in .* is kept"):
        lf.fast_train(method="lift+", output_dir=out, **list_run_args(root, num_epochs=3))
    ckpt = load_checkpoint(out)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["tuner"].values())
    assert not os.path.exists(os.path.join(out, "metrics.json"))


def test_skip_mode_skips_the_step_and_finishes(root, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, epoch=1, step=2)
    r = lf.fast_train(method="lift+", output_dir=None, **list_run_args(root, nonfinite_loss="skip"))
    assert all(torch.isfinite(p).all() for p in r.tuner.parameters())
    h = r.history[0]
    assert h["images"] == 8 and h["loss"] == h["loss"]  # the skipped batch of 4 is not counted


def test_skip_mode_still_stops_when_nothing_is_finite(root, monkeypatch):
    nan_loss_at(monkeypatch, epoch=1, step=None)
    with pytest.raises(DivergenceError, match="every step of epoch 1 had a non-finite loss"):
        lf.fast_train(method="lift+", output_dir=None, **list_run_args(root, nonfinite_loss="skip"))


def test_finite_losses_with_exploding_parameters_are_not_checkpointed(root, tmp_path):
    # A finite loss whose step overflows the parameters (skip mode cannot see it coming) is
    # caught before the epoch's checkpoint is written.
    out = str(tmp_path / "out")
    with pytest.raises(DivergenceError, match="parameters became non-finite during epoch 1"):
        lf.fast_train(
            method="lift+", output_dir=out, **list_run_args(root, nonfinite_loss="skip", lr=1e30, classifier_scale=1e30)
        )
    assert not os.path.exists(os.path.join(out, "checkpoint.pth.tar"))
