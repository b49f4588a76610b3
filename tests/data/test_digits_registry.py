"""DigitsLT (the embedded offline data set) and the data-set registry."""

import pytest
import torch

from liftplus_fast.config import LiftConfig
from liftplus_fast.data import DATASETS, DigitsLT, build_dataset, build_test_transform, shot_groups


def test_digits_train_profile():
    ds = DigitsLT("train")
    assert ds.cls_num_list == [int(150 * 100 ** (-k / 9)) for k in range(10)]
    assert ds.cls_num_list == [150, 89, 53, 32, 19, 11, 6, 4, 2, 1]
    assert len(ds) == sum(ds.cls_num_list) and ds.num_classes == 10
    assert ds.classnames == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    groups = shot_groups(ds.cls_num_list)
    assert all(len(groups[g]) > 0 for g in ("many", "med", "few"))


def test_digits_test_is_balanced_and_disjoint():
    train, test = DigitsLT("train"), DigitsLT("test")
    assert test.cls_num_list == [25] * 10
    assert not set(train.indices.tolist()) & set(test.indices.tolist())


def test_digits_deterministic_and_seeded():
    a, b = DigitsLT("train"), DigitsLT("train")
    assert a.indices.tolist() == b.indices.tolist()
    assert DigitsLT("train", seed=1).indices.tolist() != a.indices.tolist()


def test_digits_images():
    ds = DigitsLT("train", image_size=48)
    img, y = ds[0]
    assert img.mode == "RGB" and img.size == (48, 48) and isinstance(y, int)
    lo, hi = img.convert("L").getextrema()
    assert lo < 50 and hi > 200  # strokes span the 8-bit range
    ds = DigitsLT("test", transform=build_test_transform(LiftConfig(resolution=32, tte=True)))
    assert ds[3][0].shape == (5, 3, 32, 32)


def test_digits_other_ratio_and_errors():
    assert DigitsLT("train", imbalance_ratio=10).cls_num_list[-1] == 15
    with pytest.raises(ValueError, match="split"):
        DigitsLT("dev")
    with pytest.raises(ValueError, match="pool"):
        DigitsLT("train", test_per_class=40)


def test_registry_names_and_unknown():
    assert set(DATASETS) == {
        "cifar100",
        "cifar100_ir10",
        "cifar100_ir50",
        "cifar100_ir100",
        "imagenet_lt",
        "places_lt",
        "inat2018",
        "imagefolder",
        "listfile",
        "digits_lt",
        *(f"inat2018_{k}" for k in "kpcofgs"),
    }
    with pytest.raises(ValueError, match="digits_lt") as info:
        build_dataset("mnist_lt", "/x")
    assert "imagenet_lt" in str(info.value) and "mnist_lt" in str(info.value)


def test_registry_digits_and_dataloader():
    ds = build_dataset("digits_lt", "/ignored", "train", transform=build_test_transform(LiftConfig(resolution=16)))
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert x.shape == (8, 3, 16, 16) and y.dtype == torch.long
