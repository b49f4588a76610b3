"""Triton TTE aggregation and unit-feature mean against the reference, on CPU via the interpreter.

Running them needs ``TRITON_INTERPRET=1`` *before* ``triton.language`` is imported (Triton's
``tl.sum``/``tl.zeros`` are jitted at import); in a full pytest session they usually are
already, in compiled mode. So unless this process is an interpreter process, the CPU tests skip
here and ``test_cpu_tests_under_interpreter`` runs this file in a fresh ``pytest`` subprocess
with the variable set, leaving the parent's environment untouched.

Tolerances: fp32 1e-5 relative; bf16/fp16 logits within one rounding of the dtype (the kernel
and the reference both average in fp32 and round once, in different summation orders).
Predictions are checked as the first maximum of the kernel's own rounded mean, counts exactly.
"""

import pytest
import torch

from liftplus_fast.ops import reference

triton = pytest.importorskip("triton")
T = pytest.importorskip("liftplus_fast.ops.triton.tte")

from .triton_interp import IN_INTERP, cpu_tests_need_interpreter, run_under_interpreter  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(IN_INTERP, reason="already in an interpreter process")
def test_cpu_tests_under_interpreter():
    run_under_interpreter(__file__)



DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7, 37), (1, 3, 2), (3, 9, 50)])
def test_aggregate_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(shape[2])
    x = torch.randn(shape, generator=g).to(dtype)
    y = torch.randint(0, shape[2], (shape[1],), generator=g)
    out = T.tte_aggregate(x, y)
    ref = reference.tte_aggregate(x, y)
    assert out.logits.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(out.logits.float(), ref.logits.float(), rtol=tol, atol=tol)
    assert torch.equal(out.pred, out.logits.argmax(-1))
    correct, total = reference.per_class_hits(out.pred, y, shape[2])
    assert torch.equal(out.correct, correct) and torch.equal(out.total, total)
    assert out.correct.dtype == torch.int64


def test_first_maximum_wins_across_chunks():
    x = torch.zeros(2, 3, 40)
    x[:, 1, 2] = 1.0
    x[:, 1, 35] = 1.0   # equal maximum in a later 16-wide chunk
    x[:, 2, 20] = 2.0
    x[:, 2, 21] = 2.0
    out = T.tte_aggregate(x)
    assert out.pred.tolist() == [0, 2, 20]
    assert out.correct is None and out.total is None


def test_noncontiguous_input():
    x = torch.randn(7, 5, 9).transpose(0, 1)
    y = torch.randint(0, 9, (7,))
    out = T.tte_aggregate(x, y)
    ref = reference.tte_aggregate(x.contiguous(), y)
    torch.testing.assert_close(out.logits, ref.logits)
    assert torch.equal(out.pred, ref.pred) and torch.equal(out.correct, ref.correct)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 6, 40), (1, 2, 3)])
def test_mean_unit_features_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype)
    out = T.tte_mean_unit_features(x)
    ref = reference.tte_mean_unit_features(x)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def test_public_ops_dispatch_to_triton(monkeypatch):
    import liftplus_fast as lf

    monkeypatch.setenv("LIFTPLUS_FAST_BACKEND", "triton")
    assert lf.ops.choose("tte_aggregate", torch.device("cpu")) == "triton"
    assert lf.ops.choose("tte_mean_unit_features", torch.device("cpu")) == "triton"
    x = torch.randn(5, 4, 13)
    y = torch.randint(0, 13, (4,))
    out = lf.ops.tte_aggregate(x, y)
    assert torch.equal(out.correct, reference.tte_aggregate(x, y).correct)


def test_bad_input_is_rejected_before_launch(monkeypatch):
    # Arguments are validated once, by the public op; the Triton entry adds the device-side
    # label guard.
    import liftplus_fast as lf

    monkeypatch.setenv("LIFTPLUS_FAST_BACKEND", "triton")
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        lf.ops.tte_aggregate(x, torch.tensor([0, 1, 4]))
    with pytest.raises(TypeError, match="crop_logits must have dtype in"):
        lf.ops.tte_aggregate(x.double())
    with pytest.raises(ValueError, match="one device"):
        lf.ops.tte_aggregate(x, torch.tensor([0, 1, 2], device="meta"))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lf.ops.tte_mean_unit_features(x)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (full-size Triton kernels)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,k", [(64, 1000), (256, 8142)])
def test_gpu_full_size(dtype, b, k):
    x = torch.randn(5, b, k, device="cuda").to(dtype)
    y = torch.randint(0, k, (b,), device="cuda")
    out = T.tte_aggregate(x, y)
    ref = reference.tte_aggregate(x, y)
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(out.logits.float(), ref.logits.float(), rtol=tol, atol=tol)
    assert torch.equal(out.pred, out.logits.argmax(-1))
    f = torch.randn(5, b, 768, device="cuda").to(dtype)
    torch.testing.assert_close(T.tte_mean_unit_features(f).float(),
                               reference.tte_mean_unit_features(f).float(), rtol=tol, atol=tol)
