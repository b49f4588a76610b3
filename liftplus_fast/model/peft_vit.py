"""Block-level surgery on an open_clip ViT image encoder.

Each open_clip ``ResidualAttentionBlock`` is wrapped (not modified) by :class:`PEFTBlock`, which
recomputes the block from its own weights and calls the tuners attached at its named sites.
Attention is recomputed from ``in_proj_weight`` so LoRA/SSF/AFT can act between the input
projection and the attention; ``ops.attention`` reads the packed projection as it is (no head
split/merge copies). Backbone LayerNorms run in fp32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops import gemm
from ..ops.reference import merge_heads, split_heads
from .tuners import BlockTuner, fp32_layer_norm

__all__ = ["PEFTBlock", "PEFTVisionTransformer"]


def _ln(ln: nn.Module, x):
    if not isinstance(ln, nn.LayerNorm):  # e.g. nn.Identity when a model has no ln_pre
        return ln(x)
    return fp32_layer_norm(x, ln.weight, ln.bias, ln.eps)


def _first_query_attention(qkv, num_heads: int, batch_first: bool):
    """Self-attention output of the first token only, from the packed ``qkv`` of all tokens."""
    q, k, v = (split_heads(t, num_heads, batch_first) for t in qkv.chunk(3, dim=-1))
    out_dtype = q.dtype
    if gemm.runs_in_fp32(q):  # as ops.attention does without half GEMMs
        q, k, v = q.float(), k.float(), v.float()
    o = F.scaled_dot_product_attention(q[:, :, :1], k, v)
    return merge_heads(o, batch_first).to(out_dtype)


class PEFTBlock(nn.Module):
    """An open_clip ViT block run with tuners attached at its named sites.

    Sites (see :mod:`liftplus_fast.model.tuners` for the hook each one calls): ``tokens`` (block
    input), ``attn_in`` / ``attn_out`` / ``mlp_in`` / ``mlp_out`` (the four projections), ``mlp``
    (the MLP branch before the residual) and ``residual`` (the block output). The trained tensors
    live in ``self.tuner`` (a :class:`BlockTuner`, the checkpoint layout); :meth:`attach` only says
    where they act.
    """

    SITES = ("tokens", "attn_in", "attn_out", "mlp_in", "mlp_out", "mlp", "residual")
    _HOOKS = {
        "tokens": ("tune_tokens",),
        "attn_in": ("tune_weight", "tune_output"),
        "attn_out": ("tune_weight", "tune_output"),
        "mlp_in": ("tune_weight", "tune_output"),
        "mlp_out": ("tune_weight", "tune_output"),
        "mlp": ("tune_output",),
        "residual": ("tune_residual",),
    }

    def __init__(self, block: nn.Module):
        super().__init__()
        for attr in ("ln_1", "attn", "ln_2", "mlp"):
            if not hasattr(block, attr):
                raise TypeError(f"expected an open_clip ResidualAttentionBlock; {type(block).__name__} has no {attr!r}")
        # nn.MultiheadAttention, or a view with its tensor names (a timm block, see encoders.py)
        if not all(hasattr(block.attn, a) for a in ("in_proj_weight", "out_proj", "num_heads")):
            raise TypeError(f"expected nn.MultiheadAttention in the block; got {type(block.attn).__name__}")
        self.block = block
        self.tuner = BlockTuner()
        self.batch_first = bool(block.attn.batch_first)
        self.num_heads = block.attn.num_heads
        self.is_causal = False  # True for the text encoder's blocks (causal self-attention)
        # (site, hook name) -> bound hooks, in attach order. A plain dict, not submodules: the
        # modules are already owned (and saved) by self.tuner.
        self._hooks = {(site, hook): [] for site, hooks in self._HOOKS.items() for hook in hooks}

    def attach(self, site: str, tuner) -> None:
        """Make ``tuner`` act at ``site`` through the hook methods it defines for that site."""
        if site not in self._HOOKS:
            raise ValueError(f"site must be one of {', '.join(self.SITES)}; got {site!r}")
        found = [hook for hook in self._HOOKS[site] if hasattr(tuner, hook)]
        if not found:
            raise TypeError(f"{type(tuner).__name__} defines none of {self._HOOKS[site]} for site {site!r}")
        if site == "residual" and self._hooks[(site, "tune_residual")]:
            raise ValueError("site 'residual' already has a tuner; the block output has one owner")
        for hook in found:
            self._hooks[(site, hook)].append(getattr(tuner, hook))

    def attached(self, site: str) -> bool:
        """Whether any tuner acts at ``site``."""
        return any(self._hooks[(site, hook)] for hook in self._HOOKS[site])

    def _linear(self, site: str, x, weight, bias):
        for tune in self._hooks[(site, "tune_weight")]:
            weight, bias = tune(x, weight, bias)
        # Frozen weights already hold the model's compute dtype; trained ones (fft, bitfit, aft)
        # stay fp32 and are rounded here, as autocast would.
        y = gemm.linear(x, weight, bias)
        return self._output(site, x, y)

    def _output(self, site: str, x, y):
        for tune in self._hooks[(site, "tune_output")]:
            y = tune(x, y)
        return y

    def forward(self, x, raw_len: int, first_only: bool = False):
        """Run the block on ``x`` (the block's layout); ``raw_len`` = tokens without prompts.

        ``first_only``: return only the first token's output (``[B, 1, D]`` / ``[1, B, D]``).
        Keys and values still come from every token, but the attention query, the output
        projection and the MLP run for that token alone: the same numbers for it, and for the
        last block of a CLS-pooled ViT three quarters of its GEMMs saved.
        """
        blk = self.block
        for tune in self._hooks[("tokens", "tune_tokens")]:
            x = tune(x, raw_len, self.batch_first)

        h = _ln(blk.ln_1, x)
        qkv = self._linear("attn_in", h, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        if first_only:
            o = _first_query_attention(qkv, self.num_heads, self.batch_first)
            x = x.narrow(1 if self.batch_first else 0, 0, 1)
        elif self.is_causal:  # text-encoder blocks: causal attention (the fused op serves image blocks)
            qkv_bf = qkv if self.batch_first else qkv.transpose(0, 1)
            b, n, d3 = qkv_bf.shape
            q, k, v = (z.reshape(b, n, self.num_heads, -1).transpose(1, 2) for z in qkv_bf.chunk(3, dim=-1))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d3 // 3)
            o = o if self.batch_first else o.transpose(0, 1)
        else:
            o = ops.attention(qkv, self.num_heads, self.batch_first)
        o = self._linear("attn_out", o, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
        x = x + blk.ls_1(o) if hasattr(blk, "ls_1") else x + o

        h = _ln(blk.ln_2, x)
        kind = ops.linear_gelu_kind(blk.mlp.gelu)
        if kind is not None and blk.mlp.c_fc.bias is not None and not self.attached("mlp_in"):
            # Fused bias + activation (the GEMM itself stays a library GEMM).
            m = ops.linear_gelu(h, blk.mlp.c_fc.weight, blk.mlp.c_fc.bias, kind)
        else:
            m = blk.mlp.gelu(self._linear("mlp_in", h, blk.mlp.c_fc.weight, blk.mlp.c_fc.bias))
        m = self._linear("mlp_out", m, blk.mlp.c_proj.weight, blk.mlp.c_proj.bias)
        if hasattr(blk, "ls_2"):
            m = blk.ls_2(m)
        m = self._output("mlp", h, m)
        residual = self._hooks[("residual", "tune_residual")]
        return residual[0](x, m) if residual else x + m


class PEFTVisionTransformer(nn.Module):
    """open_clip ``VisionTransformer`` up to the pre-projection CLS feature, with PEFT blocks."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise NotImplementedError(
                f"PEFT surgery supports open_clip ViT image encoders; got {type(visual).__name__} "
                "(ResNet towers go through liftplus_fast.model.encoders.ResNetEncoder)"
            )
        if (
            getattr(visual, "attn_pool", None) is not None
            or getattr(visual, "pool_type", "tok") != "tok"
            or getattr(visual, "final_ln_after_pool", False)
        ):
            raise NotImplementedError("only CLS-token pooling with ln_post before pooling (CLIP) is supported")
        self.visual = visual
        self.blocks = nn.ModuleList(PEFTBlock(b) for b in visual.transformer.resblocks)
        # The activations' dtype where frozen weights are stored as rounded fp32 (set by the
        # model's precision, see ops.gemm); None: the patch embedding's weight dtype.
        self.compute_dtype = None
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))

    @property
    def width(self) -> int:
        """Token width D (the pre-projection feature size)."""
        return self.visual.conv1.out_channels

    def forward(self, images):
        """Pre-projection CLS feature ``[B, D]`` (after ``ln_post``)."""
        v = self.visual
        dtype = self.compute_dtype or v.conv1.weight.dtype
        x = gemm.first_layer(v.conv1, images, dtype, v.conv1.weight.dtype)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls_tok = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls_tok, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        x = _ln(v.ln_pre, x)
        raw_len = x.shape[1]
        if not self.batch_first:
            x = x.transpose(0, 1)
        # Only the CLS token of the last block's output is read: its block runs for it alone,
        # except where every op is asked to run its reference (the oracle keeps the published
        # computation, all tokens through every block).
        last = len(self.blocks) - 1 if ops.requested_backend() != "reference" else -1
        for i, blk in enumerate(self.blocks):
            x = blk(x, raw_len, first_only=i == last)
        cls_out = x[:, 0] if self.batch_first else x[0]
        return _ln(v.ln_post, cls_out)
