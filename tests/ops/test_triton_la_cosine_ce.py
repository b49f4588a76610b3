"""Triton logit-adjusted cosine cross-entropy against the reference, on CPU via the interpreter.

Running them needs ``TRITON_INTERPRET=1`` *before* ``triton.language`` is imported (Triton's
``tl.sum``/``tl.zeros`` are jitted at import); in a full pytest session they usually are
already, in compiled mode. So unless this process is an interpreter process, the CPU tests skip
here and ``test_cpu_tests_under_interpreter`` runs this file in a fresh ``pytest`` subprocess
with the variable set, leaving the parent's environment untouched.

Tolerances: fp32 max|K−R| ≤ 1e-5·max|R| per tensor (numpy fp32 in the interpreter sums in
another order than PyTorch; measured ≤ 1e-6). Low precision: max|K−R| ≤ 2·max|P−R| +
eps(dtype)·max|R| with R the fp32 reference and P the reference in the same dtype.
"""

import pytest
import torch

from liftplus_fast.ops import reference

triton = pytest.importorskip("triton")
T = pytest.importorskip("liftplus_fast.ops.triton.la_cosine_ce")

from .triton_interp import IN_INTERP, cpu_tests_need_interpreter, run_under_interpreter  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(IN_INTERP, reason="already in an interpreter process")
def test_cpu_tests_under_interpreter():
    run_under_interpreter(__file__)



def _run(fn, f, w, y, lp, scale=25.0, tau=1.0):
    f = f.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss, logits = fn(f, w, y, lp, scale, tau, True)
    gf, gw = torch.autograd.grad(loss, [f, w])
    return [loss.detach(), logits, gf, gw]


NAMES = ["loss", "logits", "grad_feat", "grad_weight"]


def _check(kern, ref32, lowp=None, dtype=None):
    for name, k, r, *p in zip(NAMES, kern, ref32, *([lowp] if lowp else [])):
        k, r = k.float(), r.float()
        scale = r.abs().max().item() + 1e-12
        err = (k - r).abs().max().item()
        if lowp is None:
            assert err <= 1e-5 * scale, f"{name}: max|K-R| = {err:.3g} vs scale {scale:.3g}"
        else:
            bound = 2 * (p[0].float() - r).abs().max().item() + torch.finfo(dtype).eps * scale
            assert err <= bound, f"{name}: max|K-R| = {err:.3g} > 2 max|P-R| + atol = {bound:.3g}"


def _data(b, k, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, d, generator=g).to(dtype)
    w = torch.randn(k, d, generator=g)
    y = torch.randint(0, k, (b,), generator=g)
    lp = torch.log_softmax(torch.randn(k, generator=g), 0)
    return f, w, y, lp


# Ragged: B, K, D never multiples of the interpreter tiles (16, 16, 32). (37, 150, 45) splits
# the classes over 3 programs; (70, 21, 20) splits the rows of the weight gradient.
@pytest.mark.parametrize("b,k,d", [(37, 150, 45), (70, 21, 20), (5, 3, 8)])
def test_fp32_matches_reference(b, k, d):
    f, w, y, lp = _data(b, k, d, b)
    _check(_run(T.la_cosine_cross_entropy, f, w, y, lp), _run(reference.la_cosine_cross_entropy, f, w, y, lp))


def test_tau_and_scale_are_used():
    f, w, y, lp = _data(9, 30, 16, 1)
    for scale, tau in [(10.0, 0.0), (30.0, 2.0)]:
        _check(_run(T.la_cosine_cross_entropy, f, w, y, lp, scale, tau),
               _run(reference.la_cosine_cross_entropy, f, w, y, lp, scale, tau))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference(dtype):
    f, w, y, lp = _data(37, 150, 45, 2, dtype)
    kern = _run(T.la_cosine_cross_entropy, f, w, y, lp)
    assert kern[1].dtype == dtype and kern[2].dtype == dtype and kern[3].dtype == torch.float32
    ref32 = _run(reference.la_cosine_cross_entropy, f.float(), w, y, lp)
    lowp = _run(reference.la_cosine_cross_entropy, f, w, y, lp)
    _check(kern, ref32, lowp, dtype)


def test_deterministic_and_without_logits():
    f, w, y, lp = _data(37, 150, 45, 3)
    first = _run(T.la_cosine_cross_entropy, f, w, y, lp)
    second = _run(T.la_cosine_cross_entropy, f, w, y, lp)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    loss = T.la_cosine_cross_entropy(f, w, y, lp, 25.0, 1.0, False)
    assert loss.dim() == 0 and torch.equal(loss, first[0])


def test_public_op_dispatches_to_triton(monkeypatch):
    import liftplus_fast as lf

    monkeypatch.setenv("LIFTPLUS_FAST_BACKEND", "triton")
    assert lf.ops.choose("la_cosine_cross_entropy", torch.device("cpu")) == "triton"
    f, w, y, lp = _data(6, 11, 16, 4)
    torch.testing.assert_close(lf.ops.la_cosine_cross_entropy(f, w, y, lp),
                               reference.la_cosine_cross_entropy(f, w, y, lp), rtol=1e-5, atol=1e-6)


def test_bad_input_is_rejected_before_launch(monkeypatch):
    # Arguments are validated once, by the public op; the Triton entry adds its kernel limit
    # and the device-side label guard.
    import liftplus_fast as lf

    monkeypatch.setenv("LIFTPLUS_FAST_BACKEND", "triton")
    ce = lf.ops.la_cosine_cross_entropy
    f, w, y, lp = _data(4, 5, 8, 5)
    with pytest.raises(ValueError, match=r"D <= 2048"):
        ce(torch.randn(2, 2049), torch.randn(3, 2049), y[:2], lp[:3])
    with pytest.raises(TypeError, match="feat must have dtype in"):
        ce(f.double(), w, y, lp)
    with pytest.raises(TypeError, match=r"labels must have dtype in \(torch.int64\)"):
        ce(f, w, y.int(), lp)
    with pytest.raises(ValueError, match="one device"):
        ce(f, w.to("meta"), y, lp)
    with pytest.raises(RuntimeError, match="out of range"):
        ce(f, w, torch.tensor([0, 1, 2, 5]), lp)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ce(f, w, y, lp)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (full-size Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,k", [(128, 1000), (512, 8142), (128, 100000)])
def test_gpu_full_size(dtype, b, k):
    f, w, y, lp = (t.cuda() for t in _data(b, k, 768, 0, dtype))
    kern = _run(T.la_cosine_cross_entropy, f, w, y, lp)
    ref32 = _run(reference.la_cosine_cross_entropy, f.float(), w, y, lp)
    if dtype == torch.float32:
        for name, k_, r_ in zip(NAMES, kern, ref32):  # reductions over ≥ 1e4 terms: 1e-4 (§6)
            assert (k_ - r_).abs().max() <= 1e-4 * r_.abs().max(), name
    else:
        _check(kern, ref32, _run(reference.la_cosine_cross_entropy, f, w, y, lp), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.compile of Triton kernels)")
def test_gpu_torch_compile_fullgraph():
    f, w, y, lp = (t.cuda() for t in _data(128, 1000, 768, 0))
    fn = torch.compile(lambda *a: T.la_cosine_cross_entropy(*a, 25.0, 1.0, False), fullgraph=True)
    torch.testing.assert_close(fn(f, w, y, lp), reference.la_cosine_cross_entropy(f, w, y, lp))
