"""The torch releases liftplus_fast supports; ``pyproject.toml`` declares the same floor.

2.6 is the first release with everything the package calls: ``torch.library.triton_op`` and
``wrap_triton`` (the Triton kernels, 2.6), ``torch.library.register_autograd``,
``register_fake`` and ``opcheck`` (2.4), ``torch.amp.GradScaler("cuda")`` (2.3). There is no
upper bound: the native extension is compiled against whichever torch is installed.
"""

from __future__ import annotations

import re

MIN_TORCH = "2.6"


def _release(version: str) -> tuple:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch(version: str) -> None:
    """``ImportError`` when torch ``version`` is older than :data:`MIN_TORCH`."""
    if _release(version) < _release(MIN_TORCH):
        raise ImportError(
            f"liftplus_fast needs torch >= {MIN_TORCH}; this environment has torch "
            f"{version}. Upgrade torch (pip install 'torch>={MIN_TORCH}')."
        )
