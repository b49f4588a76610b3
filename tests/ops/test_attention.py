"""Attention op: the native CPU kernel against SDPA evaluated in float64, forward and gradient.

bf16/fp16 follow flash-attention's rule: max|K − R| ≤ 2·max|P − R| + atol, with R the float64
evaluation on the same (rounded) inputs and P PyTorch's SDPA run in the low precision.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import liftplus_fast as lf
from liftplus_fast.ops import gemm, reference

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
    # bf16 on a CPU without bf16 GEMMs runs fp32 inside (ops.gemm), which inductor may fuse
    # differently from eager: the two then agree to bf16 precision only.
    same = 1e-5 if dtype == torch.float32 or gemm.native_half_gemm("cpu", dtype) else rel
    torch.testing.assert_close(compiled, eager, rtol=same, atol=same)
    torch.testing.assert_close(leaves[1].grad.float(), leaves[0].grad.float(), rtol=same, atol=same)
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
