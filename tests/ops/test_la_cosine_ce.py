"""la_cosine_cross_entropy (fused CPU kernel) against the reference: values, gradients, chunking,
low precision, float64 gradcheck, opcheck, torch.compile and argument errors. Math and
tolerances: docs/ops.md."""

import contextlib
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import liftplus_fast as lf
from liftplus_fast.ops import reference

pytestmark = pytest.mark.skipif(
    lf.ops.choose("la_cosine_cross_entropy", torch.device("cpu")) != "cpu",
    reason="the native CPU kernel of la_cosine_cross_entropy is not built",
)

OP = torch.ops.liftplus_fast
LOW = [torch.bfloat16, torch.float16]


@contextlib.contextmanager
def chunking(chunk=None, store=None):
    """Force the kernel's class chunk size / single-chunk budget (read by the kernel per call)."""
    saved = {k: os.environ.get(k) for k in ("LIFTPLUS_FAST_LA_CE_CHUNK", "LIFTPLUS_FAST_LA_CE_STORE")}
    try:
        if chunk is not None:
            os.environ["LIFTPLUS_FAST_LA_CE_CHUNK"] = str(chunk)
        if store is not None:
            os.environ["LIFTPLUS_FAST_LA_CE_STORE"] = str(store)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make(b, k, d, dtype=torch.float32, wdtype=None, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    wdtype = wdtype or dtype
    if noncontig:
        # Transposed / strided views: the kernel must not assume row-major inputs.
        feat = torch.randn(d, b, generator=g).to(dtype).t()
        weight = torch.randn(k, 2 * d, generator=g).to(wdtype)[:, ::2]
    else:
        feat = torch.randn(b, d, generator=g).to(dtype)
        weight = torch.randn(k, d, generator=g).to(wdtype)
    labels = torch.randint(0, k, (b,), generator=g)
    counts = torch.randint(1, 500, (k,), generator=g).float()
    log_prior = (counts / counts.sum()).log()
    return feat, weight, labels, log_prior


def run(fn, feat, weight, labels, log_prior, scale=25.0, tau=1.0):
    f = feat.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    loss, logits = fn(f, w, labels, log_prior, scale, tau, True)
    loss.backward()
    return loss.detach(), logits, f.grad, w.grad


def fused(feat, weight, labels, log_prior, scale=25.0, tau=1.0):
    return run(lf.ops.la_cosine_cross_entropy, feat, weight, labels, log_prior, scale, tau)


def ref(feat, weight, labels, log_prior, scale=25.0, tau=1.0):
    return run(reference.la_cosine_cross_entropy, feat, weight, labels, log_prior, scale, tau)


def assert_rel(actual, expected, rel, what, floor=0.0):
    """|a − e| ≤ rel·(|e| + max(max|e|, floor)): relative, with the tensor's scale (or the
    natural scale ``floor`` when the exact value is ~0, e.g. D = 1 gradients) for ~0 entries."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs()
    bound = rel * (expected.abs() + max(scale, floor)) + 1e-30
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: max error {err.max().item():.3g} exceeds {rel:g} relative"


def grad_scale(feat, weight, scale=25.0):
    """Magnitude of the gradients before the normalisation's projection: s·max(1/‖row‖)/B."""
    inv = lambda x: 1.0 / x.double().norm(dim=1).clamp_min(1e-12).min().item()  # noqa: E731
    return scale * max(inv(feat), inv(weight)) / feat.shape[0]


def check_fp32(feat, weight, labels, log_prior, tau=1.0, rel=None):
    k = weight.shape[0]
    rel = rel or (1e-4 if max(k, feat.shape[1]) > 10_000 else 1e-5)
    out = fused(feat, weight, labels, log_prior, tau=tau)
    exp = ref(feat, weight, labels, log_prior, tau=tau)
    # The loss is lse − z_y and logits are s·cos: both carry absolute rounding of O(eps·s).
    floors = (1.0, 1.0, grad_scale(feat, weight), grad_scale(feat, weight))
    for name, a, e, fl in zip(("loss", "logits", "grad_feat", "grad_weight"), out, exp, floors):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_rel(a, e, rel, name, fl)


shapes = st.tuples(st.integers(1, 512), st.integers(2, 10_000), st.sampled_from([1, 3, 17, 64, 97, 768]))


def small_enough(b, k, d):
    # Keeps a hypothesis example well under a second of reference time on 2 shared cores.
    return b * k * d <= 6_000_000


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    shape=shapes,
    tau=st.sampled_from([0.0, 1.0]),
    noncontig=st.booleans(),
    chunked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fp32_matches_reference(shape, tau, noncontig, chunked, seed):
    b, k, d = shape
    if not small_enough(b, k, d):
        k = max(2, 6_000_000 // (b * d))
    inputs = make(b, k, d, noncontig=noncontig, seed=seed)
    with chunking(chunk=97 if chunked else None, store=0 if chunked else None):
        check_fp32(*inputs, tau=tau)


@settings(max_examples=20, deadline=None)
@given(
    shape=shapes,
    dtype=st.sampled_from(LOW),
    weight_fp32=st.booleans(),
    tau=st.sampled_from([0.0, 1.0]),
    noncontig=st.booleans(),
    chunked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_low_precision_within_twice_pytorch_error(shape, dtype, weight_fp32, tau, noncontig, chunked, seed):
    b, k, d = shape
    if not small_enough(b, k, d):
        k = max(2, 6_000_000 // (b * d))
    wdtype = torch.float32 if weight_fp32 else dtype
    feat, weight, labels, log_prior = make(b, k, d, dtype, wdtype, seed=seed, noncontig=noncontig)
    with chunking(chunk=97 if chunked else None, store=0 if chunked else None):
        out = fused(feat, weight, labels, log_prior, tau=tau)
    low = ref(feat, weight, labels, log_prior, tau=tau)  # P: PyTorch in low precision
    hi = ref(feat.float(), weight.float(), labels, log_prior, tau=tau)  # R: fp32 on upcast inputs
    assert out[0].dtype == torch.float32
    assert out[1].dtype == dtype and out[2].dtype == dtype and out[3].dtype == wdtype
    gs = grad_scale(feat.float(), weight.float())
    floors = (1.0, 1.0, gs, gs)
    for name, a, p, r, fl in zip(("loss", "logits", "grad_feat", "grad_weight"), out, low, hi, floors):
        err = (a.double() - r.double()).abs().max().item()
        err_p = (p.double() - r.double()).abs().max().item()
        # One rounding step of the output's own dtype (the kernel and PyTorch each round once;
        # for a handful of logits near 25 one bf16 step is 0.125).
        scale_r = max(r.double().abs().max().item(), fl)
        atol = max(1e-3, torch.finfo(a.dtype).eps if a.dtype != torch.float32 else 0.0) * scale_r
        assert err <= 2 * err_p + atol, f"{name}: kernel error {err:.3g} vs PyTorch {err_p:.3g}"


@pytest.mark.parametrize("k", [63, 64, 65, 128, 129, 200])
def test_chunk_boundaries(k):
    # Chunk of 64 classes with the single-chunk budget off: K just below, at and above multiples
    # of the chunk size goes through the two-sweep path; K = 63/64 is a single chunk anyway.
    inputs = make(5, k, 24, seed=k)
    with chunking(chunk=64, store=0):
        check_fp32(*inputs)
        chunked = fused(*inputs)
    single = fused(*inputs)
    for a, e in zip(chunked, single):
        assert_rel(a, e, 1e-5, "chunked vs single chunk")


def test_many_classes_chunked_default_chunk():
    # K = 20,000 over the default 4096-class chunks (store budget off): tolerance 1e-4 (> 1e4 terms).
    inputs = make(6, 20_000, 32, seed=3)
    with chunking(store=0):
        check_fp32(*inputs, rel=1e-4)


def test_zero_norm_rows_follow_eps_branch():
    feat, weight, labels, log_prior = make(4, 9, 8, seed=5)
    feat[1] = 0
    weight[2] = 0
    labels[0] = 2
    check_fp32(feat, weight, labels, log_prior)


def test_grad_loss_scaling_and_no_grad():
    feat, weight, labels, log_prior = make(8, 50, 16)
    f = feat.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    (3.0 * lf.ops.la_cosine_cross_entropy(f, w, labels, log_prior)).backward()
    _, _, gf, gw = fused(feat, weight, labels, log_prior)
    torch.testing.assert_close(f.grad, 3 * gf)
    torch.testing.assert_close(w.grad, 3 * gw)
    with torch.no_grad():
        loss = lf.ops.la_cosine_cross_entropy(feat, weight, labels, log_prior)
    torch.testing.assert_close(loss, reference.la_cosine_cross_entropy(feat, weight, labels, log_prior))


@pytest.mark.parametrize("compute_grad", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_gradcheck_float64(compute_grad, chunked):
    feat, weight, labels, log_prior = make(3, 7, 5, torch.float64)
    log_prior = log_prior.double()

    def fn(f, w):
        return OP.la_cosine_ce_fwd(f, w, labels, log_prior, 2.5, 1.0, False, compute_grad)[0]

    with chunking(chunk=3 if chunked else None, store=0 if chunked else None):
        # A repeated backward through the retained graph recomputes the gradients (the forward's
        # were handed over to autograd), so repeats agree to rounding, not bit for bit.
        assert torch.autograd.gradcheck(fn, (feat.requires_grad_(), weight.requires_grad_()), nondet_tol=1e-12)


def test_float64_matches_float64_math():
    feat, weight, labels, log_prior = make(6, 11, 7, torch.float64)
    loss, logits, _, _, _ = OP.la_cosine_ce_fwd(feat, weight, labels, log_prior.double(), 25.0, 1.0, True, False)
    z = 25.0 * torch.nn.functional.normalize(feat) @ torch.nn.functional.normalize(weight).T
    exp = torch.nn.functional.cross_entropy(z + log_prior.double(), labels)
    torch.testing.assert_close(loss, exp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    feat, weight, labels, log_prior = make(4, 10, 6, dtype, torch.float32)
    fwd = OP.la_cosine_ce_fwd.default
    for ret in (False, True):
        for grad in (False, True):
            torch.library.opcheck(
                fwd, (feat.requires_grad_(), weight.requires_grad_(), labels, log_prior, 25.0, 1.0, ret, grad)
            )
    _, _, lse, _, _ = fwd(feat, weight, labels, log_prior, 25.0, 1.0, False, False)
    torch.library.opcheck(
        OP.la_cosine_ce_bwd.default,
        (torch.tensor(1.0), feat.detach(), weight.detach(), labels, log_prior, lse, 25.0, 1.0),
    )


def test_torch_compile_fullgraph_matches_eager():
    feat, weight, labels, log_prior = make(16, 300, 40, seed=2)

    def fwd(f, w):
        # Something around the op so the graph is not just the op itself.
        loss, logits = lf.ops.la_cosine_cross_entropy(f * 1.5, w, labels, log_prior, 25.0, 1.0, True)
        return loss * 2.0, logits

    compiled = torch.compile(fwd, fullgraph=True)
    f1, w1 = feat.clone().requires_grad_(), weight.clone().requires_grad_()
    f2, w2 = feat.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_c, logits_c = compiled(f1, w1)
    loss_e, logits_e = fwd(f2, w2)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(logits_c, logits_e)
    torch.testing.assert_close(f1.grad, f2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_bad_inputs_name_the_argument():
    feat, weight, labels, log_prior = make(3, 5, 4)
    with pytest.raises(RuntimeError, match=r"labels\[1\] = 7 is out of range \[0, 5\)"):
        lf.ops.la_cosine_cross_entropy(feat, weight, torch.tensor([0, 7, 1]), log_prior)
    with pytest.raises(RuntimeError, match=r"labels\[0\] = -1"):
        lf.ops.la_cosine_cross_entropy(feat, weight, torch.tensor([-1, 0, 1]), log_prior)
    with pytest.raises(ValueError, match="weight must have shape"):
        lf.ops.la_cosine_cross_entropy(feat, weight[:, :3], labels, log_prior)
    with pytest.raises(TypeError, match="labels"):
        lf.ops.la_cosine_cross_entropy(feat, weight, labels.int(), log_prior)
    with pytest.raises(ValueError, match="log_prior"):
        lf.ops.la_cosine_cross_entropy(feat, weight, labels, log_prior[:4])
    with pytest.raises(TypeError, match="feat"):
        lf.ops.la_cosine_cross_entropy(feat.int(), weight, labels, log_prior)
    # The native op checks on its own (it is reachable through torch.ops without the wrapper).
    with pytest.raises(RuntimeError, match=r"weight must have shape \[K >= 1, 4\].*shape \[5, 3\]"):
        OP.la_cosine_ce_fwd(feat, weight[:, :3], labels, log_prior, 25.0, 1.0, False, False)
    with pytest.raises(RuntimeError, match=r"labels must be an int64 tensor of shape \[3\].*Int"):
        OP.la_cosine_ce_fwd(feat, weight, labels.int(), log_prior, 25.0, 1.0, False, False)
    with pytest.raises(RuntimeError, match=r"log_prior must be a float tensor of shape \[5\]"):
        OP.la_cosine_ce_fwd(feat, weight, labels, log_prior[:2], 25.0, 1.0, False, False)


def test_exp_and_extreme_logits():
    # Large scale pushes exp arguments far below -87 (flushed to 0) without NaN/inf.
    feat, weight, labels, log_prior = make(8, 40, 16, seed=9)
    out = fused(feat, weight, labels, log_prior, scale=200.0)
    exp = ref(feat, weight, labels, log_prior, scale=200.0)
    for name, a, e in zip(("loss", "logits", "grad_feat", "grad_weight"), out, exp):
        assert torch.isfinite(a).all(), name
        assert_rel(a, e, 1e-4, name)
    assert math.isfinite(float(out[0]))
