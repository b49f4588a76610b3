"""Triton TTE kernels: chunked first maximum, strides, labels and GPU sizes. Equivalence on every
backend: test_op_equivalence.py; CPU tests run under the interpreter (triton_interp)."""

import pytest
import torch

from liftplus_fast.ops import reference

triton = pytest.importorskip("triton")
T = pytest.importorskip("liftplus_fast.ops.triton.tte")

from .triton_interp import cpu_tests_need_interpreter, interpreter_runner  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()


test_cpu_tests_under_interpreter = interpreter_runner(__file__)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_first_maximum_wins_across_chunks():
    x = torch.zeros(2, 3, 40)
    x[:, 1, 2] = 1.0
    x[:, 1, 35] = 1.0  # equal maximum in a later 16-wide chunk
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
    torch.testing.assert_close(
        T.tte_mean_unit_features(f).float(), reference.tte_mean_unit_features(f).float(), rtol=tol, atol=tol
    )
