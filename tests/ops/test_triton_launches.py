"""Every Triton launch runs on its tensors' device.

Triton launches on the current CUDA device whatever device the pointers belong to, so tensors on
``cuda:1`` while ``cuda:0`` is current would be read by a kernel on the wrong GPU. The source
check holds on any machine; the run needs two GPUs.
"""

import ast
import inspect
import os

import pytest
import torch

import liftplus_fast as lf

TRITON_DIR = os.path.join(os.path.dirname(lf.__file__), "ops", "triton")
MODULES = ("adaptformer.py", "la_cosine_ce.py", "tte.py")


def _guarded_launches(path):
    tree = ast.parse(open(path).read())
    guarded, launches = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
            isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", "") == "on_device"
            for item in node.items
        ):
            guarded |= {id(n) for n in ast.walk(node)}
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "wrap_triton":
            launches.append(node)
    return [(n.lineno, id(n) in guarded) for n in launches]


@pytest.mark.parametrize("module", MODULES)
def test_every_launch_is_inside_on_device(module):
    launches = _guarded_launches(os.path.join(TRITON_DIR, module))
    assert launches, module
    assert [line for line, ok in launches if not ok] == [], f"{module}: launches outside on_device"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_the_second_gpu(monkeypatch):
    pytest.importorskip("triton")
    from liftplus_fast.ops import reference

    monkeypatch.setenv("LIFTPLUS_FAST_BACKEND", "triton")
    torch.cuda.set_device(0)
    x = torch.randn(3, 17, 300, device="cuda:1")
    y = torch.randint(0, 300, (17,), device="cuda:1")
    out = lf.ops.tte_aggregate(x, y)
    assert out.logits.device == x.device
    torch.testing.assert_close(out.logits, reference.tte_aggregate(x, y).logits)
    f = torch.randn(16, 64, device="cuda:1", requires_grad=True)
    w = torch.randn(50, 64, device="cuda:1", requires_grad=True)
    lp = torch.log_softmax(torch.randn(50, device="cuda:1"), 0)
    loss = lf.ops.la_cosine_cross_entropy(f, w, y[:16] % 50, lp)
    ref = reference.la_cosine_cross_entropy(f, w, y[:16] % 50, lp)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    loss.backward()
    assert f.grad.device == f.device and torch.isfinite(f.grad).all()


def test_triton_ops_declare_their_schema_in_annotations():
    # torch releases before 2.12 ignore triton_op's schema= and infer the schema from the
    # annotations: they must say what _library.SCHEMAS says (argument and result types).
    pytest.importorskip("triton")
    from torch._library.infer_schema import infer_schema

    from liftplus_fast.ops import _library
    from liftplus_fast.ops.triton import adaptformer, la_cosine_ce, tte

    fns = {
        "adaptformer_fwd": adaptformer.adaptformer_fwd,
        "adaptformer_bwd": adaptformer.adaptformer_bwd,
        "la_cosine_ce_fwd": la_cosine_ce.la_cosine_ce_fwd,
        "la_cosine_ce_bwd": la_cosine_ce.la_cosine_ce_bwd,
        "tte_aggregate": tte.tte_aggregate_op,
        "tte_mean_unit_features": tte.tte_mean_unit_features_op,
    }
    assert set(fns) == set(_library.SCHEMAS)

    def types(schema):
        args, results = schema.split(" -> ")
        strip = [a.strip().rsplit(" ", 1)[0] if " " in a.strip() else a.strip() for a in args.strip("()").split(",")]
        res = [r.strip().split(" ")[0] for r in results.strip("()").split(",")]
        return strip, res

    for name, op in fns.items():
        # triton_op wraps the decorated function in a backend function that closes over it.
        fn = inspect.getclosurevars(op._init_fn).nonlocals["fn"]
        assert types(infer_schema(fn, mutates_args=())) == types(_library.SCHEMAS[name]), name
