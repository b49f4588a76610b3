"""MDA schedule and crops, train / plain / test transforms and five-crop TTE windows."""

import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resized_crop, to_tensor

from liftplus_fast.config import LiftConfig
from liftplus_fast.data import (
    MinimalistRandomResizedCrop,
    build_plain_transform,
    build_test_transform,
    build_train_transform,
    mda_min_scale,
    set_transform_epoch,
)


def _image(w, h, seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))


def test_convex_schedule_five_epochs():
    got = [mda_min_scale(e, 5, "convex") for e in range(5)]
    assert got == pytest.approx([0.08, 0.109, 0.203, 0.392, 1.0], abs=1e-3)


@pytest.mark.parametrize(
    "func,mid",
    [
        ("min", 0.08),
        ("max", 1.0),
        ("linear", 0.08 + 0.92 * 0.5),
        ("convex", 0.08 + 0.92 * (1 - math.sqrt(0.75))),
        ("concave", 0.08 + 0.92 * math.sqrt(0.75)),
    ],
)
def test_schedules(func, mid):
    assert mda_min_scale(2, 5, func) == pytest.approx(mid)
    first, last = mda_min_scale(0, 5, func), mda_min_scale(4, 5, func)
    assert first == pytest.approx(1.0 if func == "max" else 0.08)
    assert last == pytest.approx(0.08 if func == "min" else 1.0)


def test_single_epoch_uses_t_zero():
    assert mda_min_scale(0, 1, "convex") == pytest.approx(0.08)
    assert mda_min_scale(0, 1, "max") == pytest.approx(1.0)
    crop = MinimalistRandomResizedCrop(16, num_epochs=1)
    assert crop(_image(40, 30)).size == (16, 16)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="schedule"):
        mda_min_scale(0, 5, "cubic")
    with pytest.raises(ValueError, match="schedule"):
        MinimalistRandomResizedCrop(16, 5, sched_func="cubic")
    with pytest.raises(ValueError, match="epoch"):
        mda_min_scale(5, 5)
    crop = MinimalistRandomResizedCrop(16, 5)
    with pytest.raises(ValueError, match="epoch"):
        crop.set_epoch(-1)


def test_step_and_set_epoch():
    crop = MinimalistRandomResizedCrop(16, 5)
    assert crop.min_scale() == pytest.approx(0.08)
    crop.step()
    assert crop.min_scale() == pytest.approx(0.109, abs=1e-3)
    crop.set_epoch(4)
    assert crop.min_scale() == pytest.approx(1.0)


def _replay(img, lo, hi, size):
    """The published crop sampling, spelled out with torch's global generator."""
    w, h = img.size
    area = h * w
    cap = min(h, w) ** 2 / area
    frac = torch.empty(1).uniform_(min(lo, cap), min(hi, cap)).item()
    side = int(round(math.sqrt(area * frac)))
    i = torch.randint(0, h - side + 1, size=(1,)).item()
    j = torch.randint(0, w - side + 1, size=(1,)).item()
    return (i, j, side), resized_crop(img, i, j, side, side, [size, size], InterpolationMode.BICUBIC, antialias=True)


@pytest.mark.parametrize("epoch", [0, 2, 4])
def test_crop_matches_published_sampling(epoch):
    img = _image(60, 45)
    crop = MinimalistRandomResizedCrop(24, 5)
    crop.set_epoch(epoch)
    torch.manual_seed(7)
    outs = [np.asarray(crop(img)) for _ in range(3)]
    torch.manual_seed(7)
    for out in outs:
        _, ref = _replay(img, mda_min_scale(epoch, 5), 1.0, 24)
        np.testing.assert_array_equal(out, np.asarray(ref))  # same window, bicubic, no flip


def test_crops_are_squares_within_area_bounds():
    torch.manual_seed(0)
    img = _image(100, 50)
    area, cap = 5000, 0.5
    for epoch in range(5):
        lo = min(mda_min_scale(epoch, 5), cap)
        for _ in range(50):
            i, j, h, w = MinimalistRandomResizedCrop.sample_square(img, mda_min_scale(epoch, 5), 1.0)
            assert h == w and 0 <= i <= 50 - h and 0 <= j <= 100 - w
            assert round(math.sqrt(area * lo)) <= h <= round(math.sqrt(area * cap))
    # At the last epoch the crop is the largest square.
    assert MinimalistRandomResizedCrop.sample_square(img, 1.0, 1.0)[2] == 50


