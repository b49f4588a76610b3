"""Loading CLIP backbones through open_clip, by published config name or open_clip name.

Published LIFT+ configs name backbones ``clip_vit_b16`` etc.; they all mean OpenAI weights,
which need QuickGELU. ``tiny_vit`` is a tiny randomly initialised CLIP for tests and demos.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Optional, Tuple

from ..errors import BackboneLoadError, UserInputError
from ..files import atomic_write_json
from .timm_backbones import TIMM_BACKBONES, is_timm_name, load_timm, timm_input_config

__all__ = [
    "BackboneLoadError",
    "PUBLISHED_BACKBONES",
    "TINY_VIT",
    "load_backbone",
    "load_clip",
    "known_backbones",
    "check_resolution",
    "backbone_input_config",
]

# Published config name -> open_clip architecture. All are OpenAI CLIP models (QuickGELU).
PUBLISHED_BACKBONES = {
    "clip_vit_b16": "ViT-B-16",
    "clip_vit_b32": "ViT-B-32",
    "clip_vit_l14": "ViT-L-14",
    "clip_vit_l14@336px": "ViT-L-14-336",
    "clip_rn50": "RN50",
    "clip_rn101": "RN101",
}
# The published command line spells them "CLIP-ViT-B/16"; accept that too.
_PUBLISHED_ALIASES = {
    "clip-vit-b/16": "clip_vit_b16",
    "clip-vit-b/32": "clip_vit_b32",
    "clip-vit-l/14": "clip_vit_l14",
    "clip-vit-l/14@336px": "clip_vit_l14@336px",
    "clip-rn50": "clip_rn50",
    "clip-rn101": "clip_rn101",
}

TINY_VIT = "tiny_vit"
# No ln_pre: at random init ln_pre rescales the constant class embedding to the size of the
# patch tokens, so the CLS output barely depends on the image (mean cosine similarity 0.99
# between digits); without it the CLS token is mostly attention output and LIFT+ can learn.
_TINY_VIT_CFG = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 8, "no_ln_pre": True},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def _register_tiny_vit() -> None:
    import open_clip

    if TINY_VIT in open_clip.list_models():
        return
    # add_model_config reads JSON files from a folder; a private temp folder keeps the package
    # free of data files that would need packaging rules.
    folder = tempfile.mkdtemp(prefix="liftplus_fast_cfg_")
    atomic_write_json(os.path.join(folder, TINY_VIT + ".json"), _TINY_VIT_CFG)
    open_clip.add_model_config(folder)


def known_backbones() -> list:
    """The published config names plus ``tiny_vit`` (any open_clip or timm model name is also accepted)."""
    return list(PUBLISHED_BACKBONES) + list(TIMM_BACKBONES) + [TINY_VIT]


def _is_clip_name(backbone: str) -> bool:
    import open_clip

    _register_tiny_vit()
    key = _PUBLISHED_ALIASES.get(backbone.lower(), backbone)
    return key in PUBLISHED_BACKBONES or key in open_clip.list_models()


def load_backbone(backbone: str, pretrained: Optional[str] = None, device="cpu"):
    """Build a backbone of any supported family for :func:`~liftplus_fast.model.build_lift_model`.

    Args:
        backbone: a CLIP (what :func:`load_clip` takes: ``clip_vit_b16`` ... ``clip_rn50``,
            ``clip_rn101``, an open_clip name or source, ``tiny_vit``), a published ImageNet
            backbone (``in21k_vit_b16``, ``in21k_vit_b16@384px``, ``in21k_vit_l16``,
            ``in21k_vit_l16@384px``, ``in1k_rn50``, ``in1k_rn101``, ``in1k_rn152``; the
            published spellings ``IN21K-ViT-B/16`` too) or any timm model name
            (``vit_small_patch16_224``, ``resnet18``, ``name.tag``).
        pretrained: ``None`` for random initialisation, a local weights file, or a tag: an
            open_clip tag for a CLIP (``"openai"``), for timm ``"default"`` (what the published
            ``pretrained=True`` loads; ``"openai"`` means the same there) or a timm tag.
        device: where to put the model.

    Returns:
        ``(model, tokenizer)`` in eval mode and fp32; the tokenizer is ``None`` for timm
        backbones (no text encoder: their classifier starts from class means).

    Raises:
        UserInputError: unknown backbone name.
        BackboneLoadError: the weights could not be obtained or do not fit.
    """
    if _is_clip_name(backbone):
        return load_clip(backbone, pretrained, device=device)
    if is_timm_name(backbone):
        return load_timm(backbone, pretrained, device=device), None
    return load_clip(backbone, pretrained, device=device)  # raises the unknown-name error


def backbone_input_config(backbone: str) -> dict:
    """The input size (and, for timm, mean/std) a backbone was trained with, read from its
    config without building it, and for timm the ``class_mean`` classifier init (no text
    encoder, as the published timm presets); ``{}`` when unknown. Used for a backbone without a
    published preset, where the run does not set them."""
    import open_clip

    if _is_clip_name(backbone):
        name, _ = _resolve(backbone)
        size = (open_clip.get_model_config(name) or {}).get("vision_cfg", {}).get("image_size")
        if isinstance(size, (tuple, list)):
            size = size[0]
        return {"resolution": int(size)} if size else {}
    if is_timm_name(backbone):
        return {**timm_input_config(backbone), "classifier_init": "class_mean"}
    return {}


@contextlib.contextmanager
def _quiet_logging():
    # open_clip logs its own error (and hf_hub its trace) before raising; we raise one clear
    # sentence instead, so silence the duplicate noise while loading.
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


SCHEMAS = ("hf-hub:", "local-dir:")


def open_clip_schema_name(backbone: str) -> Optional[str]:
    """The open_clip name with a source schema for ``backbone``, or ``None``.

    ``hf-hub:org/name`` (an open_clip model on the Hugging Face Hub) and ``local-dir:/path`` pass
    through; a plain path to a folder holding ``open_clip_config.json`` (and the weights) becomes
    ``local-dir:/path``. With a schema the weights come from that source, not from ``pretrained``.
    """
    if backbone.startswith(SCHEMAS):
        if not backbone.split(":", 1)[1]:
            raise UserInputError(f"backbone {backbone!r} names no repository or folder after the schema")
        return backbone
    if os.path.isdir(backbone):
        if not os.path.isfile(os.path.join(backbone, "open_clip_config.json")):
            raise UserInputError(
                f"backbone folder {backbone!r} has no open_clip_config.json (an open_clip "
                "model folder holds it next to the weights)"
            )
        return "local-dir:" + backbone
    return None


def _resolve(backbone: str) -> Tuple[str, bool]:
    """open_clip architecture name and whether QuickGELU must be forced."""
    import open_clip

    _register_tiny_vit()
    key = _PUBLISHED_ALIASES.get(backbone.lower(), backbone)
    if key in PUBLISHED_BACKBONES:
        return PUBLISHED_BACKBONES[key], True
    schema_name = open_clip_schema_name(key)
    if schema_name is not None:
        return schema_name, False  # the source's config says whether it uses QuickGELU
    if key in open_clip.list_models():
        return key, False
    if key.replace("/", "-") in open_clip.list_models():  # "ViT-B/16", as OpenAI's clip names it
        return key.replace("/", "-"), False
    if is_timm_name(backbone):
        raise UserInputError(
            f"backbone {backbone!r} is a timm model, not a CLIP: build it with "
            f"lf.load_backbone({backbone!r}, pretrained), which builds every supported backbone"
        )
    raise UserInputError(
        f"unknown backbone {backbone!r}; known names: {', '.join(known_backbones())}, "
        f"or any open_clip model name (open_clip.list_models(), {len(open_clip.list_models())} names) "
        "or timm model name (timm.list_models(), built by load_backbone)"
    )


def load_clip(backbone: str, pretrained: Optional[str] = None, device="cpu"):
    """Build an open_clip CLIP model and its tokenizer.

    Args:
        backbone: a published config name (``clip_vit_b16``, ``clip_vit_b32``, ``clip_vit_l14``,
            ``clip_vit_l14@336px``, ``clip_rn50``, ``clip_rn101``; OpenAI weights, so QuickGELU
            is forced), any open_clip model name (``ViT-B-16``; ``ViT-B/16`` too), an open_clip
            model with its source (``hf-hub:org/name``, ``local-dir:/path`` or the path of a
            folder holding ``open_clip_config.json`` and the weights), or ``"tiny_vit"``.
        pretrained: an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``: the
            model/tag pairs of ``open_clip.list_pretrained()``), a path to a local checkpoint, or
            ``None`` for random initialisation. Not used when ``backbone`` names a source.
        device: where to put the model.

    Returns:
        ``(clip_model, tokenizer)``, the model in eval mode and fp32.

    Raises:
        UserInputError: unknown backbone name, or a timm backbone (``in21k_vit_b16``,
            ``in1k_rn50``, a timm model name), which the message sends to :func:`load_backbone`
            (a timm model has no tokenizer and is not a CLIP, so it is not built here).
        BackboneLoadError: the weights could not be downloaded or the file does not exist.
    """
    import open_clip

    name, quick_gelu = _resolve(backbone)
    path = None
    schema = name.startswith(SCHEMAS)
    if schema and pretrained is not None:
        logging.getLogger("liftplus_fast").info(
            "backbone %s brings its own weights; pretrained=%r is not used", name, pretrained
        )
    elif pretrained is not None:
        tag_cfg = open_clip.pretrained.get_pretrained_cfg(name, pretrained)
        if tag_cfg:
            quick_gelu = quick_gelu or bool(tag_cfg.get("quick_gelu", False))
            try:
                with _quiet_logging():
                    path = open_clip.pretrained.download_pretrained(tag_cfg)
            except Exception as exc:  # any transport/hub failure means the same to the user
                raise BackboneLoadError(
                    f"Could not download the {pretrained!r} weights of {name} ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else 'no details'}); download the "
                    f"checkpoint elsewhere and pass its local path: --pretrained /path/to/{name}.pt on "
                    f"the command line, pretrained='/path/to/{name}.pt' in Python."
                ) from None
            if not path:
                raise BackboneLoadError(
                    f"Could not download the {pretrained!r} weights of {name}; download the "
                    f"checkpoint elsewhere and pass its local path (--pretrained PATH on the command "
                    f"line, pretrained=PATH in Python)."
                )
        elif os.path.isfile(pretrained):
            path = pretrained
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise BackboneLoadError(
                f"pretrained={pretrained!r} is neither an existing file nor a known open_clip tag "
                f"for {name} (tags: {', '.join(tags) if tags else 'none'})."
            )
    try:
        with _quiet_logging():
            model = open_clip.create_model(name, pretrained=path, force_quick_gelu=quick_gelu, device=device)
    except Exception as exc:  # a corrupt or mismatched file: one sentence, not a hub traceback
        if schema:
            raise BackboneLoadError(
                f"Could not load backbone {name!r} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no details'}). Without network, download "
                "the model folder (open_clip_config.json and weights) elsewhere and pass its local "
                "path as the backbone."
            ) from None
        if path is None:
            raise
        raise BackboneLoadError(
            f"Could not load the weights file {path!r} into {name}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    return model, tokenizer


def check_resolution(clip_model, resolution: int, backbone: str) -> None:
    """``ValueError`` naming ``resolution`` when the ViT's positional embedding is for another size.

    A mismatch would otherwise surface as a tensor-size error deep inside the first forward.
    """
    visual = getattr(clip_model, "visual", clip_model)
    size = getattr(visual, "image_size", None)
    if size is None and hasattr(visual, "patch_embed"):  # timm ViT
        size = getattr(visual.patch_embed, "img_size", None)
        if getattr(visual, "dynamic_img_size", False):
            return
    if size is None:
        return
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if (h, w) != (resolution, resolution):
        raise UserInputError(
            f"resolution={resolution} but backbone {backbone!r} takes {h}x{w} images; set resolution {h}"
        )
