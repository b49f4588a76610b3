"""Batched decode + augmentation on the training device: the same results as the worker path.

On the CPU the device path runs the same code, so its logic is tested everywhere; the CUDA
tests (decode_jpeg on the GPU, crops and resizes on CUDA tensors) need a GPU.
"""

import pytest
import torch

import liftplus_fast as lf
from liftplus_fast.data.cache_build import open_source_cache
from liftplus_fast.data.cached_transforms import CachedMDACrop, CachedResizeCrop
from liftplus_fast.data.gpu_augment import augment_batch, collate_encoded
from liftplus_fast.data.normalize import normalize_batch
from tests.data.tiny_run import tiny_run

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU decode and augment)")


def _both_paths(root, cdir, transform, device, epoch=1):
    ds = open_source_cache("imagefolder", root, "train", cdir, transform=transform)
    torch.manual_seed(0)
    want = normalize_batch(torch.stack([ds[(epoch, i)][0] for i in range(len(ds))]), MEAN, STD)
    items, labels = collate_encoded([ds.encoded()[(epoch, i)] for i in range(len(ds))])
    torch.manual_seed(0)
    got = augment_batch(items, transform, ds.cache_format, device, MEAN, STD)
    assert labels.tolist() == ds.labels
    return want, got


@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
def test_device_path_on_cpu_equals_worker_path(caches, fmt):
    root, dirs = caches
    for transform in (CachedMDACrop(32, 3), CachedResizeCrop(32, 36), CachedResizeCrop(32, 40, five_crop=True)):
        want, got = _both_paths(root, dirs[fmt], transform, "cpu")
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fast_train_augment_on_device_matches_worker_path(caches):
    root, dirs = caches
    common = tiny_run(
        dataset="imagefolder",
        root=root,
        batch_size=4,
        prec_train="fp32",
        data_cache=dirs["jpeg"],
    )
    a = lf.fast_train(**common)
    b = lf.fast_train(augment_on_device=True, **common)
    assert a.history[0]["loss"] == pytest.approx(b.history[0]["loss"], rel=1e-6)
    assert a.metrics["overall"] == b.metrics["overall"]
    with pytest.raises(ValueError, match="augment_on_device True needs data_cache"):
        lf.fast_train(dataset="imagefolder", root=root, augment_on_device=True, backbone="tiny_vit")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
def test_cuda_decode_and_augment_within_the_equivalence_bounds(caches, fmt):
    root, dirs = caches
    for transform in (CachedMDACrop(32, 3), CachedResizeCrop(32, 36), CachedResizeCrop(32, 40, five_crop=True)):
        want, got = _both_paths(root, dirs[fmt], transform, "cuda")
        assert got.is_cuda and got.shape == want.shape
        # 2/255 of mean pixel error, in normalised units.
        assert (got.cpu() - want).abs().mean().item() <= 2 / 255 / min(STD)
