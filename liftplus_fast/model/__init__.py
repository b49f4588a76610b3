"""open_clip surgery for LIFT+: tuners, classifier, initialisation, losses and checkpoints."""

from .backbones import (
    BackboneLoadError,
    backbone_input_config,
    check_resolution,
    known_backbones,
    load_backbone,
    load_clip,
)
from .classifiers import (
    CLASSIFIERS,
    CosineClassifier,
    L2NormClassifier,
    LayerNormClassifier,
    LinearClassifier,
    build_classifier,
)
from .lift_model import LiftModel, build_lift_model, load_tuner
from .losses import build_loss
from .tuners import TUNERS

__all__ = [
    "BackboneLoadError",
    "CLASSIFIERS",
    "backbone_input_config",
    "load_backbone",
    "CosineClassifier",
    "L2NormClassifier",
    "LayerNormClassifier",
    "LiftModel",
    "LinearClassifier",
    "TUNERS",
    "build_classifier",
    "build_lift_model",
    "build_loss",
    "check_resolution",
    "known_backbones",
    "load_clip",
    "load_tuner",
]
