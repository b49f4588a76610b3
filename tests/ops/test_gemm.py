"""Half GEMMs without half GEMM units: fp32 GEMMs of bf16 values give the bf16 GEMM's numbers."""

import pytest
import torch
import torch.nn.functional as F

from liftplus_fast import ops
from liftplus_fast.ops import choices, gemm

BF16 = torch.bfloat16


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setitem(choices._OPTION, "half_gemm", "fp32")


@pytest.fixture
def undecided(monkeypatch):
    """The half_gemm choice not made yet (restored afterwards)."""
    for store in (choices._OPTION, choices._WHY):
        monkeypatch.delitem(store, "half_gemm", raising=False)


def _ulps(a, exact):
    return (a.double() - exact).abs() / (exact.abs() * 2.0**-7).clamp_min(1e-30)


@pytest.mark.parametrize("m,k,n", [(1, 8, 3), (37, 96, 130), (64, 768, 512)])
def test_linear_matches_the_bf16_gemm(emulated, m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g).to(BF16)
    w = torch.randn(n, k, generator=g).to(BF16)
    b = torch.randn(n, generator=g).to(BF16)
    native = F.linear(x, w, b)
    # frozen weight stored as fp32 holding bf16 values, as convert_frozen(rounded_fp32=True) does
    out = gemm.linear(x, w.float(), b.float())
    assert out.dtype == BF16 and out.shape == native.shape
    exact = x.double() @ w.double().T + b.double()
    # Same products, fp32 sums in another order: at most a one-ulp rounding flip, rarely.
    assert float(_ulps(out, exact).max()) <= 1.01
    assert float((out != native).float().mean()) <= 5e-3
    assert float(_ulps(out, exact).mean()) <= float(_ulps(native, exact).mean()) + 0.02


def test_linear_rounds_a_trained_fp32_weight_at_each_use(emulated):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g).to(BF16).requires_grad_()
    w = torch.randn(7, 16, generator=g).requires_grad_()  # trained master, not bf16-valued
    out = gemm.linear(x, w)
    torch.testing.assert_close(out, F.linear(x.detach(), w.detach().to(BF16)), rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert x.grad.dtype == BF16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, x.detach().float().sum(0).expand(7, 16), rtol=1e-2, atol=1e-2)


def test_a_frozen_fp32_weight_is_read_as_it_is(emulated):
    w = torch.randn(4, 4).to(BF16).float()
    assert gemm.rounded_fp32(w, BF16) is w  # no per-step cast
    t = torch.randn(4, 4, requires_grad=True)
    r = gemm.rounded_fp32(t, BF16)
    assert r.dtype == torch.float32 and torch.equal(r, t.detach().to(BF16).float()) and r.requires_grad


def test_fp32_and_autocast_are_left_alone(emulated):
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(gemm.linear(x, w), F.linear(x, w), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=BF16):
        assert gemm.linear(x, w).dtype == BF16  # autocast decides, as in the published code


def test_native_or_storage_follows_the_hardware(monkeypatch):
    monkeypatch.setitem(choices._OPTION, "half_gemm", "native")
    assert gemm.native_half_gemm("cpu", BF16) and not gemm.stores_rounded_fp32("cpu", BF16)
    monkeypatch.setitem(choices._OPTION, "half_gemm", "fp32")
    assert not gemm.native_half_gemm("cpu", BF16) and gemm.stores_rounded_fp32("cpu", BF16)
    assert gemm.native_half_gemm("cpu", torch.float32) and not gemm.stores_rounded_fp32("cpu", torch.float32)
    assert gemm.native_half_gemm("cuda", torch.float16)
    x = torch.randn(2, 3)
    seen = []
    out = gemm.first_layer(lambda t: seen.append(t) or t * 3, x, BF16, torch.float32)
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], x.to(BF16).float())  # fp32 of bf16 values
    assert out.dtype == BF16  # rounded once, activations in bf16 from there on


@pytest.mark.parametrize("value,path", [("native", "native"), ("fp32", "fp32"), (" FP32 ", "fp32")])
def test_the_environment_variable_forces_a_path(monkeypatch, undecided, value, path):
    monkeypatch.setenv(gemm.ENV_VAR, value)
    monkeypatch.setattr(gemm, "_time_bf16_against_fp32", _must_not_measure)
    decided = gemm.cpu_bf16_gemm_path()
    assert decided["path"] == path and gemm.ENV_VAR in decided["why"]


