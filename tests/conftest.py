"""Shared test set-up: deterministic threads and paths to the shared split files."""

import os

import pytest
import torch
from hypothesis import settings

# CI must not turn red on an example nobody has seen: property tests draw the same examples every
# run ("ci", the default). `pytest --hypothesis-profile=explore` searches new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("ci")

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The real split files sit beside the checkout (../shared/data); a clone elsewhere finds them
# through LIFTPLUS_FAST_SHARED_DATA or the workspace's fixed location.
_CANDIDATES = [
    os.environ.get("LIFTPLUS_FAST_SHARED_DATA", ""),
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"),
    "/work/shared/data",
]
SHARED_DATA = next((os.path.abspath(p) for p in _CANDIDATES if p and os.path.isdir(p)), os.path.abspath(_CANDIDATES[1]))


@pytest.fixture(scope="session")
def shared_data_dir():
    """The folder of real public long-tail split files (../shared/data), or skip."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared split files not found at {SHARED_DATA}")
    return SHARED_DATA
