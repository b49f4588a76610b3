"""Triton AdaptFormer branch: ``Y = A + (M + s * up(relu(down(LN(A)))))``, forward and backward.

Kernels (math in ``docs/ops.md``):

* ``_fwd``: one program per block of ``BLOCK_N`` rows. The bottleneck tile ``Z`` of
  ``BLOCK_N × BLOCK_R`` stays in registers while D is streamed in ``BLOCK_D`` chunks; saves
  only μ, rstd and the pre-ReLU ``Z`` (fp32).
* ``_bwd_rows``: per row block, ``G·Wu`` then ``dZ`` (written, fp32) and ``dA`` with the
  LayerNorm backward; Â and H are recomputed from μ, rstd. Also writes the per-row terms of
  ``ds``.
* ``_bwd_weights``: the reductions over rows (``dWu``, ``dWd``, ``dγ``, ``dβ``, ``dbu``) per
  (D tile, row split), written as per-split partials and summed afterwards in a fixed order:
  deterministic, no atomics.

Limit: the bottleneck ``r`` must be ≤ ``MAX_R`` (256, the largest r of the LIFT+ rule at
ViT-B/16, iNaturalist): the ``BLOCK_N × r`` accumulators live in registers.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .._bindings.adaptformer import kernel_call, register_autograd
from .._library import SCHEMAS, TRITON
from ._common import LazyKernel, cdiv, cfg, dot_meta, num_sms, on_device, pow2_at_least

MAX_R = 256


def _fwd(
    A,
    M,
    LNW,
    LNB,
    WD,
    BD,
    WU,
    BU,
    S,
    Y,
    MEAN,
    RSTD,
    Z,
    N,
    D,
    R,
    eps,
    ELEM_T: tl.constexpr,
    DOT_T: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    roff = rows.to(tl.int64) * D
    # Two-pass statistics (mean, then centred variance): E[x²]−E[x]² loses digits when |μ| ≫ σ.
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(A + roff[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(x, axis=1)
    mean = acc / D
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(A + roff[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        xc = tl.where(m2, x - mean[:, None], 0.0)
        acc += tl.sum(xc * xc, axis=1)
    rstd = 1.0 / tl.sqrt(acc / D + eps)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)

    rr = tl.arange(0, BLOCK_R)
    rrmask = rr < R
    z = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        m2 = rmask[:, None] & cmask[None, :]
        x = tl.load(A + roff[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        gam = tl.load(LNW + cols, mask=cmask, other=0.0).to(tl.float32)
        bet = tl.load(LNB + cols, mask=cmask, other=0.0).to(tl.float32)
        # The reference rounds H to the input dtype before the down projection.
        h = ((x - mean[:, None]) * rstd[:, None] * gam[None, :] + bet[None, :]).to(ELEM_T)
        wd = tl.load(WD + rr[:, None] * D + cols[None, :], mask=rrmask[:, None] & cmask[None, :], other=0.0).to(ELEM_T)
        z += tl.dot(h.to(DOT_T), tl.trans(wd).to(DOT_T), input_precision=PREC)
    z += tl.load(BD + rr, mask=rrmask, other=0.0).to(ELEM_T).to(tl.float32)[None, :]
    zmask = rmask[:, None] & rrmask[None, :]
    tl.store(Z + rows.to(tl.int64)[:, None] * R + rr[None, :], z, mask=zmask)

    p = tl.maximum(z, 0.0).to(ELEM_T).to(DOT_T)
    s = tl.load(S).to(ELEM_T).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        m2 = rmask[:, None] & cmask[None, :]
        wu = tl.load(WU + cols[:, None] * R + rr[None, :], mask=cmask[:, None] & rrmask[None, :], other=0.0).to(ELEM_T)
        u = tl.dot(p, tl.trans(wu).to(DOT_T), input_precision=PREC)
        bu = tl.load(BU + cols, mask=cmask, other=0.0).to(ELEM_T).to(tl.float32)
        x = tl.load(A + roff[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        mo = tl.load(M + roff[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        y = x + (mo + s * (u + bu[None, :]))
        tl.store(Y + roff[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=m2)


def _bwd_rows(
    G,
    A,
    LNW,
    WD,
    WU,
    BU,
    S,
    MEAN,
    RSTD,
    Z,
    DA,
    DZ,
    DS_ROW,
    N,
    D,
    R,
    ELEM_T: tl.constexpr,
    DOT_T: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    roff = rows.to(tl.int64) * D
    rr = tl.arange(0, BLOCK_R)
    rrmask = rr < R
    zmask = rmask[:, None] & rrmask[None, :]
    zoff = rows.to(tl.int64)[:, None] * R + rr[None, :]
    mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    z = tl.load(Z + zoff, mask=zmask, other=0.0)
    p = tl.maximum(z, 0.0).to(ELEM_T).to(tl.float32)
    s = tl.load(S).to(ELEM_T).to(tl.float32)

    gwu = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    gbu = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        m2 = rmask[:, None] & cmask[None, :]
        g = tl.load(G + roff[:, None] + cols[None, :], mask=m2, other=0.0)
        wu = tl.load(WU + cols[:, None] * R + rr[None, :], mask=cmask[:, None] & rrmask[None, :], other=0.0).to(ELEM_T)
        gwu += tl.dot(g.to(DOT_T), wu.to(DOT_T), input_precision=PREC)
        bu = tl.load(BU + cols, mask=cmask, other=0.0).to(ELEM_T).to(tl.float32)
        gbu += tl.sum(g.to(tl.float32) * bu[None, :], axis=1)
    # ds = ⟨G·Wu, P⟩ + ⟨colsum(G), bu⟩, kept per row and summed on the host in a fixed order.
    tl.store(DS_ROW + rows, tl.sum(gwu * p, axis=1) + gbu, mask=rmask)
    dz = tl.where(z > 0.0, s * gwu, 0.0)
    tl.store(DZ + zoff, dz, mask=zmask)
    dzc = dz.to(ELEM_T).to(DOT_T)

    c1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    c2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        m2 = rmask[:, None] & cmask[None, :]
        wd = tl.load(WD + rr[:, None] * D + cols[None, :], mask=rrmask[:, None] & cmask[None, :], other=0.0).to(ELEM_T)
        dh = tl.dot(dzc, wd.to(DOT_T), input_precision=PREC)
        gam = tl.load(LNW + cols, mask=cmask, other=0.0).to(tl.float32)
        x = tl.load(A + roff[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        xhat = (x - mean[:, None]) * rstd[:, None]
        dxh = dh * gam[None, :]
        c1 += tl.sum(dxh, axis=1)
        c2 += tl.sum(dxh * xhat, axis=1)
    c1 = c1 / D
    c2 = c2 / D
    # Second sweep recomputes dH (2·r FLOPs per element) rather than spilling a BLOCK_N × D tile.
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        m2 = rmask[:, None] & cmask[None, :]
        wd = tl.load(WD + rr[:, None] * D + cols[None, :], mask=rrmask[:, None] & cmask[None, :], other=0.0).to(ELEM_T)
        dh = tl.dot(dzc, wd.to(DOT_T), input_precision=PREC)
        gam = tl.load(LNW + cols, mask=cmask, other=0.0).to(tl.float32)
        x = tl.load(A + roff[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        g = tl.load(G + roff[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        xhat = (x - mean[:, None]) * rstd[:, None]
        dxh = dh * gam[None, :]
        da = g + rstd[:, None] * (dxh - c1[:, None] - xhat * c2[:, None])
        tl.store(DA + roff[:, None] + cols[None, :], da.to(DA.dtype.element_ty), mask=m2)


def _bwd_weights(
    G,
    A,
    LNW,
    LNB,
    WD,
    MEAN,
    RSTD,
    Z,
    DZ,
    P_WU,
    P_WD,
    P_LNW,
    P_LNB,
    P_BU,
    N,
    D,
    R,
    ROWS_PER_SPLIT,
    ELEM_T: tl.constexpr,
    DOT_T: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    rr = tl.arange(0, BLOCK_R)
    rrmask = rr < R
    gam = tl.load(LNW + cols, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(LNB + cols, mask=cmask, other=0.0).to(tl.float32)
    wd = (
        tl.load(WD + rr[:, None] * D + cols[None, :], mask=rrmask[:, None] & cmask[None, :], other=0.0)
        .to(ELEM_T)
        .to(DOT_T)
    )
    acc_wu = tl.zeros([BLOCK_D, BLOCK_R], dtype=tl.float32)
    acc_wd = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_bu = tl.zeros([BLOCK_D], dtype=tl.float32)
    r0 = split * ROWS_PER_SPLIT
    r1 = tl.minimum(r0 + ROWS_PER_SPLIT, N)
    for n0 in range(r0, r1, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < r1
        m2 = rmask[:, None] & cmask[None, :]
        roff = rows.to(tl.int64) * D
        zoff = rows.to(tl.int64)[:, None] * R + rr[None, :]
        zmask = rmask[:, None] & rrmask[None, :]
        g = tl.load(G + roff[:, None] + cols[None, :], mask=m2, other=0.0)
        x = tl.load(A + roff[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)
        h = tl.where(m2, xhat * gam[None, :] + bet[None, :], 0.0).to(ELEM_T).to(DOT_T)
        z = tl.load(Z + zoff, mask=zmask, other=0.0)
        p = tl.maximum(z, 0.0).to(ELEM_T).to(DOT_T)
        dz = tl.load(DZ + zoff, mask=zmask, other=0.0).to(ELEM_T).to(DOT_T)
        acc_wu += tl.dot(tl.trans(g.to(DOT_T)), p, input_precision=PREC)
        acc_wd += tl.dot(tl.trans(dz), h, input_precision=PREC)
        dh = tl.dot(dz, wd, input_precision=PREC)
        acc_g += tl.sum(dh * xhat, axis=0)
        acc_b += tl.sum(dh, axis=0)
        acc_bu += tl.sum(g.to(tl.float32), axis=0)
    base = split.to(tl.int64) * D
    tl.store(P_WU + (base + cols)[:, None] * R + rr[None, :], acc_wu, mask=cmask[:, None] & rrmask[None, :])
    tl.store(
        P_WD + split.to(tl.int64) * R * D + rr[:, None] * D + cols[None, :],
        acc_wd,
        mask=rrmask[:, None] & cmask[None, :],
    )
    tl.store(P_LNW + base + cols, acc_g, mask=cmask)
    tl.store(P_LNB + base + cols, acc_b, mask=cmask)
    tl.store(P_BU + base + cols, acc_bu, mask=cmask)


# Hopper/Ampere, half precision and r ≤ 64: 64-128 rows per program keep the r-wide accumulators
# in registers; D is streamed in 64/128-wide chunks (bf16: 128-256 B rows per load); the sweep
# picks among two tile shapes. Where a sweep cannot pay off one config is fixed, so a cold start
# compiles one variant: fp32 (ieee dots run on CUDA cores, fully unrolled: compile time grows
# with the tile, and small tiles keep it to seconds) and r ≥ 128 (the BLOCK_N × r accumulators
# fill the registers at 64 rows whatever the rest).
_ROW_CONFIGS = {
    "half": [cfg(4, 3, BLOCK_N=64, BLOCK_D=64), cfg(8, 2, BLOCK_N=128, BLOCK_D=64)],
    "half_wide_r": [cfg(8, 2, BLOCK_N=64, BLOCK_D=64)],
    "fp32": [cfg(4, 2, BLOCK_N=16, BLOCK_D=32)],
}
_WEIGHT_CONFIGS = {
    "half": [cfg(4, 3, BLOCK_N=64, BLOCK_D=64), cfg(8, 3, BLOCK_N=64, BLOCK_D=128)],
    "half_wide_r": [cfg(8, 2, BLOCK_N=32, BLOCK_D=64)],
    "fp32": [cfg(8, 2, BLOCK_N=16, BLOCK_D=32)],
}
_INTERP = cfg(1, 1, BLOCK_N=16, BLOCK_D=32)

_FWD = LazyKernel(_fwd, _ROW_CONFIGS, _INTERP, key=["D", "BLOCK_R"])
_BWD_ROWS = LazyKernel(_bwd_rows, _ROW_CONFIGS, _INTERP, key=["D", "BLOCK_R"])
_BWD_WEIGHTS = LazyKernel(_bwd_weights, _WEIGHT_CONFIGS, _INTERP, key=["D", "BLOCK_R"])


def _variant(dtype: torch.dtype, block_r: int) -> str:
    if dtype == torch.float32:
        return "fp32"
    return "half_wide_r" if block_r >= 128 else "half"


def _as_rows(t: Tensor) -> Tensor:
    return t.contiguous().view(-1, t.shape[-1])


@triton_op(f"{TRITON}::adaptformer_fwd", mutates_args=(), schema=SCHEMAS["adaptformer_fwd"])
def adaptformer_fwd(
    a: Tensor,
    mlp_out: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
    down_w: Tensor,
    down_b: Tensor,
    up_w: Tensor,
    up_b: Tensor,
    scale: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    d = a.shape[-1]
    r = down_w.shape[0]
    a2, m2 = _as_rows(a), _as_rows(mlp_out)
    n = a2.shape[0]
    y = torch.empty_like(a2)
    mean = torch.empty((n,), device=a.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    z = torch.empty((n, r), device=a.device, dtype=torch.float32)
    meta = dot_meta(a.dtype)
    block_r = pow2_at_least(r)
    if n > 0:
        with on_device(a2):
            wrap_triton(_FWD.get(_variant(a.dtype, block_r)))[lambda m: (cdiv(n, m["BLOCK_N"]),)](
                a2,
                m2,
                ln_w.contiguous(),
                ln_b.contiguous(),
                down_w.contiguous(),
                down_b.contiguous(),
                up_w.contiguous(),
                up_b.contiguous(),
                scale,
                y,
                mean,
                rstd,
                z,
                n,
                d,
                r,
                eps,
                BLOCK_R=block_r,
                **meta,
            )
    return y.view(a.shape), mean, rstd, z


def _weight_splits(n: int, d: int, device: torch.device) -> int:
    # Enough (D tile × row split) programs to fill the GPU twice; independent of the autotuned
    # block sizes so the partial buffers have one shape per problem.
    d_tiles = cdiv(d, 128)
    return max(1, min(cdiv(n, 64), cdiv(2 * num_sms(device), d_tiles)))


@triton_op(f"{TRITON}::adaptformer_bwd", mutates_args=(), schema=SCHEMAS["adaptformer_bwd"])
def adaptformer_bwd(
    grad_y: Tensor,
    a: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
    down_w: Tensor,
    down_b: Tensor,
    up_w: Tensor,
    up_b: Tensor,
    scale: Tensor,
    mean: Tensor,
    rstd: Tensor,
    z: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    d = a.shape[-1]
    r = down_w.shape[0]
    g2, a2 = _as_rows(grad_y), _as_rows(a)
    n = a2.shape[0]
    dev = a.device
    meta = dot_meta(a.dtype)
    block_r = pow2_at_least(r)
    variant = _variant(a.dtype, block_r)
    ln_w, ln_b = ln_w.contiguous(), ln_b.contiguous()
    down_w, up_w = down_w.contiguous(), up_w.contiguous()
    da = torch.empty_like(a2)
    dz = torch.empty((n, r), device=dev, dtype=torch.float32)
    ds_row = torch.empty((n,), device=dev, dtype=torch.float32)
    splits = _weight_splits(n, d, dev)
    rows_per_split = cdiv(n, splits) if n else 0
    p_wu = torch.empty((splits, d, r), device=dev, dtype=torch.float32)
    p_wd = torch.empty((splits, r, d), device=dev, dtype=torch.float32)
    p_lnw = torch.empty((splits, d), device=dev, dtype=torch.float32)
    p_lnb = torch.empty_like(p_lnw)
    p_bu = torch.empty_like(p_lnw)
    if n > 0:
        with on_device(a2):
            wrap_triton(_BWD_ROWS.get(variant))[lambda m: (cdiv(n, m["BLOCK_N"]),)](
                g2,
                a2,
                ln_w,
                down_w,
                up_w,
                up_b.contiguous(),
                scale,
                mean,
                rstd,
                z,
                da,
                dz,
                ds_row,
                n,
                d,
                r,
                BLOCK_R=block_r,
                **meta,
            )
            wrap_triton(_BWD_WEIGHTS.get(variant))[lambda m: (cdiv(d, m["BLOCK_D"]), splits)](
                g2,
                a2,
                ln_w,
                ln_b,
                down_w,
                mean,
                rstd,
                z,
                dz,
                p_wu,
                p_wd,
                p_lnw,
                p_lnb,
                p_bu,
                n,
                d,
                r,
                rows_per_split,
                BLOCK_R=block_r,
                **meta,
            )
    else:
        for t in (p_wu, p_wd, p_lnw, p_lnb, p_bu, dz, ds_row):
            t.zero_()
    s = scale.to(a.dtype).float()
    # Second, fixed-order reduction over the per-split partials: run-to-run deterministic.
    sums = [p_lnw.sum(0), p_lnb.sum(0), p_wd.sum(0), dz.sum(0), p_wu.sum(0) * s, p_bu.sum(0) * s, ds_row.sum()]
    params = (ln_w, ln_b, down_w, down_b, up_w, up_b, scale)
    grads = [g.to(p.dtype).reshape(p.shape) for g, p in zip(sums, params)]
    return (da.view(a.shape), *grads)


def check_limits(a, down_w) -> None:
    """Reject what the kernels cannot run (arguments are validated by the public op)."""
    r = down_w.shape[0]
    if r > MAX_R:
        raise ValueError(
            f"adaptformer (triton): bottleneck r = {r} (down_w shape {tuple(down_w.shape)}) "
            f"exceeds the kernel limit r <= {MAX_R}: the BLOCK_N x r accumulators "
            "must stay in registers; use the reference or native backend"
        )


register_autograd(TRITON)
_run = kernel_call(TRITON)


def adaptformer(a, mlp_out, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, eps):
    """Backend entry for :func:`liftplus_fast.ops.adaptformer` (``scale`` 0-dim, ``eps`` float)."""
    check_limits(a, down_w)
    return _run(a, mlp_out, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, float(eps))
