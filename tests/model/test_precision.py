"""Precision owned by the model: frozen weights converted once, LayerNorms and tuner fp32, and
`amp` computing what bf16 autocast computes, without autocast."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import liftplus_fast as lf
from liftplus_fast.ops import choices
from tests.ops.op_tester import backend

from .conftest import CLASSNAMES, COUNTS, cfg_for


def build(clip, tok, **overrides):
    return lf.build_lift_model(clip, cfg_for(**overrides), COUNTS, CLASSNAMES, tok)


@pytest.fixture(params=["native", "fp32"])
def half_gemm(request, monkeypatch):
    """Both CPU half paths on any machine: bf16 GEMMs, or fp32 GEMMs of bf16 values."""
    monkeypatch.setitem(choices._OPTION, "half_gemm", request.param)
    return request.param


def is_bf16_valued(t):
    return torch.equal(t, t.to(torch.bfloat16).to(t.dtype))


# On CPU every half precision is bf16 (fp16 GEMMs have no fast path there).
@pytest.mark.parametrize(
    "prec,dtype", [("bf16", torch.bfloat16), ("amp", torch.bfloat16), ("fp16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_frozen_weights_stored_once_in_the_compute_dtype(fresh_clip, tokenizer, images, prec, dtype, half_gemm):
    model = build(fresh_clip, tokenizer, prec_train=prec)
    assert model.compute_dtype == dtype and not model.needs_grad_scaler
    # Without half GEMMs the frozen weights keep fp32 storage, holding bf16 values.
    storage = torch.float32 if half_gemm == "fp32" else dtype
    trained = {id(p) for p in model.tuner.parameters()}
    assert all(p.dtype == torch.float32 for p in model.tuner.parameters())
    for mod in model.clip.visual.modules():
        for p in mod.parameters(recurse=False):
            if id(p) in trained:
                continue
            is_norm = isinstance(mod, nn.LayerNorm)
            gemm_module = isinstance(mod, (nn.Linear, nn.MultiheadAttention, nn.Conv2d))
            expected = torch.float32 if is_norm else storage if gemm_module else dtype
            assert p.dtype == expected, (type(mod).__name__, p.shape)
            if not is_norm:
                assert is_bf16_valued(p) or dtype == torch.float32, (type(mod).__name__, p.shape)
    seen = []
    handle = model.image_encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    labels = torch.tensor([0, 3, 5])
    loss, logits = model.training_loss(images, labels)  # no autocast around it
    handle.remove()
    assert seen == [dtype]  # activations in the compute dtype on both paths
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.tuner.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


class _CastRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype):
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_a_step_casts_no_frozen_weight(fresh_clip, tokenizer, images, half_gemm):
    model = build(fresh_clip, tokenizer, prec_train="amp")
    trained = {id(p) for p in model.tuner.parameters()}
    frozen = {tuple(p.shape) for p in model.clip.visual.parameters() if id(p) not in trained and p.dim() == 2}
    with _CastRecorder() as rec:
        loss, _ = model.training_loss(images, torch.tensor([0, 1, 2]))
        loss.backward()
    # Autocast would cast every one of them at every step (it caches only weights that train).
    assert frozen and rec.shapes and not frozen & set(rec.shapes)


def test_amp_computes_what_bf16_autocast_computes(tiny_clip_and_tok, images, half_gemm):
    clip, tok = tiny_clip_and_tok
    labels = torch.tensor([1, 4, 2])
    with backend("reference"):
        torch.manual_seed(3)
        fp32 = build(copy.deepcopy(clip), tok, prec_train="fp32")
        amp = build(copy.deepcopy(clip), tok, prec_train="amp")
        amp.tuner.load_state_dict(fp32.tuner.state_dict())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_ac, logits_ac = fp32.training_loss(images, labels)
        loss_ac.backward()
        ac_grads = [p.grad.clone() for p in fp32.tuner.parameters()]
        loss_amp, logits_amp = amp.training_loss(images, labels)
        loss_amp.backward()
        fp32.tuner.zero_grad()
        loss_32, _ = fp32.training_loss(images, labels)
        loss_32.backward()
    # The classifier/loss run in fp32 in both; the backbone in bf16 with the same roundings.
    torch.testing.assert_close(loss_amp, loss_ac.float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(logits_amp.float(), logits_ac.float(), rtol=2e-2, atol=2e-2)
    # Without half GEMMs the attention keeps its probabilities in fp32 (autocast's SDPA rounds
    # them to bf16): a little further from autocast, never further from fp32.
    tol = 2e-2 if half_gemm == "native" else 4e-2
    for (name, a), b, c in zip(amp.tuner.named_parameters(), ac_grads, fp32.tuner.parameters()):
        scale = float(b.abs().max()) + 1e-12
        assert float((a.grad - b).abs().max()) <= tol * scale, name
        assert float((a.grad - c.grad).norm()) <= 1.25 * float((b - c.grad).norm()) + 1e-3 * scale, name


def test_evaluate_runs_a_half_model_in_its_own_dtype(fresh_clip, tokenizer):
    from liftplus_fast.evaluate import precision_context

    model = build(fresh_clip, tokenizer, prec_train="bf16")
    cpu = torch.device("cpu")
    for prec in ("fp16", "amp", "bf16", "fp32"):
        with precision_context(model, cpu, prec):
            assert not torch.is_autocast_enabled("cpu")
    plain = nn.Linear(2, 2)
    with precision_context(plain, cpu, "fp16"):
        assert torch.is_autocast_enabled("cpu")
