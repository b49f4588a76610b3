"""The wheel and the pure-Python install, checked as a user gets them (``make install-check``).

1. Builds the wheel with ``pip wheel --no-build-isolation --no-deps .`` from the build folder the
   editable install already compiled (``build/cmake``: a relink, not a rebuild), and the
   pure-Python wheel with ``LIFTPLUS_FAST_NO_EXTENSION=1``; checks what each holds.
2. Makes a new virtual environment (no system site-packages) and installs the wheel with the
   torch and torchvision releases of the building Python and the package's dependencies.
3. From a folder outside the source tree, with only that environment on PATH (no compiler, no
   CMake) and CC/CXX pointing at ``false``: ``liftplus-fast info`` must show the native library
   loaded for this torch with its CPU kernel builds, and ``liftplus-fast demo`` must train and
   evaluate on the native kernels.
4. Replaces the package with the pure-Python wheel: the package imports without the native library
   and without a warning, ``backend_info()`` says why, and the demo runs on the reference path.

Usage: python tools/install_check.py [--work DIR] [--epochs N] [--keep]
(the work folder defaults to a temporary one, removed afterwards unless --keep).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg: str) -> None:
    print(f"[install-check] {msg}", flush=True)


def run(cmd, env=None, cwd=None, timeout=1800) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-6000:] + out.stderr[-6000:])
        raise SystemExit(f"[install-check] failed ({out.returncode}): {' '.join(map(str, cmd))}")
    log(f"{os.path.basename(str(cmd[0]))} {' '.join(map(str, cmd[1:4]))} ... ({time.perf_counter() - t0:.0f} s)")
    return out


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"[install-check] FAILED: {what}")
    log(f"ok: {what}")


def build_wheel(dest: str, pure: bool) -> str:
    # setuptools does not clear build/lib: a library or module left there by an earlier build
    # would be packed too.
    for stale in glob.glob(os.path.join(ROOT, "build", "lib*")) + glob.glob(os.path.join(ROOT, "build", "bdist*")):
        shutil.rmtree(stale)
    env = dict(os.environ)
    env.pop("LIFTPLUS_FAST_NO_EXTENSION", None)
    if pure:
        env["LIFTPLUS_FAST_NO_EXTENSION"] = "1"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", dest, ROOT]
    run(cmd + ["--quiet"], env=env)
    wheels = glob.glob(os.path.join(dest, "liftplus_fast-*.whl"))
    check(
        len(wheels) == 1,
        f"one {'pure-Python ' if pure else ''}wheel in {dest}: {[os.path.basename(w) for w in wheels]}",
    )
    return wheels[0]


def check_wheel(path: str, pure: bool, torch_version: str) -> None:
    names = zipfile.ZipFile(path).namelist()
    libs = [n for n in names if n.startswith("liftplus_fast/_C")]
    info = json.loads(zipfile.ZipFile(path).read("liftplus_fast/_build_info.json"))
    check(any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the wheel carries LICENSE")
    if pure:
        check(path.endswith("-py3-none-any.whl") and not libs, f"{os.path.basename(path)} holds no native library")
        check(info.get("extension") is False, "its build info records the pure-Python install")
    else:
        check(len(libs) == 1, f"{os.path.basename(path)} holds the native library {libs}")
        check(info.get("torch_version") == torch_version, f"built for torch {info.get('torch_version')}")
        check(info.get("cpu_dispatch") and not info.get("native_arch"), "run-time CPU dispatch, no -march=native")


def make_env(venv: str, wheel: str, torch_version: str, vision_version: str) -> str:
    run([sys.executable, "-m", "venv", venv])
    py = os.path.join(venv, "bin", "python")
    base = [torch_version.split("+")[0], vision_version.split("+")[0]]
    run([py, "-m", "pip", "install", "--quiet", wheel, f"torch=={base[0]}", f"torchvision=={base[1]}"])
    return py


def user_env(venv: str) -> dict:
    """The environment of a user of the installed package: the new venv alone on PATH, no
    compiler (CC/CXX = false), no variables of this project's build."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIFTPLUS_FAST_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=os.path.join(venv, "bin"), CC="false", CXX="false", VIRTUAL_ENV=venv)
    return env


def info_of(venv: str, cwd: str) -> dict:
    return json.loads(run([os.path.join(venv, "bin", "liftplus-fast"), "info"], env=user_env(venv), cwd=cwd).stdout)


def run_demo(venv: str, cwd: str, epochs: int, name: str) -> subprocess.CompletedProcess:
    out_dir = os.path.join(cwd, name)
    cmd = [os.path.join(venv, "bin", "liftplus-fast"), "demo", "--epochs", str(epochs), "--no-progress"]
    out = run(cmd + ["--output-dir", out_dir], env=user_env(venv), cwd=cwd)
    check(
        os.path.isfile(os.path.join(out_dir, "per_class_accuracy.png")), f"the demo ({name}) trained and wrote its plot"
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None, help="work folder (default: a new temporary folder)")
    p.add_argument("--epochs", type=int, default=2, help="demo epochs per run")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    import torch
    import torchvision

    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="liftplus-install-check-"))
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    try:
        wheel = build_wheel(os.path.join(work, "dist"), pure=False)
        check_wheel(wheel, False, torch.__version__)
        pure_wheel = build_wheel(os.path.join(work, "dist-pure"), pure=True)
        check_wheel(pure_wheel, True, torch.__version__)

        venv = os.path.join(work, "venv")
        py = make_env(venv, wheel, torch.__version__, torchvision.__version__)
        cwd = os.path.join(work, "run")
        os.makedirs(cwd, exist_ok=True)
        check(
            not any(shutil.which(c, path=user_env(venv)["PATH"]) for c in ("gcc", "g++", "c++", "cmake", "nvcc")),
            "no compiler or CMake on the user's PATH",
        )
        code = "import liftplus_fast; print(liftplus_fast.__file__)"
        where = run([py, "-c", code], env=user_env(venv), cwd=cwd).stdout.strip()
        check(where.startswith(venv), f"the package comes from the new environment ({where})")

        info = info_of(venv, cwd)
        check(info["native"]["loaded"], f"the native library loads ({info['native'].get('reason')})")
        cpu = info["cpu_capability"]
        check(cpu["selected"] is not None and cpu["why"], f"CPU kernels: {cpu['selected']} ({cpu['why']})")
        check(info["ops"]["adaptformer"]["cpu"] == "cpu", "AdaptFormer dispatches to the native CPU kernel")
        run_demo(venv, cwd, args.epochs, "demo-native")

        run([py, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", pure_wheel])
        info = info_of(venv, cwd)
        reason = info["native"]["reason"]
        check(not info["native"]["loaded"] and "LIFTPLUS_FAST_NO_EXTENSION=1" in reason, f"pure Python: {reason}")
        check(info["ops"]["adaptformer"]["cpu"] == "reference", "AdaptFormer runs the reference path")
        out = run_demo(venv, cwd, args.epochs, "demo-pure")
        check("RuntimeWarning" not in out.stderr, "no warning for an install made without the library on purpose")
        log(f"passed in {time.perf_counter() - t0:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
