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

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(scope="session")
def shared_data_dir():
    """The folder of real public long-tail split files (../shared/data), or skip."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared split files not found at {SHARED_DATA}")
    return SHARED_DATA
