"""liftplus_fast: fast LIFT+ fine-tuning of frozen CLIP models for long-tailed classification."""
from . import ops
from ._info import backend_info

__version__ = "0.1.0"

__all__ = ["__version__", "backend_info", "ops"]
