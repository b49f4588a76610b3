"""Data-parallel training across processes (``torchrun``), without wrapping the model.

Only the tuner is trained, so instead of ``DistributedDataParallel`` the few tuner gradients
are averaged with one all-reduce per optimiser step (after gradient accumulation): the same
update a single process makes on the whole global batch. Launch with

    torchrun --nproc_per_node=N -m liftplus_fast train -d imagenet_lt -m lift+ ...

``batch_size`` stays the global batch (the published meaning); each process takes
``batch_size / (N * accum_step)`` images per micro-batch. Evaluation is sharded and the
per-class counts are summed, so the metrics are those of the whole test set. NCCL is used for
CUDA, Gloo for CPU. Only rank 0 prints progress and writes the output folder.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist

from .errors import CollectiveTimeoutError, ProcessLostError, UserInputError
from .ops import choices

__all__ = [
    "CollectiveTimeoutError",
    "DistContext",
    "all_reduce_sum",
    "explain_lost_process",
    "explain_timeout",
    "init_distributed",
    "is_main_process",
    "shutdown_distributed",
]


@dataclass
class DistContext:
    """Where this process sits in a data-parallel run (``world_size == 1``: a single process),
    and the collectives the run uses: each one is a no-op for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK``; CPU stays CPU."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def rank_seed(self, seed: int) -> int:
        """A seed of this process's own: ``seed`` on rank 0 (and alone), far apart on the others."""
        return seed + 100_003 * self.rank

    def micro_batch(self, batch_size: int, accum_step: int) -> int:
        """The per-process micro-batch size, or ``ValueError`` naming ``batch_size``."""
        parts = accum_step * self.world_size
        if batch_size % parts:
            raise UserInputError(
                f"batch_size ({batch_size}) must be divisible by accum_step ({accum_step}) "
                f"times the number of processes ({self.world_size})"
            )
        return batch_size // parts

    def shard(self, dataset):
        """This process's share of ``dataset`` for evaluation: every ``world_size``-th item, no padding."""
        if not self.enabled:
            return dataset
        return torch.utils.data.Subset(dataset, range(self.rank, len(dataset), self.world_size))

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace every ``p.grad`` by its mean over the processes (one flat all-reduce per dtype)."""
        if not self.enabled:
            return
        by_dtype = {}
        for g in (p.grad for p in params if p.grad is not None):
            by_dtype.setdefault((g.dtype, g.device), []).append(g)
        for group in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            flat.div_(self.world_size)
            offset = 0
            for g in group:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def broadcast_module(self, module: torch.nn.Module, src: int = 0) -> None:
        """Copy ``module``'s parameters and buffers from rank ``src`` to every process."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (a new tensor; for one process, ``values`` itself).
        NCCL needs the tensor on the process's GPU, Gloo on the CPU: the caller places it."""
        return all_reduce_sum(values) if self.enabled else values

    def any_process(self, flag: bool, device) -> bool:
        """Whether ``flag`` is set on any process, so that every process takes the same branch
        (a branch one process took alone would leave the next collective waiting)."""
        return self.any_processes([flag], device)[0]

    def any_processes(self, flags: List[bool], device) -> List[bool]:
        """:meth:`any_process` of several flags, in one all-reduce."""
        if not self.enabled:
            return [bool(f) for f in flags]
        summed = all_reduce_sum(torch.tensor([float(f) for f in flags], device=device))
        return [bool(v > 0) for v in summed.tolist()]

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every process (``obj`` itself for a single process): what one
        process read from its disk reaches processes on nodes that do not share that disk."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_objects(self, obj) -> List:
        """Every process's ``obj``, in rank order (``[obj]`` for a single process)."""
        if not self.enabled:
            return [obj]
        out: List[Optional[object]] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def agree_on_choices(self) -> None:
        """Make every process take rank 0's measured choices of CPU implementations
        (``ops.choices``: bf16 GEMM path, attention, LayerNorm, bias + GELU): each would otherwise
        time its own, and processes sharing a machine can time differently. Rank 0 makes every
        choice not made yet."""
        if not self.enabled:
            return
        table = [choices.table() if self.is_main else None]
        dist.broadcast_object_list(table, src=0)
        choices.adopt(table[0])


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise UserInputError(f"environment variable {name} must be an integer; got {text!r}") from None


def init_distributed(device: torch.device, timeout: float = 1800.0) -> DistContext:
    """Join the process group that ``torchrun`` describes, or return a single-process context.

    A group the caller already initialised is used as is (and left open); otherwise one is
    created from ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` and closed by
    :func:`shutdown_distributed`. ``timeout`` (seconds, the ``dist_timeout`` option) bounds how
    long a collective waits for a stalled process before the job ends with an error.
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()))
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=float(timeout))
    )
    return DistContext(rank, world, local_rank, owns_group=True)


def explain_timeout(exc: BaseException, timeout: float) -> BaseException:
    """``exc`` as one sentence naming ``dist_timeout`` when it is a collective's timeout, else ``exc``.

    Gloo and NCCL report a stalled peer as "Timed out waiting 3000ms for recv ..." with a
    source location; the user needs to know which process setting ran out.
    """
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not any(w in text.lower() for w in ("timed out", "timeout")):
        return exc
    first = text.strip().splitlines()[0].split("] ", 1)[-1]
    return CollectiveTimeoutError(
        f"a collective waited longer than dist_timeout ({timeout:g} s) for another "
        f"process, which is stalled or gone ({first})"
    )


# How Gloo and NCCL report a peer process that has ended (its sockets closed by its kernel).
_LOST_PEER = (
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "connection refused",
    "remote process exited",
    "communicator was aborted",
)


def explain_lost_process(exc: BaseException) -> BaseException:
    """``exc`` as one sentence when a collective failed because another process ended, else ``exc``."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not any(w in text.lower() for w in _LOST_PEER):
        return exc
    first = text.strip().splitlines()[0].split("] ", 1)[-1].split(". This is typically")[0]
    return ProcessLostError(
        f"another process of the data-parallel run is gone (killed, crashed or its node lost: {first}); the job stops"
    )


def shutdown_distributed(ctx: DistContext) -> None:
    """Close the process group if :func:`init_distributed` opened it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over the default process group (a new tensor; the input is left alone).

    Without an initialised group of more than one process, ``values`` itself. NCCL needs the
    tensor on the process's GPU, Gloo on the CPU: the caller places it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    out = values.clone()
    dist.all_reduce(out)
    return out


def is_main_process() -> bool:
    """True on rank 0 of the current group, or of the ``torchrun`` launch (``RANK``), or alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0
