"""Image encoders of every supported backbone, with the tuners of the published code attached.

:func:`build_image_encoder` wraps the image tower of an open_clip CLIP (ViT or ResNet), a timm
``VisionTransformer`` or a timm ``ResNet``. Every encoder maps images to the feature the
published code classifies (ViT: CLS token after the last norm, before any projection; CLIP
ResNet: the attention-pool output; timm ResNet: the pooled 2048-d feature) and has

* ``width``: that feature's size;
* ``install(v, num_classes)``: attach the tuners enabled in ``v`` (a ``TunerConfig``);
* ``tuner``: the module of trained tensors, laid out as the published ``image_encoder`` tuner;
* ``family`` and ``blocks``: what a tuner's tensors are laid out for (:func:`describe_encoder`).

ViT blocks of both libraries run through :class:`~liftplus_fast.model.peft_vit.PEFTBlock`; a timm
block is seen through :class:`TimmBlockView`, which names its tensors as open_clip does.
ResNets take the tuners the published ``PEFT_RN`` has: full fine-tuning, BitFit, BatchNorm
tuning and SSF after the global pool; their ``*_layers`` options are ignored, as there.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List

import torch
import torch.nn as nn

from ..errors import UserInputError
from ..ops import gemm
from .peft_vit import PEFTBlock, PEFTVisionTransformer, _ln
from .tuners import SSF, BlockTuner, install_tuners

__all__ = [
    "ResNetEncoder",
    "TimmBlockView",
    "TimmViTEncoder",
    "build_image_encoder",
    "describe_encoder",
    "image_tower",
]


def image_tower(backbone: nn.Module) -> nn.Module:
    """The image model of a backbone: ``clip.visual`` for CLIP, the model itself for timm."""
    return backbone.visual if hasattr(backbone, "visual") else backbone


class _BlockTunerTree(nn.Module):
    """``blocks[i]`` = the i-th block's :class:`BlockTuner` (published ``image_encoder`` layout)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(b.tuner for b in blocks)


class _ViTTuning:
    """What a ViT encoder with PEFT blocks shares: installing tuners and the tuner tree."""

    def install(self, v, num_classes: int) -> List[str]:
        """Attach the tuners enabled in ``v`` to the blocks; a description of each."""
        done = install_tuners(self.blocks, v, num_classes)
        if getattr(v, "unfreeze_bn", False):
            raise UserInputError("v.unfreeze_bn needs a ResNet backbone (a ViT has no BatchNorm)")
        self.tuner = _BlockTunerTree(self.blocks)
        return done


class CLIPViTEncoder(_ViTTuning, PEFTVisionTransformer):
    """open_clip ViT image tower (see :class:`PEFTVisionTransformer`)."""

    family = "CLIP ViT"


