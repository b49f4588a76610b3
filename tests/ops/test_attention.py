"""Attention op: the native CPU kernel against SDPA evaluated in float64, forward and gradient.

bf16/fp16 follow flash-attention's rule: max|K − R| ≤ 2·max|P − R| + atol, with R the float64
evaluation on the same (rounded) inputs and P PyTorch's SDPA run in the low precision.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import liftplus_fast as lf
from liftplus_fast.ops import choices, gemm, reference

NATIVE = lf.ops.choose("attention", torch.device("cpu")) == "cpu"
needs_native = pytest.mark.skipif(not NATIVE, reason="native CPU attention kernel not built")
OPS = torch.ops.liftplus_fast if NATIVE else None
HYP = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_qkv(batch, tokens, heads, head_dim, dtype, batch_first=True, seed=0, spread=1.5):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, tokens, 3 * heads * head_dim) if batch_first else (tokens, batch, 3 * heads * head_dim)
    return (spread * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def kernel(qkv, heads, batch_first, grad_out):
    scale = (qkv.shape[-1] // (3 * heads)) ** -0.5
    out, lse = OPS.attention_fwd(qkv, heads, scale, batch_first)
    grad = OPS.attention_bwd(grad_out, qkv, out, lse, heads, scale, batch_first)
    return out, grad, lse


def sdpa(qkv, heads, batch_first, grad_out):
    x = qkv.detach().clone().requires_grad_()
    out = reference.attention(x, heads, batch_first)
    out.backward(grad_out)
    return out.detach(), x.grad


def max_err(x, ref):
    return float((x.double() - ref.double()).abs().max())


def check(batch, tokens, heads, head_dim, dtype, batch_first, seed=0):
    qkv = make_qkv(batch, tokens, heads, head_dim, dtype, batch_first, seed)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(qkv.shape[:2] + (qkv.shape[-1] // 3,), generator=g, dtype=torch.float64).to(dtype)
    out, grad, lse = kernel(qkv, heads, batch_first, grad_out)
    assert out.dtype == dtype and grad.dtype == dtype and out.shape == grad_out.shape
    assert grad.shape == qkv.shape and lse.shape == (batch, heads, tokens)
    ref_out, ref_grad = sdpa(qkv.double(), heads, batch_first, grad_out.double())
    if dtype == torch.float32:
        assert max_err(out, ref_out) <= 1e-5 * float(ref_out.abs().max()) + 1e-6
        assert max_err(grad, ref_grad) <= 1e-5 * float(ref_grad.abs().max()) + 1e-6
        return
    peer_out, peer_grad = sdpa(qkv, heads, batch_first, grad_out)
    atol = 1e-3 if dtype == torch.bfloat16 else 1e-4
    assert max_err(out, ref_out) <= 2 * max_err(peer_out, ref_out) + atol
    assert max_err(grad, ref_grad) <= 2 * max_err(peer_grad, ref_grad) + atol


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch_first", [True, False])
def test_vit_b16_shape(dtype, batch_first):
    # ViT-B/16: 197 tokens (odd), 12 heads of 64.
    check(2, 197, 12, 64, dtype, batch_first)


@needs_native
@HYP
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 70),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([2, 4, 6, 8, 16, 32, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    batch_first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_any_shape(batch, tokens, heads, head_dim, dtype, batch_first, seed):
    # Token counts cover the micro-kernel's row (6) and column (16/32) tails and odd k-pairs.
    check(batch, tokens, heads, head_dim, dtype, batch_first, seed)


@needs_native
def test_odd_head_dim_falls_back_correctly():
    check(2, 9, 3, 5, torch.bfloat16, True)


@needs_native
def test_gradcheck_float64():
    qkv = make_qkv(2, 5, 2, 3, torch.float64, seed=3).requires_grad_()

    def fn(x):
        return OPS.attention_fwd(x, 2, 3**-0.5, True)[0]

    assert torch.autograd.gradcheck(fn, (qkv,), eps=1e-6, atol=1e-7, rtol=1e-6)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    qkv = make_qkv(2, 13, 2, 8, dtype)
    torch.library.opcheck(OPS.attention_fwd.default, (qkv, 2, 8**-0.5, True))
    torch.library.opcheck(OPS.attention_fwd.default, (qkv.clone().requires_grad_(), 2, 8**-0.5, True))
    out, lse = OPS.attention_fwd(qkv, 2, 8**-0.5, True)
    torch.library.opcheck(OPS.attention_bwd.default, (torch.randn_like(out), qkv, out, lse, 2, 8**-0.5, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_op_matches_reference_and_compiles(dtype):
    qkv = make_qkv(2, 11, 2, 8, dtype, seed=5)

    def loss(x):
        return lf.ops.attention(x, 2).float().square().sum()

    leaves = [qkv.clone().requires_grad_() for _ in range(3)]
    eager = loss(leaves[0])
    eager.backward()
    compiled = torch.compile(loss, fullgraph=True)(leaves[1])
    compiled.backward()
    ref = reference.attention(leaves[2], 2).float().square().sum()
    ref.backward()
    rel = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(eager, ref, rtol=rel, atol=rel)
    if dtype == torch.float32 or gemm.native_half_gemm("cpu", dtype):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(leaves[1].grad.float(), leaves[0].grad.float(), rtol=1e-5, atol=1e-5)
    else:
        # bf16 where fp32 GEMMs are faster runs fp32 inside (ops.gemm); inductor does not keep
        # the round trips through bf16 between ops that eager makes (it does not emulate
        # precision casts): the two then agree to bf16 precision of the largest gradient only.
        torch.testing.assert_close(compiled, eager, rtol=rel, atol=rel)
        assert max_err(leaves[1].grad, leaves[0].grad) <= rel * float(leaves[0].grad.abs().max().float())
    # Two roundings to bf16 of the same gradient: compare relative to its largest entry.
    assert max_err(leaves[0].grad, leaves[2].grad) <= rel * float(leaves[2].grad.abs().max().float())


def test_bad_input_names_argument():
    with pytest.raises(ValueError, match="qkv"):
        lf.ops.attention(torch.randn(2, 5, 10), 2)
    with pytest.raises(ValueError, match="num_heads"):
        lf.ops.attention(torch.randn(2, 5, 12), 0)
    with pytest.raises(TypeError, match="qkv"):
        lf.ops.attention(torch.zeros(2, 5, 12, dtype=torch.int32), 2)
    if NATIVE:
        with pytest.raises(RuntimeError, match="qkv"):
            OPS.attention_fwd(torch.randn(2, 5, 10), 2, 1.0, True)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("tokens", [1, 13, 197])
def test_half_values_in_fp32_save_half_tensors(monkeypatch, batch_first, tokens):
    # A CPU whose bf16 GEMMs lose to fp32 (ops.gemm): fp32 flash attention on the bf16 values,
    # saving bf16 qkv and output (and the fp32 log-sum-exp) instead of fp32 copies.
    monkeypatch.setitem(choices._OPTION, "half_gemm", "fp32")
    monkeypatch.delenv("LIFTPLUS_FAST_BACKEND", raising=False)
    heads, hd = 3, 16
    qkv = make_qkv(2, tokens, heads, hd, torch.bfloat16, batch_first, seed=tokens)
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(qkv.shape[:2] + (heads * hd,), generator=g).to(torch.bfloat16)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x = qkv.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lf.ops.attention(x, heads, batch_first)
    out.backward(grad_out)
    assert out.dtype == x.grad.dtype == torch.bfloat16
    fp32_saved = sum(n for dtype, n in saved if dtype == torch.float32)
    assert fp32_saved <= 2 * heads * tokens, saved  # the log-sum-exp only
    assert sum(n for dtype, n in saved if dtype == torch.bfloat16) >= qkv.numel()
    # Against float64, as good as fp32 SDPA on the same values with fp32 copies saved (the
    # backward reads the output rounded to bf16, as a bf16 flash kernel does).
    ref_out, ref_grad = sdpa(qkv.double(), heads, batch_first, grad_out.double())
    y = qkv.clone().requires_grad_()
    peer = reference.attention(y.float(), heads, batch_first).to(torch.bfloat16)
    peer.backward(grad_out)
    assert max_err(out, ref_out) <= max_err(peer, ref_out) + 2**-8 * float(ref_out.abs().max())
    assert max_err(x.grad, ref_grad) <= 2 * max_err(y.grad, ref_grad) + 1e-3 * float(ref_grad.abs().max())


def test_half_values_in_fp32_compile(monkeypatch):
    monkeypatch.setitem(choices._OPTION, "half_gemm", "fp32")
    qkv = make_qkv(2, 11, 2, 8, torch.bfloat16, seed=3)

    def loss(x):
        return lf.ops.attention(x, 2).float().square().sum()

    eager_x, compiled_x = (qkv.clone().requires_grad_() for _ in range(2))
    loss(eager_x).backward()
    torch.compile(loss, fullgraph=True)(compiled_x).backward()
    assert max_err(compiled_x.grad, eager_x.grad) <= 3e-2 * float(eager_x.grad.abs().max().float())
