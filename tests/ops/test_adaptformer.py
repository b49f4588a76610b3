"""AdaptFormer op: the native CPU kernel against the reference, forward and all 9 gradients.

Tolerances (docs/ops.md): fp32 relative to the largest magnitude, 1e-5 (1e-4 for sums over
more than 1e4 terms); bf16/fp16 in flash-attention style, max|K − R| ≤ 2·max|P − R| + atol with
R the fp32 reference on upcast inputs and P the reference run in the low precision.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import liftplus_fast as lf
from liftplus_fast.ops import reference

NATIVE = lf.ops.choose("adaptformer", torch.device("cpu")) == "cpu"
needs_native = pytest.mark.skipif(not NATIVE, reason="native CPU adaptformer kernel not built")
OPS = torch.ops.liftplus_fast if NATIVE else None
GRAD_NAMES = ["a", "mlp_out", "ln_w", "ln_b", "down_w", "down_b", "up_w", "up_b", "scale"]
LOW = [torch.bfloat16, torch.float16]


def make_inputs(lead, d, r, dtype=torch.float32, param_dtype=torch.float32, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return shift + scale * torch.randn(*shape, generator=g)

    a = rnd(*lead, d, scale=2.0, shift=0.5)
    m = rnd(*lead, d)
    params = [
        rnd(d, scale=0.2, shift=1.0),
        rnd(d, scale=0.1),
        rnd(r, d, scale=d**-0.5),
        rnd(r, scale=0.1),
        rnd(d, r, scale=r**-0.5),
        rnd(d, scale=0.1),
        rnd(1, scale=0.3, shift=0.8),
    ]
    if noncontig:
        # Same values, strided storage: transposed leading dims, every other column, transposed weights.
        a = a.transpose(0, -2).contiguous().transpose(0, -2) if a.dim() >= 3 else a
        m = torch.stack([m, torch.zeros_like(m)], dim=-1)[..., 0]
        params[2] = params[2].t().contiguous().t()
        params[4] = params[4].t().contiguous().t()
        params[0] = torch.stack([params[0], params[0]], dim=-1)[:, 1]
    a, m = a.to(dtype), m.to(dtype)
    params = [p.to(param_dtype) for p in params]
    return [a, m] + params


def run(fn, inputs, grad_out, with_grad=True):
    leaves = [t.detach().clone().requires_grad_(with_grad) for t in inputs]
    y = fn(*leaves)
    if not with_grad:
        return y.detach(), []
    grads = torch.autograd.grad(y, leaves, grad_out)
    return y.detach(), list(grads)


def kernel(*args):
    return lf.ops.adaptformer(*args)


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check_fp32(inputs, grad_out, with_grad=True):
    yk, gk = run(kernel, inputs, grad_out, with_grad)
    yr, gr = run(reference.adaptformer, inputs, grad_out, with_grad)
    assert yk.dtype == yr.dtype and yk.shape == yr.shape
    assert rel_err(yk, yr) <= 1e-5, "y"
    rows = inputs[0].numel() // inputs[0].shape[-1]
    d, r = inputs[0].shape[-1], inputs[2 + 2].shape[0]
    # Number of terms each gradient sums over (docs/ops.md: 1e-4 beyond 1e4 terms).
    terms = {
        "a": r + d,
        "mlp_out": 1,
        "ln_w": rows,
        "ln_b": rows,
        "down_w": rows,
        "down_b": rows,
        "up_w": rows,
        "up_b": rows,
        "scale": rows * d,
    }
    for name, k, ref, inp in zip(GRAD_NAMES, gk, gr, inputs):
        assert k.dtype == inp.dtype and k.shape == inp.shape, name
        tol = 1e-4 if terms[name] > 1e4 else 1e-5
        if name == "scale":
            # ds = ⟨G, U⟩ cancels: measure relative to the magnitude of its terms, Σ|G ⊙ U|.
            branch = reference.adaptformer_branch(inputs[0], *inputs[2:8], torch.ones(()))
            cond = float((grad_out.double() * branch.double()).abs().sum())
            assert abs(float(k) - float(ref)) <= tol * max(cond, 1e-30), "grad scale"
            continue
        err = rel_err(k, ref)
        if err > tol:
            # Both are fp32 computations: judge the kernel against the exact (float64) value,
            # allowing it the reference's own fp32 error (twice, as in the low-precision rule).
            exact = exact_grads(inputs, grad_out)[name]
            assert rel_err(k, exact) <= max(tol, 2 * rel_err(ref, exact)), f"grad {name}: {err:.2e}"


def exact_grads(inputs, grad_out):
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    y = adaptformer_f64(*leaves[:8], leaves[8].reshape(()))
    grads = torch.autograd.grad(y, leaves, grad_out.double())
    return dict(zip(GRAD_NAMES, grads))


def check_low(inputs, grad_out, atol_frac=2e-3):
    """Kernel in low precision vs fp32 reference, bounded by the reference's own low-precision error."""
    up = [t.float() for t in inputs]
    yk, gk = run(kernel, inputs, grad_out)
    yp, gp = run(reference.adaptformer, inputs, grad_out)
    yr, gr = run(reference.adaptformer, up, grad_out.float())
    assert yk.dtype == inputs[0].dtype
    for name, k, p, ref, inp in zip(["y"] + GRAD_NAMES, [yk] + gk, [yp] + gp, [yr] + gr, [inputs[0]] + inputs):
        if name != "y":
            assert k.dtype == inp.dtype, name
        if ref.numel() == 0:
            continue
        err_k = float((k.float() - ref).abs().max())
        err_p = float((p.float() - ref).abs().max())
        atol = atol_frac * float(ref.abs().max())
        assert err_k <= 2 * err_p + atol, f"{name}: kernel err {err_k:.3e}, reference-in-low-precision err {err_p:.3e}"


