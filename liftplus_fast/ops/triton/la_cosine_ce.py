"""Triton logit-adjusted cosine cross-entropy, chunked over classes with an online logsumexp.

Math: ``docs/ops.md``, "Logit-adjusted cosine cross-entropy".

``C = s·F̂Ŵᵀ`` is never materialised beyond one ``BLOCK_M × BLOCK_K`` tile: the row and
class norms are accumulated in the same D loop as the dot product and applied to the tile
(``C = s·(F·Wᵀ)·(1/‖F‖)·(1/‖W‖)``), so normalisation costs no extra pass over F or W.

* ``_fwd``: grid (row blocks, class splits); each program streams its classes in chunks and
  keeps a running (max, sum-exp) per row; the splits' partial (max, sum) pairs and the target
  logit are combined on the host (B × splits values).
* ``_bwd_feat``: grid (row blocks, class splits, D tiles). Recomputes the tile, ``dC`` from
  the saved logsumexp, accumulates ``Σ_k dC·s/‖W_k‖·W_k`` over the program's D tile and
  ``t_b = Σ_k dC·C`` (which equals ``⟨F̂, dF̂⟩``, so the normalisation backward needs no second
  pass): ``dF = (acc − F̂·t)/‖F‖``.
* ``_bwd_weight``: grid (class tiles, row splits, D tiles), symmetric for ``dW``.

Splits write fp32 partials that are summed in a fixed order (deterministic, no atomics); with
one split the kernel stores the final gradient directly.

D tiles: a row of up to ``TILE_BYTES`` stays on chip whole (one D tile: the loaded rows serve
both the logits tile and the gradient product). Wider rows (fp32 past 512 columns, half past
1024) are split into D tiles of that width; each program then streams the logits tile's dot
product over all of D and keeps only its own tile of the gradient, recomputing the tile once per
D tile (2-4 times at D ≤ 2048: cheap next to the bytes moved). No limit on D follows.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .._bindings.la_cosine_ce import kernel_call, register_autograd
from .._library import SCHEMAS, TRITON
from ._common import LazyKernel, cdiv, cfg, dot_meta, interpreting, num_sms, on_device, pow2_at_least

# Bytes of one row tile kept on chip in the backward (see the module doc).
TILE_BYTES = 2048


def _dot_sq_norms(
    F,
    W,
    roff,
    koff,
    rmask,
    kmask,
    D,
    ELEM_T: tl.constexpr,
    DOT_T: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    F_SQ: tl.constexpr,
    W_SQ: tl.constexpr,
):
    """``(F·Wᵀ, ‖F‖², ‖W‖²)`` of a row block (offsets ``roff``) and a class block (``koff``),
    streamed over all of D in ``BLOCK_D`` chunks; each squared norm is summed from the same loads
    where ``F_SQ`` / ``W_SQ`` ask for it (zeros otherwise)."""
    dot = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    fsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    wsq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + tl.arange(0, BLOCK_D)
        dmask = (dc < D)[None, :]
        fc = tl.load(F + roff[:, None] + dc[None, :], mask=rmask[:, None] & dmask, other=0.0)
        wc = tl.load(W + koff[:, None] + dc[None, :], mask=kmask[:, None] & dmask, other=0.0)
        dot += tl.dot(fc.to(ELEM_T).to(DOT_T), tl.trans(wc.to(ELEM_T).to(DOT_T)), input_precision=PREC)
        if F_SQ:
            fc32 = fc.to(tl.float32)
            fsq += tl.sum(fc32 * fc32, axis=1)
        if W_SQ:
            wc32 = wc.to(tl.float32)
            wsq += tl.sum(wc32 * wc32, axis=1)
    return dot, fsq, wsq


def _row_sq_norms(X, off, mask, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Squared norms of the rows of ``X`` at offsets ``off``, streamed over D in ``BLOCK_D`` chunks."""
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + tl.arange(0, BLOCK_D)
        xc = tl.load(X + off[:, None] + dc[None, :], mask=mask[:, None] & (dc < D)[None, :], other=0.0)
        xc = xc.to(tl.float32)
        sq += tl.sum(xc * xc, axis=1)
    return sq


