"""Non-CLIP backbones through timm: the published ImageNet-21k ViTs and ImageNet-1k ResNets.

The published configs ``in21k_vit_b16`` (``@384px``), ``in21k_vit_l16`` (``@384px``) and
``in1k_rn50/101/152`` call timm's ``vit_base_patch16_224`` ... ``resnet152`` with
``pretrained=True``; the same timm functions are used here. Any other timm model name passes
through as well. They have no text encoder, so the classifier starts from class means.
"""

from __future__ import annotations

import os
from typing import Optional

from ..errors import BackboneLoadError, UserInputError

__all__ = ["TIMM_BACKBONES", "is_timm_name", "load_timm", "timm_input_config"]

# Published config name -> timm model name (the function the published trainer calls).
TIMM_BACKBONES = {
    "in21k_vit_b16": "vit_base_patch16_224",
    "in21k_vit_b16@384px": "vit_base_patch16_384",
    "in21k_vit_l16": "vit_large_patch16_224",
    "in21k_vit_l16@384px": "vit_large_patch16_384",
    "in1k_rn50": "resnet50",
    "in1k_rn101": "resnet101",
    "in1k_rn152": "resnet152",
}
# The published yaml files spell them "IN21K-ViT-B/16", "IN1K-RN50", ...
TIMM_ALIASES = {
    "in21k-vit-b/16": "in21k_vit_b16",
    "in21k-vit-b/16@384px": "in21k_vit_b16@384px",
    "in21k-vit-l/16": "in21k_vit_l16",
    "in21k-vit-l/16@384px": "in21k_vit_l16@384px",
    "in1k-rn50": "in1k_rn50",
    "in1k-rn101": "in1k_rn101",
    "in1k-rn152": "in1k_rn152",
}
# Tags meaning "what pretrained=True gives" (the published call).
_DEFAULT_TAGS = ("default", "true", "timm", "openai")


def timm_model_name(backbone: str) -> Optional[str]:
    """The timm model name of a published name or a plain timm name, else ``None``."""
    import timm

    key = TIMM_ALIASES.get(backbone.lower(), backbone)
    if key in TIMM_BACKBONES:
        return TIMM_BACKBONES[key]
    arch = backbone.split(".", 1)[0]
    if arch in timm.list_models():
        return backbone
    return None


def is_timm_name(backbone: str) -> bool:
    """Whether ``backbone`` resolves to a timm model (published in21k/in1k name or timm name)."""
    return timm_model_name(backbone) is not None


def timm_input_config(backbone: str) -> dict:
    """``{"resolution", "mean", "std"}`` of a timm backbone from its pretrained config (no weights)."""
    import timm

    name = timm_model_name(backbone)
    if name is None:
        raise UserInputError(f"{backbone!r} is not a timm backbone")
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return {}
    return {"resolution": int(cfg.input_size[-1]), "mean": tuple(cfg.mean), "std": tuple(cfg.std)}


def load_timm(backbone: str, pretrained: Optional[str] = None, device="cpu", **model_kwargs):
    """Build a timm backbone (eval mode, fp32).

    Args:
        backbone: a published name (``in21k_vit_b16``, ``in1k_rn50``, ...) or a timm model name.
        pretrained: ``None`` (random init), a local weights file (``.safetensors``, ``.pth``,
            ``.bin``: a timm state dict), ``"default"`` (timm's default pretrained weights, what
            the published ``pretrained=True`` loads; ``"openai"`` reads the same for timm
            backbones), or another timm pretrained tag.
        device: where to put the model.
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``depth=2`` for a small test model).

    Raises:
        ValueError: the name is not a timm model.
        BackboneLoadError: the weights could not be downloaded or read.
    """
    import timm
    import torch

    name = timm_model_name(backbone)
    if name is None:
        raise UserInputError(f"unknown timm backbone {backbone!r}")
    model_kwargs.setdefault("num_classes", 0)  # the head is never used (published: features only)
    if pretrained is None or os.path.isfile(str(pretrained)):
        model = timm.create_model(name, pretrained=False, **model_kwargs)
        if pretrained is not None:
            try:
                if str(pretrained).endswith(".safetensors"):
                    from safetensors.torch import load_file

                    sd = load_file(pretrained)
                else:
                    sd = torch.load(pretrained, map_location="cpu", weights_only=True)
                sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
                sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc."))}
                missing, unexpected = model.load_state_dict(sd, strict=False)
            except Exception as exc:  # a foreign or corrupt file: one sentence
                raise BackboneLoadError(
                    f"Could not load the weights file {pretrained!r} into {name}: {type(exc).__name__}: {exc}"
                ) from None
            missing = [k for k in missing if not k.startswith(("head.", "fc."))]
            if missing or unexpected:
                raise BackboneLoadError(
                    f"weights file {pretrained!r} does not fit {name}: missing keys {missing[:8]}, "
                    f"unexpected keys {list(unexpected)[:8]}"
                )
    else:
        tag = str(pretrained)
        full = name if tag.lower() in _DEFAULT_TAGS else f"{name.split('.', 1)[0]}.{tag}"
        try:
            model = timm.create_model(full, pretrained=True, **model_kwargs)
        except Exception as exc:  # no network, unknown tag, hub failure
            raise BackboneLoadError(
                f"Could not obtain the pretrained weights of {full} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no details'}); download them elsewhere "
                f"and pass the local file, e.g. --pretrained /path/to/{name}.safetensors"
            ) from None
    return model.to(device).eval()
