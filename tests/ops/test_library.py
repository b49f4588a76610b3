"""One schema and one autograd per op, shared by the native and the Triton namespace."""

import pytest
import torch

from liftplus_fast.ops import _library
from liftplus_fast.ops._native import native_status


def _schema_text(namespace, name):
    schema = str(_library.op(namespace, name).default._schema)
    prefix = f"{namespace}::"
    assert schema.startswith(prefix + name)
    return schema[len(prefix) :]


def _expected(name):
    return str(torch._C.parse_schema(name + {**_library.SCHEMAS, **_library.CPU_ONLY_SCHEMAS}[name]))


@pytest.mark.skipif(not native_status().loaded, reason="native extension not built")
@pytest.mark.parametrize("name", sorted(_library.SCHEMAS) + sorted(_library.CPU_ONLY_SCHEMAS))
def test_native_kernels_register_against_the_one_schema(name):
    assert _schema_text(_library.NATIVE, name) == _expected(name)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{_library.NATIVE}::{name}", "CPU")


@pytest.mark.parametrize("name", sorted(_library.SCHEMAS))
def test_triton_ops_have_the_native_schema(name):
    pytest.importorskip("triton")
    import liftplus_fast.ops.triton  # noqa: F401  (defines the Triton namespace)

    assert _schema_text(_library.TRITON, name) == _expected(name)


def test_ops_with_a_backward_have_autograd_in_both_namespaces():
    pytest.importorskip("triton")
    import liftplus_fast.ops.triton  # noqa: F401

    namespaces = ([_library.NATIVE] if native_status().loaded else []) + [_library.TRITON]
    for fwd in ("adaptformer_fwd", "la_cosine_ce_fwd"):
        for ns in namespaces:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{fwd}", "Autograd"), (ns, fwd)


@pytest.mark.skipif(not native_status().loaded, reason="native extension not built")
def test_cpu_only_ops_have_autograd():
    import liftplus_fast.ops  # noqa: F401  (registers the autograd of every op)

    for fwd in ("attention_fwd", "attention_brgemm_fwd", "bias_gelu_fwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{_library.NATIVE}::{fwd}", "Autograd"), fwd
