"""The training step's intra-op threads beside the DataLoader workers: measured, kept, forced, restored."""

import time

import pytest
import torch
from torch.utils.data import TensorDataset

from liftplus_fast.config import make_config
from liftplus_fast.data import step_threads
from liftplus_fast.data.loaders import build_loader
from liftplus_fast.data.step_threads import ENV_VAR, StepThreadsLoader, thread_candidates
from liftplus_fast.errors import UserInputError


@pytest.fixture
def two_threads(monkeypatch):
    """torch at 2 intra-op threads on a 2-core machine (whatever this one has), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(step_threads, "_cpu_count", lambda: 2)
    monkeypatch.delenv(ENV_VAR, raising=False)
    yield
    torch.set_num_threads(before)


def _consume(loader, cost):
    """Iterate like the training loop, each batch costing ``cost[threads]`` seconds; the counts seen."""
    seen = []
    for _ in loader:
        seen.append(torch.get_num_threads())
        time.sleep(cost[seen[-1]])
    return seen


def test_candidates_are_torchs_count_and_the_cores_the_workers_leave(two_threads, monkeypatch):
    assert thread_candidates(1) == (2, 1)
    assert thread_candidates(2) == (2, 1) and thread_candidates(8) == (2, 1)
    monkeypatch.setattr(step_threads, "_cpu_count", lambda: 16)
    assert thread_candidates(4) == (2,)  # 12 cores left: torch's 2 threads fit beside the workers


@pytest.mark.parametrize("cost, expected", [({2: 0.03, 1: 0.002}, 1), ({2: 0.002, 1: 0.03}, 2)])
def test_the_faster_count_is_kept_for_the_run_and_the_count_restored_after(two_threads, cost, expected):
    loader = StepThreadsLoader(list(range(12)), num_workers=2)
    seen = _consume(loader, cost)
    assert loader.threads == expected and torch.get_num_threads() == 2
    # The unmeasured first batches ran with fewer threads, then both counts alternately from
    # torch's, then the choice held.
    skip = step_threads.SKIP_PERIODS
    assert seen[: skip + 2] == [1] * skip + [2, 1]
    assert {1, 2} <= set(seen) and seen[-4:] == [expected] * 4
    assert all(loader.measured[n] for n in (1, 2))
    # Later epochs run at the chosen count from their first batch, without measuring.
    timed = {n: len(v) for n, v in loader.measured.items()}
    assert _consume(loader, cost) == [expected] * 12 and torch.get_num_threads() == 2
    assert {n: len(v) for n, v in loader.measured.items()} == timed


def test_a_near_tie_keeps_torchs_count(two_threads, monkeypatch):
    # 8 % faster with fewer threads is within FEWER_MARGIN: torch's count stays, run after run.
    loader = StepThreadsLoader(list(range(16)), num_workers=2)
    _consume(loader, {2: 0.05, 1: 0.046})
    assert loader.threads == 2


def test_forced_count_and_bad_values(two_threads, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    loader = StepThreadsLoader(list(range(5)), num_workers=2)
    assert _consume(loader, {1: 0.0, 2: 0.0}) == [1] * 5 and torch.get_num_threads() == 2
    assert not any(loader.measured.values())
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(ENV_VAR, bad)
        with pytest.raises(UserInputError, match=f"{ENV_VAR} must be a positive integer"):
            StepThreadsLoader([], num_workers=2)


def test_the_count_is_restored_when_the_loop_stops_early(two_threads):
    loader = StepThreadsLoader(list(range(10)), num_workers=2)
    batches = iter(loader)
    for _ in range(5):
        next(batches)
    batches.close()  # a loop left by break or an exception
    assert torch.get_num_threads() == 2


def test_training_loaders_on_the_cpu_with_workers_are_wrapped(two_threads):
    data = TensorDataset(torch.zeros(8, 3), torch.zeros(8, dtype=torch.long))
    cfg = make_config("lift+", {"num_workers": 1})
    loader = build_loader(data, cfg, batch_size=4, shuffle=True)
    assert isinstance(loader, StepThreadsLoader) and len(loader) == 2
    assert loader.generator is loader.loader.generator and loader.sampler is loader.loader.sampler
    assert sum(x.shape[0] for x, _ in loader) == 8
    assert not isinstance(build_loader(data, cfg, batch_size=4, shuffle=False), StepThreadsLoader)
    no_workers = make_config("lift+", {"num_workers": 0})
    assert not isinstance(build_loader(data, no_workers, batch_size=4, shuffle=True), StepThreadsLoader)
