"""Fused ops of liftplus_fast with a pure-PyTorch reference path.

Every op validates its arguments, then dispatches (see :mod:`liftplus_fast.ops._dispatch`) to
the native CPU/CUDA kernels, the Triton kernels or :mod:`liftplus_fast.ops.reference`.
"""

import logging

from . import reference
from ._dispatch import BACKENDS, add_loader, choose, requested_backend
from .adaptformer import adaptformer
from .attention import attention
from .la_cosine_ce import la_cosine_cross_entropy
from .layer_norm import fp32_layer_norm
from .linear_gelu import linear_gelu, linear_gelu_kind
from .reference import TTEResult, cosine_logits
from .tte import tte_aggregate, tte_mean_unit_features


def _load_triton() -> None:
    # Imported on first need: the Triton kernels register themselves with the dispatcher.
    try:
        from . import triton  # noqa: F401
    except ImportError as exc:  # a CPU-only torch comes without triton
        logging.getLogger("liftplus_fast").debug("Triton implementations unavailable: %s", exc)


add_loader("triton", _load_triton)

__all__ = [
    "BACKENDS",
    "TTEResult",
    "adaptformer",
    "attention",
    "choose",
    "cosine_logits",
    "fp32_layer_norm",
    "la_cosine_cross_entropy",
    "linear_gelu",
    "linear_gelu_kind",
    "reference",
    "requested_backend",
    "tte_aggregate",
    "tte_mean_unit_features",
]
