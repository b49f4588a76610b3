"""Build driver: setuptools hands the native extension to CMake (CMakeLists.txt) with Ninja.

`pip install --no-build-isolation .` (or `pip wheel --no-build-isolation --no-deps .`) builds
liftplus_fast/_C*.so against the installed torch (any release from the floor in pyproject.toml
on) and writes liftplus_fast/_build_info.json (torch version, CUDA on/off, arch list) beside it.
Environment: LIFTPLUS_FAST_CUDA=0/1, TORCH_CUDA_ARCH_LIST, LIFTPLUS_FAST_BUILD_TYPE,
LIFTPLUS_FAST_NATIVE_ARCH=1 (-march=native instead of the run-time CPU dispatch),
LIFTPLUS_FAST_NO_EXTENSION=1 (pure-Python install), LIFTPLUS_FAST_BUILD_DIR, MAX_JOBS.
"""

import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_EXTENSION = os.environ.get("LIFTPLUS_FAST_NO_EXTENSION") == "1"
BUILD_INFO = "_build_info.json"


def _write_json(path, info):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, path)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _tool(name):
    """A tool from this Python's environment first (pip's cmake/ninja), then PATH."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else shutil.which(name)


class CMakeBuild(build_ext):
    def run(self):
        # setuptools clears self.inplace while it builds and copies the library into the source
        # tree afterwards: remember the flag so the build info is written there too.
        self._lpf_inplace = bool(self.inplace)
        super().run()

    def build_extension(self, ext):
        try:
            import torch
        except ImportError:
            # pip's isolated build environment has no torch (pyproject.toml does not pull one in,
            # so the library is never compiled against a torch the user does not run).
            raise RuntimeError(
                "liftplus_fast's native extension is compiled against the installed torch, which this "
                "build cannot import: install torch first, then build without isolation: "
                "pip install --no-build-isolation . (or set LIFTPLUS_FAST_NO_EXTENSION=1)"
            ) from None

        output = os.path.abspath(self.get_ext_fullpath(ext.name))
        in_place = bool(getattr(self, "editable_mode", False) or self.inplace or getattr(self, "_lpf_inplace", False))
        # A fixed build folder keeps CMake's incremental builds across (editable) reinstalls.
        build_dir = os.environ.get("LIFTPLUS_FAST_BUILD_DIR", os.path.join(ROOT, "build", "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        cmake = _tool("cmake")
        ninja = _tool("ninja")
        if cmake is None:
            raise RuntimeError("cmake is required to build liftplus_fast: pip install cmake ninja")
        args = [
            cmake,
            "-S",
            ROOT,
            "-B",
            build_dir,
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DLIFTPLUS_FAST_OUTPUT={output}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('LIFTPLUS_FAST_BUILD_TYPE', 'Release')}",
            # An installed library (a wheel) finds torch beside it, not at this machine's path.
            f"-DLIFTPLUS_FAST_ABSOLUTE_RPATH={'ON' if in_place else 'OFF'}",
            # Said on every configure: a build folder configured once with -march=native must not
            # keep it in its cache when the switch is off.
            f"-DLIFTPLUS_FAST_NATIVE_ARCH={'ON' if os.environ.get('LIFTPLUS_FAST_NATIVE_ARCH') == '1' else 'OFF'}",
        ]
        if ninja is not None:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.check_call(args)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call([cmake, "--build", build_dir, "--parallel", jobs])
        out_dirs = {os.path.dirname(output)}
        if in_place:
            # Editable installs copy only the library into the source tree; the info goes too.
            out_dirs.add(os.path.join(ROOT, "liftplus_fast"))
        for out_dir in out_dirs:
            self._write_build_info(build_dir, out_dir, torch)

    @staticmethod
    def _write_build_info(build_dir, out_dir, torch):
        cache = open(os.path.join(build_dir, "CMakeCache.txt")).read()
        cuda = (
            bool(re.search(r"^CMAKE_CUDA_COMPILER:\w+=.+$", cache, re.M))
            and os.environ.get("LIFTPLUS_FAST_CUDA", "") != "0"
        )
        native_arch = bool(re.search(r"^LIFTPLUS_FAST_NATIVE_ARCH:\w+=(ON|1|TRUE)$", cache, re.M | re.I))
        info = {
            "torch_version": torch.__version__,
            "cuda": cuda,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0") if cuda else "",
            # The library registers kernels only; the op schemas come from liftplus_fast/ops/_library.py.
            "schemas_from_python": True,
            # CPU kernels built per capability and chosen at load (csrc/cpu_dispatch.cpp), or
            # compiled once with -march=native for the build machine.
            "cpu_dispatch": True,
            "native_arch": native_arch,
        }
        _write_json(os.path.join(out_dir, BUILD_INFO), info)


class BuildPy(build_py):
    """A pure-Python install records that it has no native library on purpose, so the package
    says why it runs the reference path instead of asking for a build."""

    def run(self):
        super().run()
        if NO_EXTENSION and not self.editable_mode:
            info = {
                "extension": False,
                "why": "installed without the native extension (LIFTPLUS_FAST_NO_EXTENSION=1): every op runs "
                "on the pure-PyTorch reference path",
            }
            _write_json(os.path.join(self.build_lib, "liftplus_fast", BUILD_INFO), info)


ext_modules = [] if NO_EXTENSION else [CMakeExtension("liftplus_fast._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy})
