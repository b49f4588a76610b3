"""tte_aggregate and tte_mean_unit_features against the reference, on every available backend.

Math and tolerances: docs/ops.md.
"""

import pytest
import torch

import liftplus_fast as lf
from liftplus_fast.ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_tte_first_maximum_wins():
    x = torch.zeros(2, 3, 4)
    x[:, 1, 2] = 1.0
    x[:, 1, 3] = 1.0
    out = lf.ops.tte_aggregate(x)
    assert out.pred.tolist() == [0, 2, 0]
    assert out.correct is None and out.total is None


def test_tte_noncontiguous_input():
    x = torch.randn(7, 5, 9).transpose(0, 1)  # [5, 7, 9] view with odd strides
    y = torch.randint(0, 9, (7,))
    out = lf.ops.tte_aggregate(x, y)
    ref = reference.tte_aggregate(x.contiguous(), y)
    torch.testing.assert_close(out.logits, ref.logits)
    assert torch.equal(out.correct, ref.correct)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tte_feature_shortcut_equals_mean_of_logits(dtype):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(5, 6, 32, generator=g)
    w = torch.randn(10, 32, generator=g)
    crop_logits = torch.stack([reference.cosine_logits(f, w) for f in feats])
    unit = lf.ops.tte_mean_unit_features(feats.to(dtype)).float()
    shortcut = 25.0 * unit @ torch.nn.functional.normalize(w).T
    tol = 1e-4 if dtype == torch.float32 else 0.3
    torch.testing.assert_close(shortcut, crop_logits.mean(0), rtol=0, atol=tol)


def test_tte_bad_input_names_argument():
    with pytest.raises(ValueError, match="crop_logits"):
        lf.ops.tte_aggregate(torch.randn(3, 4))
    with pytest.raises(TypeError, match="labels"):
        lf.ops.tte_aggregate(torch.randn(2, 3, 4), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="crop_logits"):
        lf.ops.tte_aggregate(torch.randn(2, 3, 4).double())


def test_tte_label_out_of_range_is_rejected():
    if lf.ops.choose("tte_aggregate", torch.device("cpu")) == "reference":
        pytest.skip("the reference path relies on bincount's own check")
    with pytest.raises(RuntimeError, match="out of range"):
        lf.ops.tte_aggregate(torch.randn(2, 3, 4), torch.tensor([0, 1, 4]))


def test_tte_under_torch_compile_fullgraph():
    x = torch.randn(5, 8, 13)
    y = torch.randint(0, 13, (8,))
    fn = torch.compile(lambda a, b: lf.ops.tte_aggregate(a, b), fullgraph=True)
    out = fn(x, y)
    ref = reference.tte_aggregate(x, y)
    torch.testing.assert_close(out.logits, ref.logits)
    assert torch.equal(out.correct, ref.correct)


def test_native_tte_opcheck():
    if not lf.backend_info()["native"]["loaded"]:
        pytest.skip("native extension not built")
    x = torch.randn(5, 8, 13)
    y = torch.randint(0, 13, (8,))
    torch.library.opcheck(torch.ops.liftplus_fast.tte_aggregate.default, (x, y))
    torch.library.opcheck(torch.ops.liftplus_fast.tte_aggregate.default, (x, None))
    torch.library.opcheck(torch.ops.liftplus_fast.tte_mean_unit_features.default, (x,))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(
    c=st.integers(1, 6),
    b=st.integers(0, 40),
    k=st.integers(1, 3000),
    dtype=st.sampled_from(DTYPES),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_tte_hypothesis_shapes(c, b, k, dtype, ties, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c, b, k, generator=g)
    if ties:
        # Few distinct values: many exact ties, so the first-maximum rule is exercised.
        x = x.round()
    x = x.to(dtype)
    y = torch.randint(0, k, (b,), generator=g)
    out = lf.ops.tte_aggregate(x, y)
    ref = reference.tte_aggregate(x, y)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-6)
    # Argmax over the stored mean: identical to torch.argmax of the kernel's own mean.
    assert torch.equal(out.pred, out.logits.argmax(-1))
    assert torch.equal(out.total, ref.total)
    assert torch.equal(out.correct, torch.bincount(y[out.pred == y], minlength=k))


def test_tte_nan_and_inf_rows():
    x = torch.full((3, 4, 40), -float("inf"))
    x[:, 1, 7] = float("nan")
    x[:, 1, 30] = float("nan")
    x[:, 2, 5] = 1.0
    x[:, 3, 39] = float("inf")
    out = lf.ops.tte_aggregate(x)
    assert out.pred.tolist() == reference.tte_aggregate(x).pred.tolist() == [0, 7, 5, 39]