SHAPES = st.tuples(
    st.lists(st.integers(1, 9), min_size=1, max_size=3),  # leading dims (rows = product)
    st.sampled_from([2, 3, 7, 16, 17, 33, 64, 100, 768]),  # D, odd and vector-width sizes
    st.sampled_from([1, 2, 3, 4, 5, 8, 13, 32, 64, 256]),  # r
)
HYP = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@needs_native
@HYP
@given(shape=SHAPES, noncontig=st.booleans(), seed=st.integers(0, 2**16))
def test_fp32_matches_reference(shape, noncontig, seed):
    lead, d, r = shape
    inputs = make_inputs(lead, d, r, noncontig=noncontig and len(lead) >= 2, seed=seed)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seed + 1))
    check_fp32(inputs, grad_out)


@needs_native
@HYP
@given(shape=SHAPES, dtype=st.sampled_from(LOW), fp32_params=st.booleans(), seed=st.integers(0, 2**16))
def test_low_precision_matches_reference(shape, dtype, fp32_params, seed):
    lead, d, r = shape
    inputs = make_inputs(lead, d, r, dtype=dtype, param_dtype=torch.float32 if fp32_params else dtype, seed=seed)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    check_low(inputs, grad_out)


@needs_native
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 33, 65, 300])
@pytest.mark.parametrize("r", [4, 32, 256])
def test_fp32_tile_boundaries(rows, r):
    # Tiles are 16/32/64 rows and chunks split rows between threads: cover the edges.
    inputs = make_inputs([rows], 96, r, seed=rows * 7 + r)
    check_fp32(inputs, torch.randn(rows, 96, generator=torch.Generator().manual_seed(1)))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
def test_vit_shape(dtype):
    inputs = make_inputs([2, 197], 768, 8, dtype=dtype)
    grad_out = torch.randn(2, 197, 768, generator=torch.Generator().manual_seed(3)).to(dtype)
    if dtype == torch.float32:
        check_fp32(inputs, grad_out)
    else:
        check_low(inputs, grad_out)


