"""The supported torch range: one floor, declared in pyproject.toml and enforced at import."""

import os
import re

import pytest

import liftplus_fast
from liftplus_fast._torch_range import MIN_TORCH, check_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    return open(os.path.join(ROOT, "pyproject.toml")).read()


def test_pyproject_declares_a_range_with_the_package_floor():
    deps = re.search(r"^dependencies = \[(.*?)^\]", _pyproject(), re.S | re.M).group(1)
    assert f'"torch>={MIN_TORCH}"' in deps
    assert "torch==" not in deps and "torchvision==" not in deps


def test_build_does_not_pull_its_own_torch():
    build = re.search(r"^\[build-system\](.*?)^\[", _pyproject(), re.S | re.M).group(1)
    assert "torch" not in re.search(r"requires = \[(.*?)\]", build).group(1)


@pytest.mark.parametrize("version", ["2.6.0", "2.11.0+cu130", "2.14.1", "3.0.0a0"])
def test_supported_versions_pass(version):
    check_torch(version)


@pytest.mark.parametrize("version", ["2.5.1+cu124", "1.13.1"])
def test_older_torch_is_refused_naming_the_floor(version):
    with pytest.raises(ImportError, match=rf"torch >= {re.escape(MIN_TORCH)}.*{re.escape(version)}"):
        check_torch(version)


def test_floor_is_public():
    assert liftplus_fast.MIN_TORCH == MIN_TORCH


@pytest.mark.skipif(
    not os.path.exists(os.path.join(ROOT, "liftplus_fast", "_build_info.json")), reason="no native build here"
)
def test_a_library_built_for_another_torch_warns_once_at_import_and_falls_back():
    import json
    import subprocess
    import sys

    code = (
        "import json, warnings, torch\n"
        "torch.__version__ = '2.99.0'  # as if another torch release were installed\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import liftplus_fast as lf\n"
        "    imported = [str(w.message) for w in caught]\n"
        "    r = lf.ops.tte_aggregate(torch.randn(2, 3, 4))\n"
        "    lf.backend_info()\n"
        "print(json.dumps({'at_import': imported, 'all': [str(w.message) for w in caught],\n"
        "                  'loaded': lf.backend_info()['native']['loaded'], 'shape': list(r.logits.shape)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    mismatch = [m for m in result["all"] if "built for torch" in m]
    assert len(mismatch) == 1 and "running 2.99.0" in mismatch[0] and "rebuild" in mismatch[0]
    assert mismatch[0] in result["at_import"]
    assert result["loaded"] is False and result["shape"] == [3, 4]
