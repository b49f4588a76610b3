"""Fused ops of liftplus_fast with a pure-PyTorch reference path.

Every op validates its arguments, then dispatches (see :mod:`liftplus_fast.ops._dispatch`) to
the native CPU/CUDA kernels, the Triton kernels or :mod:`liftplus_fast.ops.reference`.
"""

from . import reference
from ._dispatch import BACKENDS, choose, requested_backend
from .adaptformer import adaptformer
from .attention import attention
from .la_cosine_ce import la_cosine_cross_entropy
from .layer_norm import fp32_layer_norm
from .linear_gelu import linear_gelu, linear_gelu_kind
from .reference import TTEResult, cosine_logits
from .tte import tte_aggregate, tte_mean_unit_features

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
