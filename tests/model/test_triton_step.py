"""The GPU path rehearsed on the CPU: a whole LIFT+ training step with the Triton backend forced.

A tiny ViT with every tuner site LIFT+ uses (an AdaptFormer in each block, the cosine classifier
trained through the LA cross-entropy) takes one step (forward, backward, SGD with momentum and
weight decay) with ``LIFTPLUS_FAST_BACKEND=triton`` and one with ``reference``, from the same
weights. Triton runs its kernels on CPU tensors under ``TRITON_INTERPRET=1`` (the tests run in an
interpreter subprocess, see ``tests/ops/triton_interp.py``); attention and the MLP, which have no
Triton implementation, take the automatic order, as on a GPU. Tolerance: docs/ops.md,
"Tolerances" (fp32: 1e-5 of each tensor's largest entry, here for the loss, the logits, every
tuner gradient and every trained tensor after the step).
"""

import copy

import pytest
import torch

import liftplus_fast as lf
from liftplus_fast.ops import _dispatch

from ..ops.triton_interp import cpu_tests_need_interpreter, interpreter_runner  # noqa: F401

pytest.importorskip("triton")

test_cpu_tests_under_interpreter = interpreter_runner(__file__)

K = 10
RTOL = 1e-5


def _models():
    torch.manual_seed(0)
    clip, tok = lf.load_clip("tiny_vit", None)
    cfg = lf.make_config("lift+", {"num_classes": K, "resolution": 32, "prec_train": "fp32"})
    counts = [max(1, int(100 * 0.05 ** (i / (K - 1)))) for i in range(K)]
    names = [f"class {i}" for i in range(K)]
    first = lf.build_lift_model(copy.deepcopy(clip), cfg, counts, names, tok)
    second = lf.build_lift_model(copy.deepcopy(clip), cfg, counts, names, tok)
    # Trained-looking tuners: at init the up projections are zero, and every gradient behind
    # them with it.
    with torch.no_grad():
        for p in first.tuner.parameters():
            p.add_(0.2 * torch.randn_like(p))
    second.tuner.load_state_dict(first.tuner.state_dict())
    return first, second


def _step(model, images, labels):
    cfg = model.cfg
    params = dict(model.tuner.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss, logits = model.training_loss(images, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    opt.step()
    after = {n: p.detach().clone() for n, p in params.items()}
    return loss.detach(), logits, grads, after


def _close(name, got, want):
    scale = want.abs().max().item() + 1e-12
    err = (got - want).abs().max().item()
    assert err <= RTOL * scale, f"{name}: max|T-R| = {err:.3g} vs {RTOL} * {scale:.3g}"


def test_lift_plus_step_with_triton_forced_equals_the_reference(monkeypatch):
    tri_model, ref_model = _models()
    blocks = tri_model.image_encoder.blocks
    assert all(b.tuner.adaptformer is not None for b in blocks)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 32, 32, generator=g)
    labels = torch.randint(0, K, (6,), generator=g)

    monkeypatch.setattr(_dispatch, "_CHOICES", {})
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    tri = _step(tri_model, images, labels)
    ran = {op: backend for (op, dev, *_), backend in _dispatch._CHOICES.items() if dev == "cpu"}
    assert ran["adaptformer"] == "triton" and ran["la_cosine_cross_entropy"] == "triton", ran
    assert ran["attention"] != "triton" and ran["linear_gelu"] != "triton", ran
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    ref = _step(ref_model, images, labels)

    _close("loss", tri[0], ref[0])
    _close("logits", tri[1], ref[1])
    assert set(tri[2]) == set(ref[2]) and len(tri[2]) == len(blocks) * 7 + 1, sorted(tri[2])
    for name in ref[2]:
        assert ref[2][name].abs().max() > 0, name
        _close(f"grad {name}", tri[2][name], ref[2][name])
        _close(f"after step {name}", tri[3][name], ref[3][name])
    # The step moved every trained tensor (a step that changed nothing would pass the above).
    before = ref_model.tuner.state_dict()
    assert any(not torch.equal(tri[3][n], before[n]) for n in tri[3])