def _tile_grad(dot, inv_f, inv_w, lp, lse, lab, ks, tmask, scale, tau, gscale):
    """The logits tile ``C = s·(F·Wᵀ)/(‖F‖‖W‖)`` and its gradient ``dC = (softmax(C + τ·log p) −
    onehot)·gscale`` (``gscale = dL/B``) from the saved logsumexp, 0 outside ``tmask``."""
    c = dot * (scale * inv_f)[:, None] * inv_w[None, :]
    prob = tl.exp(c + tau * lp[None, :] - lse[:, None])
    onehot = (ks[None, :] == lab[:, None]).to(tl.float32)
    return c, tl.where(tmask, (prob - onehot) * gscale, 0.0)


def _fwd(
    F,
    W,
    LAB,
    LP,
    LOGITS,
    PM,
    PL,
    TGT,
    B,
    K,
    D,
    K_PER_SPLIT,
    scale,
    tau,
    WRITE_LOGITS: tl.constexpr,
    ELEM_T: tl.constexpr,
    DOT_T: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Scalars in fp32 whatever the launcher typed them (inductor passes Python floats as fp64).
    scale = tl.cast(scale, tl.float32)
    tau = tl.cast(tau, tl.float32)
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    roff = rows.to(tl.int64) * D
    lab = tl.load(LAB + rows, mask=rmask, other=-1)
    k0 = split * K_PER_SPLIT
    k1 = tl.minimum(k0 + K_PER_SPLIT, K)
    m_run = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([BLOCK_M], dtype=tl.float32)
    for kc in range(k0, k1, BLOCK_K):
        ks = kc + tl.arange(0, BLOCK_K)
        kmask = ks < k1
        koff = ks.to(tl.int64) * D
        acc, fsq, wsq = _dot_sq_norms(
            F, W, roff, koff, rmask, kmask, D, ELEM_T, DOT_T, PREC, BLOCK_M, BLOCK_K, BLOCK_D, True, True
        )
        inv_f = 1.0 / tl.maximum(tl.sqrt(fsq), 1e-12)
        inv_w = 1.0 / tl.maximum(tl.sqrt(wsq), 1e-12)
        c = acc * (scale * inv_f)[:, None] * inv_w[None, :]
        tmask = rmask[:, None] & kmask[None, :]
        if WRITE_LOGITS:
            tl.store(LOGITS + rows.to(tl.int64)[:, None] * K + ks[None, :], c.to(LOGITS.dtype.element_ty), mask=tmask)
        lp = tl.load(LP + ks, mask=kmask, other=0.0).to(tl.float32)
        zz = tl.where(kmask[None, :], c + tau * lp[None, :], float("-inf"))
        hit = (ks[None, :] == lab[:, None]) & tmask
        # Exactly one chunk of one split holds a row's label: a plain store, no race.
        tl.store(
            TGT + rows, tl.sum(tl.where(hit, zz, 0.0), axis=1), mask=rmask & (tl.sum(hit.to(tl.int32), axis=1) > 0)
        )
        m_new = tl.maximum(m_run, tl.max(zz, axis=1))
        l_run = l_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(zz - m_new[:, None]), axis=1)
        m_run = m_new
    tl.store(PM + split * B + rows, m_run, mask=rmask)
    tl.store(PL + split * B + rows, l_run, mask=rmask)


