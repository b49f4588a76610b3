"""Pure-PyTorch reference implementations of the fused ops.

These functions are the fallback when the native extension is missing and the oracle every
kernel is tested against. They follow the structure of the published LIFT+ code (LayerNorm in
fp32, everything else in the input dtype, parameters cast to the input dtype as autocast
would) so that their numbers are the published numbers. Autograd comes from PyTorch.

The math of each op (forward, backward, saved tensors, precision, tolerances) is written out
in ``docs/ops.md``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "TTEResult",
    "adaptformer",
    "attention",
    "adaptformer_branch",
    "cosine_logits",
    "la_cosine_cross_entropy",
    "tte_aggregate",
    "tte_mean_unit_features",
]


def adaptformer_branch(a, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, eps: float = 1e-5):
    """The AdaptFormer bottleneck ``s * up(relu(down(LN(a))))`` in the dtype of ``a``."""
    dt = a.dtype
    # The published code's adapter LayerNorm always runs in fp32 and casts back.
    h = F.layer_norm(a.float(), (a.shape[-1],), ln_w.float(), ln_b.float(), eps).to(dt)
    z = F.linear(h, down_w.to(dt), down_b.to(dt))
    u = F.linear(F.relu(z), up_w.to(dt), up_b.to(dt))
    return u * scale.to(dt)


def adaptformer(a, mlp_out, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, eps: float = 1e-5):
    """``Y = A + (M + s * up(relu(down(LN(A)))))``, the block output with the AdaptFormer branch.

    ``a`` and ``mlp_out`` share shape ``[..., D]``; ``down_w`` is ``[r, D]``, ``up_w`` is
    ``[D, r]`` (PyTorch Linear layout); ``scale`` is a 0-dim tensor.
    """
    branch = adaptformer_branch(a, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, eps)
    # Same association as the published block: identity + (mlp + adapter).
    return a + (mlp_out + branch)


def split_heads(x, num_heads: int, batch_first: bool = True):
    """``[B, N, D]`` (or ``[N, B, D]``) -> ``[B, heads, N, D / heads]`` (a view)."""
    if not batch_first:
        x = x.transpose(0, 1)
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x, batch_first: bool = True):
    """``[B, heads, N, hd]`` -> ``[B, N, heads * hd]`` (or ``[N, B, ...]``)."""
    b, h, n, hd = x.shape
    if batch_first:
        return x.transpose(1, 2).reshape(b, n, h * hd)
    return x.permute(2, 0, 1, 3).reshape(n, b, h * hd)


def attention(qkv, num_heads: int, batch_first: bool = True, scale: Optional[float] = None):
    """Multi-head self-attention from the packed in-projection output ``qkv`` ``[B, N, 3D]``.

    Split into heads, PyTorch's ``scaled_dot_product_attention`` (flash / math kernels), merge:
    the structure of the published code's ``nn.MultiheadAttention`` recomputation. Returns
    ``[B, N, D]`` (``[N, B, D]`` for sequence-first input).
    """
    q, k, v = (split_heads(t, num_heads, batch_first) for t in qkv.chunk(3, dim=-1))
    return merge_heads(F.scaled_dot_product_attention(q, k, v, scale=scale), batch_first)


def cosine_logits(feat, weight, scale: float = 25.0):
    """Unadjusted cosine-classifier logits ``scale * normalize(feat) @ normalize(weight).T``."""
    return F.linear(scale * F.normalize(feat, dim=-1), F.normalize(weight.to(feat.dtype), dim=-1))


def la_cosine_cross_entropy(
    feat, weight, labels, log_prior, scale: float = 25.0, tau: float = 1.0, return_logits: bool = False
):
    """Mean logit-adjusted cross-entropy of a cosine classifier.

    ``loss = CE(scale * F̂ Ŵᵀ + tau * log_prior, labels)``. With ``return_logits`` the
    unadjusted cosine logits come back too (for training accuracy), detached.
    """
    logits = cosine_logits(feat, weight, scale)
    adjusted = logits.float() + tau * log_prior.float().unsqueeze(0)
    loss = F.cross_entropy(adjusted, labels)
    if return_logits:
        return loss, logits.detach()
    return loss


class TTEResult(NamedTuple):
    """Output of :func:`tte_aggregate`: mean logits, predictions and per-class hit counts.

    ``correct`` and ``total`` are ``int64`` tensors of length K, or ``None`` without labels.
    """

    logits: torch.Tensor
    pred: torch.Tensor
    correct: Optional[torch.Tensor]
    total: Optional[torch.Tensor]


def per_class_hits(pred, labels, num_classes: int):
    """Per-class correct and total counts for predictions ``pred`` against ``labels``."""
    total = torch.bincount(labels, minlength=num_classes)
    correct = torch.bincount(labels[pred == labels], minlength=num_classes)
    return correct, total


def tte_aggregate(crop_logits, labels=None) -> TTEResult:
    """Average ``[C, B, K]`` crop logits over crops, take the argmax and count hits per class."""
    mean = crop_logits.float().mean(dim=0).to(crop_logits.dtype)
    pred = mean.argmax(dim=-1)
    if labels is None:
        return TTEResult(mean, pred, None, None)
    correct, total = per_class_hits(pred, labels, crop_logits.shape[-1])
    return TTEResult(mean, pred, correct, total)


def tte_mean_unit_features(crop_feats):
    """Mean over crops of the L2-normalised features ``[C, B, D] -> [B, D]``.

    A cosine classifier is linear in the normalised feature, so
    ``scale * mean_c(F̂_c) @ Ŵᵀ`` equals the mean of the crops' logits: one GEMM instead of C.
    """
    return F.normalize(crop_feats.float(), dim=-1).mean(dim=0).to(crop_feats.dtype)
