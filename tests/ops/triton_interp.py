"""Running Triton kernel tests on CPU under ``TRITON_INTERPRET=1``.

The variable must be set *before* ``triton.language`` is imported (Triton's ``tl.sum`` and
``tl.zeros`` are jitted at import), and in a full pytest session torch has usually imported it
already in compiled mode. So a Triton test module imports :data:`IN_INTERP` and the autouse
fixture :func:`cpu_tests_need_interpreter`: unless the process is an interpreter process its CPU
tests skip, and its ``test_cpu_tests_under_interpreter`` calls :func:`run_under_interpreter`,
which reruns the module in a fresh pytest subprocess with the variable set. The parent's
environment is never changed.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER_TEST = "test_cpu_tests_under_interpreter"


def _in_interpreter_process() -> bool:
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1" and isinstance(tl.sum, InterpretedFunction)


IN_INTERP = _in_interpreter_process()


@pytest.fixture(autouse=True)
def cpu_tests_need_interpreter(request):
    """Skip a module's CPU tests outside an interpreter process (GPU tests and the runner run)."""
    if request.node.get_closest_marker("gpu") is None and request.node.name != RUNNER_TEST and not IN_INTERP:
        pytest.skip(f"runs in the TRITON_INTERPRET=1 subprocess of {RUNNER_TEST}")


def run_under_interpreter(test_file: str, *pytest_args: str) -> None:
    """Run ``test_file``'s CPU tests (``pytest_args`` select among them) in a pytest subprocess
    with ``TRITON_INTERPRET=1``."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("LIFTPLUS_FAST_BACKEND", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not gpu",
            *pytest_args,
            os.path.abspath(test_file),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def interpreter_runner(test_file: str, *pytest_args: str):
    """The test that reruns ``test_file``'s CPU tests under the interpreter (skipped inside one)."""

    @pytest.mark.skipif(IN_INTERP, reason="already in an interpreter process")
    def test_cpu_tests_under_interpreter():
        pytest.importorskip("triton")
        run_under_interpreter(test_file, *pytest_args)

    return test_cpu_tests_under_interpreter
