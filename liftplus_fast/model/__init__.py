"""open_clip surgery for LIFT+: tuners, classifier, initialisation, losses and checkpoints.

The names below load their module on first use, so that importing one part of the model (the
classifiers, the losses, the tuners) does not import the whole model and what it builds on.
"""

from importlib import import_module

_LAZY = {
    "BackboneLoadError": ".backbones",
    "backbone_input_config": ".backbones",
    "check_resolution": ".backbones",
    "known_backbones": ".backbones",
    "load_backbone": ".backbones",
    "load_clip": ".backbones",
    "CLASSIFIERS": ".classifiers",
    "CosineClassifier": ".classifiers",
    "L2NormClassifier": ".classifiers",
    "LayerNormClassifier": ".classifiers",
    "LinearClassifier": ".classifiers",
    "build_classifier": ".classifiers",
    "LiftModel": ".lift_model",
    "build_lift_model": ".lift_model",
    "load_tuner": ".lift_model",
    "build_loss": ".losses",
    "TUNERS": ".tuners",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
