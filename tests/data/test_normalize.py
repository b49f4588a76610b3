"""Normalising uint8 batches: one (scale, shift) per device, built once."""

import pytest
import torch

from liftplus_fast.data import normalize
from liftplus_fast.data.normalize import device_affine, normalize_batch

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def test_the_affine_of_a_device_is_built_once(monkeypatch):
    normalize._cached_affine.cache_clear()
    built = []
    real = normalize.normalization_affine
    monkeypatch.setattr(normalize, "normalization_affine", lambda *a: built.append(a) or real(*a))
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    outs = [normalize_batch(x, MEAN, STD) for _ in range(3)]
    outs.append(normalize_batch(x, list(MEAN), list(STD)))  # the same values as a list
    assert len(built) == 1
    want = (x.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    for out in outs:
        torch.testing.assert_close(out, want)
    normalize_batch(x, MEAN, STD, dtype=torch.float64)  # another dtype: another pair
    assert len(built) == 2
    assert device_affine(MEAN, STD, torch.float32, "cpu")[0] is device_affine(MEAN, STD, torch.float32, "cpu")[0]


def test_a_pair_first_built_during_evaluation_serves_training():
    normalize._cached_affine.cache_clear()
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    with torch.inference_mode():
        normalize_batch(x, MEAN, STD)
    scale, shift = device_affine(MEAN, STD, torch.float32, "cpu")
    assert not scale.is_inference() and not shift.is_inference()
    w = torch.ones(1, requires_grad=True)
    (normalize_batch(x, MEAN, STD) * w).sum().backward()
    assert w.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gpu_pair_stays_on_the_gpu():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, device="cuda")
    first = device_affine(MEAN, STD, torch.float32, x.device)
    out = normalize_batch(x, MEAN, STD)
    assert first[0].device == x.device and device_affine(MEAN, STD, torch.float32, x.device)[0] is first[0]
    torch.testing.assert_close(out.cpu(), normalize_batch(x.cpu(), MEAN, STD))
