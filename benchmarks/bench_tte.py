"""TTE aggregation of C = 5 crop logits: eager reference, torch.compile of it, fused CPU op.

Cases: C = 5, B ∈ {64, 256}, K ∈ {1000, 8142}, fp32 and bf16, with labels (per-class hits).
Bytes moved: read C·B·K logits, write B·K mean logits (+ B predictions and 2·K counts).
"""

from __future__ import annotations

import common
import torch

from liftplus_fast import ops as lf_ops
from liftplus_fast.ops import reference

NAME = "tte"
C = 5


def make_case(b, k, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(C, b, k, generator=g).to(dtype)
    y = torch.randint(0, k, (b,), generator=g)
    compiled = common.compiled(reference.tte_aggregate)
    candidates = {
        "reference": lambda: reference.tte_aggregate(x, y),
        "compile": lambda: compiled(x, y),
        "fused": lambda: lf_ops.tte_aggregate(x, y),
    }
    bytes_moved = common.tensor_bytes(x) + b * k * x.element_size() + 8 * (b + 2 * k)
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    return common.Case(
        f"C={C} B={b} K={k} {dt}",
        {"C": C, "B": b, "K": k, "dtype": dt},
        candidates,
        bytes_moved=bytes_moved,
        flops=C * b * k,
    )


def cases(smoke: bool) -> list:
    if smoke:
        return [make_case(8, 100, torch.float32)]
    return [make_case(b, k, dt) for dt in (torch.float32, torch.bfloat16) for b in (64, 256) for k in (1000, 8142)]
