"""CUDA kernels of the native extension.

Two layers (GPU code that cannot run here is still built; docs/gpu.md):
* build checks that run everywhere the extension was built with CUDA: every op the library
  defines has a CUDA kernel registered;
* equivalence tests of the CUDA kernels against the reference (forward and all gradients,
  fp32 and bf16/fp16, both the fused small-r path and the cuBLAS path), skipped without a GPU.

The element-wise arithmetic of the CUDA kernels lives in csrc/include/liftplus_fast/
(layernorm.h, adaptformer.h, math.h) and is exercised on CPU by test_adaptformer.py.
"""

import pytest
import torch

from liftplus_fast.ops import reference
from liftplus_fast.ops._native import NAMESPACE, native_status

from . import test_la_cosine_ce as lace
from .test_adaptformer import GRAD_NAMES, LOW, check_fp32, check_low, make_inputs, run

STATUS = native_status()
BUILT_WITH_CUDA = STATUS.loaded and bool(STATUS.build_info.get("cuda"))
_skip_without_cuda_build = pytest.mark.skipif(
    not BUILT_WITH_CUDA,
    reason=("native extension not loaded: " + STATUS.reason)
    if not STATUS.loaded
    else "liftplus_fast/_build_info.json says the extension was built without CUDA",
)
_skip_without_gpu = pytest.mark.skipif(
    not (BUILT_WITH_CUDA and torch.cuda.is_available()), reason="needs a CUDA device and the extension built with CUDA"
)


# Both marks carry `gpu`, so `pytest -m gpu` (make gpu-check) selects every test of this file.
def needs_cuda_build(test):
    return pytest.mark.gpu(_skip_without_cuda_build(test))


def needs_gpu(test):
    return pytest.mark.gpu(_skip_without_gpu(test))


# The ops that have CUDA kernels in csrc/ops/cuda/ (one file per op family).
CUDA_OPS = [
    "adaptformer_fwd",
    "adaptformer_bwd",
    "la_cosine_ce_fwd",
    "la_cosine_ce_bwd",
    "tte_aggregate",
    "tte_mean_unit_features",
]


def _library_ops():
    # Ops the library declares CPU-only (PyTorch's kernels are the GPU path) are not expected here.
    from liftplus_fast.ops._library import CPU_ONLY_SCHEMAS

    prefix = NAMESPACE + "::"
    return sorted(
        {
            s.name[len(prefix) :]
            for s in torch._C._jit_get_all_schemas()
            if s.name.startswith(prefix) and s.name[len(prefix) :] not in CPU_ONLY_SCHEMAS
        }
    )


@needs_cuda_build
def test_build_info_names_the_arch_list():
    archs = STATUS.build_info.get("cuda_arch_list", "")
    assert archs, STATUS.build_info
    for arch in archs.replace(" ", ";").split(";"):
        major_minor = arch.replace("+PTX", "").split(".")
        assert len(major_minor) == 2 and all(p.isdigit() for p in major_minor), archs


@needs_cuda_build
@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_kernel_registered(op):
    qualname = f"{NAMESPACE}::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"), qualname
    # The CPU kernel is there too: CUDA sources are compiled into the same library.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU"), qualname


@needs_cuda_build
def test_every_library_op_has_a_cuda_kernel():
    ops = _library_ops()
    assert set(CUDA_OPS) <= set(ops), ops
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"


# ---------------------------------------------------------------------------------------------
# AdaptFormer on a GPU: the CUDA kernel (forced with LIFTPLUS_FAST_BACKEND=cuda) against the
# reference on the same device.


@pytest.fixture
def cuda_backend(monkeypatch):
    monkeypatch.setenv("LIFTPLUS_FAST_BACKEND", "cuda")


def to_cuda(ts):
    return [t.cuda() for t in ts]


@needs_gpu
@pytest.mark.parametrize(
    "lead,d,r",
    [
        ([2, 197], 768, 4),
        ([3, 50], 768, 8),
        ([1, 197], 768, 32),
        ([77], 768, 64),  # fused path
        ([5, 7], 40, 3),
        ([33], 17, 1),
        ([9], 1024, 16),
        ([4], 300, 13),  # ragged widths
        ([6, 11], 128, 17),
        ([50], 64, 33),
        ([300], 256, 48),  # unit groups of 16
        ([2, 65], 768, 96),
        ([40], 1100, 8),  # cuBLAS path
    ],
)
def test_cuda_fp32_matches_reference(cuda_backend, lead, d, r):
    inputs = to_cuda(make_inputs(lead, d, r, seed=d + r))
    grad_out = torch.randn(*lead, d, generator=torch.Generator().manual_seed(1)).cuda()
    check_fp32(inputs, grad_out)


