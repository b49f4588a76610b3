"""List-file data sets: parsing of the real public split files and error reporting."""

import json
import os

import pytest
import torch
from PIL import Image

from liftplus_fast.data import (
    CorruptImageError,
    ImageNetLT,
    INaturalist2018,
    LongTailListDataset,
    PlacesLT,
    build_dataset,
)


def _sub(shared_data_dir, name):
    return os.path.join(shared_data_dir, name)


def test_places_lt_real_splits(shared_data_dir):
    d = _sub(shared_data_dir, "Places_LT")
    train = PlacesLT("/images", "train", split_dir=d)
    assert len(train) == 62500 and train.num_classes == 365 and len(train.classnames) == 365
    assert max(train.cls_num_list) == 4980 and min(train.cls_num_list) == 5
    assert sum(train.cls_num_list) == 62500
    assert train.paths[0] == os.path.join("/images", "train/airfield/00004851.jpg")
    test = build_dataset("places_lt", "/images", "test", split_dir=d)
    assert len(test) == 36500 and test.cls_num_list == [100] * 365
    assert len(PlacesLT("/images", "val", split_dir=d)) == 7300


def test_imagenet_lt_real_splits(shared_data_dir):
    d = _sub(shared_data_dir, "ImageNet_LT")
    test = ImageNetLT("/images", "test", split_dir=d)
    assert len(test) == 50000 and test.num_classes == 1000 and len(test.classnames) == 1000
    assert test.cls_num_list == [50] * 1000
    assert test.classnames[0] == "tench"
    assert len(ImageNetLT("/images", "val", split_dir=d)) == 20000


def test_imagenet_lt_missing_train_file_names_it(shared_data_dir):
    d = _sub(shared_data_dir, "ImageNet_LT")
    with pytest.raises(FileNotFoundError, match=r"train\.txt") as info:
        ImageNetLT("/images", "train", split_dir=d)
    assert "split_dir" in str(info.value)


def test_inat2018_real_val_is_test_split(shared_data_dir):
    d = _sub(shared_data_dir, "iNaturalist2018")
    ds = INaturalist2018("/images", "test", split_dir=d)
    assert len(ds) == 24426 and ds.num_classes == 8142 and len(ds.classnames) == 8142
    assert ds.cls_num_list == [3] * 8142
    assert ds.classnames == sorted(ds.classnames)

    with open(os.path.join(d, "categories.json"), "rb") as f:
        cats = json.load(f)
    names = sorted({c["name"] for c in cats})
    with open(os.path.join(d, "val.txt")) as f:
        lines = [next(f) for _ in range(5)]
    for i, line in enumerate(lines):
        raw = int(line.split()[1])
        expected = names.index(cats[raw]["name"])
        assert ds.labels[i] == expected and ds.classnames[ds.labels[i]] == cats[raw]["name"]
    # Sorting by name reorders the ids, so the remap is not the identity.
    raw_labels = [int(line.split()[1]) for line in lines]
    assert ds.labels[:5] != raw_labels


def _write_image(path, size=(40, 30), color=(200, 10, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_loads_images_lazily_with_transform(tmp_path):
    _write_image(str(tmp_path / "a" / "x.png"))
    Image.new("L", (20, 20), 7).save(tmp_path / "gray.png")
    lst = tmp_path / "list.txt"
    lst.write_text("a/x.png 1\n\ngray.png 0\nmissing.png 1\n")
    ds = LongTailListDataset(
        str(tmp_path), str(lst), ["c0", "c1"], transform=lambda im: torch.tensor(im.size + (len(im.getbands()),))
    )
    assert ds.labels == [1, 0, 1] and ds.cls_num_list == [1, 2] and ds.num_classes == 2
    img, y = ds[0]
    assert img.tolist() == [40, 30, 3] and y == 1
    assert ds[1][0].tolist() == [20, 20, 3]  # grayscale is converted to RGB
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ds[2]


def test_corrupt_image_names_path(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    _write_image(str(tmp_path / "ok.jpg"))
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    lst = tmp_path / "list.txt"
    lst.write_text("bad.jpg 0\ntrunc.jpg 0\n")
    ds = LongTailListDataset(str(tmp_path), str(lst), ["c0"])
    for i, name in enumerate(["bad.jpg", "trunc.jpg"]):
        with pytest.raises(CorruptImageError, match=name) as info:
            ds[i]
        assert isinstance(info.value, ValueError)
        assert info.value.path.endswith(name)


def test_label_out_of_range_names_file_and_line(tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_text("a.jpg 0\nb.jpg 1\nc.jpg 3\n")
    with pytest.raises(ValueError, match=r"train\.txt:3: label 3"):
        LongTailListDataset(str(tmp_path), str(lst), ["c0", "c1", "c2"])
    lst.write_text("a.jpg -1\n")
    with pytest.raises(ValueError, match=r"train\.txt:1"):
        LongTailListDataset(str(tmp_path), str(lst), ["c0"])


def test_malformed_lines(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("a.jpg 0\nonlyonefield\n")
    with pytest.raises(ValueError, match=r"l\.txt:2"):
        LongTailListDataset(str(tmp_path), str(lst), ["c0"])
    lst.write_text("a.jpg zero\n")
    with pytest.raises(ValueError, match="not an integer"):
        LongTailListDataset(str(tmp_path), str(lst), ["c0"])


def test_paths_with_spaces(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("my dir/a b.jpg 0\n")
    ds = LongTailListDataset(str(tmp_path), str(lst), ["c0"])
    assert ds.paths == [os.path.join(str(tmp_path), "my dir/a b.jpg")]


def test_missing_files_and_bad_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        LongTailListDataset(str(tmp_path), str(tmp_path / "nope.txt"), ["c0"])
    (tmp_path / "train.txt").write_text("a.jpg 0\n")
    with pytest.raises(FileNotFoundError, match=r"classnames\.txt"):
        PlacesLT(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match=r"categories\.json"):
        INaturalist2018(str(tmp_path), "train")
    with pytest.raises(ValueError, match="unknown split"):
        PlacesLT(str(tmp_path), "holdout")


def test_split_dir_defaults_to_root(tmp_path):
    _write_image(str(tmp_path / "img" / "a.png"))
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    (tmp_path / "test.txt").write_text("img/a.png 1\n")
    ds = build_dataset("imagenet_lt", str(tmp_path), "test")
    assert ds.classnames == ["cat", "dog"] and ds.cls_num_list == [0, 1]
    assert ds[0][0].size == (40, 30)
