"""AdaptFormer branch (LN → down → ReLU → up → scale → residual), forward and forward+backward.

Candidates: "reference" (the eager oracle, the published code's structure), "compile"
(torch.compile of that reference) and "fused" (``liftplus_fast.ops.adaptformer`` on the native
CPU backend). Shapes from DESIGN.md §5: N = B·197 ViT-B/16 tokens, D = 768, r ∈ {4, 8, 32, 256};
activations fp32 or bf16, adapter parameters fp32 (the precision policy).
"""
from __future__ import annotations

import torch

import common
import liftplus_fast as lf
from liftplus_fast.ops import reference

NAME = "adaptformer"
TOKENS = 197
D = 768


def _inputs(batch: int, d: int, r: int, dtype: torch.dtype, grad: bool):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(batch, TOKENS, d, generator=g).to(dtype)
    m = torch.randn(batch, TOKENS, d, generator=g).to(dtype)
    params = [1 + 0.1 * torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g),
              torch.randn(r, d, generator=g) / d ** 0.5, 0.1 * torch.randn(r, generator=g),
              torch.randn(d, r, generator=g) / r ** 0.5, 0.1 * torch.randn(d, generator=g),
              torch.tensor(1.0)]
    tensors = [a, m] + params
    for t in tensors:
        t.requires_grad_(grad)
    return tensors


def bytes_moved(n: int, d: int, r: int, dtype: torch.dtype, backward: bool) -> int:
    """Compulsory traffic of the fused op: activations once each way, saved stats and Z."""
    e = torch.tensor([], dtype=dtype).element_size()
    params = 4 * (4 * d + 2 * r * d + r + 1)
    saved = 4 * (2 * n + n * r)                 # mean, rstd, z (fp32)
    fwd = 3 * n * d * e + saved + params         # read A, M; write Y
    if not backward:
        return fwd
    bwd = 3 * n * d * e + saved + 2 * params     # read G, A; write dA (dM is G itself)
    return fwd + bwd


def flops(n: int, d: int, r: int, backward: bool) -> int:
    return (12 if backward else 4) * n * d * r


# The inputs of only one case are alive at a time: a full run has 48 cases of up to 150 MB.
_LIVE: dict = {}


def _lazy_inputs(key, make):
    if key not in _LIVE:
        _LIVE.clear()
        _LIVE[key] = make()
    return _LIVE[key]


def _candidates(fn_ref, fn_compiled, make_inputs, backward: bool):
    def fused(*args):
        return lf.ops.adaptformer(*args)

    def make(fn):
        if not backward:
            def run():
                tensors, _ = make_inputs()
                with torch.no_grad():
                    return fn(*tensors)
            return run

        def run_bwd():
            tensors, grad_out = make_inputs()
            fn(*tensors).backward(grad_out)
            for t in tensors:
                t.grad = None
        return run_bwd

    return {"reference": make(fn_ref), "compile": make(fn_compiled), "fused": make(fused)}


def _case(batch: int, r: int, dtype: torch.dtype, backward: bool, d: int = D):
    n = batch * TOKENS
    key = (batch, r, dtype, backward, d)

    def make_inputs():
        def build():
            tensors = _inputs(batch, d, r, dtype, backward)
            return tensors, torch.randn_like(tensors[0])
        return _lazy_inputs(key, build)

    mode = "fwd+bwd" if backward else "fwd"
    dt = str(dtype).replace("torch.", "")
    notes = []
    if lf.ops.choose("adaptformer", torch.device("cpu")) != "cpu":
        notes.append("native CPU kernel unavailable: 'fused' ran the reference path")
    return common.Case(
        name=f"N={batch}x{TOKENS} D={d} r={r} {dt} {mode}",
        params={"batch": batch, "tokens": TOKENS, "rows": n, "d": d, "r": r, "dtype": dt, "mode": mode},
        candidates=_candidates(reference.adaptformer, common.compiled(reference.adaptformer), make_inputs, backward),
        bytes_moved=bytes_moved(n, d, r, dtype, backward),
        flops=flops(n, d, r, backward),
        notes=notes,
    )


def cases(smoke: bool) -> list:
    if smoke:
        return [_case(1, 4, torch.float32, True, d=64)]
    out = []
    for backward in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for batch in (8, 32, 128):
                for r in (4, 8, 32, 256):
                    out.append(_case(batch, r, dtype, backward))
    return out
