"""Triton kernels for the fused ops (GPU; on CPU only under ``TRITON_INTERPRET=1``).

Importing this package registers the ``triton`` backend of each op with the dispatcher. It
needs only an importable ``triton``: kernels are jitted on first launch (see ``_common``), so
the import works on machines without a GPU.
"""

from .._dispatch import register
from . import adaptformer, la_cosine_ce, tte

register("adaptformer", "triton", adaptformer.adaptformer)
register("la_cosine_cross_entropy", "triton", la_cosine_ce.la_cosine_cross_entropy)
register("tte_aggregate", "triton", tte.tte_aggregate)
register("tte_mean_unit_features", "triton", tte.tte_mean_unit_features)

__all__ = ["adaptformer", "la_cosine_ce", "tte"]