@needs_gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("fp32_params", [True, False])
@pytest.mark.parametrize("d,r", [(768, 8), (768, 64), (96, 5), (768, 128)])
def test_cuda_low_precision_matches_reference(cuda_backend, dtype, fp32_params, d, r):
    inputs = to_cuda(
        make_inputs([3, 41], d, r, dtype=dtype, param_dtype=torch.float32 if fp32_params else dtype, seed=r)
    )
    grad_out = torch.randn(3, 41, d, generator=torch.Generator().manual_seed(2)).to(dtype).cuda()
    check_low(inputs, grad_out)


@needs_gpu
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 255, 256, 257, 2049, 20000])
def test_cuda_row_blocking_edges(cuda_backend, rows):
    # Warps per block (8), row blocks (capped at 256) and weight chunks (>= 256 rows) split here.
    inputs = to_cuda(make_inputs([rows], 64, 4, seed=rows))
    check_fp32(inputs, torch.randn(rows, 64, generator=torch.Generator().manual_seed(3)).cuda())


@needs_gpu
def test_cuda_noncontiguous(cuda_backend):
    inputs = to_cuda(make_inputs([5, 6, 3], 40, 5, noncontig=True))
    inputs = [t.transpose(0, -2).contiguous().transpose(0, -2) if t.dim() >= 3 else t for t in inputs]
    grad_out = torch.randn(3, 6, 5, 40).permute(2, 1, 0, 3).cuda()
    check_fp32(inputs, grad_out)


@needs_gpu
@pytest.mark.parametrize("lead", [[0], [2, 0]])
def test_cuda_zero_rows(cuda_backend, lead):
    inputs = to_cuda(make_inputs(lead, 24, 4))
    y, grads = run(
        lambda *a: torch.ops.liftplus_fast.adaptformer_fwd(*a[:-1], a[-1].reshape(()), 1e-5)[0],
        inputs,
        torch.randn(*lead, 24).cuda(),
    )
    assert y.shape == inputs[0].shape
    for name, g, inp in zip(GRAD_NAMES[2:], grads[2:], inputs[2:]):
        assert g.shape == inp.shape and g.dtype == inp.dtype and not g.any(), name


@needs_gpu
@pytest.mark.parametrize("r", [8, 96])
def test_cuda_backward_is_deterministic(cuda_backend, r):
    inputs = to_cuda(make_inputs([4, 197], 768, r, seed=9))
    grad_out = torch.randn(4, 197, 768).cuda()
    fn = lambda *a: torch.ops.liftplus_fast.adaptformer_fwd(*a[:-1], a[-1].reshape(()), 1e-5)[0]  # noqa: E731
    _, g1 = run(fn, inputs, grad_out)
    _, g2 = run(fn, inputs, grad_out)
    for name, x, y in zip(GRAD_NAMES, g1, g2):
        assert torch.equal(x, y), name


@needs_gpu
def test_cuda_saved_tensors_and_float64_gradcheck():
    inputs = to_cuda(make_inputs([2, 9], 20, 3, dtype=torch.bfloat16))
    _, mean, rstd, z = torch.ops.liftplus_fast.adaptformer_fwd(*inputs[:-1], inputs[-1].reshape(()), 1e-5)
    assert mean.dtype == rstd.dtype == z.dtype == torch.float32 and z.shape == (18, 3)
    a = inputs[0].float().reshape(18, 20)
    torch.testing.assert_close(mean, a.mean(-1))
    torch.testing.assert_close(rstd, (a.var(-1, unbiased=False) + 1e-5).rsqrt())
    # float64 runs the cuBLAS path in float64.
    dbl = [t.double().cuda().requires_grad_() for t in make_inputs([2, 3], 7, 3, seed=11)]
    dbl[-1] = dbl[-1].detach().reshape(()).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *x: torch.ops.liftplus_fast.adaptformer_fwd(*x, 1e-5)[0], dbl, eps=1e-6, atol=1e-6, rtol=1e-5
    )


@needs_gpu
def test_cuda_checks_name_the_argument():
    a, m, ln_w, ln_b, down_w, down_b, up_w, up_b, s = to_cuda(make_inputs([4], 16, 2))
    ops = torch.ops.liftplus_fast
    with pytest.raises(RuntimeError, match="up_b must be on cuda"):
        ops.adaptformer_fwd(a, m, ln_w, ln_b, down_w, down_b, up_w, up_b.cpu(), s, 1e-5)
    with pytest.raises(RuntimeError, match=r"down_b must have shape \[2\]"):
        ops.adaptformer_fwd(a, m, ln_w, ln_b, down_w, torch.randn(3).cuda(), up_w, up_b, s, 1e-5)
    _, mean, rstd, z = ops.adaptformer_fwd(a, m, ln_w, ln_b, down_w, down_b, up_w, up_b, s, 1e-5)
    with pytest.raises(RuntimeError, match="z must have shape"):
        ops.adaptformer_bwd(a, a, ln_w, ln_b, down_w, down_b, up_w, up_b, s, mean, rstd, z[:, :1])


