"""Triton kernels for the fused ops (GPU; on CPU only under ``TRITON_INTERPRET=1``).

Importing this package registers the ``triton`` backend of each op that has a kernel here.
"""
