"""The fast path trains the same model as the reference path (the published code's structure).

In fp32, three SGD steps of the whole LIFT+ step (fused attention/GELU/AdaptFormer/loss kernels,
multi-tensor SGD) leave the loss, the logits and every tuner tensor within 1e-4 (relative to
each tensor's largest value) of the reference path with the published per-tensor SGD loop.
"""

import copy

import torch

import liftplus_fast as lf
from liftplus_fast.train_loop import make_optimizer
from tests.ops.op_tester import backend

from .conftest import CLASSNAMES, COUNTS, cfg_for


def _train(model, images, labels, backend_name, fast_optim, steps=3):
    with backend(backend_name):
        params = [p for p in model.tuner.parameters() if p.requires_grad]
        cfg = model.cfg
        opt = (
            make_optimizer(params, cfg)
            if fast_optim
            else torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        )
        losses, logits = [], []
        for _ in range(steps):
            loss, lg = model.training_loss(images, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            logits.append(lg)
        return (
            torch.stack(losses),
            torch.stack(logits),
            {k: v.detach().clone() for k, v in model.tuner.state_dict().items()},
        )


def _rel(a, b):
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


def test_fp32_three_sgd_steps_match_the_reference(tiny_clip_and_tok):
    clip, tok = tiny_clip_and_tok
    torch.manual_seed(0)
    # lr raised so three steps move the adapters well away from their zero init.
    cfg = cfg_for(lr=0.5)
    ref = lf.build_lift_model(copy.deepcopy(clip), cfg, COUNTS, CLASSNAMES, tok)
    fast = lf.build_lift_model(copy.deepcopy(clip), cfg, COUNTS, CLASSNAMES, tok)
    fast.tuner.load_state_dict(ref.tuner.state_dict())
    g = torch.Generator().manual_seed(5)
    images = torch.randn(8, 3, 32, 32, generator=g)
    labels = torch.randint(0, len(COUNTS), (8,), generator=g)
    loss_r, logits_r, tuner_r = _train(ref, images, labels, "reference", fast_optim=False)
    loss_f, logits_f, tuner_f = _train(fast, images, labels, "auto", fast_optim=True)
    assert _rel(loss_f, loss_r) <= 1e-4
    assert _rel(logits_f, logits_r) <= 1e-4
    for name, r in tuner_r.items():
        assert _rel(tuner_f[name], r) <= 1e-4, name
    # The steps did something: the up-projections left their zero init.
    ups = [v for k, v in tuner_r.items() if k.endswith("up.weight")]
    assert ups and all(float(u.abs().max()) > 0 for u in ups)
