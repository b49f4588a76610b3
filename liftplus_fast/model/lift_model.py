"""The LIFT+ model: a frozen open_clip CLIP with PEFT tuners, a classifier and a loss."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import LiftConfig
from ..errors import UserInputError
from ..ops.gemm import stores_rounded_fp32
from .backbones import load_backbone
from .classifiers import CosineClassifier, build_classifier
from .encoders import ResNetEncoder, build_image_encoder, describe_encoder, feature_device, image_tower
from .inits import class_mean_weights, linear_probing_weights, semantic_weights
from .losses import build_loss, check_cls_num_list, log_prior
from .official_ckpt import export_official, import_official
from .precision import compute_dtype, convert_frozen, needs_grad_scaler
from .text_head import TextHead
from .tuner_files import (
    CONFIG_NAME,
    TENSORS_NAME,
    format_trainable_parameters,
    read_tuner,
    save_tuner,
    trainable_parameters,
)
from .tuners import TUNERS

__all__ = ["LiftModel", "TunerRoot", "build_lift_model", "load_tuner"]


class TunerRoot(nn.Module):
    """Everything that is trained, laid out like the published ``PEFT_Model.tuner``:
    ``image_encoder.blocks[i].<tuner>`` and ``classifier``."""

    def __init__(self, image_encoder_tuner: nn.Module, classifier: Optional[nn.Module], extras: Optional[dict] = None):
        super().__init__()
        self.image_encoder = image_encoder_tuner
        for name, item in (extras or {}).items():  # CLIP-side tuners (text_encoder, image_proj, ...)
            if isinstance(item, nn.Parameter):
                self.register_parameter(name, item)
            else:
                self.add_module(name, item)
        if classifier is not None:
            self.classifier = classifier


class LiftModel(nn.Module):
    """Frozen CLIP image encoder + PEFT tuners + classifier (or CLIP zero-shot text head).

    Build it with :func:`build_lift_model`. ``tuner`` holds exactly the trained parameters
    (all with ``requires_grad=True``); every other backbone parameter is frozen. The CLIP model
    passed in is used in place (not copied): its parameters' ``requires_grad`` flags change,
    and with ``cfg.prec_train`` other than ``fp32`` its image encoder's frozen weights are
    stored in the compute dtype (``compute_dtype``; LayerNorms stay fp32, see
    :mod:`liftplus_fast.model.precision`), so forward and ``training_loss`` run in that
    precision with no autocast around them.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        cfg: LiftConfig,
        cls_num_list: Sequence[int],
        classnames: Sequence[str],
        tokenizer=None,
        init_classifier: bool = True,
    ):
        super().__init__()
        num_classes = cfg.num_classes if cfg.num_classes is not None else len(cls_num_list)
        if len(cls_num_list) != num_classes:
            raise ValueError(f"cls_num_list has {len(cls_num_list)} entries but num_classes is {num_classes}")
        if classnames is not None and len(classnames) != num_classes:
            raise ValueError(f"classnames has {len(classnames)} entries but num_classes is {num_classes}")
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.classnames = list(classnames) if classnames is not None else None
        self.clip = clip_model
        for p in clip_model.parameters():
            p.requires_grad_(False)

        self.image_encoder = build_image_encoder(clip_model)
        self.feature_dim = self.image_encoder.width
        self.tuner_summary = self.image_encoder.install(cfg.v, self.num_classes)
        self.has_text = _has_text_tower(clip_model)

        use_classifier = cfg.classifier is not None and not cfg.zero_shot
        classifier = None
        if use_classifier:
            classifier = build_classifier(cfg.classifier, self.feature_dim, self.num_classes, cfg.classifier_scale)
        device = feature_device(clip_model)
        if not self.has_text and (not use_classifier or (cfg.classifier_init == "semantic" and not cfg.test_only)):
            what = "the zero-shot (text) head" if not use_classifier else "classifier_init='semantic'"
            raise UserInputError(
                f"{what} needs a CLIP text encoder; backbone {cfg.backbone!r} has none "
                "(use classifier_init class_mean, the published default for non-CLIP backbones)"
            )
        clip_side = bool(cfg.coop or cfg.proj_tuning or cfg.clip_adapter) or any(
            getattr(cfg.l, name) for name in TUNERS
        )
        if use_classifier and clip_side:
            raise UserInputError(
                "coop, proj_tuning, clip_adapter and the l.* text-encoder tuners train the "
                "CLIP text head; set classifier None (as -m coop / -m zs do)"
            )
        self.text_head = None
        if not use_classifier:
            if self.classnames is None:
                raise ValueError("the zero-shot (text) head needs classnames")
            self.text_head = TextHead(clip_model, cfg, self.classnames, tokenizer)
        extras = dict(self.text_head.trained) if self.text_head is not None and not cfg.zero_shot else {}
        self.tuner = TunerRoot(self.image_encoder.tuner, classifier, extras)
        for p in self.tuner.parameters():
            p.requires_grad_(True)

        self.loss_fn = build_loss(cfg, cls_num_list)
        counts = check_cls_num_list(cls_num_list, self.num_classes, need_positive=False)
        self.register_buffer("cls_num", counts, persistent=False)
        lp = log_prior(cls_num_list) if bool((counts > 0).all()) else torch.zeros_like(counts)
        self.register_buffer("log_prior", lp, persistent=False)

        if use_classifier:
            if cfg.classifier_init == "semantic" and init_classifier:
                if self.classnames is None:
                    raise ValueError("classifier_init='semantic' needs classnames")
                with torch.no_grad():
                    self.tuner.classifier.weight.copy_(semantic_weights(clip_model, self.classnames, tokenizer))
        self.to(device)
        self.precision = cfg.prec_train
        self.compute_dtype = compute_dtype(cfg.prec_train, device)
        if isinstance(self.image_encoder, ResNetEncoder):
            # BatchNorm tuners (bitfit / unfreeze_bn) mix trained fp32 and frozen tensors in one
            # op, which half precision refuses: ResNets keep their weights in fp32.
            self.compute_dtype = torch.float32
        if self.compute_dtype != torch.float32:
            rounded = stores_rounded_fp32(device, self.compute_dtype)
            convert_frozen(image_tower(clip_model), self.compute_dtype, self.tuner.parameters(), rounded)
            if rounded:  # activations in the compute dtype although the patch embedding is fp32
                self.image_encoder.compute_dtype = self.compute_dtype

    @property
    def needs_grad_scaler(self) -> bool:
        """Whether training needs a gradient scaler (fp16 on CUDA)."""
        return needs_grad_scaler(self.compute_dtype, self.log_prior.device)

    # --- features and logits ------------------------------------------------------------------
    @property
    def classifier(self) -> Optional[nn.Module]:
        """The classifier head, or ``None`` for the zero-shot text head."""
        return getattr(self.tuner, "classifier", None)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-projection CLS feature ``[B, D]`` (after ``ln_post``, before ``visual.proj``)."""
        return self.image_encoder(images)

    def logits_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Unadjusted logits ``[B, K]`` from pre-projection features."""
        if self.classifier is not None:
            return self.classifier(feats)
        return self.text_head(feats)

    @property
    def supports_feature_tte(self) -> bool:
        """Whether crop features can be averaged before the classifier (cosine heads only)."""
        return isinstance(self.classifier, CosineClassifier)

    def classifier_logits_from_unit(self, unit: torch.Tensor) -> torch.Tensor:
        """Cosine logits from an average of unit-norm features (see ``ops.tte_mean_unit_features``).

        The cosine head is linear in the normalised feature, so ``scale * mean_c(F̂_c) Ŵᵀ``
        equals the mean of the crops' logits; the average is not re-normalised.
        """
        if not self.supports_feature_tte:
            raise ValueError("feature-space TTE needs a CosineClassifier head")
        w = F.normalize(self.classifier.weight, dim=-1)
        # fp32 like the classifier head itself, whatever the backbone's compute dtype.
        return F.linear(self.classifier.scale * unit.float(), w.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unadjusted logits ``[B, K]``."""
        return self.logits_from_features(self.encode_image(images))

    # --- training -------------------------------------------------------------------------------
    def _fused_tau(self) -> Optional[float]:
        # The loss says whether it is CE(logits + tau * log prior) (its prior_tau); with a cosine
        # head that is exactly what the fused op computes.
        if not isinstance(self.classifier, CosineClassifier):
            return None
        tau = getattr(self.loss_fn, "prior_tau", None)
        return None if tau is None else float(tau)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor):
        """``(loss, logits)``: the configured loss and the unadjusted (detached) logits.

        A cosine classifier with LA/BS/CE goes through the fused LA cosine cross-entropy op.
        """
        labels = torch.as_tensor(labels, device=self.log_prior.device).long().view(-1)
        # Data-dependent, so skipped while torch.compile traces (the loss kernels check labels too).
        if (
            not torch.compiler.is_compiling()
            and labels.numel()
            and (labels.min() < 0 or labels.max() >= self.num_classes)
        ):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}); got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        feats = self.encode_image(images)
        if labels.shape[0] != feats.shape[0]:
            raise ValueError(f"got {feats.shape[0]} images but {labels.shape[0]} labels")
        tau = self._fused_tau()
        if tau is not None:
            loss, logits = ops.la_cosine_cross_entropy(
                feats.float(),
                self.classifier.weight,
                labels,
                self.log_prior,
                self.classifier.scale,
                tau,
                return_logits=True,
            )
            return loss, logits
        logits = self.logits_from_features(feats)
        return self.loss_fn(logits, labels), logits.detach()

    # --- classifier initialisation ---------------------------------------------------------------
    @torch.no_grad()
    def init_classifier_from_features(
        self, features: torch.Tensor, labels: torch.Tensor, method: str = "class_mean"
    ) -> None:
        """Initialise the classifier from image features: ``class_mean`` or ``linear_probing``."""
        if self.classifier is None:
            raise ValueError("this model has no classifier (zero-shot text head)")
        if method == "class_mean":
            w = class_mean_weights(features, labels, self.num_classes)
        elif method == "linear_probing":
            w = linear_probing_weights(features, labels, self.num_classes)
        else:
            raise ValueError(f"method must be 'class_mean' or 'linear_probing'; got {method!r}")
        if w.shape != self.classifier.weight.shape:
            raise ValueError(
                f"features have dimension {w.shape[1]}; the classifier expects {self.classifier.weight.shape[1]}"
            )
        self.classifier.weight.copy_(w)

    # --- published checkpoints -------------------------------------------------------------------
    def official_tuner_state_dict(self):
        """The tuner in the published ``checkpoint.pth.tar["tuner"]`` key layout."""
        return export_official(self.tuner)

    def load_official_tuner(self, state_dict, strict: bool = True) -> None:
        """Load a published-format tuner state dict (or a whole checkpoint with key ``tuner``)."""
        import_official(self.tuner, state_dict, strict=strict)

    # --- PEFT-style tuner files ------------------------------------------------------------------
    def save_tuner(self, path: str) -> None:
        """Write ``path/tuner.safetensors`` (the trained tensors only) and ``path/tuner_config.json``
        (method, options, backbone, class names and counts); rebuild with ``lf.load_tuner(path)``."""
        save_tuner(self, path)

    def get_nb_trainable_parameters(self) -> tuple:
        """``(trainable, total)`` parameter counts."""
        return trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` (as PEFT does)."""
        print(format_trainable_parameters(self))


def _has_text_tower(backbone: nn.Module) -> bool:
    src = backbone.text if hasattr(backbone, "text") else backbone
    return hasattr(src, "token_embedding") and hasattr(src, "transformer")


def build_lift_model(
    clip_model: nn.Module,
    cfg: LiftConfig,
    cls_num_list: Sequence[int],
    classnames: Sequence[str],
    tokenizer=None,
    init_classifier: bool = True,
) -> LiftModel:
    """Build a :class:`LiftModel` from an open_clip CLIP model (used in place, frozen).

    ``tokenizer`` defaults to open_clip's CLIP tokenizer with the model's context length. The
    classifier gets the semantic init when ``cfg.classifier_init == "semantic"`` and
    ``init_classifier`` (pass ``False`` when trained weights will be loaded over it); ``class_mean``
    and ``linear_probing`` need image features, see :meth:`LiftModel.init_classifier_from_features`.
    The model reads only model options of ``cfg`` (method, tuners ``v``, classifier, loss).
    """
    return LiftModel(clip_model, cfg, cls_num_list, classnames, tokenizer, init_classifier)


def load_tuner(path: str, clip_model=None, tokenizer=None, device=None) -> LiftModel:
    """Rebuild the ``LiftModel`` saved by :meth:`LiftModel.save_tuner` in folder ``path``.

    Args:
        path: the folder holding ``tuner.safetensors`` and ``tuner_config.json``.
        clip_model: the frozen backbone to wrap (used in place): an open_clip CLIP (ViT or
            ResNet) or a timm ViT / ResNet, as :func:`~liftplus_fast.model.load_backbone` builds
            them. ``None`` loads the backbone named in the config with its ``pretrained``
            weights (a tag or a local file) through ``load_backbone``.
        tokenizer: for a zero-shot text head; defaults to the backbone's.
        device: where the model goes; default the backbone's device.

    Returns:
        The ``LiftModel`` with the saved tuner, in eval mode.

    Raises:
        UserInputError: ``clip_model`` is not the kind of image encoder the tuner was trained on
            (family, feature width or block count differ); checked before the backbone is touched.
    """
    config, state = read_tuner(path)
    try:
        cfg = LiftConfig.from_dict(config["config"])
    except UserInputError as exc:
        raise UserInputError(f"{os.path.join(path, CONFIG_NAME)!r}: {exc}") from None
    if clip_model is None:
        clip_model, tokenizer = load_backbone(cfg.backbone, cfg.pretrained, device=device or "cpu")
    _check_backbone_fits(path, config, describe_encoder(build_image_encoder(clip_model)))
    # The saved classifier replaces any initialisation: skip the text-encoder pass of "semantic".
    build_cfg = dataclasses.replace(cfg, classifier_init=None, apply_preset=False) if cfg.classifier else cfg
    model = build_lift_model(clip_model, build_cfg, config["cls_num_list"], config["classnames"], tokenizer=tokenizer)
    model.cfg = cfg
    try:
        model.load_official_tuner(state)
    except UserInputError as exc:
        raise UserInputError(f"{os.path.join(path, TENSORS_NAME)!r}: {exc}") from None
    if device is not None:
        model.to(device)
    return model.eval()


def _encoder_words(description: dict) -> str:
    words = [str(description["image_encoder"])] if "image_encoder" in description else []
    words += [
        f"{description[k]} {label}" for k, label in (("feature_dim", "wide"), ("blocks", "blocks")) if k in description
    ]
    return ", ".join(words)


def _check_backbone_fits(path: str, config: dict, have: dict) -> None:
    """``UserInputError`` naming what differs between the saved tuner's encoder and ``have``.

    Only what the file records is compared (a file may hold ``feature_dim`` alone).
    """
    saved = {k: config[k] for k in have if k in config}
    differ = [k for k in saved if saved[k] != have[k]]
    if differ:
        names = {"image_encoder": "family", "feature_dim": "feature width", "blocks": "block count"}
        differing = ", ".join(names[k] for k in differ)
        raise UserInputError(
            f"the tuner in {path!r} was trained on backbone {config.get('backbone')!r} ({_encoder_words(saved)}); "
            f"the backbone it is loaded onto is {_encoder_words(have)} (differing: {differing})"
        )
