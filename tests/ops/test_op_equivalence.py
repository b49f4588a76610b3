"""Every fused op against its reference on every backend: device × backend × dtype × shape.

One test per op (the harness is ``op_tester``); the tolerances are those of docs/ops.md. Shapes
are ragged on purpose: rows, D, r, B, K never multiples of the kernels' tiles (Triton's
interpreter tiles are 16 × 16 × 32), and large enough to split classes / rows over programs.
Backend-specific behaviour (saved tensors, determinism, limits, gradcheck, compile) stays in
the per-op test files.
"""

import pytest
import torch

import liftplus_fast as lf
from liftplus_fast.ops import reference

from .op_tester import DTYPES, assert_matches, backend, cases, triton_runner

test_triton_under_interpreter = triton_runner(__file__)

AF_NAMES = ["y", "a", "mlp_out", "ln_w", "ln_b", "down_w", "down_b", "up_w", "up_b", "scale"]


def _af_inputs(shape, r, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    a = (torch.randn(shape, generator=g) + 0.5).to(dtype)
    m = torch.randn(shape, generator=g).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)
    ps = [
        1 + 0.1 * torch.randn(d, generator=g),
        0.1 * torch.randn(d, generator=g),
        torch.randn(r, d, generator=g) / d**0.5,
        0.1 * torch.randn(r, generator=g),
        torch.randn(d, r, generator=g) / r**0.5,
        0.1 * torch.randn(d, generator=g),
        torch.tensor(0.7),
    ]
    return [t.to(device) for t in [a, m, *ps]], gy.to(device)


def _af_run(fn, inputs, gy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, gy))


