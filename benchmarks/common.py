"""Shared benchmark machinery: cases, interleaved timing, peak memory and hardware floors.

Speed is claimed only as ratios of candidates measured in one process, interleaved, median of
repeats, with the thread count fixed (docs/benchmarks.md). Each ``bench_<op>.py`` module defines
``NAME`` and ``cases(smoke) -> list[Case]``; ``run.py`` measures them.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from liftplus_fast import build_lift_model, load_clip, make_config
from liftplus_fast.files import atomic_write_json
from liftplus_fast.ops._dispatch import ENV_VAR

REFERENCE = "reference"
COMPILE = "compile"


@dataclass
class Case:
    """One benchmark shape: candidates doing the same work, plus its bytes and flops."""

    name: str
    params: dict
    candidates: Dict[str, Callable[[], object]]
    bytes_moved: Optional[int] = None
    flops: Optional[int] = None
    device: str = "cpu"
    notes: List[str] = field(default_factory=list)
    # Optional: candidate -> max relative error of its outputs (and gradients) against a
    # float64 evaluation of the reference, measured once outside the timed loop.
    accuracy: Optional[Callable[[], Dict[str, float]]] = None
    # Whole-pipeline cases (DataLoader workers, training runs) opt out of the profiler's
    # peak-memory pass and set their own repeat count.
    measure_memory: bool = True
    repeats: Optional[int] = None
    # Items (images) one call processes: the row then gets items_per_s per candidate.
    items: Optional[int] = None
    # Optional: extra row fields computed after timing (e.g. timings the candidates recorded).
    report: Optional[Callable[[], dict]] = None


def synchronize(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


# On CUDA one timed sample spans at least this long (calls repeated back to back), so launch
# gaps and the event resolution (~0.5 µs) stay small against it.
CUDA_SAMPLE_S = 1e-3


def time_interleaved(
    candidates: Dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 3, device: str = "cpu"
) -> Dict[str, List[float]]:
    """Seconds per call of each candidate; candidates alternate within every repeat.

    The order rotates each repeat so that no candidate always follows the same neighbour
    (cache state and clock boosts then spread evenly). On CUDA a sample is timed with CUDA
    events around as many back-to-back calls as fill :data:`CUDA_SAMPLE_S` (counted once after
    the warm-up), so µs-scale kernels are not timed by the host clock.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    synchronize(device)
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    inner = {name: _calls_per_sample(candidates[name]) if cuda else 1 for name in names}
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fn, n = candidates[name], inner[name]
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(n):
                    fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3 / n)
            else:
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - t0)
    return times


def _calls_per_sample(fn: Callable[[], object]) -> int:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end) / 1e3, 1e-6)
    return max(1, min(1000, int(CUDA_SAMPLE_S / once)))


def median(xs: List[float]) -> float:
    return statistics.median(xs)


@contextlib.contextmanager
def _quiet_stderr():
    # The profiler's C++ side logs every start/stop to fd 2; keep the table readable.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes allocated by ``fn`` above what was allocated when it started.

    CUDA: the caching allocator's peak. CPU: the running sum of the allocation events recorded
    by the profiler (allocations minus frees, in time order).
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


_FLOORS: Dict[str, float] = {}


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """Measured copy bandwidth in bytes/s (read + write counted), cached per device."""
    key = f"bw:{device}"
    if key not in _FLOORS:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        times = time_interleaved({"copy": lambda: dst.copy_(src)}, repeats=9, warmup=2, device=device)
        _FLOORS[key] = 2 * nbytes / median(times["copy"])
    return _FLOORS[key]