def test_a_bad_environment_value_names_the_variable(monkeypatch, undecided):
    monkeypatch.setenv(gemm.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=gemm.ENV_VAR):
        gemm.cpu_bf16_gemm_path()


def _must_not_measure(*args, **kwargs):
    raise AssertionError("the bf16 GEMM path was measured where nothing needed measuring")


@pytest.mark.parametrize(
    "fp32_rate,native",
    [(100e9, True), (gemm.FP32_MARGIN * 99e9, True), (gemm.FP32_MARGIN * 101e9, False), (300e9, False)],
)
def test_with_bf16_units_the_faster_path_is_measured(monkeypatch, fp32_rate, native):
    monkeypatch.delenv(gemm.ENV_VAR, raising=False)
    monkeypatch.setattr(gemm, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(gemm, "_time_bf16_against_fp32", lambda: {"native": 100e9, "fp32": fp32_rate})
    decided, why = gemm._decide_cpu_bf16()
    assert decided == ("native" if native else "fp32")
    assert "100 GFLOP/s" in why and f"{fp32_rate / 1e9:.0f} GFLOP/s" in why


def test_without_bf16_units_nothing_is_measured(monkeypatch):
    monkeypatch.delenv(gemm.ENV_VAR, raising=False)
    monkeypatch.setattr(gemm, "cpu_has_bf16_units", lambda: False)
    monkeypatch.setattr(gemm, "_time_bf16_against_fp32", _must_not_measure)
    assert gemm._decide_cpu_bf16() == ("fp32", "this CPU has no bf16 units")


def test_the_choice_is_made_once_on_first_use(monkeypatch, undecided):
    calls = []
    monkeypatch.delenv(gemm.ENV_VAR, raising=False)
    monkeypatch.setattr(gemm, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(gemm, "_time_bf16_against_fp32", lambda: calls.append(1) or {"native": 1e9, "fp32": 9e9})
    assert gemm.native_half_gemm("cpu", torch.float32) and not calls  # fp32 asks nothing
    assert not gemm.native_half_gemm("cpu", BF16)
    assert gemm.stores_rounded_fp32("cpu", BF16)
    assert gemm.cpu_bf16_gemm_path()["path"] == "fp32" and "9 GFLOP/s" in gemm.cpu_bf16_gemm_path()["why"]
    assert calls == [1]


def test_the_measurement_gives_both_rates():
    rate = gemm._time_bf16_against_fp32(m=16, k=32, n=24, rounds=1)
    assert set(rate) == {"native", "fp32"}
    assert all(0 < r < float("inf") for r in rate.values())


@pytest.mark.parametrize("kind", ["quick", "erf"])
def test_linear_gelu_reads_a_rounded_fp32_weight(emulated, kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 24, generator=g).to(BF16)
    w = torch.randn(40, 24, generator=g).to(BF16)
    b = torch.randn(40, generator=g)
    fp32_storage = ops.linear_gelu(x, w.float(), b, kind)
    bf16_storage = ops.linear_gelu(x, w, b, kind)
    assert fp32_storage.dtype == BF16
    torch.testing.assert_close(fp32_storage, bf16_storage, rtol=1.6e-2, atol=1e-2)


def test_attention_runs_fp32_inside_with_bf16_in_and_out(emulated):
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 13, 3 * 32, generator=g).to(BF16).requires_grad_()
    out = ops.attention(qkv, 4)
    assert out.dtype == BF16
    exact = ops.reference.attention(qkv.detach().double(), 4, True, 8**-0.5)
    # only the bf16 rounding of the output remains
    assert float(_ulps(out, exact).max()) <= 1.01
    out.float().square().sum().backward()
    assert qkv.grad.dtype == BF16 and torch.isfinite(qkv.grad.float()).all()


def test_a_path_taken_from_elsewhere_is_checked(monkeypatch, undecided):
    choices.adopt({"half_gemm": {"option": "native", "why": "rank 0 measured"}})
    assert gemm.cpu_bf16_gemm_path() == {"path": "native", "why": "rank 0 measured"}
    assert gemm.native_half_gemm("cpu", BF16)
    with pytest.raises(ValueError, match="not a decision of a known choice"):
        choices.adopt({"half_gemm": {"option": "fast"}})
