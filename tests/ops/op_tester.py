"""The shared equivalence harness of the fused ops (as torchvision's op tester).

A test written once per op runs over device × backend × dtype × shape: every backend that can
run the op on that device in this process (native ``cpu`` / ``cuda``, ``triton``), forced through
``LIFTPLUS_FAST_BACKEND`` and called through the public op, is compared with the reference by
the rules of docs/ops.md ("Tolerances"). Triton runs on CPU only under ``TRITON_INTERPRET=1``,
which must be set before ``triton.language`` is imported: a module using this harness defines
``test_triton_under_interpreter = triton_runner(__file__)``, which reruns the module's Triton
cases in a fresh interpreter subprocess (see ``triton_interp``).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from liftplus_fast.ops import _dispatch

from .triton_interp import interpreter_runner

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOW = (torch.bfloat16, torch.float16)


def backends(op: str, device_type: str):
    """The kernel backends (not the reference) that can run ``op`` on ``device_type`` here."""
    return [b for b in ("cpu", "cuda", "triton") if _dispatch._available(op, b, device_type)[0]]


def cases(op: str):
    """``pytest.param(device, backend)``: every CPU backend of ``op`` that runs here, and the CUDA
    cases (``cuda``, ``triton``) of every backend implementing ``op``, always collected and
    marked ``gpu`` (``pytest -m gpu`` selects them), skipped with the reason where they cannot
    run."""
    params = [pytest.param("cpu", b, id=f"cpu-{b}") for b in backends(op, "cpu")]
    for b in ("cuda", "triton"):
        if not _dispatch.implements(op, b):
            continue
        ok, why = _dispatch._available(op, b, "cuda")
        if ok and not torch.cuda.is_available():
            ok, why = False, "needs a CUDA device"
        marks = [pytest.mark.gpu] + ([] if ok else [pytest.mark.skip(reason=why)])
        params.append(pytest.param("cuda", b, id=f"cuda-{b}", marks=marks))
    return params or [
        pytest.param(
            "cpu", None, id="no-kernel-backend", marks=pytest.mark.skip(reason=f"no kernel backend of {op} here")
        )
    ]


@contextlib.contextmanager
def backend(name: str):
    """Force ``LIFTPLUS_FAST_BACKEND=name`` for the public ops inside the block."""
    old = os.environ.get(_dispatch.ENV_VAR)
    os.environ[_dispatch.ENV_VAR] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_dispatch.ENV_VAR, None)
        else:
            os.environ[_dispatch.ENV_VAR] = old


def assert_matches(names, kern, ref32, lowp=None, dtype=None, rtol=1e-5):
    """Per tensor: fp32 ``max|K−R| ≤ rtol·max|R|``; low precision ``≤ 2·max|P−R| + eps·max|R|``.

    ``ref32`` is the reference in fp32 (on upcast inputs), ``lowp`` the reference run in the
    low precision ``dtype`` (None for fp32).
    """
    for i, (name, k, r) in enumerate(zip(names, kern, ref32)):
        assert k.shape == r.shape, f"{name}: shape {tuple(k.shape)} vs {tuple(r.shape)}"
        k, r = k.double(), r.double()
        scale = r.abs().max().item() + 1e-12 if r.numel() else 1.0
        err = (k - r).abs().max().item() if r.numel() else 0.0
        if lowp is None:
            assert err <= rtol * scale, f"{name}: max|K-R| = {err:.3g} vs scale {scale:.3g}"
        else:
            p = lowp[i].double()
            bound = 2 * (p - r).abs().max().item() + torch.finfo(dtype).eps * scale
            assert err <= bound, f"{name}: max|K-R| = {err:.3g} > 2 max|P-R| + atol = {bound:.3g}"


def triton_runner(test_file: str):
    """A test that reruns ``test_file``'s Triton cases under the interpreter (CPU machines)."""
    return interpreter_runner(test_file, "-k", "triton")
