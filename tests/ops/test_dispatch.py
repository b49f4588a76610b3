"""Backend selection, forced backends, backend_info and the missing-extension fallback."""

import json
import os
import subprocess
import sys

import pytest
import torch

import liftplus_fast as lf
from liftplus_fast.ops import _dispatch, _native

NATIVE = lf.backend_info()["native"]["loaded"]


def test_backend_info_lists_every_op():
    info = lf.backend_info()
    assert set(info["ops"]) >= {"adaptformer", "la_cosine_cross_entropy", "tte_aggregate", "tte_mean_unit_features"}
    for row in info["ops"].values():
        assert "reference" in row["implementations"]
    assert info["requested"] == "auto"
    assert info["choices"]["half_gemm"]["option"] in ("native", "fp32") and info["choices"]["half_gemm"]["why"]
    assert {"attention_bf16", "attention_fp32", "bias_gelu_bf16", "layer_norm_bf16"} <= set(info["choices"])


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LIFTPLUS_FAST_BACKEND", "fpga")
    with pytest.raises(ValueError, match="LIFTPLUS_FAST_BACKEND must be one of"):
        _dispatch.choose("tte_aggregate", torch.device("cpu"))


def test_reference_backend_is_forced(monkeypatch):
    monkeypatch.setenv("LIFTPLUS_FAST_BACKEND", "reference")
    for op in ("adaptformer", "la_cosine_cross_entropy", "tte_aggregate"):
        assert _dispatch.choose(op, torch.device("cpu")) == "reference"


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("LIFTPLUS_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot run tte_aggregate"):
        _dispatch.choose("tte_aggregate", torch.device("cpu"))


@pytest.mark.parametrize("forced", ["cuda", "triton"])
def test_forced_backend_runs_the_automatic_order_for_ops_it_does_not_implement(monkeypatch, forced):
    # attention and linear_gelu have CPU kernels only: forcing a GPU backend must not stop a
    # model at its first block; the choice and its reason are in backend_info and the log.
    monkeypatch.delenv("LIFTPLUS_FAST_BACKEND", raising=False)
    auto = {op: _dispatch.choose(op, torch.device("cpu")) for op in ("attention", "linear_gelu")}
    monkeypatch.setenv("LIFTPLUS_FAST_BACKEND", forced)
    for op, backend in auto.items():
        assert not _dispatch.implements(op, forced)
        assert _dispatch.choose(op, torch.device("cpu")) == backend
        row = lf.backend_info()["ops"][op]
        assert row["cpu"] == backend and row["cuda"] == "reference"
        assert row["notes"]["cuda"] == f"LIFTPLUS_FAST_BACKEND={forced} has no {op} implementation; automatic order"


def test_the_log_names_the_backend_of_each_op_and_why(monkeypatch, caplog):
    monkeypatch.setenv("LIFTPLUS_FAST_BACKEND", "cuda")
    monkeypatch.setattr(_dispatch, "_CHOICES", {})  # each choice is logged once per process
    x = torch.randn(2, 5, 24)
    with caplog.at_level("INFO", logger="liftplus_fast"):
        lf.ops.attention(x, 2)
    assert any(
        "attention on cpu tensors runs the" in r.message and "LIFTPLUS_FAST_BACKEND=cuda has no attention" in r.message
        for r in caplog.records
    ), [r.message for r in caplog.records]


def test_backend_packages_are_announced_not_imported_by_the_dispatcher():
    # ops/triton imports the dispatcher to register; the dispatcher reaches it only through the
    # loader the ops package hands in (no import circle).
    src = open(_dispatch.__file__).read()
    assert "from . import triton" not in src and "import_module" not in src
    for name in ("adaptformer", "la_cosine_ce", "tte"):
        path = os.path.join(os.path.dirname(_dispatch.__file__), "triton", f"{name}.py")
        text = open(path).read()
        assert f"from ..{name} import" not in text and "from .._dispatch" not in text, path


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
def test_auto_uses_native_cpu_kernel_for_tte():
    assert _dispatch.choose("tte_aggregate", torch.device("cpu")) == "cpu"


def test_extension_built_for_another_torch_is_refused(tmp_path, monkeypatch):
    info = tmp_path / "_build_info.json"
    info.write_text(json.dumps({"torch_version": "1.13.0"}))
    monkeypatch.setattr(_native, "BUILD_INFO_FILE", str(info))
    monkeypatch.setattr(_native, "_find_library", lambda: str(tmp_path / "_C.so"))
    status = _native._load()
    assert not status.loaded
    assert "built for torch 1.13.0" in status.reason and torch.__version__ in status.reason


def test_extension_that_defines_its_own_schemas_is_refused(tmp_path, monkeypatch):
    # Loading an older build (TORCH_LIBRARY in C++) over the Python schemas would abort the process.
    info = tmp_path / "_build_info.json"
    info.write_text(json.dumps({"torch_version": torch.__version__}))
    monkeypatch.setattr(_native, "BUILD_INFO_FILE", str(info))
    monkeypatch.setattr(_native, "_find_library", lambda: str(tmp_path / "_C.so"))
    status = _native._load()
    assert not status.loaded and "define their own op schemas; rebuild it" in status.reason


def test_package_works_without_the_extension():
    code = (
        "import warnings, torch, liftplus_fast as lf\n"
        "x = torch.randn(5, 4, 7)\n"
        "r = lf.ops.tte_aggregate(x)\n"
        "assert lf.backend_info()['ops']['tte_aggregate']['cpu'] == 'reference'\n"
        "print('ok', lf.backend_info()['native']['reason'])\n"
    )
    env = dict(os.environ, LIFTPLUS_FAST_DISABLE_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok disabled by LIFTPLUS_FAST_DISABLE_NATIVE=1" in out.stdout
