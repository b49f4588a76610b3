"""Packaging metadata against what the code uses: license, build floors, dependency floors."""

import glob
import os
import re
from importlib import metadata

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
PROJECT = PYPROJECT["project"]


def _version(text: str) -> tuple:
    return tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", text).group(0).split("."))


def _floors(specs) -> dict:
    """{name: floor or None} of requirement strings "name>=x.y" / "name" (names normalised)."""
    out = {}
    for spec in specs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9.]+))?", spec.strip())
        assert m, f"unexpected requirement {spec!r}: expected 'name' or 'name>=version'"
        out[m.group(1).lower().replace("_", "-")] = _version(m.group(2)) if m.group(2) else None
    return out


RUNTIME = _floors(PROJECT["dependencies"])
BUILD = _floors(PYPROJECT["build-system"]["requires"])


def _requirements(name: str) -> list:
    lines = open(os.path.join(ROOT, name)).read().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _package_source() -> str:
    files = glob.glob(os.path.join(ROOT, "liftplus_fast", "**", "*.py"), recursive=True)
    return "\n".join(open(f).read() for f in sorted(files))


def test_license_file_matches_the_declared_license():
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    text = open(os.path.join(ROOT, "LICENSE")).read()
    assert text.startswith("MIT License\n") and "Permission is hereby granted, free of charge" in text


def test_setuptools_floor_reads_the_license_field():
    # An SPDX string in project.license (PEP 639) is read from setuptools 77 on; older releases
    # reject it or need the table form.
    assert isinstance(PROJECT["license"], str)
    assert BUILD["setuptools"] >= (77,)


def test_cmake_floor_is_the_one_cmakelists_asks_for():
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    needed = _version(re.search(r"cmake_minimum_required\(VERSION ([0-9.]+)\)", cmake).group(1))
    assert BUILD["cmake"] == needed


def test_make_installs_the_declared_build_tools():
    # requirements.txt installs the build tools the editable build needs without isolation.
    declared = _floors(r for r in _requirements("requirements.txt") if not r.startswith(("torch", "torchvision")))
    assert declared == BUILD


def test_dev_tools_hold_the_test_extra():
    dev = _floors(_requirements("requirements-dev.txt"))
    assert set(_floors(PROJECT["optional-dependencies"]["test"])) <= set(dev)
    assert {"ruff", "clang-format"} <= set(dev)


def test_torchvision_floor_is_the_release_made_for_the_torch_floor():
    # torchvision 0.(N + 15) is built for torch 2.N (0.21 for 2.6, ..., 0.29 for 2.14).
    torch_floor, vision_floor = RUNTIME["torch"], RUNTIME["torchvision"]
    assert torch_floor[0] == 2 and vision_floor == (0, torch_floor[1] + 15)


# (distribution, first release with it, what the package uses, a pattern that finds the use)
USES = [
    ("open-clip-torch", (3, 0), "the local-dir: model source", r'"local-dir:"'),
    ("timm", (0, 9), "VisionTransformer.patch_drop", r"\.patch_drop\("),
    ("timm", (0, 9), "PretrainedCfg attributes", r"get_pretrained_cfg\(name\)[\s\S]{0,120}cfg\.input_size"),
    ("torchvision", (0, 20), "decode_jpeg of a list onto a device", r"decode_jpeg\(blobs, [^)]*device=device\)"),
    ("torchvision", (0, 16), "torchvision.transforms.v2", r"torchvision\.transforms\.v2"),
]


@pytest.mark.parametrize("dist,release,what,pattern", USES, ids=[f"{u[0]}-{u[2]}" for u in USES])
def test_floor_admits_only_releases_with_what_the_code_uses(dist, release, what, pattern):
    found = re.search(pattern, _package_source())
    assert found, f"the package no longer uses {what}: update this table and the {dist} floor"
    floor = RUNTIME[dist]
    assert floor is not None and floor >= release, f"{dist} floor {floor} admits releases without {what}"


def test_this_environment_is_inside_the_declared_floors():
    for dist, floor in {**RUNTIME, **BUILD}.items():
        if floor is None:
            continue
        try:
            installed = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        assert _version(installed) >= floor, f"{dist} {installed} is below the declared floor {floor}"
