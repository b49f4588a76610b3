"""Attention on PyTorch's batch-reduce GEMM (``attention_brgemm_fwd`` / ``_bwd``) against SDPA in
float64, forward and gradient, in both operand layouts brgemm takes (VNNI pairs: oneDNN's
micro-kernels, AMX tiles on CPUs with AMX, products padded to whole tiles there; plain: a BLAS
GEMM, what any other CPU runs).

Tolerances as in test_attention.py: fp32 within 1e-5 of float64; bf16 at most twice the error of
PyTorch's bf16 SDPA on the same rounded inputs, plus 1e-3.
"""

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import liftplus_fast as lf
from liftplus_fast.ops import choices, reference

from .test_attention import HYP, make_qkv, max_err, sdpa

attention_mod = importlib.import_module("liftplus_fast.ops.attention")  # the package exports the function
OPS = torch.ops.liftplus_fast
BRGEMM = bool(attention_mod._BRGEMM_LAYOUT)  # the extension loaded, with brgemm (torch >= 2.6)
pytestmark = pytest.mark.skipif(not BRGEMM, reason="native extension without brgemm attention")
BF16, FP32 = torch.bfloat16, torch.float32


@pytest.fixture(params=["vnni_tiles", "vnni_exact", "plain"])
def layout(request, monkeypatch):
    """Both operand layouts on any machine (VNNI only where brgemm runs it), VNNI products both
    padded to whole AMX tiles (what a CPU with AMX runs) and at their own sizes (what others run)."""
    if request.param == "plain":
        monkeypatch.setenv("LIFTPLUS_FAST_BRGEMM_PLAIN", "1")
    else:
        monkeypatch.delenv("LIFTPLUS_FAST_BRGEMM_PLAIN", raising=False)
        monkeypatch.setenv("LIFTPLUS_FAST_BRGEMM_TILES", "1" if request.param == "vnni_tiles" else "0")
        if OPS.attention_brgemm_layout() != "vnni":
            pytest.skip("brgemm takes no VNNI operands on this CPU / torch build")
    assert OPS.attention_brgemm_layout() == request.param.split("_")[0]
    return request.param