def _bwd_feat(
    F,
    W,
    LAB,
    LP,
    LSE,
    GL,
    OUT,
    B,
    K,
    D,
    K_PER_SPLIT,
    scale,
    tau,
    inv_b,
    ELEM_T: tl.constexpr,
    DOT_T: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DF: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    # Scalars in fp32 whatever the launcher typed them (inductor passes Python floats as fp64).
    scale = tl.cast(scale, tl.float32)
    tau = tl.cast(tau, tl.float32)
    inv_b = tl.cast(inv_b, tl.float32)
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    roff = rows.to(tl.int64) * D
    cols = tl.program_id(2) * BLOCK_DF + tl.arange(0, BLOCK_DF)
    cmask = cols < D
    fmask = rmask[:, None] & cmask[None, :]
    f = tl.load(F + roff[:, None] + cols[None, :], mask=fmask, other=0.0)
    f32 = f.to(tl.float32)
    if ONE_TILE:
        fsq = tl.sum(f32 * f32, axis=1)
    else:
        fsq = _row_sq_norms(F, roff, rmask, D, BLOCK_M, BLOCK_DF)
    inv_f = 1.0 / tl.maximum(tl.sqrt(fsq), 1e-12)
    fd = f.to(ELEM_T).to(DOT_T)
    lab = tl.load(LAB + rows, mask=rmask, other=-1)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    gscale = tl.load(GL).to(tl.float32) * inv_b
    acc = tl.zeros([BLOCK_M, BLOCK_DF], dtype=tl.float32)
    t = tl.zeros([BLOCK_M], dtype=tl.float32)
    k0 = split * K_PER_SPLIT
    k1 = tl.minimum(k0 + K_PER_SPLIT, K)
    for kc in range(k0, k1, BLOCK_K):
        ks = kc + tl.arange(0, BLOCK_K)
        kmask = ks < k1
        koff = ks.to(tl.int64) * D
        w = tl.load(W + koff[:, None] + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        wd = w.to(ELEM_T).to(DOT_T)
        if ONE_TILE:
            w32 = w.to(tl.float32)
            wsq = tl.sum(w32 * w32, axis=1)
            dot = tl.dot(fd, tl.trans(wd), input_precision=PREC)
        else:
            dot, _, wsq = _dot_sq_norms(
                F, W, roff, koff, rmask, kmask, D, ELEM_T, DOT_T, PREC, BLOCK_M, BLOCK_K, BLOCK_DF, False, True
            )
        inv_w = 1.0 / tl.maximum(tl.sqrt(wsq), 1e-12)
        lp = tl.load(LP + ks, mask=kmask, other=0.0).to(tl.float32)
        tmask = rmask[:, None] & kmask[None, :]
        c, dc_ = _tile_grad(dot, inv_f, inv_w, lp, lse, lab, ks, tmask, scale, tau, gscale)
        t += tl.sum(dc_ * c, axis=1)
        coeff = (dc_ * scale * inv_w[None, :]).to(ELEM_T).to(DOT_T)
        acc += tl.dot(coeff, wd, input_precision=PREC)
    out = inv_f[:, None] * acc - f32 * (inv_f * inv_f * t)[:, None]
    tl.store(
        OUT + (split * B + rows).to(tl.int64)[:, None] * D + cols[None, :], out.to(OUT.dtype.element_ty), mask=fmask
    )


def _bwd_weight(
    F,
    W,
    LAB,
    LP,
    LSE,
    GL,
    OUT,
    B,
    K,
    D,
    B_PER_SPLIT,
    scale,
    tau,
    inv_b,
    ELEM_T: tl.constexpr,
    DOT_T: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DF: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    # Scalars in fp32 whatever the launcher typed them (inductor passes Python floats as fp64).
    scale = tl.cast(scale, tl.float32)
    tau = tl.cast(tau, tl.float32)
    inv_b = tl.cast(inv_b, tl.float32)
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    koff = ks.to(tl.int64) * D
    cols = tl.program_id(2) * BLOCK_DF + tl.arange(0, BLOCK_DF)
    cmask = cols < D
    wmask = kmask[:, None] & cmask[None, :]
    w = tl.load(W + koff[:, None] + cols[None, :], mask=wmask, other=0.0)
    w32 = w.to(tl.float32)
    if ONE_TILE:
        wsq = tl.sum(w32 * w32, axis=1)
    else:
        wsq = _row_sq_norms(W, koff, kmask, D, BLOCK_K, BLOCK_DF)
    inv_w = 1.0 / tl.maximum(tl.sqrt(wsq), 1e-12)
    wd = w.to(ELEM_T).to(DOT_T)
    lp = tl.load(LP + ks, mask=kmask, other=0.0).to(tl.float32)
    gscale = tl.load(GL).to(tl.float32) * inv_b
    acc = tl.zeros([BLOCK_K, BLOCK_DF], dtype=tl.float32)
    t = tl.zeros([BLOCK_K], dtype=tl.float32)
    b0 = split * B_PER_SPLIT
    b1 = tl.minimum(b0 + B_PER_SPLIT, B)
    for bc in range(b0, b1, BLOCK_M):
        rows = bc + tl.arange(0, BLOCK_M)
        rmask = rows < b1
        roff = rows.to(tl.int64) * D
        f = tl.load(F + roff[:, None] + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        fd = f.to(ELEM_T).to(DOT_T)
        if ONE_TILE:
            f32 = f.to(tl.float32)
            fsq = tl.sum(f32 * f32, axis=1)
            dot = tl.dot(fd, tl.trans(wd), input_precision=PREC)
        else:
            dot, fsq, _ = _dot_sq_norms(
                F, W, roff, koff, rmask, kmask, D, ELEM_T, DOT_T, PREC, BLOCK_M, BLOCK_K, BLOCK_DF, True, False
            )
        inv_f = 1.0 / tl.maximum(tl.sqrt(fsq), 1e-12)
        lab = tl.load(LAB + rows, mask=rmask, other=-1)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        tmask = rmask[:, None] & kmask[None, :]
        c, dc_ = _tile_grad(dot, inv_f, inv_w, lp, lse, lab, ks, tmask, scale, tau, gscale)
        t += tl.sum(dc_ * c, axis=0)
        coeff = (dc_ * (scale * inv_f)[:, None]).to(ELEM_T).to(DOT_T)
        acc += tl.dot(tl.trans(coeff), fd, input_precision=PREC)
    out = inv_w[:, None] * acc - w32 * (inv_w * inv_w * t)[:, None]
    tl.store(OUT + (split * K + ks).to(tl.int64)[:, None] * D + cols[None, :], out.to(OUT.dtype.element_ty), mask=wmask)


# Forward, half precision: class chunks of 64-128 with D streamed in 64-wide chunks
# (tensor-core tiles on Ampere/Hopper), two shapes swept. Backward: row tiles of ≤ TILE_BYTES
# plus the same-size fp32 accumulator stay on chip at 16-32 rows × 16-32 classes. fp32 (the
# model's call: fp32 features and weight) runs ieee dots on CUDA cores, unrolled per tile:
# one small config each, which compiles in seconds; a sweep would compile several per shape.
_FWD = LazyKernel(
    _fwd,
    {
        "half": [cfg(4, 3, BLOCK_M=64, BLOCK_K=64, BLOCK_D=64), cfg(8, 3, BLOCK_M=64, BLOCK_K=128, BLOCK_D=64)],
        "fp32": [cfg(4, 2, BLOCK_M=32, BLOCK_K=32, BLOCK_D=32)],
    },
    cfg(1, 1, BLOCK_M=16, BLOCK_K=16, BLOCK_D=32),
    key=["D", "K", "WRITE_LOGITS"],
    helpers=[_dot_sq_norms],
)
_BWD_CFGS = {
    "half": [cfg(4, 2, BLOCK_M=16, BLOCK_K=16), cfg(8, 2, BLOCK_M=32, BLOCK_K=32)],
    "fp32": [cfg(4, 2, BLOCK_M=16, BLOCK_K=16)],
}
_BWD_INTERP = cfg(1, 1, BLOCK_M=16, BLOCK_K=16)
_BWD_HELPERS = [_dot_sq_norms, _row_sq_norms, _tile_grad]
_BWD_FEAT = LazyKernel(_bwd_feat, _BWD_CFGS, _BWD_INTERP, key=["BLOCK_DF", "K"], helpers=_BWD_HELPERS)
_BWD_WEIGHT = LazyKernel(_bwd_weight, _BWD_CFGS, _BWD_INTERP, key=["BLOCK_DF", "B"], helpers=_BWD_HELPERS)


def _variant(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def d_tile(d: int, dtype: torch.dtype) -> int:
    """Width of the backward's D tiles: the whole row when it fits ``TILE_BYTES`` (32 columns
    under the interpreter, so CPU tests reach the tiled path at small D)."""
    cap = 32 if interpreting() else TILE_BYTES // (torch.finfo(dtype).bits // 8)
    return min(pow2_at_least(d), cap)


def _class_splits(b: int, k: int, device) -> int:
    # Row blocks alone give too few programs for B ≤ 512; split the classes until ~2 waves.
    return max(1, min(cdiv(k, 64), cdiv(2 * num_sms(device), cdiv(b, 32))))


def _row_splits(b: int, k: int, device) -> int:
    return max(1, min(cdiv(b, 32), cdiv(2 * num_sms(device), cdiv(k, 32))))


@triton_op(f"{TRITON}::la_cosine_ce_fwd", mutates_args=(), schema=SCHEMAS["la_cosine_ce_fwd"])
def la_cosine_ce_fwd(
    feat: Tensor,
    weight: Tensor,
    labels: Tensor,
    log_prior: Tensor,
    scale: float,
    tau: float,
    return_logits: bool,
    compute_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    b, d = feat.shape
    k = weight.shape[0]
    dev = feat.device
    feat, weight, labels, log_prior = (
        feat.contiguous(),
        weight.contiguous(),
        labels.contiguous(),
        log_prior.contiguous(),
    )
    splits = _class_splits(b, k, dev)
    k_per = cdiv(k, splits)
    splits = cdiv(k, k_per)
    logits = torch.empty((b, k) if return_logits else (0,), device=dev, dtype=feat.dtype)
    pm = torch.empty((splits, b), device=dev, dtype=torch.float32)
    pl = torch.empty_like(pm)
    tgt = torch.empty((b,), device=dev, dtype=torch.float32)
    with on_device(feat):
        wrap_triton(_FWD.get(_variant(feat.dtype)))[lambda m: (cdiv(b, m["BLOCK_M"]), splits)](
            feat,
            weight,
            labels,
            log_prior,
            logits,
            pm,
            pl,
            tgt,
            b,
            k,
            d,
            k_per,
            scale,
            tau,
            WRITE_LOGITS=return_logits,
            **dot_meta(feat.dtype),
        )
    mx = pm.max(0).values
    lse = mx + torch.log((pl * torch.exp(pm - mx)).sum(0))
    loss = (lse - tgt).mean()
    if compute_grad:
        # The backward kernels recompute the logits tile by tile anyway, so the gradients for
        # grad_loss = 1 cost the same here as later; computing them now keeps one autograd.
        g_feat, g_weight = _backward(loss.new_ones(()), feat, weight, labels, log_prior, lse, scale, tau)
    else:
        g_feat, g_weight = feat.new_empty((0,)), weight.new_empty((0,))
    return loss, logits, lse, g_feat, g_weight


@triton_op(f"{TRITON}::la_cosine_ce_bwd", mutates_args=(), schema=SCHEMAS["la_cosine_ce_bwd"])
def la_cosine_ce_bwd(
    grad_loss: Tensor,
    feat: Tensor,
    weight: Tensor,
    labels: Tensor,
    log_prior: Tensor,
    lse: Tensor,
    scale: float,
    tau: float,
) -> tuple[Tensor, Tensor]:
    return _backward(grad_loss, feat, weight, labels, log_prior, lse, scale, tau)


def _backward(grad_loss, feat, weight, labels, log_prior, lse, scale, tau):
    b, d = feat.shape
    k = weight.shape[0]
    dev = feat.device
    feat, weight, labels, log_prior = (
        feat.contiguous(),
        weight.contiguous(),
        labels.contiguous(),
        log_prior.contiguous(),
    )
    grad_loss = grad_loss.reshape(()).float().contiguous()
    meta = dot_meta(feat.dtype)
    variant = _variant(feat.dtype)
    block_df = d_tile(d, feat.dtype)
    tiles = cdiv(d, block_df)
    meta.update(BLOCK_DF=block_df, ONE_TILE=tiles == 1)

    ks = _class_splits(b, k, dev)
    k_per = cdiv(k, ks)
    ks = cdiv(k, k_per)
    # One split stores the final gradient in the output dtype; several store fp32 partials.
    g_feat = torch.empty_like(feat) if ks == 1 else torch.empty((ks, b, d), device=dev, dtype=torch.float32)
    with on_device(feat):
        wrap_triton(_BWD_FEAT.get(variant))[lambda m: (cdiv(b, m["BLOCK_M"]), ks, tiles)](
            feat, weight, labels, log_prior, lse, grad_loss, g_feat, b, k, d, k_per, scale, tau, 1.0 / b, **meta
        )
    if ks > 1:
        g_feat = g_feat.sum(0).to(feat.dtype)

    bs = _row_splits(b, k, dev)
    b_per = cdiv(b, bs)
    bs = cdiv(b, b_per)
    g_weight = torch.empty_like(weight) if bs == 1 else torch.empty((bs, k, d), device=dev, dtype=torch.float32)
    with on_device(feat):
        wrap_triton(_BWD_WEIGHT.get(variant))[lambda m: (cdiv(k, m["BLOCK_K"]), bs, tiles)](
            feat, weight, labels, log_prior, lse, grad_loss, g_weight, b, k, d, b_per, scale, tau, 1.0 / b, **meta
        )
    if bs > 1:
        g_weight = g_weight.sum(0).to(weight.dtype)
    return g_feat, g_weight


def check_labels(weight, labels) -> None:
    """Device-side guard (no host sync, traceable): labels index the classes."""
    k = weight.shape[0]
    torch._assert_async(
        ((labels >= 0) & (labels < k)).all(), f"la_cosine_cross_entropy (triton): labels out of range [0, {k})"
    )


register_autograd(TRITON)
_run = kernel_call(TRITON)


def la_cosine_cross_entropy(feat, weight, labels, log_prior, scale, tau, return_logits):
    """Backend entry for :func:`liftplus_fast.ops.la_cosine_cross_entropy`."""
    check_labels(weight, labels)
    return _run(feat, weight, labels, log_prior, float(scale), float(tau), bool(return_logits))