@needs_native
def test_noncontiguous_inputs_and_grad():
    inputs = make_inputs([5, 6, 3], 40, 5, noncontig=True)
    assert not inputs[0].is_contiguous() and not inputs[1].is_contiguous()
    assert not inputs[2].is_contiguous() and not inputs[4].is_contiguous()
    grad_out = torch.randn(6, 3, 40).transpose(0, 1)  # [3,6,40] strided → reshaped below
    grad_out = grad_out.transpose(0, 1)
    grad_out = torch.randn(3, 6, 5, 40).permute(2, 1, 0, 3)
    assert not grad_out.is_contiguous()
    check_fp32(inputs, grad_out)


@needs_native
@pytest.mark.parametrize("lead", [[0], [2, 0], [0, 3, 4]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_rows(lead, dtype):
    inputs = make_inputs(lead, 24, 4, dtype=dtype)
    grad_out = torch.randn(*lead, 24).to(dtype)
    yk, gk = run(kernel, inputs, grad_out)
    assert yk.shape == inputs[0].shape and yk.dtype == dtype
    assert gk[0].shape == inputs[0].shape
    for name, gr_, inp in zip(GRAD_NAMES[2:], gk[2:], inputs[2:]):
        assert gr_.shape == inp.shape and gr_.dtype == inp.dtype, name
        assert not gr_.any(), name


@needs_native
def test_backward_is_deterministic():
    inputs = make_inputs([3, 77], 64, 8, seed=5)
    grad_out = torch.randn(3, 77, 64)
    _, g1 = run(kernel, inputs, grad_out)
    _, g2 = run(kernel, inputs, grad_out)
    for name, x, y in zip(GRAD_NAMES, g1, g2):
        assert torch.equal(x, y), name


@needs_native
def test_saved_tensors_are_fp32_stats_and_preactivation():
    inputs = make_inputs([2, 9], 20, 3, dtype=torch.bfloat16)
    y, mean, rstd, z = OPS.adaptformer_fwd(*inputs[:-1], inputs[-1].reshape(()), 1e-5)
    assert mean.shape == (18,) and rstd.shape == (18,) and z.shape == (18, 3)
    assert mean.dtype == rstd.dtype == z.dtype == torch.float32
    a = inputs[0].float().reshape(18, 20)
    torch.testing.assert_close(mean, a.mean(-1))
    torch.testing.assert_close(rstd, (a.var(-1, unbiased=False) + 1e-5).rsqrt())


def adaptformer_f64(a, m, ln_w, ln_b, down_w, down_b, up_w, up_b, s):
    # The reference runs LN in fp32 whatever the input; this one stays in float64 throughout.
    h = torch.nn.functional.layer_norm(a, (a.shape[-1],), ln_w, ln_b, 1e-5)
    u = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(h, down_w, down_b)), up_w, up_b)
    return a + (m + s * u)


