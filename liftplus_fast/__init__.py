"""liftplus_fast: fast LIFT+ fine-tuning of frozen CLIP models for long-tailed classification.

    import liftplus_fast as lf
    result = lf.fast_train(dataset="cifar100_ir100", root="./data", backbone="clip_vit_b16",
                           pretrained="openai", method="lift+", output_dir="out")
    result.metrics   # overall, mean, many, med, few, per_class

Heavy modules (open_clip, torchvision) load on first use of the names that need them.
"""

from importlib import import_module

import torch as _torch

from ._torch_range import MIN_TORCH
from ._torch_range import check_torch as _check_torch

_check_torch(_torch.__version__)

from . import ops  # noqa: E402
from ._info import backend_info  # noqa: E402
from .config import LiftConfig, TunerConfig, make_config  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "fast_train": ".train",
    "TrainResult": ".train",
    "evaluate": ".evaluate",
    "build_lift_model": ".model",
    "load_backbone": ".model",
    "load_clip": ".model",
    "load_tuner": ".model",
    "LiftModel": ".model",
    "build_dataset": ".data",
    "build_cache": ".data",
    "run_demo": ".demo",
}

__all__ = ["__version__", "MIN_TORCH", "backend_info", "ops", "LiftConfig", "TunerConfig", "make_config", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'liftplus_fast' has no attribute {name!r}")
