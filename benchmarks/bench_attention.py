"""Multi-head self-attention from the packed qkv, forward + backward: every CPU implementation.

Candidates (the options of the measured choice ``attention_bf16`` / ``attention_fp32``, see
``liftplus_fast/ops/attention.py``, plus the usual peers):

* ``reference``: the pure-PyTorch op (head split, ``scaled_dot_product_attention``, merge) —
  the ``sdpa`` option;
* ``compile``: ``torch.compile`` of that reference;
* ``kernel``: the package's own kernel (``attention_fwd`` / ``_bwd``: AVX512-BF16 micro-GEMMs in
  bf16, an ATen fallback in fp32);
* ``brgemm``: the kernel on PyTorch's batch-reduce GEMM (``attention_brgemm_fwd`` / ``_bwd``:
  oneDNN micro-kernels, AMX tiles on CPUs with AMX);
* ``brgemm_plain``: the same with plain bf16 operands (a BLAS GEMM per product: what CPUs whose
  oneDNN has no bf16 micro-kernels run).

Shapes: ViT-B/16 blocks (197 tokens, 12 heads of 64) at B ∈ {8, 32}, bf16 and fp32. flops: the
five N x N x head_dim products of the backward and two of the forward.
"""

from __future__ import annotations

import importlib
import os

import common
import torch

from liftplus_fast.ops import reference

NAME = "attention"
_attention = importlib.import_module("liftplus_fast.ops.attention")  # the package exports the function
_OPS = torch.ops.liftplus_fast


def _native(fwd, bwd, qkv, grad, heads, scale, plain=False):
    def run():
        previous = os.environ.pop("LIFTPLUS_FAST_BRGEMM_PLAIN", None)
        if plain:
            os.environ["LIFTPLUS_FAST_BRGEMM_PLAIN"] = "1"
        try:
            out, lse = fwd(qkv, heads, scale, True)
            return bwd(grad, qkv, out, lse, heads, scale, True)
        finally:
            os.environ.pop("LIFTPLUS_FAST_BRGEMM_PLAIN", None)
            if previous is not None:
                os.environ["LIFTPLUS_FAST_BRGEMM_PLAIN"] = previous

    return run


def make_case(batch, tokens, heads, head_dim, dtype):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, generator=g).to(dtype)
    grad = torch.randn(batch, tokens, heads * head_dim, generator=g).to(dtype)
    scale = head_dim**-0.5

    def ref_step(x):
        reference.attention(x, heads, True, scale).backward(grad)

    compiled = common.compiled(ref_step)
    candidates = {
        "reference": lambda: ref_step(qkv.detach().requires_grad_()),
        "compile": lambda: compiled(qkv.detach().requires_grad_()),
    }
    if _attention.native_status().loaded:
        candidates["kernel"] = _native(_OPS.attention_fwd, _OPS.attention_bwd, qkv, grad, heads, scale)
        if _attention._BRGEMM_LAYOUT:
            brgemm = (_OPS.attention_brgemm_fwd, _OPS.attention_brgemm_bwd)
            candidates["brgemm"] = _native(*brgemm, qkv, grad, heads, scale)
            if dtype == torch.bfloat16 and _attention._BRGEMM_LAYOUT == "vnni":
                candidates["brgemm_plain"] = _native(*brgemm, qkv, grad, heads, scale, plain=True)
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    return common.Case(
        f"B={batch} N={tokens} H={heads} hd={head_dim} {dt} fwd+bwd",
        {"B": batch, "N": tokens, "H": heads, "head_dim": head_dim, "dtype": dt},
        candidates,
        flops=7 * 2 * batch * heads * tokens * tokens * head_dim,
    )


def cases(smoke: bool) -> list:
    if smoke:
        return [make_case(1, 17, 2, 8, dt) for dt in (torch.float32, torch.bfloat16)]
    return [make_case(b, 197, 12, 64, dt) for dt in (torch.bfloat16, torch.float32) for b in (8, 32)]
