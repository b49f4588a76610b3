"""The published per-batch training report: print_freq lines and TensorBoard scalars."""

import logging
import os

import pytest
import torch

import liftplus_fast as lf
from liftplus_fast.train_log import EMAMeter, TrainingLog


def test_ema_meter_is_the_published_one():
    m = EMAMeter()
    for v in (10.0, 0.0, 20.0):
        m.update(v)
    assert m.val == 20.0 and m.avg == pytest.approx((10.0 * 0.9) * 0.9 + 20.0 * 0.1)


def test_running_group_accuracy_and_lines(caplog):
    counts = [200, 50, 5]  # one many, one medium, one few class
    log = TrainingLog(counts, print_freq=2, num_batches=4, num_epochs=1)
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0]])
    with caplog.at_level(logging.INFO, logger="liftplus_fast"):
        log.update(0, 0, 1.0, logits, torch.tensor([0, 1, 2]), 0.02)  # many, med right; few wrong
        log.update(0, 1, 0.5, logits, torch.tensor([0, 0, 2]), 0.02)  # class 0: right then wrong
    lines = [r.getMessage() for r in caplog.records if "batch [" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("epoch [1/1] batch [2/4]")
    # class 0: 100 then 0 -> 90; class 1: 100; class 2: 0 then 0
    assert "many 90.00 med 100.00 few 0.00" in lines[0]
    assert "mean 63.33" in lines[0] and "loss 0.5000 (0.9500)" in lines[0]


def test_fast_train_writes_tensorboard_and_batch_lines(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    r = lf.fast_train(
        dataset="digits_lt",
        backbone="tiny_vit",
        pretrained=None,
        resolution=32,
        batch_size=64,
        num_workers=0,
        progress=False,
        method="lift+",
        output_dir=str(out),
        num_epochs=1,
        print_freq=2,
        prec_train="fp32",
        prec_test="fp32",
    )
    assert r.history
    events = [f for f in os.listdir(out / "tensorboard") if f.startswith("events.out.tfevents")]
    assert len(events) == 1
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/lr", "train/loss.val", "train/many_acc", "train/med_acc", "train/few_acc"} <= tags
    n_batches = len(acc.Scalars("train/loss.val"))
    assert n_batches == -(-sum(r.cls_num_list) // 64)
    log = (out / "log.txt").read_text()
    assert log.count("batch [") == n_batches // 2 and "many " in log and " few " in log
