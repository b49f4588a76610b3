"""Public attention op: multi-head self-attention read from the packed ``qkv`` projection.

On CPU three implementations compute it, and which one runs for bf16 and for fp32 ``qkv`` is a
measured choice (:mod:`.choices`: ``attention_bf16``, ``attention_fp32``; forced with
``LIFTPLUS_FAST_ATTENTION=brgemm|kernel|sdpa``):

* ``brgemm``: the native ``liftplus_fast::attention_brgemm_fwd`` / ``_bwd`` on PyTorch's
  batch-reduce GEMM micro-kernels (oneDNN; AMX tiles where the CPU has them);
* ``kernel``: the native ``liftplus_fast::attention_fwd`` / ``_bwd`` with its own AVX512-BF16
  micro-GEMMs (bf16; other dtypes run its ATen fallback);
* ``sdpa``: PyTorch's ``scaled_dot_product_attention`` (the reference).

Both native ones read the in-projection output as it is and write the heads merged (no layout
copies around them), run one (image, head) per task in cache, save only the softmax
log-sum-exp and recompute the probabilities in the backward. fp16/fp64 and CUDA tensors use
SDPA (flash / cuDNN on GPU).

Half ``qkv`` on a CPU whose half GEMMs lose to fp32 (:mod:`.gemm`) runs PyTorch's fp32 CPU flash
kernel on its values but saves, for the backward, ``qkv`` and the output in their half dtype
(plus the fp32 log-sum-exp), as a flash kernel in half precision does; the fp32 copies are made
again in the backward. Keeping the fp32 copies instead would hold twice the bytes per block
(at ViT-B/16, B = 32: 77 MB against 39 MB per block).
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Optional

import torch

from . import _library, choices, gemm, reference
from ._checks import FLOAT_DTYPES, check_tensor
from ._dispatch import dispatch, register
from ._native import native_status

OP = "attention"


def check_attention_args(qkv, num_heads: int, batch_first: bool) -> None:
    """Validate the packed ``qkv`` tensor against ``num_heads``."""
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES + (torch.float64,), dim=3)
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    width = qkv.shape[-1]
    if width == 0 or width % (3 * num_heads):
        raise ValueError(
            f"the last dimension of qkv must be 3 * num_heads * head_dim; got {width} with num_heads={num_heads}"
        )
    if qkv.shape[1 if batch_first else 0] == 0:
        raise ValueError(f"qkv must hold at least one token; got shape {tuple(qkv.shape)}")


def attention(qkv, num_heads: int, batch_first: bool = True, scale: Optional[float] = None):
    """``softmax(scale · Q Kᵀ) V`` per head, heads merged, from ``qkv = [Q | K | V]``.

    Args:
        qkv: the in-projection output ``[B, N, 3D]`` (``[N, B, 3D]`` when not ``batch_first``);
            fp32, bf16, fp16 (or fp64).
        num_heads: number of heads H (head width D / H).
        batch_first: layout of ``qkv`` and of the result.
        scale: softmax scale, default ``1 / sqrt(D / H)``.

    Returns:
        ``[B, N, D]`` (or ``[N, B, D]``) in the dtype of ``qkv``; differentiable in ``qkv``.
    """
    check_attention_args(qkv, num_heads, batch_first)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    scale = float(head_dim**-0.5 if scale is None else scale)
    run = dispatch(OP, qkv.device)
    if gemm.runs_in_fp32(qkv):
        # Half GEMMs lose to fp32 on this CPU (see .gemm): the same half inputs and output, fp32
        # inside. The reference backend keeps the plain structure (fp32 copies saved by SDPA).
        if run is _reference_attention:
            return run(qkv.float(), num_heads, bool(batch_first), scale).to(qkv.dtype)
        return _HalfSavedFp32Attention.apply(qkv, num_heads, bool(batch_first), scale)
    return run(qkv, num_heads, bool(batch_first), scale)


def _fp32_heads(t, num_heads, batch_first):
    return reference.split_heads(t.float(), num_heads, batch_first)


class _HalfSavedFp32Attention(torch.autograd.Function):
    """fp32 CPU flash attention of half ``qkv`` that saves half tensors (see the module doc)."""

    @staticmethod
    def forward(ctx, qkv, num_heads, batch_first, scale):
        q, k, v = (_fp32_heads(t, num_heads, batch_first) for t in qkv.chunk(3, dim=-1))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
        o = qkv.new_empty(qkv.shape[:-1] + (qkv.shape[-1] // 3,))
        reference.split_heads(o, num_heads, batch_first).copy_(out)  # merge and round in one pass
        ctx.save_for_backward(qkv, o, lse)
        ctx.args = (num_heads, batch_first, scale)
        return o

    @staticmethod
    def backward(ctx, grad_o):
        qkv, o, lse = ctx.saved_tensors
        num_heads, batch_first, scale = ctx.args
        q, k, v = (_fp32_heads(t, num_heads, batch_first) for t in qkv.chunk(3, dim=-1))
        out, grad = (_fp32_heads(t, num_heads, batch_first) for t in (o, grad_o))
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, False, scale=scale
        )
        grad_qkv = torch.empty_like(qkv)
        for part, g in zip(grad_qkv.chunk(3, dim=-1), grads):  # merge, pack and round in one pass
            reference.split_heads(part, num_heads, batch_first).copy_(g)
        return grad_qkv, None, None, None


def _reference_attention(qkv, num_heads, batch_first, scale):
    return reference.attention(qkv, num_heads, batch_first, scale)


register(OP, "reference", _reference_attention)


ENV_VAR = "LIFTPLUS_FAST_ATTENTION"
IMPLEMENTATIONS = ("brgemm", "kernel", "sdpa")
_NATIVE_OPS = {"brgemm": ("attention_brgemm_fwd", "attention_brgemm_bwd"), "kernel": ("attention_fwd", "attention_bwd")}

# Facts about the loaded extension, asked once when it loads (plain values, so torch.compile never
# traces the queries): whether the kernel has its AVX512-BF16 micro-GEMMs, and the bf16 operand
# layout of brgemm ("vnni": oneDNN micro-kernels, "plain": a BLAS GEMM, "": no brgemm).
_BF16_KERNEL = False
_BRGEMM_LAYOUT = ""


def _blocked() -> Dict[str, str]:
    """Options that cannot run here, with the reason."""
    blocked = {}
    if not native_status().loaded:
        blocked["brgemm"] = blocked["kernel"] = f"the native extension is not loaded ({native_status().reason})"
    elif not _BRGEMM_LAYOUT:
        blocked["brgemm"] = f"torch {torch.__version__} has no batch-reduce GEMM (torch 2.6 or later has)"
    return blocked


def _time_options(dtype: torch.dtype, options) -> Dict[str, float]:
    """Forward + backward seconds of each option on one ViT-B/16 block of two images."""
    b, n, h, hd = 2, 197, 12, 64
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, n, 3 * h * hd, generator=g).to(dtype)
    grad = torch.randn(b, n, h * hd, generator=g).to(dtype)
    scale = hd**-0.5

    def native(fwd, bwd):
        def run():
            out, lse = fwd(qkv, h, scale, True)
            bwd(grad, qkv, out, lse, h, scale, True)

        return run

    def sdpa():
        x = qkv.detach().requires_grad_()
        reference.attention(x, h, True, scale).backward(grad)

    runs = {}
    for name in options:
        names = _NATIVE_OPS.get(name)
        runs[name] = sdpa if names is None else native(*(_library.op(_library.NATIVE, op) for op in names))
    return choices.best_seconds(runs)


def _decider(dtype: torch.dtype):
    def decide():
        options = [name for name in IMPLEMENTATIONS if name not in _blocked()]
        if options == ["sdpa"]:
            return "sdpa", _blocked()["brgemm"]
        if dtype == torch.bfloat16 and not gemm.native_half_gemm("cpu", dtype):
            return (
                "sdpa",
                "bf16 GEMMs run as fp32 GEMMs here (ops.gemm): bf16 attention runs PyTorch's fp32 flash kernel",
            )
        if dtype == torch.bfloat16 and not _BF16_KERNEL:
            options.remove("kernel")  # its ATen fallback: slower than SDPA by design
        return choices.faster(_time_options(dtype, options), prefer="brgemm")

    return decide


CHOICES = {
    dtype: choices.define(choices.Choice(f"attention_{label}", IMPLEMENTATIONS, ENV_VAR, _decider(dtype), _blocked))
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32"))
}


def implementation(dtype: torch.dtype) -> str:
    """Which implementation runs CPU attention of ``dtype`` (the measured choice; fp16 and fp64:
    SDPA)."""
    choice = CHOICES.get(dtype)
    return "sdpa" if choice is None else choices.get(choice.name)


def kernel_call(namespace: str):
    """The backend function: the chosen native op of ``namespace``, or SDPA."""
    fwds = {name: _library.op(namespace, ops[0]) for name, ops in _NATIVE_OPS.items()}

    def run(qkv, num_heads, batch_first, scale):
        impl = implementation(qkv.dtype)
        if impl == "sdpa":
            return reference.attention(qkv, num_heads, batch_first, scale)
        return fwds[impl](qkv.contiguous(), num_heads, scale, batch_first)[0]

    return run


def _fake_fwd(qkv, num_heads, scale, batch_first):
    a, b, w = qkv.shape
    batch, tokens = (a, b) if batch_first else (b, a)
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    return qkv.new_empty((a, b, w // 3)), qkv.new_empty((batch, num_heads, tokens), dtype=acc)


def _fake_bwd(grad_out, qkv, out, lse, num_heads, scale, batch_first):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale, batch_first = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.args = (num_heads, scale, batch_first)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse)


def _make_backward(namespace: str, bwd_name: str):
    bwd = _library.op(namespace, bwd_name)

    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:
            return None, None, None, None
        qkv, out, lse = ctx.saved_tensors
        return bwd(grad_out.contiguous(), qkv, out, lse, *ctx.args), None, None, None

    return backward


if native_status().loaded:
    _BF16_KERNEL = bool(_library.op(_library.NATIVE, "attention_bf16_kernel")())
    _BRGEMM_LAYOUT = str(_library.op(_library.NATIVE, "attention_brgemm_layout")())
    for _fwd, _bwd in _NATIVE_OPS.values():
        _library.register_fakes(_library.NATIVE, **{_fwd: _fake_fwd, _bwd: _fake_bwd})
        _library.register_autograd(_library.NATIVE, _fwd, partial(_make_backward, bwd_name=_bwd), _setup_context)
    register(OP, "cpu", kernel_call(_library.NATIVE), native_name="attention_fwd")
