"""DownSampler, shot groups and group accuracies."""

import math
from collections import Counter

import pytest
import torch

from liftplus_fast.data import DownSampler, group_accuracies, shot_groups


def test_downsampler_caps_each_class():
    labels = [0] * 250 + [1] * 30 + [2] * 5 + [0] * 10
    s = DownSampler(labels, n_max=100, generator=torch.Generator().manual_seed(0))
    idx = list(s)
    assert len(idx) == len(s) == 135 and len(set(idx)) == 135
    assert Counter(labels[i] for i in idx) == {0: 100, 1: 30, 2: 5}


def test_downsampler_reproducible_and_shuffled():
    labels = [k % 3 for k in range(300)]
    a = list(DownSampler(labels, 50, generator=torch.Generator().manual_seed(1)))
    b = list(DownSampler(labels, 50, generator=torch.Generator().manual_seed(1)))
    assert a == b
    assert len({labels[i] for i in a[:50]}) > 1  # the classes are mixed, not emitted in blocks
    torch.manual_seed(3)
    c = list(DownSampler(labels, 50))
    torch.manual_seed(3)
    assert list(DownSampler(labels, 50)) == c


def test_downsampler_edge_cases():
    assert list(DownSampler([], 10)) == []
    with pytest.raises(ValueError, match="n_max"):
        DownSampler([0], 0)


def test_shot_group_boundaries():
    counts = [101, 100, 20, 19, 500, 5]
    g = shot_groups(counts)
    assert g["many"].tolist() == [0, 4]
    assert g["med"].tolist() == [1, 2]
    assert g["few"].tolist() == [3, 5]
    assert all(v.dtype == torch.long and v.dim() == 1 for v in g.values())
    assert shot_groups([500])["many"].tolist() == [0]  # a single member stays 1-D


def test_group_accuracies():
    acc = group_accuracies([0.9, 0.5, 0.7, 0.1], [200, 50, 30, 3])
    assert acc["many"] == pytest.approx(0.9) and acc["med"] == pytest.approx(0.6)
    assert acc["few"] == pytest.approx(0.1)
    acc = group_accuracies(torch.tensor([0.5, 0.7]), [200, 300])
    assert acc["many"] == pytest.approx(0.6) and math.isnan(acc["med"]) and math.isnan(acc["few"])
    with pytest.raises(ValueError, match="per_class_acc"):
        group_accuracies([0.1], [1, 2])


def test_downsampler_matches_published_call_sequence():
    """Per class in first-appearance order: randperm, keep n_max; then one randperm of all."""
    labels = [2, 0, 2, 1, 0, 2, 2, 1, 0, 0, 2]
    torch.manual_seed(11)
    got = list(DownSampler(labels, n_max=3))
    torch.manual_seed(11)
    by_class = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    picked = []
    for idx in by_class.values():
        t = torch.tensor(idx)
        picked.extend(t[torch.randperm(len(t))].tolist()[:3])
    t = torch.tensor(picked)
    assert got == t[torch.randperm(len(t))].tolist()