@needs_native
def test_gradcheck_float64():
    inputs = [t.double().requires_grad_() for t in make_inputs([2, 3], 7, 3, seed=11)]
    inputs[-1] = inputs[-1].detach().reshape(()).requires_grad_()

    def fn(*args):
        return OPS.adaptformer_fwd(*args, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    # And the float64 kernel agrees with the float64 reference.
    grad_out = torch.randn(2, 3, 7, dtype=torch.float64)
    yk, gk = run(fn, inputs, grad_out)
    yr, gr = run(adaptformer_f64, inputs, grad_out)
    assert rel_err(yk, yr) < 1e-12
    for name, k, ref in zip(GRAD_NAMES, gk, gr):
        assert rel_err(k, ref) < 1e-11, name


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    inputs = make_inputs([3, 5], 24, 4, dtype=dtype)
    inputs[-1] = inputs[-1].reshape(())
    torch.library.opcheck(OPS.adaptformer_fwd.default, (*inputs, 1e-5))
    grad_inputs = [t.requires_grad_() if t.is_floating_point() else t for t in [x.clone() for x in inputs]]
    torch.library.opcheck(OPS.adaptformer_fwd.default, (*grad_inputs, 1e-5))
    _, mean, rstd, z = OPS.adaptformer_fwd(*inputs, 1e-5)
    grad_y = torch.randn(3, 5, 24).to(dtype)
    a, _m, *params = inputs
    torch.library.opcheck(OPS.adaptformer_bwd.default, (grad_y, a, *params, mean, rstd, z))


def test_torch_compile_fullgraph_matches_eager():
    inputs = make_inputs([2, 11], 48, 4, seed=2)

    def block(a, m, *params):
        return lf.ops.adaptformer(a, m, *params).square().sum()

    compiled = torch.compile(block, fullgraph=True)
    leaves_c = [t.clone().requires_grad_() for t in inputs]
    leaves_e = [t.clone().requires_grad_() for t in inputs]
    out_c = compiled(*leaves_c)
    out_e = block(*leaves_e)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    out_c.backward()
    out_e.backward()
    for name, x, y in zip(GRAD_NAMES, leaves_c, leaves_e):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_bad_arguments_name_the_argument():
    a, m, ln_w, ln_b, down_w, down_b, up_w, up_b, s = make_inputs([4], 16, 2)
    good = dict(a=a, mlp_out=m, ln_w=ln_w, ln_b=ln_b, down_w=down_w, down_b=down_b, up_w=up_w, up_b=up_b, scale=s)

    def call(**over):
        kw = {**good, **over}
        return lf.ops.adaptformer(*kw.values())

    with pytest.raises(ValueError, match="mlp_out"):
        call(mlp_out=torch.randn(4, 15))
    with pytest.raises(TypeError, match="mlp_out"):
        call(mlp_out=m.double())
    with pytest.raises(ValueError, match="down_w"):
        call(down_w=torch.randn(2, 15))
    with pytest.raises(ValueError, match="up_w"):
        call(up_w=torch.randn(2, 16))
    with pytest.raises(ValueError, match="ln_b"):
        call(ln_b=torch.randn(17))
    with pytest.raises(TypeError, match="a must have dtype"):
        call(a=a.long(), mlp_out=m.long())
    with pytest.raises(ValueError, match="scale"):
        call(scale=torch.ones(2))
    with pytest.raises(ValueError, match="up_b on meta"):
        call(up_b=up_b.to("meta"))


@needs_native
def test_native_checks_name_the_argument():
    a, m, ln_w, ln_b, down_w, down_b, up_w, up_b, s = make_inputs([4], 16, 2)
    with pytest.raises(RuntimeError, match=r"down_b must have shape \[2\]"):
        OPS.adaptformer_fwd(a, m, ln_w, ln_b, down_w, torch.randn(3), up_w, up_b, s, 1e-5)
    with pytest.raises(RuntimeError, match="up_w must have shape .*dtype"):
        OPS.adaptformer_fwd(a, m, ln_w, ln_b, down_w, down_b, torch.randn(16, 3), up_b, s, 1e-5)
    with pytest.raises(RuntimeError, match="a must be float32.*Long"):
        OPS.adaptformer_fwd(a.long(), m.long(), ln_w, ln_b, down_w, down_b, up_w, up_b, s, 1e-5)
    with pytest.raises(RuntimeError, match="mlp_out must match a"):
        OPS.adaptformer_fwd(a, m.half(), ln_w, ln_b, down_w, down_b, up_w, up_b, s, 1e-5)
    _, mean, rstd, z = OPS.adaptformer_fwd(a, m, ln_w, ln_b, down_w, down_b, up_w, up_b, s, 1e-5)
    with pytest.raises(RuntimeError, match="z must have shape"):
        OPS.adaptformer_bwd(a, a, ln_w, ln_b, down_w, down_b, up_w, up_b, s, mean, rstd, z[:, :1])
    with pytest.raises(RuntimeError, match="rstd must have dtype"):
        OPS.adaptformer_bwd(a, a, ln_w, ln_b, down_w, down_b, up_w, up_b, s, mean, rstd.double(), z)
    with pytest.raises(RuntimeError, match="grad_y must match a"):
        OPS.adaptformer_bwd(a[:2], a, ln_w, ln_b, down_w, down_b, up_w, up_b, s, mean, rstd, z)
