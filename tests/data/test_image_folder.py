"""Your own data: image folders and list files, through build_dataset, fast_train and the CLI."""

import os

import pytest
import torch
from PIL import Image

import liftplus_fast as lf
from liftplus_fast.cli import main as cli_main
from liftplus_fast.data import ImageFolderLT, ListFileDataset, build_dataset
from liftplus_fast.data.synthetic_images import write_image_folder
from tests.data.tiny_run import TINY, tiny_argv

SMALL = ((40, 52), (52, 40), (36, 36))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_image_folder(
        str(root), [6, 3, 2], test_per_class=2, sizes=SMALL, classnames=["golden_retriever", "tabby_cat", "red_fox"]
    )
    return str(root)


def test_imagefolder_classes_labels_and_names(folder):
    train = build_dataset("imagefolder", folder, "train")
    assert train.num_classes == 3 and train.cls_num_list == [6, 2, 3]
    # Sorted folder names give the labels; underscores become spaces for the text init.
    assert train.folder_names == ["golden_retriever", "red_fox", "tabby_cat"]
    assert train.classnames == ["golden retriever", "red fox", "tabby cat"]
    img, y = train[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and y == 0
    test = build_dataset("imagefolder", folder, "test")
    assert test.cls_num_list == [2, 2, 2] and len(test) == 6


def test_imagefolder_falls_back_to_val_and_ignores_non_images(tmp_path):
    write_image_folder(str(tmp_path), [2, 2], test_per_class=1, sizes=SMALL, listfiles=False)
    os.rename(tmp_path / "test", tmp_path / "val")
    (tmp_path / "train" / "class_000" / "notes.txt").write_text("not an image")
    assert len(ImageFolderLT(str(tmp_path), "train")) == 4
    assert len(ImageFolderLT(str(tmp_path), "test")) == 2


def test_imagefolder_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        ImageFolderLT(str(tmp_path), "train")
    write_image_folder(str(tmp_path), [1, 1], test_per_class=1, sizes=SMALL, listfiles=False)
    os.makedirs(tmp_path / "test" / "unknown_class")
    with pytest.raises(ValueError, match="unknown_class"):
        ImageFolderLT(str(tmp_path), "test")


def test_listfile_reads_split_dir_and_falls_back_to_val(folder, tmp_path):
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    for name in ("train.txt", "classnames.txt"):
        (split_dir / name).write_text(open(os.path.join(folder, name)).read())
    (split_dir / "val.txt").write_text(open(os.path.join(folder, "test.txt")).read())
    train = build_dataset("listfile", folder, "train", split_dir=str(split_dir))
    assert isinstance(train, ListFileDataset) and train.cls_num_list == [6, 3, 2]
    assert train.classnames[0] == "golden retriever"
    test = build_dataset("listfile", folder, "test", split_dir=str(split_dir))
    assert len(test) == 6 and test.list_file.endswith("val.txt")
    assert torch.equal(torch.as_tensor(train[0][0].size), torch.as_tensor(Image.open(train.paths[0]).size))
    with pytest.raises(FileNotFoundError, match="split_dir"):
        build_dataset("listfile", folder, "train", split_dir=str(tmp_path))


def test_fast_train_on_imagefolder_and_listfile(folder):
    a = lf.fast_train(dataset="imagefolder", root=folder, **TINY)
    assert a.cls_num_list == [6, 2, 3] and a.history[0]["images"] == 11
    b = lf.fast_train(dataset="listfile", root=folder, split_dir=folder, **TINY)
    assert b.cls_num_list == [6, 3, 2] and b.history[0]["images"] == 11


def test_cli_accepts_split_dir(folder, tmp_path, capsys):
    rc = cli_main(tiny_argv(tmp_path / "out", dataset="listfile", root=folder, split_dir=folder, batch_size=8))
    assert rc == 0, capsys.readouterr().err
    assert "overall accuracy" in capsys.readouterr().out