@needs_gpu
def test_cuda_reference_on_same_device_is_the_oracle():
    # Guards the tests above: the reference must run on the GPU tensors it is given.
    inputs = to_cuda(make_inputs([2], 8, 2))
    assert reference.adaptformer(*inputs).is_cuda


# ---------------------------------------------------------------------------------------------
# LA cosine cross-entropy on a GPU (CUDA kernel forced), against the reference on the device.


def ce_cuda(b, k, d, dtype=torch.float32, wdtype=None, seed=0, noncontig=False):
    return [t.cuda() for t in lace.make(b, k, d, dtype, wdtype, seed=seed, noncontig=noncontig)]


@needs_gpu
@pytest.mark.parametrize("b,k,d", [(128, 100, 768), (128, 1000, 768), (7, 365, 64), (1, 2, 1), (33, 8142, 97)])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_cuda_la_ce_fp32_matches_reference(cuda_backend, b, k, d, chunked, tau):
    with lace.chunking(chunk=97 if chunked else None, store=0 if chunked else None):
        lace.check_fp32(*ce_cuda(b, k, d, seed=b + k), tau=tau)


@needs_gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("weight_fp32", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_cuda_la_ce_low_precision(cuda_backend, dtype, weight_fp32, chunked):
    wdtype = torch.float32 if weight_fp32 else dtype
    feat, weight, labels, log_prior = ce_cuda(64, 1000, 768, dtype, wdtype, seed=4)
    with lace.chunking(chunk=97 if chunked else None, store=0 if chunked else None):
        out = lace.fused(feat, weight, labels, log_prior)
    low = lace.ref(feat, weight, labels, log_prior)
    hi = lace.ref(feat.float(), weight.float(), labels, log_prior)
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype
    assert out[2].dtype == dtype and out[3].dtype == wdtype
    gs = lace.grad_scale(feat.float(), weight.float())
    for name, a, p, r, fl in zip(("loss", "logits", "grad_feat", "grad_weight"), out, low, hi, (1.0, 1.0, gs, gs)):
        err = (a.double() - r.double()).abs().max().item()
        err_p = (p.double() - r.double()).abs().max().item()
        atol = 1e-3 * max(r.double().abs().max().item(), fl)
        assert err <= 2 * err_p + atol, f"{name}: kernel error {err:.3g} vs PyTorch {err_p:.3g}"


@needs_gpu
def test_cuda_la_ce_recomputing_backward_and_grad_scaling(cuda_backend):
    feat, weight, labels, log_prior = ce_cuda(16, 300, 64, seed=8)
    ops = torch.ops.liftplus_fast
    loss, _, lse, gf1, gw1 = ops.la_cosine_ce_fwd(feat, weight, labels, log_prior, 25.0, 1.0, False, True)
    gl = torch.tensor(3.0, device="cuda")
    gf, gw = ops.la_cosine_ce_bwd(gl, feat, weight, labels, log_prior, lse, 25.0, 1.0)
    torch.testing.assert_close(gf, 3 * gf1)
    torch.testing.assert_close(gw, 3 * gw1)
    torch.testing.assert_close(loss, reference.la_cosine_cross_entropy(feat, weight, labels, log_prior))


@needs_gpu
def test_cuda_la_ce_zero_norm_rows_and_determinism(cuda_backend):
    feat, weight, labels, log_prior = ce_cuda(4, 9, 8, seed=5)
    feat[1] = 0
    weight[2] = 0
    labels[0] = 2
    lace.check_fp32(feat, weight, labels, log_prior)
    a, b = lace.fused(feat, weight, labels, log_prior), lace.fused(feat, weight, labels, log_prior)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@needs_gpu
@pytest.mark.parametrize("chunked", [False, True])
def test_cuda_la_ce_gradcheck_float64(chunked):
    feat, weight, labels, log_prior = ce_cuda(3, 7, 5, torch.float64)
    log_prior = log_prior.double()

    def fn(f, w):
        return torch.ops.liftplus_fast.la_cosine_ce_fwd(f, w, labels, log_prior, 2.5, 1.0, False, True)[0]

    with lace.chunking(chunk=3 if chunked else None, store=0 if chunked else None):
        assert torch.autograd.gradcheck(fn, (feat.requires_grad_(), weight.requires_grad_()))


@needs_gpu
def test_cuda_la_ce_checks_name_the_argument():
    feat, weight, labels, log_prior = ce_cuda(4, 9, 8)
    with pytest.raises(RuntimeError, match="log_prior must be on cuda"):
        torch.ops.liftplus_fast.la_cosine_ce_fwd(feat, weight, labels, log_prior.cpu(), 25.0, 1.0, False, False)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.liftplus_fast.la_cosine_ce_fwd(feat, weight[:, :3], labels, log_prior, 25.0, 1.0, False, False)
