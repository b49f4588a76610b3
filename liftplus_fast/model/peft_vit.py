"""Block-level surgery on an open_clip ViT image encoder.

Each open_clip ``ResidualAttentionBlock`` is wrapped (not modified) by :class:`PEFTBlock`, which
recomputes the block from its own weights with the tuners of a :class:`BlockTuner` attached at
named sites. Attention is recomputed from ``in_proj_weight`` so LoRA/SSF/AFT can act between the
input projection and the attention; ``ops.attention`` reads the packed projection as it is (no
head split/merge copies). Backbone LayerNorms run in fp32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .tuners import BlockTuner, fp32_layer_norm

__all__ = ["PEFTBlock", "PEFTVisionTransformer"]


def _as(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _ln(ln: nn.Module, x):
    if not isinstance(ln, nn.LayerNorm):  # e.g. nn.Identity when a model has no ln_pre
        return ln(x)
    return fp32_layer_norm(x, ln.weight, ln.bias, ln.eps)


class PEFTBlock(nn.Module):
    """An open_clip ViT block run with the tuners of ``self.tuner`` attached."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for attr in ("ln_1", "attn", "ln_2", "mlp"):
            if not hasattr(block, attr):
                raise TypeError(f"expected an open_clip ResidualAttentionBlock; {type(block).__name__} "
                                f"has no {attr!r}")
        if not isinstance(block.attn, nn.MultiheadAttention):
            raise TypeError(f"expected nn.MultiheadAttention in the block; got {type(block.attn).__name__}")
        self.block = block
        self.tuner = BlockTuner()
        self.batch_first = bool(block.attn.batch_first)
        self.num_heads = block.attn.num_heads

    def _linear(self, site: str, x, weight, bias):
        t = self.tuner
        if t.has("aft") and site in t.aft:
            weight, bias = t.aft[site].weight_and_bias()
        # Frozen weights already have the model's compute dtype; trained ones (fft, bitfit,
        # aft) stay fp32 and are cast here, as autocast would.
        return F.linear(x, _as(weight, x.dtype), _as(bias, x.dtype))

    def _site_tuned(self, site: str) -> bool:
        t = self.tuner
        return (t.has("aft") and site in t.aft) or (t.has("ssf") and site in t.ssf)

    def _ssf(self, site: str, x):
        t = self.tuner
        if t.has("ssf") and site in t.ssf:
            return t.ssf[site](x)
        return x

    def _insert_prompt(self, x, raw_len: int):
        seq = 1 if self.batch_first else 0
        batch = 0 if self.batch_first else 1
        prompt = self.tuner.prompt.to(x.dtype).unsqueeze(batch)
        shape = list(x.shape)
        shape[seq] = prompt.shape[seq]
        prompt = prompt.expand(shape)
        cls_tok = x.narrow(seq, 0, 1)
        # The last raw_len-1 tokens are the patches; anything between CLS and them is the
        # previous block's prompt, which this block's prompt replaces (VPT-deep).
        patches = x.narrow(seq, x.shape[seq] - (raw_len - 1), raw_len - 1)
        return torch.cat([cls_tok, prompt, patches], dim=seq)

    def forward(self, x, raw_len: int):
        """Run the block on ``x`` (the block's layout); ``raw_len`` = tokens without prompts."""
        blk, t = self.block, self.tuner
        if t.has("prompt"):
            x = self._insert_prompt(x, raw_len)

        h = _ln(blk.ln_1, x)
        qkv = self._linear("attn_in", h, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        if t.has("lora") or (t.has("ssf") and "attn_in" in t.ssf):
            q, k, v = qkv.chunk(3, dim=-1)
            if t.has("lora"):
                q = q + t.lora["q"](h)
                v = v + t.lora["v"](h)
            qkv = self._ssf("attn_in", torch.cat([q, k, v], dim=-1))
        o = ops.attention(qkv, self.num_heads, self.batch_first)
        o = self._linear("attn_out", o, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
        o = self._ssf("attn_out", o)
        x = x + blk.ls_1(o) if hasattr(blk, "ls_1") else x + o

        h = _ln(blk.ln_2, x)
        kind = ops.linear_gelu_kind(blk.mlp.gelu)
        if kind is not None and blk.mlp.c_fc.bias is not None and not self._site_tuned("mlp_in"):
            # Fused bias + activation (the GEMM itself stays a library GEMM).
            m = ops.linear_gelu(h, _as(blk.mlp.c_fc.weight, h.dtype), blk.mlp.c_fc.bias, kind)
        else:
            m = self._linear("mlp_in", h, blk.mlp.c_fc.weight, blk.mlp.c_fc.bias)
            m = blk.mlp.gelu(self._ssf("mlp_in", m))
        m = self._linear("mlp_out", m, blk.mlp.c_proj.weight, blk.mlp.c_proj.bias)
        m = self._ssf("mlp_out", m)
        if hasattr(blk, "ls_2"):
            m = blk.ls_2(m)
        if t.has("adapter"):
            m = m + t.adapter(m)
        if t.has("adaptformer"):
            return t.adaptformer.block_output(x, m)
        return x + m


class PEFTVisionTransformer(nn.Module):
    """open_clip ``VisionTransformer`` up to the pre-projection CLS feature, with PEFT blocks."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise NotImplementedError(
                f"PEFT surgery supports open_clip ViT image encoders; got {type(visual).__name__} "
                "(ResNet CLIP backbones are not supported by liftplus_fast.model)")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok" \
                or getattr(visual, "final_ln_after_pool", False):
            raise NotImplementedError("only CLS-token pooling with ln_post before pooling (CLIP) is supported")
        self.visual = visual
        self.blocks = nn.ModuleList(PEFTBlock(b) for b in visual.transformer.resblocks)
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))

    @property
    def width(self) -> int:
        """Token width D (the pre-projection feature size)."""
        return self.visual.conv1.out_channels

    def forward(self, images):
        """Pre-projection CLS feature ``[B, D]`` (after ``ln_post``)."""
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls_tok = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls_tok, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        x = _ln(v.ln_pre, x)
        raw_len = x.shape[1]
        if not self.batch_first:
            x = x.transpose(0, 1)
        for blk in self.blocks:
            x = blk(x, raw_len)
        cls_out = x[:, 0] if self.batch_first else x[0]
        return _ln(v.ln_post, cls_out)
