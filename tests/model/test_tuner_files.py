"""PEFT-style tuner files: tuner.safetensors + tuner_config.json, load_tuner, parameter counts."""

import copy
import json
import os

import pytest
import torch

import liftplus_fast as lf
from liftplus_fast.model import build_lift_model
from liftplus_fast.model.tuner_files import CONFIG_NAME, TENSORS_NAME

from .conftest import CLASSNAMES, COUNTS, cfg_for


def trained_model(clip, tokenizer, method="lift+", **overrides):
    model = build_lift_model(
        clip, cfg_for(method, backbone="tiny_vit", pretrained=None, **overrides), COUNTS, CLASSNAMES, tokenizer
    )
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # stand-in for training: every tuner tensor moves off its init
        for p in model.tuner.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("method", ["lift+", "lora", "vpt", "ssf"])
def test_round_trip_rebuilds_the_same_model(tmp_path, tiny_clip_and_tok, method, images):
    clip, tok = tiny_clip_and_tok
    model = trained_model(copy.deepcopy(clip), tok, method)
    model.save_tuner(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [TENSORS_NAME, CONFIG_NAME]  # no temporary files left

    loaded = lf.load_tuner(str(tmp_path), copy.deepcopy(clip), tok)
    assert loaded.cfg == model.cfg and loaded.classnames == CLASSNAMES
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
    for (k, a), (k2, b) in zip(model.tuner.state_dict().items(), loaded.tuner.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_files_hold_only_the_trained_tensors_and_what_rebuilds_the_model(tmp_path, fresh_clip, tokenizer):
    from safetensors.torch import load_file

    model = trained_model(fresh_clip, tokenizer)
    model.save_tuner(str(tmp_path / "tuner"))
    tensors = load_file(str(tmp_path / "tuner" / TENSORS_NAME))
    assert set(tensors) == set(model.official_tuner_state_dict())
    assert any(k.startswith("image_encoder.blocks.0.adaptformer.") for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == model.get_nb_trainable_parameters()[0]
    config = json.load(open(tmp_path / "tuner" / CONFIG_NAME))
    assert config["method"] == "lift+" and config["backbone"] == "tiny_vit" and config["pretrained"] is None
    assert config["classnames"] == CLASSNAMES and config["cls_num_list"] == COUNTS
    assert config["num_classes"] == len(COUNTS) and config["config"]["v"]["adaptformer"] is True


def test_load_without_a_clip_builds_the_named_backbone(tmp_path, fresh_clip, tokenizer):
    model = trained_model(fresh_clip, tokenizer)
    model.save_tuner(str(tmp_path))
    loaded = lf.load_tuner(str(tmp_path))
    assert loaded.clip is not fresh_clip
    for k, v in model.official_tuner_state_dict().items():
        assert torch.equal(loaded.official_tuner_state_dict()[k], v), k


def test_trainable_parameters_are_counted_and_printed_like_peft(fresh_clip, tokenizer, capsys):
    model = trained_model(fresh_clip, tokenizer)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.tuner.parameters())
    assert total == sum(p.numel() for p in model.parameters()) and 0 < trainable < total
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


def test_missing_or_broken_files_are_named(tmp_path, fresh_clip, tokenizer):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        lf.load_tuner(str(tmp_path))
    model = trained_model(fresh_clip, tokenizer)
    model.save_tuner(str(tmp_path))
    (tmp_path / TENSORS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=TENSORS_NAME):
        lf.load_tuner(str(tmp_path), copy.deepcopy(fresh_clip), tokenizer)
    os.remove(tmp_path / TENSORS_NAME)
    with pytest.raises(FileNotFoundError, match=TENSORS_NAME):
        lf.load_tuner(str(tmp_path), copy.deepcopy(fresh_clip), tokenizer)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a liftplus_fast tuner config"):
        lf.load_tuner(str(tmp_path))
    with pytest.raises(ValueError, match="must be a folder"):
        model.save_tuner(str(tmp_path / CONFIG_NAME))


def test_a_clip_of_another_width_is_refused(tmp_path, fresh_clip, tokenizer):
    from liftplus_fast.model.backbones import load_clip

    trained_model(fresh_clip, tokenizer).save_tuner(str(tmp_path))
    wider, _ = load_clip("ViT-B-32")
    with pytest.raises(ValueError, match=r"CLIP ViT, 64 wide, 3 blocks\).*768 wide, 12 blocks"):
        lf.load_tuner(str(tmp_path), wider)
