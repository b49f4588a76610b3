"""GPU benchmark of the fused ops: eager reference, torch.compile of it, Triton, CUDA extension.

Shapes as in docs/benchmarks.md. Without a CUDA device (or without triton) there are no cases. Each
candidate does the whole work once (fwd+bwd where the op trains) and synchronises.
"""

from __future__ import annotations

import common
import torch

NAME = "triton_gpu"
DEV = "cuda"


def _available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import liftplus_fast.ops.triton  # noqa: F401
    except ImportError:
        return False
    return True


def _native_has(op: str) -> bool:
    try:
        from liftplus_fast.ops._native import has_kernel, native_status
    except ImportError:
        return False
    return native_status().loaded and has_kernel(op, "CUDA")


def _train_step(fn, inputs, params):
    def run():
        out = fn()
        loss = out if out.dim() == 0 else out.float().square().mean()
        loss.backward()
        for t in list(inputs) + list(params):
            t.grad = None
        torch.cuda.synchronize()

    return run


def _adaptformer_cases(smoke: bool):
    from liftplus_fast.ops import reference
    from liftplus_fast.ops.triton import adaptformer as tri

    shapes = [(8, 4)] if smoke else [(b, r) for b in (8, 32, 128) for r in (4, 8, 32, 256)]
    cases = []
    for b, r in shapes:
        n, d, dt = b * 197, 768, torch.bfloat16
        a = torch.randn(n, d, device=DEV, dtype=dt, requires_grad=True)
        m = torch.randn(n, d, device=DEV, dtype=dt, requires_grad=True)
        ps = [
            torch.ones(d),
            torch.zeros(d),
            torch.randn(r, d) / d**0.5,
            torch.zeros(r),
            torch.randn(d, r) * 0.01,
            torch.zeros(d),
            torch.tensor(1.0),
        ]
        ps = [p.to(DEV).requires_grad_() for p in ps]
        ref = reference.adaptformer
        comp = torch.compile(reference.adaptformer)
        cands = {
            common.REFERENCE: _train_step(lambda: ref(a, m, *ps, 1e-5), (a, m), ps),
            common.COMPILE: _train_step(lambda: comp(a, m, *ps, 1e-5), (a, m), ps),
            "triton": _train_step(lambda: tri.adaptformer(a, m, *ps, 1e-5), (a, m), ps),
        }
        if _native_has("adaptformer_fwd"):
            from liftplus_fast.ops._native import native_op

            cands["cuda"] = _train_step(lambda: native_op("adaptformer_fwd")(a, m, *ps, 1e-5)[0], (a, m), ps)
        e = a.element_size()
        # Ideal fused traffic: fwd reads A, M, writes Y; bwd reads G, A, writes dA (dM = G).
        ideal = 6 * n * d * e + n * (8 + 4 * r) + n * 4 * r * 2
        cases.append(
            common.Case(
                f"adaptformer_fwd_bwd_B{b}_r{r}",
                {"N": n, "D": d, "r": r, "dtype": "bf16"},
                cands,
                bytes_moved=ideal,
                flops=3 * 4 * n * d * r,
                device=DEV,
            )
        )
    return cases


def _ce_cases(smoke: bool):
    from liftplus_fast.ops import reference
    from liftplus_fast.ops.triton import la_cosine_ce as tri

    shapes = [(128, 1000)] if smoke else [(b, k) for b in (128, 512) for k in (100, 365, 1000, 8142, 100000)]
    cases = []
    for b, k in shapes:
        d, dt = 768, torch.bfloat16
        f = torch.randn(b, d, device=DEV, dtype=dt, requires_grad=True)
        w = torch.randn(k, d, device=DEV, requires_grad=True)
        y = torch.randint(0, k, (b,), device=DEV)
        lp = torch.log_softmax(torch.randn(k, device=DEV), 0)
        ref = reference.la_cosine_cross_entropy
        comp = torch.compile(reference.la_cosine_cross_entropy)
        cands = {
            common.REFERENCE: _train_step(lambda: ref(f, w, y, lp), (f, w), ()),
            common.COMPILE: _train_step(lambda: comp(f, w, y, lp), (f, w), ()),
            "triton": _train_step(lambda: tri.la_cosine_cross_entropy(f, w, y, lp, 25.0, 1.0, False), (f, w), ()),
        }
        if _native_has("la_cosine_ce_fwd"):
            # The public op's CUDA backend: its forward also returns the gradients when autograd
            # needs them (compute_grad), so the backward does not recompute the logits GEMM.
            from liftplus_fast.ops.la_cosine_ce import _native_la_ce

            cands["cuda"] = _train_step(lambda: _native_la_ce(f, w, y, lp, 25.0, 1.0, False), (f, w), ())
        # Ideal: read F and W once in fwd, once in bwd, write dF and dW (fp32 weight).
        ideal = 2 * (b * d * 2 + k * d * 4) + b * d * 2 + k * d * 4
        cases.append(
            common.Case(
                f"la_cosine_ce_fwd_bwd_B{b}_K{k}",
                {"B": b, "K": k, "D": d, "dtype": "bf16"},
                cands,
                bytes_moved=ideal,
                flops=3 * 2 * b * k * d,
                device=DEV,
            )
        )
    return cases


def _tte_cases(smoke: bool):
    from liftplus_fast.ops import reference
    from liftplus_fast.ops.triton import tte as tri

    shapes = [(64, 1000)] if smoke else [(b, k) for b in (64, 256) for k in (1000, 8142)]
    cases = []
    for b, k in shapes:
        x = torch.randn(5, b, k, device=DEV, dtype=torch.float16)
        y = torch.randint(0, k, (b,), device=DEV)
        comp = torch.compile(reference.tte_aggregate)

        def sync(fn):
            def run():
                fn()
                torch.cuda.synchronize()

            return run

        cands = {
            common.REFERENCE: sync(lambda: reference.tte_aggregate(x, y)),
            common.COMPILE: sync(lambda: comp(x, y)),
            "triton": sync(lambda: tri.tte_aggregate(x, y)),
        }
        if _native_has("tte_aggregate"):
            from liftplus_fast.ops._native import native_op

            cands["cuda"] = sync(lambda: native_op("tte_aggregate")(x, y))
        cases.append(
            common.Case(
                f"tte_aggregate_C5_B{b}_K{k}",
                {"C": 5, "B": b, "K": k, "dtype": "fp16"},
                cands,
                bytes_moved=6 * b * k * 2 + 8 * b + 16 * k,
                device=DEV,
            )
        )
    return cases


def cases(smoke: bool) -> list:
    if not _available():
        return []
    return _adaptformer_cases(smoke) + _ce_cases(smoke) + _tte_cases(smoke)