def gemm_throughput(
    device: str = "cpu", dtype: torch.dtype = torch.float32, m: int = 6304, k: int = 768, n: int = 768
) -> float:
    """Measured GEMM throughput in flop/s at a ViT-B/16-like shape, cached."""
    key = f"gemm:{device}:{dtype}"
    if key not in _FLOORS:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        times = time_interleaved({"mm": lambda: a @ b}, repeats=7, warmup=2, device=device)
        _FLOORS[key] = 2 * m * k * n / median(times["mm"])
    return _FLOORS[key]


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the given tensors (for bytes-moved accounting)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def compiled(fn: Callable, reset: bool = False) -> Callable:
    """``torch.compile`` of a reference function (the peer every fused op is compared with).

    Every benchmark shape is a static-shape specialisation (``dynamic=False``: after a second
    shape dynamo would otherwise switch to a dynamic-shape graph); the recompile limit is raised
    so that later shapes are not silently run eagerly once dynamo's default limit (8) is hit.
    ``reset=True`` first drops every compiled graph (a case then compiles for itself alone).
    """
    import torch._dynamo

    if reset:
        torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(fn, dynamic=False)


@contextlib.contextmanager
def backend(name: str):
    """``LIFTPLUS_FAST_BACKEND=name`` inside the block (the ops read it per call), restored after."""
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous


def lift_models(backbone: str, size: int, k: int, precisions: Dict[str, str], device: str = "cpu"):
    """``(clip, {candidate: LIFT+ model})``: one model per candidate of ``precisions`` (candidate
    -> ``prec_train``), all on copies of one random CLIP and with the first one's tuner, so the
    candidates do the same work. ``K = k`` long-tailed classes (500 down to 5 images); the text
    tower is removed (the training step does not use it)."""
    torch.manual_seed(0)
    clip, tokenizer = load_clip(backbone, None, device=device)
    counts = [max(1, int(500 * 0.01 ** (i / max(1, k - 1)))) for i in range(k)]
    classnames = [f"class {i}" for i in range(k)]
    models, first = {}, None
    for cand, prec in precisions.items():
        cfg = make_config(
            "lift+", {"num_classes": k, "resolution": size, "prec_train": prec, "classifier_init": "random"}
        )
        model = build_lift_model(copy.deepcopy(clip), cfg, counts, classnames, tokenizer)
        for attr in ("transformer", "token_embedding", "ln_final"):
            if hasattr(model.clip, attr):
                delattr(model.clip, attr)
        if first is None:
            first = model
        else:
            model.tuner.load_state_dict(first.tuner.state_dict())
        models[cand] = model
    return clip, models


def max_rel_error(got: List[torch.Tensor], truth: List[torch.Tensor]) -> float:
    """Largest ``max|got - truth| / max|truth|`` over matching tensors (each scaled by its own size)."""
    worst = 0.0
    for x, t in zip(got, truth):
        t = t.detach().double()
        scale = float(t.abs().max()) if t.numel() else 0.0
        err = float((x.detach().double() - t).abs().max()) if t.numel() else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def summarize(case: Case, times: Dict[str, List[float]], memory: Dict[str, int]) -> dict:
    """Row of the results table for one case."""
    med = {name: median(ts) for name, ts in times.items()}
    row = {
        "case": case.name,
        "params": case.params,
        "ms": {n: 1e3 * t for n, t in med.items()},
        "peak_mem_mb": {n: m / 2**20 for n, m in memory.items()},
        "notes": case.notes,
    }
    for peer in (REFERENCE, COMPILE):
        if peer in med:
            row[f"speedup_vs_{peer}"] = {n: med[peer] / t for n, t in med.items() if n != peer}
    if case.bytes_moved:
        floor = case.bytes_moved / copy_bandwidth(case.device)
        row["bandwidth_floor_ms"] = 1e3 * floor
        row["floor_fraction"] = {n: floor / t for n, t in med.items()}
    if case.flops:
        row["gflops"] = {n: case.flops / t / 1e9 for n, t in med.items()}
    if case.items:
        row["items_per_s"] = {n: case.items / t for n, t in med.items()}
    return row


def write_json(path: str, payload) -> None:
    """Write ``payload`` to ``path`` (its folder made when missing) with the package's atomic writer."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    atomic_write_json(path, payload)
