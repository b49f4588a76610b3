"""``run.json``: how a run ran, for reproducing it and for a paper's methods section.

Written by rank 0 when the run starts (``status`` ``"running"``) and again when it ends
(``"finished"``, with the wall time of every phase):

* ``command``: the command line as typed (``argv``, as one shell line, and the working folder);
* ``package``: version, location and, when it is a git checkout, the commit (and whether
  tracked files differ from it);
* ``versions``: Python, torch, torchvision, open_clip, timm, CUDA, cuDNN, Triton;
* ``hardware``: the device, the CPU's model name and the instruction set torch dispatches to;
* ``backend``: :func:`liftplus_fast.backend_info` (the native build, the backend of each op, the
  CPU GEMM path);
* ``model``: the tuners installed (with their resolved bottleneck ``r``), the sizes under their
  option names (``v.adaptformer_dim``), trainable and total parameter counts;
* ``data``: classes and images per split; ``timings``: seconds per phase.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from typing import Any, Dict, Optional

import torch

from ._info import backend_info
from .model.tuner_files import trainable_parameters
from .model.tuners import tuner_sizes

__all__ = ["FORMAT", "environment", "git_state", "model_facts", "run_record"]

FORMAT = "liftplus_fast.run/1"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "-C", _PACKAGE_DIR, *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> Optional[Dict[str, Any]]:
    """``{"commit", "dirty"}`` of the git checkout the package is imported from, or ``None`` when
    it is not one (an installed wheel, no git): the package's own files must be tracked there,
    so a virtual environment inside another repository does not report that repository."""
    if _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """The ``package``, ``versions`` and ``hardware`` entries of ``run.json``."""
    cuda = torch.cuda.is_available()
    hardware: Dict[str, Any] = {
        "device": None if device is None else str(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
    }
    if cuda:
        index = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
        hardware["cuda_device"] = torch.cuda.get_device_name(index)
        hardware["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
    package = sys.modules[__name__.partition(".")[0]]  # the package that imported this module
    return {
        "package": {"name": package.__name__, "version": getattr(package, "__version__", None), "path": _PACKAGE_DIR},
        "git": git_state(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "open_clip": _version("open_clip_torch"),
            "timm": _version("timm"),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "triton": _version("triton") or _version("pytorch-triton"),
        },
        "hardware": hardware,
    }


def model_facts(model) -> Dict[str, Any]:
    """The tuners of a :class:`~liftplus_fast.model.LiftModel` (descriptions, resolved sizes)
    and its trainable / total parameter counts."""
    trainable, total = trainable_parameters(model)
    tuners = list(getattr(model, "tuner_summary", []))
    text_head = getattr(model, "text_head", None)
    tuners += list(getattr(text_head, "text_summary", []) or [])
    return {
        "tuners": tuners,
        "sizes": tuner_sizes(model.tuner),
        "trainable_parameters": trainable,
        "total_parameters": total,
    }


def run_record(
    *,
    status: str,
    started: datetime.datetime,
    device: torch.device,
    model_facts: Dict[str, Any],
    data: Dict[str, Any],
    timings: Optional[Dict[str, float]] = None,
    world_size: int = 1,
    argv=None,
    error: Optional[str] = None,
) -> Dict[str, Any]:
    """The whole ``run.json`` (see the module docstring); ``error``: why a ``"failed"`` run stopped."""
    # orig_argv holds the interpreter and "-m liftplus_fast" too: the line as typed.
    argv = list(getattr(sys, "orig_argv", sys.argv) if argv is None else argv)
    record = {
        "format": FORMAT,
        "status": status,
        "started": started.isoformat(timespec="seconds"),
        "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": {"argv": argv, "line": shlex.join(argv), "cwd": os.getcwd()},
        **environment(device),
        "processes": world_size,
        "backend": backend_info(),
        "model": model_facts,
        "data": data,
        "timings": dict(timings or {}),
    }
    if error is not None:
        record["error"] = error
    return record