@pytest.mark.parametrize("device,name", cases("adaptformer"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,r", [((37, 45), 5), ((3, 7, 40), 16), ((19, 33), 20)], ids=str)
def test_adaptformer(device, name, dtype, shape, r):
    inputs, gy = _af_inputs(shape, r, dtype, device, seed=r)
    with backend(name):
        kern = _af_run(lf.ops.adaptformer, inputs, gy)
    assert kern[0].dtype == dtype and all(k.dtype == t.dtype for k, t in zip(kern[1:], inputs))
    up = [t.float() for t in inputs]
    ref32 = _af_run(reference.adaptformer, up, gy.float())
    lowp = None if dtype == torch.float32 else _af_run(reference.adaptformer, inputs, gy)
    assert_matches(AF_NAMES, kern, ref32, lowp, dtype)


CE_NAMES = ["loss", "logits", "grad_feat", "grad_weight"]


def _ce_inputs(b, k, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, d, generator=g).to(dtype)
    w = torch.randn(k, d, generator=g)  # the classifier stays fp32 (the model's policy)
    y = torch.randint(0, k, (b,), generator=g)
    lp = torch.log_softmax(torch.randn(k, generator=g), 0)
    return [t.to(device) for t in (f, w, y, lp)]


def _ce_run(fn, f, w, y, lp, scale=25.0, tau=1.0):
    f = f.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss, logits = fn(f, w, y, lp, scale, tau, return_logits=True)
    return [loss.detach(), logits] + list(torch.autograd.grad(loss, [f, w]))


@pytest.mark.parametrize("device,name", cases("la_cosine_cross_entropy"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,k,d,tau", [(37, 150, 45, 1.0), (70, 21, 20, 0.0), (5, 3, 8, 0.5)], ids=str)
def test_la_cosine_cross_entropy(device, name, dtype, b, k, d, tau):
    f, w, y, lp = _ce_inputs(b, k, d, dtype, device, seed=b)
    with backend(name):
        kern = _ce_run(lf.ops.la_cosine_cross_entropy, f, w, y, lp, tau=tau)
    assert kern[0].dtype == torch.float32 and kern[1].dtype == dtype and kern[2].dtype == dtype
    ref32 = _ce_run(reference.la_cosine_cross_entropy, f.float(), w, y, lp, tau=tau)
    lowp = None if dtype == torch.float32 else _ce_run(reference.la_cosine_cross_entropy, f, w, y, lp, tau=tau)
    assert_matches(CE_NAMES, kern, ref32, lowp, dtype)


@pytest.mark.parametrize("device,name", cases("tte_aggregate"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 1, 2), (5, 7, 11), (3, 64, 300), (1, 4, 3)], ids=str)
def test_tte_aggregate(device, name, dtype, shape):
    g = torch.Generator().manual_seed(shape[2])
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    y = torch.randint(0, shape[2], (shape[1],), generator=g).to(device)
    with backend(name):
        out, unlabelled = lf.ops.tte_aggregate(x, y), lf.ops.tte_aggregate(x)
    ref = reference.tte_aggregate(x, y)
    assert out.logits.dtype == dtype
    # The mean is accumulated in fp32 and rounded once, as the reference does: equal up to
    # summation order (one rounding of the dtype).
    assert_matches(["logits"], [out.logits], [ref.logits.float()], rtol=4 * torch.finfo(dtype).eps)
    # Predictions are the first maximum of the op's own rounded mean (a one-ulp difference in the
    # mean may flip a near tie against the reference's), and the counts follow from them.
    assert torch.equal(out.pred, out.logits.argmax(-1)) and torch.equal(unlabelled.pred, out.pred)
    correct, total = reference.per_class_hits(out.pred, y, shape[2])
    assert torch.equal(out.correct, correct) and torch.equal(out.total, total)
    assert torch.equal(out.total, ref.total) and out.correct.dtype == torch.int64
    if name == "cpu":  # the native CPU mean is the reference's bit for bit, so are its predictions
        assert torch.equal(out.pred, ref.pred) and torch.equal(out.correct, ref.correct)
    assert unlabelled.correct is None and unlabelled.total is None


@pytest.mark.parametrize("device,name", cases("tte_mean_unit_features"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 3, 40), (1, 6, 17), (4, 2, 300)], ids=str)
def test_tte_mean_unit_features(device, name, dtype, shape):
    g = torch.Generator().manual_seed(shape[2])
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    with backend(name):
        out = lf.ops.tte_mean_unit_features(x)
    ref = reference.tte_mean_unit_features(x)
    assert out.dtype == dtype
    rtol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    assert_matches(["unit_mean"], [out], [ref.float()], rtol=rtol)


@pytest.mark.parametrize("device,name", cases("tte_aggregate"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tte_aggregate_nan_is_the_first_maximum(device, name, dtype):
    # torch.argmax's rule: a NaN beats every number and the first NaN wins. The kernels stream K
    # in chunks (16 wide under the interpreter, 256 on the GPU): the NaNs sit in later chunks than
    # larger numbers and infinities.
    k = 600
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(7))
    x[:, 0, 10] = 50.0
    x[0, 0, 500] = float("nan")  # one crop's NaN makes the mean NaN
    x[1, 1, 300] = float("nan")
    x[0, 1, 520] = float("nan")  # a second NaN, later
    x[:, 2, 7] = float("inf")
    x[0, 2, 400] = float("nan")
    x[:, 3, :] = float("-inf")  # no maximum but -inf: the first index
    x = x.to(dtype).to(device)
    y = torch.tensor([500, 0, 400, 0, 3], device=device)
    with backend(name):
        out = lf.ops.tte_aggregate(x, y)
    ref = reference.tte_aggregate(x, y)
    assert ref.pred.tolist()[:4] == [500, 300, 400, 0]
    assert torch.equal(out.pred, ref.pred)
    assert torch.equal(out.correct, ref.correct) and torch.equal(out.total, ref.total)


@pytest.mark.parametrize("device,name", cases("tte_aggregate"))
def test_tte_aggregate_offsets_past_2_31_elements(device, name):
    # Crops 2^30 + 64 elements apart: crop 2 starts past 2^31, where int32 offsets wrap.
    if device != "cuda":
        pytest.skip("the view spans 4 GiB: GPU case only")
    stride = 2**30 + 64
    base = torch.empty(2 * stride + 16, dtype=torch.float16, device=device)
    x = base.as_strided((3, 2, 8), (stride, 8, 1))
    x.copy_(torch.randn(3, 2, 8))
    y = torch.tensor([1, 5], device=device)
    with backend(name):
        out = lf.ops.tte_aggregate(x, y)
    ref = reference.tte_aggregate(x.contiguous(), y)
    torch.testing.assert_close(out.logits, ref.logits, rtol=4e-3, atol=4e-3)
    assert torch.equal(out.pred, out.logits.argmax(-1)) and torch.equal(out.total, ref.total)
