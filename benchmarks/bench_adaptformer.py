"""AdaptFormer branch (LN → down → ReLU → up → scale → residual), forward and forward+backward.

Candidates: "reference" (the eager oracle, the published code's structure), "compile"
(torch.compile of that reference) and "fused" (``liftplus_fast.ops.adaptformer`` on the native
CPU backend). Shapes (docs/benchmarks.md): N = B·197 ViT-B/16 tokens, D = 768, r ∈ {4, 8, 32, 256};
activations fp32 or bf16, adapter parameters fp32 (the precision policy).
"""

from __future__ import annotations

import common
import torch

import liftplus_fast as lf
from liftplus_fast.ops import reference

NAME = "adaptformer"
TOKENS = 197
D = 768


def _inputs(batch: int, d: int, r: int, dtype: torch.dtype, grad: bool):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(batch, TOKENS, d, generator=g).to(dtype)
    m = torch.randn(batch, TOKENS, d, generator=g).to(dtype)
    params = [
        1 + 0.1 * torch.randn(d, generator=g),
        0.1 * torch.randn(d, generator=g),
        torch.randn(r, d, generator=g) / d**0.5,
        0.1 * torch.randn(r, generator=g),
        torch.randn(d, r, generator=g) / r**0.5,
        0.1 * torch.randn(d, generator=g),
        torch.tensor(1.0),
    ]
    tensors = [a, m] + params
    for t in tensors:
        t.requires_grad_(grad)
    return tensors


def bytes_moved(n: int, d: int, r: int, dtype: torch.dtype, backward: bool) -> int:
    """Compulsory traffic of the fused op: activations once each way, saved stats and Z."""
    e = torch.tensor([], dtype=dtype).element_size()
    params = 4 * (4 * d + 2 * r * d + r + 1)
    saved = 4 * (2 * n + n * r)  # mean, rstd, z (fp32)
    fwd = 3 * n * d * e + saved + params  # read A, M; write Y
    if not backward:
        return fwd
    bwd = 3 * n * d * e + saved + 2 * params  # read G, A; write dA (dM is G itself)
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


def _away_from_kink(tensors, margin: float = 1e-5):
    """Copies of the inputs whose rows keep every pre-ReLU value off the kink.

    Where ``|Z|`` is within ``margin · max|Z|`` of 0, float32 and float64 may pick different
    sides of the ReLU and neither gradient is more right; such rows of ``A`` are replaced by a
    row that has no such value, so the error measures arithmetic, not a coin toss.
    """
    a, m, ln_w, ln_b, down_w, down_b = (t.detach() for t in tensors[:6])
    d = a.shape[-1]
    rows = a.reshape(-1, d).clone()
    wide = rows.double()
    h = torch.nn.functional.layer_norm(wide, (d,), ln_w.double(), ln_b.double(), 1e-5)
    z = h @ down_w.double().T + down_b.double()
    near = (z.abs() < margin * z.abs().max()).any(-1)
    if near.any() and not near.all():
        rows[near] = rows[(~near).nonzero()[0, 0]].clone()
    out = [rows.reshape(a.shape)] + [t.detach().clone() for t in tensors[1:]]
    return [t.requires_grad_() for t in out]


def _accuracy(make_inputs, candidates):
    """Max relative error of the output and all gradients against the float64 reference."""

    def measure():
        timed, grad_out = make_inputs()
        tensors = _away_from_kink(timed)
        wide = [t.detach().double().requires_grad_() for t in tensors]
        y64 = reference.adaptformer(*wide)
        y64.backward(grad_out.double())
        truth = [y64.detach()] + [t.grad for t in wide]
        errors = {}
        for name, fn in candidates.items():
            for t in tensors:
                t.grad = None
            y = fn(*tensors)
            y.backward(grad_out)
            errors[name] = common.max_rel_error([y] + [t.grad for t in tensors], truth)
        return errors

    return measure


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
    compiled = common.compiled(reference.adaptformer)
    fns = {"reference": reference.adaptformer, "compile": compiled, "fused": lf.ops.adaptformer}
    return common.Case(
        name=f"N={batch}x{TOKENS} D={d} r={r} {dt} {mode}",
        params={"batch": batch, "tokens": TOKENS, "rows": n, "d": d, "r": r, "dtype": dt, "mode": mode},
        candidates=_candidates(reference.adaptformer, compiled, make_inputs, backward),
        bytes_moved=bytes_moved(n, d, r, dtype, backward),
        flops=flops(n, d, r, backward),
        notes=notes,
        accuracy=_accuracy(make_inputs, fns) if backward else None,
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
