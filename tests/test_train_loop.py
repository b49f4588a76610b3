"""The one optimiser step (TrainStep): accumulation, the update, and skipping a non-finite step."""

import copy

import pytest
import torch

from liftplus_fast.config import make_config
from liftplus_fast.model import build_lift_model, load_clip
from liftplus_fast.train_loop import TrainStep, make_optimizer

K = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    clip, tok = load_clip("tiny_vit")
    cfg = make_config("lift+", {"num_classes": K, "resolution": 32, "prec_train": "fp32", "classifier_init": "random"})
    m = build_lift_model(clip, cfg, [8, 4, 2, 1], list("abcd"), tokenizer=tok)
    with torch.no_grad():  # away from the zero inits, so every tuner tensor gets a gradient
        for p in m.tuner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _step(model, accum_step):
    model = copy.deepcopy(model)
    params = [p for p in model.tuner.parameters() if p.requires_grad]
    return model, TrainStep(model, make_optimizer(params, model.cfg), accum_step)


def test_accumulated_halves_make_the_step_of_the_whole_batch(model):
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, K, (8,), generator=g)
    whole, step = _step(model, 1)
    loss, logits = step(images, labels)
    assert isinstance(loss, float) and logits.shape == (8, K)
    halves, step2 = _step(model, 2)
    step2.accumulate(images[:4], labels[:4])
    step2.accumulate(images[4:], labels[4:])
    assert step2.update()
    moved = 0.0
    for a, b, before in zip(whole.tuner.parameters(), halves.tuner.parameters(), model.tuner.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((a - before).detach().abs().max()))
        assert a.grad is None and b.grad is None  # cleared after the update
    assert moved > 1e-4  # the step changed the tuner


def test_a_non_finite_micro_batch_skips_the_whole_step(model, monkeypatch):
    g = torch.Generator().manual_seed(2)
    images, labels = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, K, (4,), generator=g)
    tuned, step = _step(model, 2)
    real = type(tuned).training_loss
    calls = []

    def nan_second(self, x, y):
        calls.append(1)
        loss, logits = real(self, x, y)
        return (loss * float("nan") if len(calls) == 2 else loss), logits

    monkeypatch.setattr(type(tuned), "training_loss", nan_second)
    before = [p.detach().clone() for p in tuned.tuner.parameters()]
    step.accumulate(images, labels)
    value, _ = step.accumulate(images, labels)
    assert value != value and step.update() is False
    assert all(torch.equal(a, b) for a, b in zip(tuned.tuner.parameters(), before))
    assert all(p.grad is None for p in tuned.tuner.parameters())
    step.accumulate(images, labels)  # the next step starts clean
    step.accumulate(images, labels)
    assert step.update() is True
    assert any(not torch.equal(a, b) for a, b in zip(tuned.tuner.parameters(), before))
