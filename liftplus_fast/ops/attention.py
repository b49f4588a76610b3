"""Public attention op: multi-head self-attention read from the packed ``qkv`` projection.

On CPU in bf16 the native kernel ``liftplus_fast::attention_fwd`` / ``attention_bwd`` runs one
(image, head) per task in cache with bf16 micro-GEMMs (fp32 accumulation), saves only the
softmax log-sum-exp and recomputes the probabilities in the backward; its input is the
in-projection output as it is and its output already has the heads merged, so no layout copies
happen around it. Other dtypes and CUDA tensors use PyTorch's ``scaled_dot_product_attention``
(the reference), which is faster there: flash / cuDNN on GPU, and on CPU in fp32 MKL's GEMMs
beat the kernel's fp32 fallback.

Half ``qkv`` on a CPU whose half GEMMs lose to fp32 (:mod:`.gemm`) runs PyTorch's fp32 CPU flash
kernel on its values but saves, for the backward, ``qkv`` and the output in their half dtype
(plus the fp32 log-sum-exp), as a flash kernel in half precision does; the fp32 copies are made
again in the backward. Keeping the fp32 copies instead would hold twice the bytes per block
(at ViT-B/16, B = 32: 77 MB against 39 MB per block).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _library, gemm, reference
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


def native_kernel_applies(qkv) -> bool:
    """Whether the native CPU kernel is the faster choice for ``qkv`` (bf16 with AVX512-BF16)."""
    return qkv.dtype == torch.bfloat16 and qkv.shape[-1] % 2 == 0 and _has_bf16_kernel()


# Asked once when the extension loads (a plain bool, so torch.compile never traces the query).
_BF16_KERNEL = False


def _has_bf16_kernel() -> bool:
    return _BF16_KERNEL


def kernel_call(namespace: str):
    """The backend function running ``namespace::attention_fwd`` (SDPA where it is faster)."""
    fwd = _library.op(namespace, "attention_fwd")

    def run(qkv, num_heads, batch_first, scale):
        if not native_kernel_applies(qkv):
            return reference.attention(qkv, num_heads, batch_first, scale)
        return fwd(qkv.contiguous(), num_heads, scale, batch_first)[0]

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


def _make_backward(namespace: str):
    bwd = _library.op(namespace, "attention_bwd")

    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:
            return None, None, None, None
        qkv, out, lse = ctx.saved_tensors
        return bwd(grad_out.contiguous(), qkv, out, lse, *ctx.args), None, None, None

    return backward


if native_status().loaded:
    _BF16_KERNEL = bool(_library.op(_library.NATIVE, "attention_bf16_kernel")())
    _library.register_fakes(_library.NATIVE, attention_fwd=_fake_fwd, attention_bwd=_fake_bwd)
    _library.register_autograd(_library.NATIVE, "attention_fwd", _make_backward, _setup_context)
    register(OP, "cpu", kernel_call(_library.NATIVE), native_name="attention_fwd")
