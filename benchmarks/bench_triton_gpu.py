"""GPU benchmark of the fused ops at the shapes and dtypes the LIFT+ model calls them with.

Candidates: the eager reference, ``torch.compile`` of it (static shapes, dynamo reset per case),
the Triton kernels and the CUDA extension (when built). Each candidate does the whole work once
(forward + backward where the op trains); the timing is CUDA-event based (``common``).

The calls, at ViT-B/16 (D = 768, 197 tokens):

* AdaptFormer in every block: rows ``N = B·197``, activations in the compute dtype (fp16 under
  the default ``amp`` on CUDA, bf16 under ``prec_train=bf16``), parameters fp32, bottleneck
  ``r = 2^floor(log2(K / 24))`` (the published rule: 4 at K = 100, 32 at K = 1000, 256 at
  K = 8142);
* LA cosine cross-entropy once per step: fp32 features ``[B, 768]``, fp32 weight ``[K, 768]``;
* evaluation: ``tte_aggregate`` of fp32 logits with one crop ``[1, B, K]`` and labels (every
  test batch), ``tte_mean_unit_features`` of five crops' features ``[5, B, 768]`` in the compute
  dtype (feature-space TTE).

``specs(mode)`` lists the shapes (``smoke``: one per op at K = 1000, B = 128; ``full``: the
grid below); cases are built one at a time, right before they are measured. Without CUDA
:func:`cases` yields none; :func:`rehearse` builds every case on the meta device and runs tiny
ones on the CPU (Triton under ``TRITON_INTERPRET=1``), so the GPU run finds no broken case.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from liftplus_fast.model.tuners import bottleneck_dim  # noqa: E402
from liftplus_fast.ops import _library, reference  # noqa: E402
from liftplus_fast.ops._bindings import adaptformer as af_binding  # noqa: E402
from liftplus_fast.ops._bindings import la_cosine_ce as ce_binding  # noqa: E402
from liftplus_fast.ops._bindings import tte as tte_binding  # noqa: E402
from liftplus_fast.ops._native import has_kernel, native_status  # noqa: E402

NAME = "triton_gpu"
WIDTH, TOKENS, LAYERS = 768, 197, 12
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def adaptformer_r(k: int) -> int:
    """The bottleneck the model builds for K classes at ViT-B/16 (AdaptFormer's divisor 2)."""
    return bottleneck_dim(k, LAYERS, 2)


def specs(mode: str) -> list:
    """``(op, params)`` of every case of ``mode`` (``smoke``, ``full`` or ``tiny`` for the CPU)."""
    if mode == "tiny":
        return [
            ("adaptformer", {"B": 1, "K": 100, "dtype": "fp32"}),
            ("la_cosine_ce", {"B": 8, "K": 40, "dtype": "fp32"}),
            ("tte_aggregate", {"C": 1, "B": 8, "K": 40, "dtype": "fp32"}),
            ("tte_mean_unit_features", {"C": 5, "B": 8, "dtype": "fp32"}),
        ]
    if mode == "smoke":
        return [
            ("adaptformer", {"B": 128, "K": 1000, "dtype": "fp16"}),
            ("la_cosine_ce", {"B": 128, "K": 1000, "dtype": "fp32"}),
            ("tte_aggregate", {"C": 1, "B": 128, "K": 1000, "dtype": "fp32"}),
            ("tte_mean_unit_features", {"C": 5, "B": 128, "dtype": "fp16"}),
        ]
    out = [
        ("adaptformer", {"B": b, "K": k, "dtype": dt})
        for dt in ("fp16", "bf16")
        for b in (32, 128)
        for k in (100, 1000, 8142)
    ]
    out += [("la_cosine_ce", {"B": b, "K": k, "dtype": "fp32"}) for b in (128, 512) for k in (100, 1000, 8142, 100000)]
    out += [("tte_aggregate", {"C": 1, "B": b, "K": k, "dtype": "fp32"}) for b in (128, 512) for k in (1000, 8142)]
    out += [("tte_mean_unit_features", {"C": 5, "B": b, "dtype": dt}) for dt in ("fp16", "bf16") for b in (64, 256)]
    return out


def _native_has(op: str) -> bool:
    return native_status().loaded and has_kernel(op, "CUDA")


def _triton():
    from liftplus_fast.ops import triton as tri  # needs triton; imported when a case is built

    return tri


def _train_step(fn, leaves):
    def run():
        out = fn()
        loss = out if out.dim() == 0 else out.float().square().mean()
        loss.backward()
        for t in leaves:
            t.grad = None

    return run


def _adaptformer_case(p, device, with_native):
    b, k, dt = p["B"], p["K"], DTYPES[p["dtype"]]
    n, d, r = b * TOKENS, WIDTH, adaptformer_r(k)
    a = torch.randn(n, d, device=device, dtype=dt, requires_grad=True)
    m = torch.randn(n, d, device=device, dtype=dt, requires_grad=True)
    ps = [torch.ones(d), torch.zeros(d), torch.randn(r, d) / d**0.5, torch.zeros(r), torch.randn(d, r) * 0.01]
    ps = [t.to(device).requires_grad_() for t in ps + [torch.zeros(d), torch.tensor(1.0)]]
    leaves = [a, m, *ps]
    comp = common.compiled(reference.adaptformer, reset=True)
    triton_fn = _triton().adaptformer.adaptformer
    cands = {
        common.REFERENCE: _train_step(lambda: reference.adaptformer(a, m, *ps, 1e-5), leaves),
        common.COMPILE: _train_step(lambda: comp(a, m, *ps, 1e-5), leaves),
        "triton": _train_step(lambda: triton_fn(a, m, *ps[:-1], ps[-1].reshape(()), 1e-5), leaves),
    }
    if with_native and _native_has("adaptformer_fwd"):
        native = af_binding.kernel_call(_library.NATIVE)
        cands["cuda"] = _train_step(lambda: native(a, m, *ps[:-1], ps[-1].reshape(()), 1e-5), leaves)
    e = a.element_size()
    # Ideal fused traffic: fwd reads A, M, writes Y; bwd reads G, A, writes dA (dM = G); plus the
    # fp32 statistics and Z written once and read once.
    return common.Case(
        f"adaptformer_fwd_bwd_B{b}_K{k}_r{r}_{p['dtype']}",
        {"N": n, "D": d, "r": r, "K": k, "dtype": p["dtype"]},
        cands,
        bytes_moved=6 * n * d * e + n * (8 + 4 * r) * 2,
        flops=3 * 4 * n * d * r,
        device=device,
    )


def _la_ce_case(p, device, with_native):
    b, k, dt = p["B"], p["K"], DTYPES[p["dtype"]]
    d = WIDTH
    f = torch.randn(b, d, device=device, dtype=dt, requires_grad=True)
    w = torch.randn(k, d, device=device, requires_grad=True)
    y = torch.randint(0, k, (b,), device=device)
    lp = torch.log_softmax(torch.randn(k, device=device), 0)
    comp = common.compiled(reference.la_cosine_cross_entropy, reset=True)
    triton_fn = _triton().la_cosine_ce.la_cosine_cross_entropy
    cands = {
        common.REFERENCE: _train_step(lambda: reference.la_cosine_cross_entropy(f, w, y, lp), (f, w)),
        common.COMPILE: _train_step(lambda: comp(f, w, y, lp), (f, w)),
        "triton": _train_step(lambda: triton_fn(f, w, y, lp, 25.0, 1.0, False), (f, w)),
    }
    if with_native and _native_has("la_cosine_ce_fwd"):
        # The public op's CUDA backend: its forward also returns the gradients when autograd
        # needs them (compute_grad), so the backward does not recompute the logits GEMM.
        native = ce_binding.kernel_call(_library.NATIVE)
        cands["cuda"] = _train_step(lambda: native(f, w, y, lp, 25.0, 1.0, False), (f, w))
    e = f.element_size()
    # Ideal: read F and W once in the forward, once in the backward, write dF and dW.
    return common.Case(
        f"la_cosine_ce_fwd_bwd_B{b}_K{k}_{p['dtype']}",
        {"B": b, "K": k, "D": d, "dtype": p["dtype"]},
        cands,
        bytes_moved=2 * (b * d * e + k * d * 4) + b * d * e + k * d * 4,
        flops=3 * 2 * b * k * d,
        device=device,
    )


def _tte_case(p, device, with_native):
    c, b, k, dt = p["C"], p["B"], p["K"], DTYPES[p["dtype"]]
    x = torch.randn(c, b, k, device=device, dtype=dt)
    y = torch.randint(0, k, (b,), device=device)
    comp = common.compiled(reference.tte_aggregate, reset=True)
    triton_fn = _triton().tte.tte_aggregate
    cands = {
        common.REFERENCE: lambda: reference.tte_aggregate(x, y),
        common.COMPILE: lambda: comp(x, y),
        "triton": lambda: triton_fn(x, y),
    }
    if with_native and _native_has("tte_aggregate"):
        native = tte_binding.kernel_calls(_library.NATIVE)[0]
        cands["cuda"] = lambda: native(x, y)
    return common.Case(
        f"tte_aggregate_C{c}_B{b}_K{k}_{p['dtype']}",
        {"C": c, "B": b, "K": k, "dtype": p["dtype"]},
        cands,
        bytes_moved=(c + 1) * b * k * x.element_size() + 8 * b + 16 * k,
        device=device,
    )


def _unit_case(p, device, with_native):
    c, b, dt = p["C"], p["B"], DTYPES[p["dtype"]]
    x = torch.randn(c, b, WIDTH, device=device, dtype=dt)
    comp = common.compiled(reference.tte_mean_unit_features, reset=True)
    triton_fn = _triton().tte.tte_mean_unit_features
    cands = {
        common.REFERENCE: lambda: reference.tte_mean_unit_features(x),
        common.COMPILE: lambda: comp(x),
        "triton": lambda: triton_fn(x),
    }
    if with_native and _native_has("tte_mean_unit_features"):
        native = tte_binding.kernel_calls(_library.NATIVE)[1]
        cands["cuda"] = lambda: native(x)
    return common.Case(
        f"tte_mean_unit_features_C{c}_B{b}_{p['dtype']}",
        {"C": c, "B": b, "D": WIDTH, "dtype": p["dtype"]},
        cands,
        bytes_moved=(c + 1) * b * WIDTH * x.element_size(),
        device=device,
    )


BUILDERS = {
    "adaptformer": _adaptformer_case,
    "la_cosine_ce": _la_ce_case,
    "tte_aggregate": _tte_case,
    "tte_mean_unit_features": _unit_case,
}


def make_case(op: str, params: dict, device: str, with_native: bool = True) -> common.Case:
    return BUILDERS[op](params, device, with_native and device.startswith("cuda"))


def _available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        _triton()
    except ImportError:
        return False
    return True


def cases(smoke: bool):
    """The CUDA cases, each built right before it is measured (none without CUDA)."""
    if not _available():
        return
    for op, params in specs("smoke" if smoke else "full"):
        yield make_case(op, params, "cuda")


def rehearse(repeats: int = 1) -> dict:
    """Without a GPU: build every smoke and full case on the meta device (shapes, dtypes and
    candidates exist), then run each tiny case's candidates on the CPU (Triton needs
    ``TRITON_INTERPRET=1``). Returns the case names built and the tiny rows measured."""
    built = []
    with torch.device("meta"):
        for mode in ("smoke", "full"):
            for op, params in specs(mode):
                built.append(make_case(op, params, "meta").name)
    rows = []
    for op, params in specs("tiny"):
        case = make_case(op, params, "cpu")
        times = common.time_interleaved(case.candidates, repeats=repeats, warmup=1)
        rows.append(common.summarize(case, times, {}))
    return {"built": built, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="rehearse the GPU op benchmark on the CPU")
    parser.add_argument("--rehearse", action="store_true", help="build every case, run the tiny ones on the CPU")
    parser.add_argument("--out", help="JSON file for the rehearsal's result")
    args = parser.parse_args(argv)
    if not args.rehearse:
        parser.error("run the GPU benchmark through benchmarks/run.py --only triton_gpu; this entry rehearses it")
    result = rehearse()
    print(f"built {len(result['built'])} cases; ran {[r['case'] for r in result['rows']]}")
    if args.out:
        common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