class _AttnView(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.in_proj_weight = attn.qkv.weight
        self.in_proj_bias = attn.qkv.bias
        self.out_proj = attn.proj
        self.num_heads = attn.num_heads
        self.batch_first = True


class _MlpView(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = mlp.fc1, mlp.act, mlp.fc2


class TimmBlockView(nn.Module):
    """A timm ViT ``Block`` under open_clip's names (``ln_1``, ``attn.in_proj_weight``,
    ``mlp.c_fc`` ...), sharing its parameters, so :class:`PEFTBlock` runs it unchanged."""

    def __init__(self, block: nn.Module):
        super().__init__()
        attn, mlp = block.attn, block.mlp
        if not hasattr(attn, "qkv") or attn.qkv.bias is None and getattr(attn, "q_bias", None) is not None:
            raise NotImplementedError(f"timm block attention {type(attn).__name__} has no fused qkv Linear")
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
                raise NotImplementedError(f"timm attention with {name} is not supported")
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity) or not hasattr(mlp, "fc1"):
            raise NotImplementedError(f"timm MLP {type(mlp).__name__} is not a plain fc1-act-fc2 MLP")
        self.ln_1, self.ln_2 = block.norm1, block.norm2
        self.attn = _AttnView(attn)
        self.mlp = _MlpView(mlp)
        self.ls_1, self.ls_2 = block.ls1, block.ls2


class TimmViTEncoder(_ViTTuning, nn.Module):
    """timm ``VisionTransformer`` up to the pre-logits feature (CLS token after ``norm``)."""

    family = "timm ViT"

    def __init__(self, vit: nn.Module):
        super().__init__()
        if getattr(vit, "num_prefix_tokens", 1) != 1 or getattr(vit, "cls_token", None) is None:
            raise NotImplementedError(
                "timm ViTs with a single class token are supported (no register tokens, no class-token-free models)"
            )
        self.visual = vit
        self.blocks = nn.ModuleList(PEFTBlock(TimmBlockView(b)) for b in vit.blocks)
        self.batch_first = True
        self.compute_dtype = None  # as PEFTVisionTransformer.compute_dtype

    @property
    def width(self) -> int:
        """Token width D."""
        return int(self.visual.num_features)

    def forward(self, images):
        """Pre-logits feature ``[B, D]``: the model's own pooling after its final norm (fp32)."""
        v = self.visual
        dtype = self.compute_dtype or v.patch_embed.proj.weight.dtype
        x = gemm.first_layer(v.patch_embed, images, dtype, v.patch_embed.proj.weight.dtype)
        x = v.norm_pre(v.patch_drop(v._pos_embed(x)))
        raw_len = x.shape[1]
        for blk in self.blocks:
            x = blk(x, raw_len)
        return v.forward_head(_ln(v.norm, x), pre_logits=True)


def _resnet_parts(visual: nn.Module):
    layers = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
    if hasattr(visual, "attnpool"):  # open_clip ModifiedResNet
        return "CLIP ResNet", visual.stem, layers, visual.attnpool, int(visual.output_dim)
    if hasattr(visual, "global_pool") and hasattr(visual, "conv1"):  # timm ResNet
        stem = nn.Sequential(OrderedDict(conv1=visual.conv1, bn1=visual.bn1, act1=visual.act1, maxpool=visual.maxpool))
        return "timm ResNet", stem, layers, visual.global_pool, int(visual.num_features)
    raise NotImplementedError(f"unsupported ResNet image tower {type(visual).__name__}")


class ResNetEncoder(nn.Module):
    """CLIP ModifiedResNet (feature: attention-pool output) or timm ResNet (pooled feature)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.family, self.stem, layers, self.global_pool, self._width = _resnet_parts(visual)
        # One flat sequence of bottlenecks, as the published PEFT_RN: its indices name the
        # trained tensors ("0_conv1_weight" is layer1[0].conv1.weight).
        self.blocks = nn.Sequential(*[b for layer in layers for b in layer])
        self.tuner = nn.Module()
        self.tuner.blocks = BlockTuner()

    @property
    def width(self) -> int:
        """Feature size (CLIP: the embedding size; timm: ``num_features``)."""
        return self._width

    def install(self, v, num_classes: int) -> List[str]:
        """Attach ``v.fft`` / ``v.bitfit`` / ``v.unfreeze_bn`` / ``v.ssf``; other tuners raise."""
        unsupported = [n for n in ("pt", "lora", "adapter", "adaptformer", "aft") if getattr(v, n)]
        if unsupported:
            raise UserInputError(
                f"v.{unsupported[0]} needs a ViT backbone; a ResNet takes v.fft, v.bitfit, v.unfreeze_bn and v.ssf"
            )
        store, done = self.tuner.blocks, []
        if v.fft:
            for name, p in self.blocks.named_parameters():
                store.register_parameter(name.replace(".", "_"), p)
            done.append("full fine-tuning of the ResNet blocks")
        if v.bitfit:
            for name, p in self.blocks.named_parameters():
                key = name.replace(".", "_")
                if name.endswith("bias") and not store.has(key):
                    store.register_parameter(key, p)
            done.append("BitFit on the ResNet blocks")
        if v.unfreeze_bn:
            for name, m in self.blocks.named_modules():
                if isinstance(m, nn.BatchNorm2d):
                    key = name.replace(".", "_")
                    for pname in ("weight", "bias"):  # already a tuner tensor under fft/bitfit
                        store._parameters.pop(f"{key}_{pname}", None)
                    store.add_module(key, m)
            done.append("BatchNorm tuning of the ResNet blocks")
        if v.ssf:
            self.tuner.ssf = SSF(self.width)
            done.append("SSF after the global pool")
        return done

    def forward(self, images):
        """The pooled feature ``[B, width]`` (SSF applied when installed)."""
        x = images.to(self.visual.conv1.weight.dtype)
        x = self.global_pool(self.blocks(self.stem(x)))
        if hasattr(self.tuner, "ssf"):
            x = self.tuner.ssf(x)
        return x


def build_image_encoder(backbone: nn.Module) -> nn.Module:
    """The PEFT image encoder for an open_clip CLIP or a timm ViT / ResNet (used in place)."""
    visual = image_tower(backbone)
    if hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        return CLIPViTEncoder(visual)
    if hasattr(visual, "blocks") and hasattr(visual, "patch_embed"):
        return TimmViTEncoder(visual)
    if hasattr(visual, "layer4"):
        return ResNetEncoder(visual)
    raise NotImplementedError(
        f"unsupported image tower {type(visual).__name__}: expected an open_clip "
        "ViT or ModifiedResNet, or a timm VisionTransformer or ResNet"
    )


def describe_encoder(encoder: nn.Module) -> dict:
    """``{"image_encoder": family, "feature_dim": width, "blocks": count}``: what a tuner of this
    encoder is laid out for (its tensors are indexed by block and sized by the feature width).
    A ResNet's blocks are its bottlenecks, counted as the published ``PEFT_RN`` flattens them."""
    return {"image_encoder": encoder.family, "feature_dim": int(encoder.width), "blocks": len(encoder.blocks)}


def feature_device(backbone: nn.Module) -> torch.device:
    """The device of the backbone's first parameter."""
    return next(backbone.parameters()).device
