"""What a run sets in its process: the seeds, deterministic algorithms, the device and the log."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from typing import Optional

import numpy as np
import torch

from .errors import UserInputError

__all__ = ["attach_log", "deterministic_mode", "resolve_device", "seed_everything"]

logger = logging.getLogger("liftplus_fast")


def seed_everything(seed: Optional[int]) -> None:
    """Seed Python, NumPy and torch (the published code's seeding)."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """``deterministic True`` as the published code sets it (deterministic algorithms, a fixed
    cuBLAS workspace, cuDNN deterministic without benchmarking), restored on exit.

    Unlike the published code an op without a deterministic implementation warns instead of
    failing the run (``warn_only``)."""
    if not enabled:
        yield
        return
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    if prev[2] is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        if prev[2] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[3], prev[4]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device={name!r} was requested but no CUDA device is available")
    return device


class _ConsoleHandler(logging.StreamHandler):
    """Log lines to whatever ``sys.stderr`` is when a line is written: a handler that kept the
    stream of its creation would write into a closed one once a caller (a notebook, a test
    harness) has swapped standard error and closed the old one."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ and setStream assign it: always stderr
        pass


def attach_log(output_dir: Optional[str], is_main: bool = True) -> Optional[logging.Handler]:
    """Log to the console and, on rank 0, to ``output_dir/log.txt`` (appended); the file's handler,
    which the caller removes and closes at the end of the run. Under torchrun only rank 0 reports;
    the other processes speak only of trouble."""
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if not any(
        isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in logger.handlers
    ):
        console = _ConsoleHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
        logger.propagate = False
    if output_dir is None or not is_main:
        return None
    os.makedirs(output_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(output_dir, "log.txt"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    return handler
