"""The schema of every fused op, written once and defined in each backend's namespace.

Two namespaces hold the same ops with the same schemas: ``liftplus_fast`` (kernels of the
native extension, registered by ``TORCH_LIBRARY_IMPL`` blocks in ``csrc/ops/*``) and
``liftplus_fast_triton`` (the Triton kernels of :mod:`liftplus_fast.ops.triton`). The native
namespace is defined here, from Python, before the extension is loaded, so the C++ kernels are
checked against these schemas when they register (a kernel whose signature differs fails to
load). The autograd formula and the fake kernel of an op are written once in its public module
(``ops/<op>.py``) and registered for each namespace with :func:`register_autograd`.

Math, saved tensors and precision policy of each op: ``docs/ops.md``.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

NATIVE = "liftplus_fast"
TRITON = "liftplus_fast_triton"

# name -> "(arguments) -> (results)"; the same text for every namespace.
SCHEMAS: Dict[str, str] = {
    # AdaptFormer: y = a + (mlp_out + scale * up(relu(down(LN(a))))). Saves the row mean/rstd
    # ([N]) and the pre-ReLU bottleneck z ([N, r]) in fp32 (float64 for float64 inputs).
    "adaptformer_fwd": (
        "(Tensor a, Tensor mlp_out, Tensor ln_w, Tensor ln_b, Tensor down_w, Tensor down_b, "
        "Tensor up_w, Tensor up_b, Tensor scale, float eps) "
        "-> (Tensor y, Tensor mean, Tensor rstd, Tensor z)"
    ),
    "adaptformer_bwd": (
        "(Tensor grad_y, Tensor a, Tensor ln_w, Tensor ln_b, Tensor down_w, Tensor down_b, "
        "Tensor up_w, Tensor up_b, Tensor scale, Tensor mean, Tensor rstd, Tensor z) "
        "-> (Tensor grad_a, Tensor grad_ln_w, Tensor grad_ln_b, Tensor grad_down_w, "
        "Tensor grad_down_b, Tensor grad_up_w, Tensor grad_up_b, Tensor grad_scale)"
    ),
    # Logit-adjusted cosine cross-entropy: fp32 loss, unadjusted logits [B, K] when
    # return_logits (else empty), per-row logsumexp [B]; with compute_grad also the gradients
    # for grad_loss = 1 (else empty), so the backward need not recompute the logits GEMM.
    "la_cosine_ce_fwd": (
        "(Tensor feat, Tensor weight, Tensor labels, Tensor log_prior, float scale, float tau, "
        "bool return_logits, bool compute_grad=False) "
        "-> (Tensor loss, Tensor logits, Tensor lse, Tensor grad_feat, Tensor grad_weight)"
    ),
    # The recomputing backward, for a forward run without compute_grad.
    "la_cosine_ce_bwd": (
        "(Tensor grad_loss, Tensor feat, Tensor weight, Tensor labels, Tensor log_prior, "
        "Tensor lse, float scale, float tau) -> (Tensor grad_feat, Tensor grad_weight)"
    ),
    # Test-time ensembling: mean over crops, argmax, per-class correct/total (empty without labels).
    "tte_aggregate": (
        "(Tensor crop_logits, Tensor? labels) -> (Tensor logits, Tensor pred, Tensor correct, Tensor total)"
    ),
    "tte_mean_unit_features": "(Tensor crop_feats) -> Tensor",
}


# Ops with CPU kernels only (native namespace only): on GPUs PyTorch's own kernels are the
# fast path for them (flash / cuDNN SDPA; element-wise GELU fused by the GEMM epilogue or
# torch.compile), so they have neither CUDA nor Triton kernels.
CPU_ONLY_SCHEMAS: Dict[str, str] = {
    # Multi-head self-attention from the packed in-projection qkv ([B, N, 3D], or [N, B, 3D]
    # when not batch_first): out in qkv's layout ([B, N, D] / [N, B, D]) and the per-row
    # log-sum-exp of the scaled scores ([B, H, N], fp32; fp64 for fp64), all the backward keeps.
    "attention_fwd": "(Tensor qkv, int num_heads, float scale, bool batch_first) -> (Tensor out, Tensor lse)",
    "attention_bwd": (
        "(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale, "
        "bool batch_first) -> Tensor grad_qkv"
    ),
    # Whether the CPU attention kernel runs its bf16 micro-kernel (the AVX512-BF16 build is the
    # one chosen at run time); without it bf16 runs the fp32 fallback, slower than PyTorch's SDPA.
    "attention_bf16_kernel": "() -> bool",
    # Which CPU kernel builds run (csrc/cpu_dispatch.cpp): the capability chosen and the widest
    # this CPU supports (default, avx2, avx512, avx512_bf16, amx; "native" for a -march=native
    # build), why, an error for an invalid LIFTPLUS_FAST_CPU_CAPABILITY (else empty), and the
    # build of each kernel file as "file=capability,...".
    "cpu_capability": "() -> (str selected, str supported, str why, str error, str kernels)",
    # The same attention (bf16 or fp32 qkv) on PyTorch's batch-reduce GEMM micro-kernels
    # (cpublas::brgemm: oneDNN, AMX tiles where the CPU has them); kernels from torch 2.6 on.
    "attention_brgemm_fwd": "(Tensor qkv, int num_heads, float scale, bool batch_first) -> (Tensor out, Tensor lse)",
    "attention_brgemm_bwd": (
        "(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale, "
        "bool batch_first) -> Tensor grad_qkv"
    ),
    # The bf16 operand layout brgemm runs here: "vnni" (oneDNN micro-kernels), "plain" (a BLAS
    # GEMM), "" when the build has no brgemm.
    "attention_brgemm_layout": "() -> str",
    # y = gelu(x + bias) for the MLP (x: the bias-free GEMM output [..., F]); kind 0 =
    # QuickGELU u·sigmoid(1.702u), 1 = GELU (erf), 2 = GELU (tanh). The backward needs only x;
    # grad_bias is [F] when bias_grad, else [0] (a frozen bias: no column sums).
    "bias_gelu_fwd": "(Tensor x, Tensor bias, int kind) -> Tensor",
    "bias_gelu_bwd": (
        "(Tensor grad_y, Tensor x, Tensor bias, int kind, bool bias_grad=True) -> (Tensor grad_x, Tensor grad_bias)"
    ),
}

_NATIVE_LIB = None


def define_native() -> None:
    """Define every schema in the native namespace (once; before loading the extension)."""
    global _NATIVE_LIB
    if _NATIVE_LIB is None:
        lib = torch.library.Library(NATIVE, "DEF")
        for name, schema in {**SCHEMAS, **CPU_ONLY_SCHEMAS}.items():
            lib.define(name + schema)
        _NATIVE_LIB = lib


def op(namespace: str, name: str):
    """The ``torch.ops.<namespace>.<name>`` overload packet."""
    return getattr(getattr(torch.ops, namespace), name)


def register_autograd(namespace: str, name: str, make_backward: Callable, setup_context: Callable) -> None:
    """Register one op's autograd for ``namespace::name``.

    ``make_backward(namespace)`` returns the backward; it is built per namespace only so the
    backward calls the backward kernel of the same backend as the forward.
    """
    torch.library.register_autograd(f"{namespace}::{name}", make_backward(namespace), setup_context=setup_context)


def register_fakes(namespace: str, **fakes: Callable) -> None:
    """Register the fake (meta) kernel of each ``namespace::<name>`` given as ``name=fake``."""
    for name, fake in fakes.items():
        torch.library.register_fake(f"{namespace}::{name}")(fake)
