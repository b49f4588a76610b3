"""Atomic tuner checkpoints in the published format."""

import pytest
import torch

from liftplus_fast.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint


def test_round_trip_and_published_layout(tmp_path):
    sd = {"image_encoder.blocks.0.adaptformer.scale": torch.tensor(1.5), "classifier.weight": torch.randn(3, 4)}
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(str(path), sd, epoch=2)
    # What the published loader does: torch.load(weights_only=True)["tuner"].
    raw = torch.load(path, weights_only=True)
    assert set(raw["tuner"]) == set(sd) and raw["epoch"] == 2
    loaded = load_checkpoint(str(tmp_path))  # a folder works too
    assert torch.equal(loaded["tuner"]["classifier.weight"], sd["classifier.weight"])


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
