"""packed_linear: frozen bf16 linear layers on oneDNN-packed weights against F.linear, the cache
of packed copies, and where the path applies."""

import gc

import pytest
import torch
import torch.nn.functional as F

from liftplus_fast.ops import choices, gemm
from liftplus_fast.ops import packed_linear as pl

MISSING = pl._ops_missing()
needs_packed = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
BF16 = torch.bfloat16


@pytest.fixture
def packed(monkeypatch):
    monkeypatch.setitem(choices._OPTION, pl.CHOICE.name, "packed")


def operands(shape, n, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(BF16)
    w = (torch.randn(n, shape[-1], generator=g) * shape[-1] ** -0.5).to(BF16)
    b = torch.randn(n, generator=g).to(BF16) if bias else None
    return x, w, b


def run(fn, x, w, b, grad, bias_grad):
    x = x.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_(bias_grad)
    y = fn(x, w, b)
    y.backward(grad)
    return y.detach(), x.grad, None if b is None else b.grad


def close(got, ref):
    got, ref = got.float(), ref.float()
    assert float((got - ref).abs().max()) <= 2**-7 * float(ref.abs().max()) + 1e-6


@needs_packed
@pytest.mark.parametrize("shape,n", [((2, 197, 768), 3072), ((394, 64), 48), ((1, 5), 7), ((3, 1, 33), 17)])
@pytest.mark.parametrize("bias,bias_grad", [(True, False), (True, True), (False, False)])
def test_matches_f_linear_forward_and_backward(packed, shape, n, bias, bias_grad):
    x, w, b = operands(shape, n, bias)
    grad = torch.randn(*shape[:-1], n, generator=torch.Generator().manual_seed(1)).to(BF16)
    got = run(gemm.linear, x, w, b, grad, bias_grad)
    ref = run(F.linear, x, w, b, grad, bias_grad)
    assert got[0].dtype == BF16 and got[0].shape == ref[0].shape
    for g, r in zip(got, ref):
        if r is None:
            assert g is None
        else:
            close(g, r)


@needs_packed
def test_packed_copies_are_made_once_follow_in_place_changes_and_go_with_the_weight(packed):
    x, w, b = operands((4, 16), 8)
    first = gemm.linear(x, w, b)
    copy = pl._PACKED[(id(w), False)][2]
    gemm.linear(x, w, b)
    assert pl._PACKED[(id(w), False)][2] is copy
    with torch.no_grad():
        w.mul_(2)  # as load_state_dict copies into a frozen weight
    close(gemm.linear(x, w, None), F.linear(x, w))
    assert pl._PACKED[(id(w), False)][2] is not copy
    assert not torch.equal(first, gemm.linear(x, w, b))
    key = (id(w), False)
    del w
    gc.collect()
    assert key not in pl._PACKED


@needs_packed
def test_applies_only_to_frozen_bf16_weights_outside_autocast(packed):
    x, w, _ = operands((4, 16), 8)
    assert pl.applies(x, w)
    assert not pl.applies(x, w.clone().requires_grad_())  # a trained weight needs its own gradient
    assert not pl.applies(x.float(), w.float())
    with torch.autocast("cpu", dtype=BF16):
        assert not pl.applies(x, w)


def test_plain_choice_runs_f_linear(monkeypatch):
    monkeypatch.setitem(choices._OPTION, pl.CHOICE.name, "plain")
    x, w, b = operands((4, 16), 8)
    assert not pl.applies(x, w)
    assert torch.equal(gemm.linear(x, w, b), F.linear(x, w, b))


@needs_packed
def test_compiles_fullgraph_on_the_plain_path(packed):
    x, w, b = operands((4, 16), 8)
    fn = torch.compile(lambda *a: gemm.linear(*a).float().sum(), fullgraph=True)
    close(fn(x, w, b), F.linear(x, w, b).float().sum())


def test_a_bad_forced_value_names_the_variable(monkeypatch):
    monkeypatch.delitem(choices._OPTION, pl.CHOICE.name, raising=False)
    monkeypatch.delitem(choices._WHY, pl.CHOICE.name, raising=False)
    monkeypatch.setenv(pl.ENV_VAR, "blocked")
    with pytest.raises(Exception, match="LIFTPLUS_FAST_LINEAR_BF16 must be one of packed, plain"):
        choices.get(pl.CHOICE.name)
