"""Losses against hand-written formulas; fused LA path against classifier + loss module."""

import math

import pytest
import torch

from liftplus_fast.model import build_lift_model, build_loss

from .conftest import CLASSNAMES, COUNTS, K, cfg_for

N = torch.tensor(COUNTS, dtype=torch.float32)
PRIOR = N / N.sum()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(5, K, generator=g) * 3, torch.tensor([0, 1, 5, 3, 5])


def _ce(z, y):
    return torch.logsumexp(z, 1) - z[torch.arange(len(y)), y]


def _loss(name, **kw):
    return build_loss(cfg_for("lift+", loss_type=name, **kw), COUNTS)


def test_ce_focal_la_bs(batch):
    z, y = batch
    torch.testing.assert_close(_loss("CE")(z, y), _ce(z, y).mean())
    ce = _ce(z, y)
    p = torch.exp(-ce)
    torch.testing.assert_close(_loss("Focal")(z, y), ((1 - p) ** 2 * ce).mean())
    torch.testing.assert_close(_loss("LA")(z, y), _ce(z + torch.log(PRIOR), y).mean())
    torch.testing.assert_close(_loss("LA", la_tau=0.5)(z, y), _ce(z + 0.5 * torch.log(PRIOR), y).mean())
    torch.testing.assert_close(_loss("BS")(z, y), _ce(z + torch.log(PRIOR), y).mean())


def test_ldam(batch):
    z, y = batch
    m = N**-0.25
    m = m * 0.5 / m.max()
    zm = z.clone()
    for i, c in enumerate(y):
        zm[i, c] -= 25.0 * m[c]
    torch.testing.assert_close(_loss("LDAM")(z, y), _ce(zm, y).mean())


@pytest.mark.parametrize("name", ["CB", "GRW"])
def test_reweighted(name, batch):
    z, y = batch
    if name == "CB":
        w = (1 - 0.9999) / (1 - 0.9999 ** N.double())
    else:
        w = 1.0 / PRIOR.double()
    w = (w / w.mean()).float()
    expected = (w[y] * _ce(z, y)).sum() / w[y].sum()
    torch.testing.assert_close(_loss(name)(z, y), expected)


def test_lade(batch):
    z, y = batch
    ce = _ce(z + torch.log(PRIOR), y).mean()
    total = 0.0
    for k in range(K):
        sel = y == k
        first = z[sel, k].sum() / (sel.sum() + 1e-8)
        q = z[:, k] - torch.log(PRIOR[k] + 1e-9) + math.log(1 / K + 1e-9)
        second = torch.logsumexp(q, 0) - math.log(len(y))
        total = total + PRIOR[k] * (first - second - 0.1 * second**2)
    torch.testing.assert_close(_loss("LADE")(z, y), ce + 0.1 * (-total))


def test_zero_count_class_raises_naming_it():
    with pytest.raises(ValueError, match="class index 2"):
        build_loss(cfg_for("lift+"), [5, 3, 0, 1, 1, 1])


def test_cls_num_list_length_must_match(fresh_clip, tokenizer):
    with pytest.raises(ValueError, match="cls_num_list"):
        build_lift_model(fresh_clip, cfg_for("lift+"), COUNTS[:-1], CLASSNAMES[:-1], tokenizer)


@pytest.mark.parametrize("loss_type,tau", [("LA", 1.0), ("LA", 0.7), ("CE", 1.0), ("BS", 1.0)])
def test_fused_path_equals_classifier_plus_loss(loss_type, tau, fresh_clip, tokenizer, images):
    model = build_lift_model(
        fresh_clip, cfg_for("lift+", loss_type=loss_type, la_tau=tau), COUNTS, CLASSNAMES, tokenizer
    )
    assert model._fused_tau() is not None
    with torch.no_grad():
        for blk in model.tuner.image_encoder.blocks:
            blk.adaptformer.up.weight.normal_(std=0.1)
    labels = torch.tensor([0, 4, 5])
    params = list(model.tuner.parameters())

    loss_f, logits_f = model.training_loss(images, labels)
    grads_f = torch.autograd.grad(loss_f, params)
    logits_u = model(images)
    loss_u = model.loss_fn(logits_u, labels)
    grads_u = torch.autograd.grad(loss_u, params)

    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_f, logits_u.detach(), rtol=1e-5, atol=1e-5)
    for gf, gu in zip(grads_f, grads_u):
        torch.testing.assert_close(gf, gu, rtol=1e-5, atol=1e-6)


def test_non_fused_losses_run_through_the_module(fresh_clip, tokenizer, images):
    model = build_lift_model(fresh_clip, cfg_for("lift+", loss_type="LDAM"), COUNTS, CLASSNAMES, tokenizer)
    assert model._fused_tau() is None
    labels = torch.tensor([0, 4, 5])
    loss, logits = model.training_loss(images, labels)
    torch.testing.assert_close(loss, model.loss_fn(model(images), labels))


def test_labels_out_of_range_raise(fresh_clip, tokenizer, images):
    model = build_lift_model(fresh_clip, cfg_for("lift+"), COUNTS, CLASSNAMES, tokenizer)
    with pytest.raises(ValueError, match="labels"):
        model.training_loss(images, torch.tensor([0, 1, K]))
    with pytest.raises(ValueError, match="labels"):
        model.training_loss(images, torch.tensor([0, -1, 2]))
