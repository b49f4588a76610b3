"""pytest-benchmark view of the same cases: ``pytest benchmarks --benchmark-only``.

Each (case, candidate) becomes one pytest-benchmark measurement. Ratios are claimed only from
``run.py``, which interleaves candidates in one run; this file is for pytest-benchmark's own
tooling (histograms, comparisons across commits with ``--benchmark-autosave``).
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402

SMOKE = os.environ.get("LIFTPLUS_FAST_BENCH_FULL", "0") != "1"


def _params():
    out = []
    for module in run.discover():
        for case in module.cases(SMOKE):
            for cand, fn in case.candidates.items():
                out.append(pytest.param(fn, id=f"{module.NAME}-{case.name}-{cand}"))
    return out


@pytest.mark.parametrize("fn", _params())
def test_benchmark(benchmark, fn):
    benchmark(fn)
