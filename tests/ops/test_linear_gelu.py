"""linear_gelu: the fused bias + QuickGELU/GELU CPU kernel against the published computation."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import liftplus_fast as lf
from liftplus_fast.ops import choices
from liftplus_fast.ops.linear_gelu import CHOICES, reference_linear_gelu

NATIVE = lf.ops.choose("linear_gelu", torch.device("cpu")) == "cpu"
needs_native = pytest.mark.skipif(not NATIVE, reason="native CPU bias_gelu kernel not built")
KINDS = ["quick", "erf", "tanh"]


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    """The fused kernel for every dtype, whatever this machine's measured choice."""
    for choice in CHOICES.values():
        monkeypatch.setitem(choices._OPTION, choice.name, "fused")


def inputs(rows, d, f, dtype, bias_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(f, d, generator=g, dtype=torch.float64) * d**-0.5).to(dtype)
    b = torch.randn(f, generator=g, dtype=torch.float64).to(bias_dtype or dtype)
    return x, w, b


def run(fn, args, grad):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    y = fn(*leaves)
    y.backward(grad.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def err(a, b):
    return float((a.double() - b.double()).abs().max())


@needs_native
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 40),
    d=st.integers(1, 24),
    f=st.integers(1, 70),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    trained_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_the_published_computation(rows, d, f, kind, dtype, trained_bias, seed):
    args = inputs(rows, d, f, dtype, torch.float32 if trained_bias else dtype, seed)
    grad = torch.randn(rows, f, generator=torch.Generator().manual_seed(seed + 1))
    got = run(lambda *a: lf.ops.linear_gelu(*a, kind), args, grad)
    truth = run(
        lambda x, w, b: reference_linear_gelu(x, w, b.to(x.dtype), kind), [a.double() for a in args], grad.double()
    )
    if dtype == torch.float32:
        for g, t in zip(got, truth):
            assert err(g, t) <= 1e-5 * (float(t.abs().max()) + 1)
        return
    peer = run(lambda x, w, b: reference_linear_gelu(x, w, b.to(x.dtype), kind), args, grad)
    for name, g, p, t in zip(["y", "x", "w", "b"], got, peer, truth):
        assert g.dtype == p.dtype, name
        assert err(g, t) <= 2 * err(p, t) + 2e-2 * (float(t.abs().max()) + 1) * (name == "b") + 1e-3, name


@needs_native
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    args = [a.requires_grad_() for a in inputs(5, 4, 7, torch.float64, seed=2)]
    assert torch.autograd.gradcheck(lambda *a: lf.ops.linear_gelu(*a, kind), args, eps=1e-6, atol=1e-7)


@needs_native
def test_opcheck():
    x, w, b = inputs(6, 5, 9, torch.bfloat16)
    u = x @ w.T
    ops = torch.ops.liftplus_fast
    torch.library.opcheck(ops.bias_gelu_fwd.default, (u, b.float(), 0))
    torch.library.opcheck(ops.bias_gelu_fwd.default, (u.clone().requires_grad_(), b.float().requires_grad_(), 2))
    torch.library.opcheck(ops.bias_gelu_bwd.default, (torch.randn_like(u), u, b, 1))
    torch.library.opcheck(ops.bias_gelu_bwd.default, (torch.randn_like(u), u, b, 0, False))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_a_frozen_bias_skips_its_gradient_and_changes_nothing_else(dtype, kind):
    # The frozen backbone's MLP: no bias gradient is asked for, and grad_x is the same bits.
    x, w, b = inputs(37, 8, 50, dtype, seed=7)
    grad = torch.randn(37, 50, generator=torch.Generator().manual_seed(8)).to(dtype)
    trained = run(lambda *a: lf.ops.linear_gelu(*a, kind), (x, w, b), grad)
    xf = x.clone().requires_grad_()
    y = lf.ops.linear_gelu(xf, w, b, kind)
    y.backward(grad)
    assert torch.equal(y.detach(), trained[0]) and torch.equal(xf.grad, trained[1])
    u = x @ w.T
    gx, gb = torch.ops.liftplus_fast.bias_gelu_bwd(grad, u, b, 0, False)
    assert gb.shape == (0,) and torch.equal(gx, torch.ops.liftplus_fast.bias_gelu_bwd(grad, u, b, 0)[0])


def test_compiles_fullgraph():
    x, w, b = inputs(4, 6, 10, torch.float32, seed=4)
    fn = torch.compile(lambda *a: lf.ops.linear_gelu(*a, "quick").sum(), fullgraph=True)
    torch.testing.assert_close(fn(x, w, b), reference_linear_gelu(x, w, b).sum(), rtol=1e-5, atol=1e-5)


def test_bad_input_names_argument():
    x, w, b = inputs(2, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="kind"):
        lf.ops.linear_gelu(x, w, b, "relu")
    with pytest.raises(ValueError, match="weight"):
        lf.ops.linear_gelu(x, w.T.contiguous(), b)
    with pytest.raises(ValueError, match="bias"):
        lf.ops.linear_gelu(x, w, b[:2])
    with pytest.raises(TypeError, match="weight"):
        lf.ops.linear_gelu(x, w.double(), b)
