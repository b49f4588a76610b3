"""Triton LA cosine cross-entropy: tau/scale, determinism, limits and GPU sizes. Equivalence on every
backend: test_op_equivalence.py; CPU tests run under the interpreter (triton_interp)."""

import pytest
import torch

from liftplus_fast.ops import reference

triton = pytest.importorskip("triton")
T = pytest.importorskip("liftplus_fast.ops.triton.la_cosine_ce")

from .op_tester import assert_matches  # noqa: E402
from .triton_interp import cpu_tests_need_interpreter, interpreter_runner  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()


test_cpu_tests_under_interpreter = interpreter_runner(__file__)


def _run(fn, f, w, y, lp, scale=25.0, tau=1.0):
    f = f.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss, logits = fn(f, w, y, lp, scale, tau, True)
    gf, gw = torch.autograd.grad(loss, [f, w])
    return [loss.detach(), logits, gf, gw]


NAMES = ["loss", "logits", "grad_feat", "grad_weight"]


def _data(b, k, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, d, generator=g).to(dtype)
    w = torch.randn(k, d, generator=g)
    y = torch.randint(0, k, (b,), generator=g)
    lp = torch.log_softmax(torch.randn(k, generator=g), 0)
    return f, w, y, lp


def test_tau_and_scale_are_used():
    f, w, y, lp = _data(9, 30, 16, 1)
    for scale, tau in [(10.0, 0.0), (30.0, 2.0)]:
        assert_matches(
            NAMES,
            _run(T.la_cosine_cross_entropy, f, w, y, lp, scale, tau),
            _run(reference.la_cosine_cross_entropy, f, w, y, lp, scale, tau),
        )


def test_deterministic_and_without_logits():
    f, w, y, lp = _data(37, 150, 45, 3)
    first = _run(T.la_cosine_cross_entropy, f, w, y, lp)
    second = _run(T.la_cosine_cross_entropy, f, w, y, lp)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    loss = T.la_cosine_cross_entropy(f, w, y, lp, 25.0, 1.0, False)
    assert loss.dim() == 0 and torch.equal(loss, first[0])


@pytest.mark.parametrize("d", [32, 33, 100])
def test_feature_width_split_into_d_tiles(d):
    # Under the interpreter a D tile is 32 columns: D = 32 is one tile, 33 and 100 are 2 and 4
    # (each program streams the logits tile over all of D and keeps its own tile's gradient).
    assert T.d_tile(d, torch.float32) == 32
    f, w, y, lp = _data(21, 40, d, 11)
    assert_matches(
        NAMES, _run(T.la_cosine_cross_entropy, f, w, y, lp), _run(reference.la_cosine_cross_entropy, f, w, y, lp)
    )


def test_bad_input_is_rejected_before_launch(monkeypatch):
    # Arguments are validated once, by the public op; the Triton entry adds the device-side
    # label guard.
    import liftplus_fast as lf

    monkeypatch.setenv("LIFTPLUS_FAST_BACKEND", "triton")
    ce = lf.ops.la_cosine_cross_entropy
    f, w, y, lp = _data(4, 5, 8, 5)
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
        for name, k_, r_ in zip(NAMES, kern, ref32):  # reductions over ≥ 1e4 terms: 1e-4 (docs/ops.md)
            assert (k_ - r_).abs().max() <= 1e-4 * r_.abs().max(), name
    else:
        assert_matches(NAMES, kern, ref32, _run(reference.la_cosine_cross_entropy, f, w, y, lp), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (full-size Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [1024, 1280, 2048])
def test_gpu_wide_features(dtype, d):
    # Rows wider than a D tile (fp32: 512 columns, half: 1024) take the tiled backward; 1280 is
    # a ViT-H/14-wide feature.
    f, w, y, lp = (t.cuda() for t in _data(128, 1000, d, 1, dtype))
    assert (T.d_tile(d, dtype) < d) == (dtype == torch.float32 or d > 1024)
    kern = _run(T.la_cosine_cross_entropy, f, w, y, lp)
    ref32 = _run(reference.la_cosine_cross_entropy, f.float(), w, y, lp)
    if dtype == torch.float32:
        for name, k_, r_ in zip(NAMES, kern, ref32):
            assert (k_ - r_).abs().max() <= 1e-4 * r_.abs().max(), name
    else:
        assert_matches(NAMES, kern, ref32, _run(reference.la_cosine_cross_entropy, f, w, y, lp), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.compile of Triton kernels)")
def test_gpu_torch_compile_fullgraph():
    f, w, y, lp = (t.cuda() for t in _data(128, 1000, 768, 0))
    fn = torch.compile(lambda *a: T.la_cosine_cross_entropy(*a, 25.0, 1.0, False), fullgraph=True)
    torch.testing.assert_close(fn(f, w, y, lp), reference.la_cosine_cross_entropy(f, w, y, lp))
