"""Files written whole or not at all (liftplus_fast.files)."""

import errno
import json
import os

import pytest
import torch

from liftplus_fast.checkpoint import save_checkpoint
from liftplus_fast.errors import OutputWriteError
from liftplus_fast.files import atomic_write, atomic_write_bytes, atomic_write_json


def test_failed_write_leaves_old_file_intact(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(str(path), {"w": torch.ones(2)})
    before = path.read_bytes()

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(path), boom)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary left behind


def test_json_is_strict_with_empty_groups_as_null(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(
        str(path),
        {
            "many": float("nan"),
            "few": 12.5,
            "per_class": [None, float("inf"), 1.0],
            "nested": {"x": (float("-inf"), 2)},
        },
    )

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads(path.read_text(), parse_constant=reject)
    assert data == {"many": None, "few": 12.5, "per_class": [None, None, 1.0], "nested": {"x": [None, 2]}}


def test_a_failed_disk_write_names_the_file_and_keeps_the_old_version(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_json(str(path), {"a": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputWriteError, match=r"metrics\.json \(its previous version is kept\): No space left"):
        atomic_write_bytes(str(path), b"new")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_before_replace_runs_after_the_contents_are_written(tmp_path):
    path, other = tmp_path / "data", tmp_path / "index"
    other.write_text("old index")
    seen = []

    def write(f):
        f.write(b"new data")

    def drop_index():
        seen.append((other.exists(), path.exists()))
        other.unlink()

    atomic_write(str(path), write, before_replace=drop_index)
    assert seen == [(True, False)] and path.read_bytes() == b"new data" and not other.exists()


def test_new_files_get_the_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "f.bin"  # the folder is created
    mask = os.umask(0o027)
    try:
        atomic_write_bytes(str(path), b"x")
    finally:
        os.umask(mask)
    assert path.read_bytes() == b"x" and (path.stat().st_mode & 0o777) == 0o640
