"""Logit-adjusted cosine cross-entropy: eager reference, torch.compile of it, fused CPU op.

Cases: B ∈ {128, 512}, K ∈ {100, 365, 1000, 8142, 100000}, D = 768, fp32 and bf16 features
(bf16 with an fp32 weight, as trained in mixed precision), forward and forward+backward.
``LAFAST_BENCH_FILTER=substr`` keeps only the cases whose name contains ``substr``.

Flops are the useful GEMM work (the reference's structure: one B×K×D GEMM forward, three
forward+backward). The fused op does exactly that when B·K ≤ 2^22 and recomputes the logits
GEMM once more above (K = 100k), which is noted in the case.

Peak memory (the driver's ``peak_memory_bytes``: profiler allocation events, allocations minus
frees in time order, above the level at the call) includes the gradients, which are outputs;
the note of each forward+backward case gives the extra memory without them.
"""

from __future__ import annotations

import os

import common
import torch

from liftplus_fast import ops as lf_ops
from liftplus_fast.ops import reference

NAME = "la_cosine_ce"
D = 768
STORE_BUDGET = 1 << 22  # the kernel's default single-chunk budget (B·K elements)


def _inputs(b, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(b, D, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(k, D, generator=g).requires_grad_()  # fp32: trainable parameter
    labels = torch.randint(0, k, (b,), generator=g)
    counts = torch.randint(1, 1000, (k,), generator=g).float()
    log_prior = (counts / counts.sum()).log()
    return feat, weight, labels, log_prior


def _candidate(fn, feat, weight, labels, log_prior, backward):
    if backward:

        def run():
            loss = fn(feat, weight, labels, log_prior, 25.0, 1.0, False)
            loss.backward()
            feat.grad = None
            weight.grad = None
    else:

        def run():
            with torch.no_grad():
                return fn(feat, weight, labels, log_prior, 25.0, 1.0, False)

    return run


def make_case(b, k, dtype, backward):
    feat, weight, labels, log_prior = _inputs(b, k, dtype)
    compiled = common.compiled(reference.la_cosine_cross_entropy)
    candidates = {
        "reference": _candidate(reference.la_cosine_cross_entropy, feat, weight, labels, log_prior, backward),
        "compile": _candidate(compiled, feat, weight, labels, log_prior, backward),
        "fused": _candidate(lf_ops.la_cosine_cross_entropy, feat, weight, labels, log_prior, backward),
    }
    gemm = 2 * b * k * D
    in_bytes = common.tensor_bytes(feat, weight, labels, log_prior)
    if backward:
        grads = common.tensor_bytes(feat, weight)
        bytes_moved, flops = in_bytes + grads, 3 * gemm
    else:
        bytes_moved, flops = in_bytes, gemm
    tag = "fwd_bwd" if backward else "fwd"
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    case = common.Case(
        f"{tag} B={b} K={k} {dt}",
        {"B": b, "K": k, "D": D, "dtype": dt, "pass": tag},
        candidates,
        bytes_moved=bytes_moved,
        flops=flops,
    )
    if backward and b * k > STORE_BUDGET:
        case.notes.append(
            "fused: B·K above the single-chunk budget, the logits GEMM is recomputed "
            "per chunk (4 GEMMs instead of 3) to keep O(B·chunk) memory"
        )
    if backward:
        grads_mb = common.tensor_bytes(feat, weight) / 2**20
        case.notes.append(
            f"peak memory includes the gradients ({grads_mb:.1f} MB, outputs); extra = peak − {grads_mb:.1f} MB"
        )
    return case


def cases(smoke: bool):
    """Cases, built one at a time (a K = 100,000 case holds hundreds of MB)."""
    if smoke:
        yield make_case(16, 100, torch.float32, True)
        return
    want = os.environ.get("LAFAST_BENCH_FILTER", "")
    for dtype in (torch.float32, torch.bfloat16):
        for backward in (True, False):
            for b in (128, 512):
                for k in (100, 365, 1000, 8142, 100_000):
                    tag = "fwd_bwd" if backward else "fwd"
                    dt = "fp32" if dtype == torch.float32 else "bf16"
                    if want and want not in f"{tag} B={b} K={k} {dt}":
                        continue
                    yield make_case(b, k, dtype, backward)