def test_crop_accepts_tensors():
    torch.manual_seed(0)
    out = MinimalistRandomResizedCrop(8, 5)(torch.rand(3, 20, 30))
    assert out.shape == (3, 8, 8)


def _cfg(**kw):
    return LiftConfig(resolution=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **kw)


def test_train_transform_with_mda_and_set_epoch():
    tf = build_train_transform(_cfg(num_epochs=5, mda_func="linear"))
    crops = [t for t in tf.transforms if isinstance(t, MinimalistRandomResizedCrop)]
    assert len(crops) == 1 and crops[0].sched_func == "linear" and crops[0].num_epochs == 5
    assert crops[0].interpolation == InterpolationMode.BICUBIC
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in tf.transforms)
    assert set_transform_epoch(tf, 3) == 1 and crops[0].epoch == 3
    assert set_transform_epoch(T.Compose([T.Compose([tf])]), 2) == 1 and crops[0].epoch == 2
    assert tf(_image(50, 40)).shape == (3, 32, 32)


def test_train_transform_without_mda():
    tf = build_train_transform(_cfg(mda=False))
    kinds = [type(t) for t in tf.transforms]
    assert kinds[:2] == [T.RandomResizedCrop, T.RandomHorizontalFlip]
    assert tf.transforms[0].interpolation == InterpolationMode.BICUBIC
    assert set_transform_epoch(tf, 0) == 0
    assert tf(_image(50, 40)).shape == (3, 32, 32)


def test_plain_and_center_test_transforms():
    plain = build_plain_transform(_cfg())
    assert plain(_image(64, 48)).shape == (3, 32, 32)
    assert plain.transforms[0].size == 32
    test = build_test_transform(_cfg())
    assert test.transforms[0].size == 32 + 32 // 7
    assert test(_image(64, 48)).shape == (3, 32, 32)
    assert build_test_transform(_cfg(expand=8)).transforms[0].size == 40
    # 224 -> 256 (the published 224 + 224 // 7)
    assert build_test_transform(LiftConfig()).transforms[0].size == 256


def test_tte_five_crop_windows():
    cfg = _cfg(tte=True)
    tf = build_test_transform(cfg)
    assert tf.transforms[0].size == 32 + 24
    img = _image(80, 64)
    out = tf(img)
    assert out.shape == (5, 3, 32, 32)
    resized = to_tensor(T.Resize(56, interpolation=InterpolationMode.BICUBIC)(img))
    _, H, W = resized.shape
    assert min(H, W) == 56
    ct, cl = int(round((H - 32) / 2.0)), int(round((W - 32) / 2.0))
    windows = [(0, 0), (0, W - 32), (H - 32, 0), (H - 32, W - 32), (ct, cl)]  # tl, tr, bl, br, centre
    for k, (top, left) in enumerate(windows):
        torch.testing.assert_close(out[k], resized[:, top : top + 32, left : left + 32], atol=1e-6, rtol=0)


def test_tte_normalizes_and_pickles():
    tf = build_test_transform(LiftConfig(resolution=32, tte=True))
    out = tf(Image.new("RGB", (40, 40), (255, 255, 255)))
    mean, std = torch.tensor(LiftConfig().mean), torch.tensor(LiftConfig().std)
    torch.testing.assert_close(out[:, :, 5, 5], ((1 - mean) / std).expand(5, 3))
    assert pickle.loads(pickle.dumps(tf))(Image.new("RGB", (40, 40))).shape == (5, 3, 32, 32)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), lo=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_square_crop_always_fits(h, w, lo, seed):
    torch.manual_seed(seed)
    i, j, sh, sw = MinimalistRandomResizedCrop.sample_square(torch.zeros(3, h, w), lo, 1.0)
    assert sh == sw and 1 <= sh <= min(h, w) and 0 <= i <= h - sh and 0 <= j <= w - sw
