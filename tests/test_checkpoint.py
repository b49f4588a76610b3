"""Atomic tuner checkpoints in the published format."""

import pytest
import torch

from liftplus_fast.checkpoint import CHECKPOINT_NAME, atomic_write_bytes, load_checkpoint, save_checkpoint


def test_round_trip_and_published_layout(tmp_path):
    sd = {"image_encoder.blocks.0.adaptformer.scale": torch.tensor(1.5), "classifier.weight": torch.randn(3, 4)}
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(str(path), sd, epoch=2)
    # What the published loader does: torch.load(weights_only=True)["tuner"].
    raw = torch.load(path, weights_only=True)
    assert set(raw["tuner"]) == set(sd) and raw["epoch"] == 2
    loaded = load_checkpoint(str(tmp_path))  # a folder works too
    assert torch.equal(loaded["tuner"]["classifier.weight"], sd["classifier.weight"])


def test_failed_write_leaves_old_file_intact(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(str(path), {"w": torch.ones(2)})
    before = path.read_bytes()

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_bytes(str(path), boom)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary left behind


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(str(tmp_path / "nowhere.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        load_checkpoint(str(bad))
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="no 'tuner'"):
        load_checkpoint(str(foreign))


def test_json_is_strict_with_empty_groups_as_null(tmp_path):
    import json

    from liftplus_fast.checkpoint import atomic_write_json

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
