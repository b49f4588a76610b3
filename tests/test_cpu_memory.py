"""A CPU training process keeps freed memory for reuse: repeated large allocations stop faulting
pages in once it is kept, keep faulting with LIFTPLUS_FAST_MALLOC=system, and a bad value is a
clear error. Each case runs in its own process: the setting is process-wide."""

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates, fills and frees a 64 MB tensor five times after keep_freed_memory(); prints the
# state and the page faults of the last four rounds.
_CODE = """
import resource, torch
from liftplus_fast.cpu_memory import keep_freed_memory, malloc_state
print(keep_freed_memory())
assert keep_freed_memory() == malloc_state()
torch.ones(16 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.ones(16 * 2**20).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(mode):
    env = dict(os.environ)
    env.pop("LIFTPLUS_FAST_MALLOC", None)
    if mode is not None:
        env["LIFTPLUS_FAST_MALLOC"] = mode
    return subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults_and_system_leaves_glibc_as_it_is():
    pages = 64 * 2**20 // 4096  # one 64 MB tensor
    kept = _run(None)
    assert kept.returncode == 0, kept.stderr
    state, faults = kept.stdout.split("\n")[:2]
    assert state.startswith("kept") and int(faults) < pages // 4
    system = _run("system")
    assert system.returncode == 0, system.stderr
    state, faults = system.stdout.split("\n")[:2]
    assert state == "system (LIFTPLUS_FAST_MALLOC=system)" and int(faults) > 3 * pages


def test_a_bad_mode_names_the_variable_and_the_choices():
    out = _run("always")
    assert out.returncode != 0
    assert "LIFTPLUS_FAST_MALLOC='always' is not a malloc mode; expected one of keep, system" in out.stderr
