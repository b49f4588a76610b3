"""The LIFT+ model: a frozen open_clip CLIP with PEFT tuners, a classifier and a loss."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import LiftConfig
from .classifiers import CosineClassifier, build_classifier
from .inits import class_mean_weights, class_text_features, linear_probing_weights, semantic_weights
from .losses import build_loss, check_cls_num_list, log_prior
from .official_ckpt import export_official, import_official
from .peft_vit import PEFTVisionTransformer
from .precision import compute_dtype, convert_frozen, needs_grad_scaler
from .tuners import install_tuners

__all__ = ["LiftModel", "TunerRoot", "build_lift_model"]

class TunerRoot(nn.Module):
    """Everything that is trained, laid out like the published ``PEFT_Model.tuner``:
    ``image_encoder.blocks[i].<tuner>`` and ``classifier``."""

    def __init__(self, block_tuners, classifier: Optional[nn.Module]):
        super().__init__()
        self.image_encoder = nn.Module()
        self.image_encoder.blocks = nn.ModuleList(block_tuners)
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

    def __init__(self, clip_model: nn.Module, cfg: LiftConfig, cls_num_list: Sequence[int],
                 classnames: Sequence[str], tokenizer=None, init_classifier: bool = True):
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

        self.image_encoder = PEFTVisionTransformer(clip_model.visual)
        self.feature_dim = self.image_encoder.width
        self.tuner_summary = install_tuners(self.image_encoder.blocks, cfg.v, self.num_classes)

        use_classifier = cfg.classifier is not None and not cfg.zero_shot
        classifier = None
        if use_classifier:
            classifier = build_classifier(cfg.classifier, self.feature_dim, self.num_classes,
                                          cfg.classifier_scale)
        self.tuner = TunerRoot([b.tuner for b in self.image_encoder.blocks], classifier)
        for p in self.tuner.parameters():
            p.requires_grad_(True)

        self.loss_fn = build_loss(cfg, cls_num_list)
        counts = check_cls_num_list(cls_num_list, self.num_classes, need_positive=False)
        self.register_buffer("cls_num", counts, persistent=False)
        lp = log_prior(cls_num_list) if bool((counts > 0).all()) else torch.zeros_like(counts)
        self.register_buffer("log_prior", lp, persistent=False)

        device = clip_model.visual.conv1.weight.device
        if use_classifier:
            if cfg.classifier_init == "semantic" and init_classifier:
                if self.classnames is None:
                    raise ValueError("classifier_init='semantic' needs classnames")
                with torch.no_grad():
                    self.tuner.classifier.weight.copy_(semantic_weights(clip_model, self.classnames, tokenizer))
        else:
            if self.classnames is None:
                raise ValueError("the zero-shot (text) head needs classnames")
            self.register_buffer("text_features",
                                 class_text_features(clip_model, self.classnames, tokenizer),
                                 persistent=False)
        self.to(device)
        self.precision = cfg.prec_train
        self.compute_dtype = compute_dtype(cfg.prec_train, device)
        if self.compute_dtype != torch.float32:
            convert_frozen(clip_model.visual, self.compute_dtype, self.tuner.parameters())

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
        proj = getattr(self.clip.visual, "proj", None)
        img = feats if proj is None else feats.to(proj.dtype) @ proj
        scale = self.clip.logit_scale.exp().float()
        return scale * F.normalize(img.float(), dim=-1) @ self.text_features.T

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
        if not torch.compiler.is_compiling() and labels.numel() and \
                (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        feats = self.encode_image(images)
        if labels.shape[0] != feats.shape[0]:
            raise ValueError(f"got {feats.shape[0]} images but {labels.shape[0]} labels")
        tau = self._fused_tau()
        if tau is not None:
            loss, logits = ops.la_cosine_cross_entropy(
                feats.float(), self.classifier.weight, labels, self.log_prior,
                self.classifier.scale, tau, return_logits=True)
            return loss, logits
        logits = self.logits_from_features(feats)
        return self.loss_fn(logits, labels), logits.detach()

    # --- classifier initialisation ---------------------------------------------------------------
    @torch.no_grad()
    def init_classifier_from_features(self, features: torch.Tensor, labels: torch.Tensor,
                                      method: str = "class_mean") -> None:
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
            raise ValueError(f"features have dimension {w.shape[1]}; the classifier expects "
                             f"{self.classifier.weight.shape[1]}")
        self.classifier.weight.copy_(w)

    # --- published checkpoints -------------------------------------------------------------------
    def official_tuner_state_dict(self):
        """The tuner in the published ``checkpoint.pth.tar["tuner"]`` key layout."""
        return export_official(self.tuner)

    def load_official_tuner(self, state_dict, strict: bool = True) -> None:
        """Load a published-format tuner state dict (or a whole checkpoint with key ``tuner``)."""
        import_official(self.tuner, state_dict, strict=strict)


def build_lift_model(clip_model: nn.Module, cfg: LiftConfig, cls_num_list: Sequence[int],
                     classnames: Sequence[str], tokenizer=None, init_classifier: bool = True) -> LiftModel:
    """Build a :class:`LiftModel` from an open_clip CLIP model (used in place, frozen).

    ``tokenizer`` defaults to open_clip's CLIP tokenizer with the model's context length. The
    classifier gets the semantic init when ``cfg.classifier_init == "semantic"`` and
    ``init_classifier`` (pass ``False`` when trained weights will be loaded over it); ``class_mean``
    and ``linear_probing`` need image features, see :meth:`LiftModel.init_classifier_from_features`.
    The model reads only model options of ``cfg`` (method, tuners ``v``, classifier, loss).
    """
    return LiftModel(clip_model, cfg, cls_num_list, classnames, tokenizer, init_classifier)
