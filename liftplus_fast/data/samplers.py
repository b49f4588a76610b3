"""Samplers over long-tailed data sets."""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import Sampler


class DownSampler(Sampler[int]):
    """Each pass yields at most ``n_max`` random indices per class, in shuffled order.

    Used to compute classifier initialisations (class means, linear probing) from a
    class-balanced subset. Classes are visited in order of first appearance in ``labels``
    and randomness comes from ``generator`` (torch's global generator when ``None``), which
    matches the published sampler's call sequence. A new subset is drawn on every pass.
    """

    def __init__(self, labels: Sequence[int], n_max: int = 100, generator: Optional[torch.Generator] = None):
        if n_max < 1:
            raise ValueError(f"n_max must be >= 1; got {n_max!r}")
        by_class: Dict[int, List[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(int(y), []).append(i)
        self._groups = [torch.tensor(v, dtype=torch.long) for v in by_class.values()]
        self.n_max = int(n_max)
        self.generator = generator
        self.num_samples = sum(min(self.n_max, len(g)) for g in self._groups)

    def __iter__(self) -> Iterator[int]:
        picked = [g[torch.randperm(len(g), generator=self.generator)][: self.n_max] for g in self._groups]
        if not picked:
            return iter(())
        flat = torch.cat(picked)
        flat = flat[torch.randperm(len(flat), generator=self.generator)]
        return iter(flat.tolist())

    def __len__(self) -> int:
        return self.num_samples
