"""Triton test-time-ensembling ops (math: ``docs/ops.md``, "Test-time ensembling").

* ``_aggregate``: one program per block of images; streams K in chunks, averages the C crops
  in fp32, rounds the mean to the input dtype (the reference takes the argmax of the rounded
  mean), keeps a running first-maximum argmax (a NaN counts as the maximum and the first NaN
  wins, as in ``torch.argmax``) and, with labels, adds the hit to per-class int64 counters.
  Integer atomics commute, so the counts are deterministic. Offsets are int64: a strided
  ``[C, B, K]`` view may span more than 2^31 elements.
* ``_unit_mean``: per image, crop norms over D chunks, then the mean of the unit vectors.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .._bindings.tte import kernel_calls
from .._library import SCHEMAS, TRITON
from ._common import LazyKernel, cdiv, cfg, on_device, pow2_at_least


def _aggregate(
    X,
    LAB,
    OUT,
    PRED,
    CORRECT,
    TOTAL,
    C,
    B,
    K,
    sc,
    sb,
    sk,
    inv_c,
    HAS_LABELS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    best = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_B], dtype=tl.int64)
    found_nan = tl.zeros([BLOCK_B], dtype=tl.int1)
    roff = rows.to(tl.int64)[:, None] * sb
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m2 = rmask[:, None] & (ks < K)[None, :]
        koff = ks.to(tl.int64)[None, :] * sk
        acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        ptr = X + roff + koff
        for _c in range(0, C):
            acc += tl.load(ptr, mask=m2, other=0.0).to(tl.float32)
            ptr += sc  # pointer arithmetic is 64-bit: c * sc never forms in int32
        # Divide (not multiply by 1/C) to round exactly like the reference's mean().
        mean = (acc / C).to(OUT.dtype.element_ty)
        tl.store(OUT + rows.to(tl.int64)[:, None] * K + ks[None, :], mean, mask=m2)
        v = tl.where(m2, mean.to(tl.float32), float("-inf"))
        # tl.max may drop NaNs: they are found apart, and the first one wins over any number.
        is_nan = v != v
        nan_i = tl.min(tl.where(is_nan, ks[None, :], K), axis=1).to(tl.int64)
        v = tl.where(is_nan, float("-inf"), v)
        cmax = tl.max(v, axis=1)
        cidx = tl.min(tl.where(v == cmax[:, None], ks[None, :], K), axis=1).to(tl.int64)
        # Strictly greater: an equal maximum in a later chunk never replaces an earlier one.
        better = (cmax > best) & ~found_nan
        first_nan = (nan_i < K) & ~found_nan
        best_i = tl.where(first_nan, nan_i, tl.where(better, cidx, best_i))
        best = tl.where(better, cmax, best)
        found_nan = found_nan | first_nan
    tl.store(PRED + rows, best_i, mask=rmask)
    if HAS_LABELS:
        lab = tl.load(LAB + rows, mask=rmask, other=0)
        one = tl.full([BLOCK_B], 1, dtype=tl.int64)
        tl.atomic_add(TOTAL + lab, one, mask=rmask)
        tl.atomic_add(CORRECT + lab, one, mask=rmask & (best_i == lab))


def _unit_mean(X, OUT, C, B, D, inv_c, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    cs = tl.arange(0, BLOCK_C)
    cmask = cs < C
    base = cs.to(tl.int64) * B * D + b.to(tl.int64) * D
    sq = tl.zeros([BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + base[:, None] + cols[None, :], mask=cmask[:, None] & (cols < D)[None, :], other=0.0).to(
            tl.float32
        )
        sq += tl.sum(x * x, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        dmask = cols < D
        x = tl.load(X + base[:, None] + cols[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        out = tl.sum(x * inv[:, None], axis=0) * inv_c
        tl.store(OUT + b.to(tl.int64) * D + cols, out.to(OUT.dtype.element_ty), mask=dmask)


# Not autotuned: the counters are accumulated with atomics, and autotuning would re-run the
# kernel on the same buffers. Both kernels are pure streaming; 4 warps over 8 × 256 tiles
# saturate bandwidth on Ampere/Hopper.
_AGG = LazyKernel(_aggregate, [cfg(4, 2, BLOCK_B=8, BLOCK_K=256)], cfg(1, 1, BLOCK_B=4, BLOCK_K=16), key=["K"])
_UNIT = LazyKernel(_unit_mean, [cfg(4, 2, BLOCK_D=256)], cfg(1, 1, BLOCK_D=16), key=["D"])


@triton_op(f"{TRITON}::tte_aggregate", mutates_args=(), schema=SCHEMAS["tte_aggregate"])
def tte_aggregate_op(crop_logits: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c, b, k = crop_logits.shape
    dev = crop_logits.device
    out = torch.empty((b, k), device=dev, dtype=crop_logits.dtype)
    pred = torch.empty((b,), device=dev, dtype=torch.int64)
    counts = (k,) if labels is not None else (0,)
    correct = torch.zeros(counts, device=dev, dtype=torch.int64)
    total = torch.zeros(counts, device=dev, dtype=torch.int64)
    if b > 0:
        lab = labels.contiguous() if labels is not None else pred
        sc, sb, sk = crop_logits.stride()
        with on_device(crop_logits):
            wrap_triton(_AGG.get())[lambda m: (cdiv(b, m["BLOCK_B"]),)](
                crop_logits, lab, out, pred, correct, total, c, b, k, sc, sb, sk, 1.0 / c, HAS_LABELS=labels is not None
            )
    return out, pred, correct, total


@triton_op(f"{TRITON}::tte_mean_unit_features", mutates_args=(), schema=SCHEMAS["tte_mean_unit_features"])
def tte_mean_unit_features_op(crop_feats: Tensor) -> Tensor:
    c, b, d = crop_feats.shape
    x = crop_feats.contiguous()
    out = torch.empty((b, d), device=x.device, dtype=x.dtype)
    if b > 0 and d > 0:
        with on_device(x):
            wrap_triton(_UNIT.get())[(b,)](x, out, c, b, d, 1.0 / c, BLOCK_C=pow2_at_least(c, 1))
    return out


def check_labels(crop_logits, labels) -> None:
    """Device-side guard: an out-of-range label would index past the counters."""
    if labels is not None:
        k = crop_logits.shape[-1]
        torch._assert_async(
            ((labels >= 0) & (labels < k)).all(), f"tte_aggregate (triton): labels out of range [0, {k})"
        )


_aggregate, _unit_mean = kernel_calls(TRITON)


def tte_aggregate(crop_logits, labels=None):
    """Backend entry for :func:`liftplus_fast.ops.tte_aggregate`."""
    check_labels(crop_logits, labels)
    return _aggregate(crop_logits, labels)


def tte_mean_unit_features(crop_feats):
    """Backend entry for :func:`liftplus_fast.ops.tte_mean_unit_features`."""
    return _unit_mean(crop_feats)