def brgemm(qkv, heads, batch_first, grad_out):
    scale = (qkv.shape[-1] // (3 * heads)) ** -0.5
    out, lse = OPS.attention_brgemm_fwd(qkv, heads, scale, batch_first)
    grad = OPS.attention_brgemm_bwd(grad_out, qkv, out, lse, heads, scale, batch_first)
    return out, grad, lse


def check(batch, tokens, heads, head_dim, dtype, batch_first, seed=0):
    qkv = make_qkv(batch, tokens, heads, head_dim, dtype, batch_first, seed)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(qkv.shape[:2] + (qkv.shape[-1] // 3,), generator=g, dtype=torch.float64).to(dtype)
    out, grad, lse = brgemm(qkv, heads, batch_first, grad_out)
    assert out.dtype == grad.dtype == dtype and out.shape == grad_out.shape and grad.shape == qkv.shape
    assert lse.shape == (batch, heads, tokens) and lse.dtype == FP32
    ref_out, ref_grad = sdpa(qkv.double(), heads, batch_first, grad_out.double())
    if dtype == FP32:
        assert max_err(out, ref_out) <= 1e-5 * float(ref_out.abs().max()) + 1e-6
        assert max_err(grad, ref_grad) <= 1e-5 * float(ref_grad.abs().max()) + 1e-6
        return
    peer_out, peer_grad = sdpa(qkv, heads, batch_first, grad_out)
    assert max_err(out, ref_out) <= 2 * max_err(peer_out, ref_out) + 1e-3
    assert max_err(grad, ref_grad) <= 2 * max_err(peer_grad, ref_grad) + 1e-3


@pytest.mark.parametrize("dtype", [BF16, FP32])
@pytest.mark.parametrize(
    "batch,tokens,heads,head_dim,batch_first",
    [
        (2, 197, 12, 64, True),  # ViT-B/16 at 224 px
        (2, 197, 12, 64, False),  # open_clip's sequence-first layout
        (2, 50, 12, 64, True),  # ViT-B/32 at 224 px
        (1, 257, 16, 64, False),  # ViT-L/14 at 224 px
        (2, 50, 16, 80, True),  # head width 80 (ViT-H/14)
        (1, 197, 16, 80, False),
        (3, 7, 2, 6, True),  # fewer tokens than a 16-column block
        (2, 33, 3, 5, False),  # odd head width: K of QKᵀ odd, no VNNI pairs
    ],
)
def test_matches_reference(layout, batch, tokens, heads, head_dim, batch_first, dtype):
    check(batch, tokens, heads, head_dim, dtype, batch_first)


@HYP
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 70),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([2, 4, 6, 8, 16, 32, 64, 80]),
    dtype=st.sampled_from([FP32, BF16]),
    batch_first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_any_shape(batch, tokens, heads, head_dim, dtype, batch_first, seed):
    # Token counts cover 16-column tails, odd counts (the zero pair row of P·V) and one token.
    check(batch, tokens, heads, head_dim, dtype, batch_first, seed)


def test_matches_the_package_kernel_on_vit_b16():
    # Same arithmetic (fp32 scores, P and dS rounded to bf16 as GEMM operands), other GEMMs.
    qkv = make_qkv(2, 197, 12, 64, BF16, seed=4)
    grad_out = make_qkv(2, 197, 4, 64, BF16, seed=5)[..., : 12 * 64]
    out_b, grad_b, lse_b = brgemm(qkv, 12, True, grad_out)
    out_k, lse_k = OPS.attention_fwd(qkv, 12, 0.125, True)
    grad_k = OPS.attention_bwd(grad_out, qkv, out_k, lse_k, 12, 0.125, True)
    torch.testing.assert_close(lse_b, lse_k, rtol=1e-5, atol=1e-5)
    assert float((out_b.float() - out_k.float()).abs().max()) <= 2**-7 * float(out_k.float().abs().max())
    assert float((grad_b.float() - grad_k.float()).abs().max()) <= 2**-6 * float(grad_k.float().abs().max())


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_opcheck(dtype):
    qkv = make_qkv(2, 13, 2, 8, dtype)
    torch.library.opcheck(OPS.attention_brgemm_fwd.default, (qkv, 2, 8**-0.5, True))
    torch.library.opcheck(OPS.attention_brgemm_fwd.default, (qkv.clone().requires_grad_(), 2, 8**-0.5, True))
    out, lse = OPS.attention_brgemm_fwd(qkv, 2, 8**-0.5, True)
    args = (torch.randn_like(out), qkv, out, lse, 2, 8**-0.5, True)
    torch.library.opcheck(OPS.attention_brgemm_bwd.default, args)


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("shape", [(2, 197, 12, 64), (2, 50, 16, 80)])
def test_public_op_runs_it_when_chosen_and_compiles(monkeypatch, dtype, shape):
    monkeypatch.setitem(choices._OPTION, "half_gemm", "native")
    monkeypatch.setitem(choices._OPTION, attention_mod.CHOICES[dtype].name, "brgemm")
    batch, tokens, heads, head_dim = shape
    qkv = make_qkv(batch, tokens, heads, head_dim, dtype, seed=6)

    def loss(x):
        return lf.ops.attention(x, heads).float().square().sum()

    leaves = [qkv.clone().requires_grad_() for _ in range(3)]
    with torch.profiler.profile() as prof:
        eager = loss(leaves[0])
        eager.backward()
    names = {e.name for e in prof.events()}
    assert {"liftplus_fast::attention_brgemm_fwd", "liftplus_fast::attention_brgemm_bwd"} <= names
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)(leaves[1])
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaves[1].grad.float(), leaves[0].grad.float(), rtol=1e-5, atol=1e-5)
    ref = reference.attention(leaves[2].double(), heads).float().square().sum()
    ref.backward()
    rel = 1e-5 if dtype == FP32 else 3e-2
    torch.testing.assert_close(eager.double(), ref.double(), rtol=rel, atol=rel)
    assert max_err(leaves[0].grad, leaves[2].grad) <= rel * float(leaves[2].grad.abs().max())


def test_layout_follows_the_cpu():
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    layout = OPS.attention_brgemm_layout()
    assert layout in ("vnni", "plain")
    if amx and torch.backends.mkldnn.is_available():
        assert layout == "vnni"  # oneDNN micro-kernels on AMX tiles


def test_rejects_other_dtypes_naming_qkv():
    with pytest.raises(RuntimeError, match="qkv must be bfloat16 or float32"):
        OPS.attention_brgemm_fwd(torch.randn(2, 5, 12, dtype=torch.float16), 2, 1.0, True)
    with pytest.raises(RuntimeError, match="qkv"):
        OPS.attention_brgemm_fwd(torch.randn(2, 5, 10), 2, 1.0, True)
