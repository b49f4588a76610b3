"""Backbone names the open_clip ecosystem uses: model/tag pairs, hf-hub: and local folders."""

import json
import os

import pytest
import torch

from liftplus_fast.model import BackboneLoadError, load_clip
from liftplus_fast.model.backbones import _TINY_VIT_CFG, _resolve


def tiny_model_folder(folder, model):
    """An open_clip model folder: open_clip_config.json + safetensors weights (as on the Hub)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": _TINY_VIT_CFG, "preprocess_cfg": {}}, f)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "open_clip_model.safetensors")
    )
    return str(folder)


@pytest.mark.parametrize("spelling", ["{path}", "local-dir:{path}"])
def test_local_model_folder_loads_its_own_weights(tmp_path, tiny_clip_and_tok, spelling):
    model, _ = tiny_clip_and_tok
    folder = tiny_model_folder(tmp_path / "tiny-clip", model)
    loaded, tok = load_clip(spelling.format(path=folder), pretrained="openai")  # the folder's weights win
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert tok(["a photo of a dog."]).shape == (1, 77)


def test_folder_without_open_clip_config_is_named(tmp_path):
    with pytest.raises(ValueError, match="open_clip_config.json"):
        load_clip(str(tmp_path))
    with pytest.raises(ValueError, match="names no repository"):
        load_clip("hf-hub:")


def test_hf_hub_names_pass_through_and_fail_offline_in_one_sentence(monkeypatch):
    import open_clip.factory

    assert _resolve("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K") == (
        "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        False,
    )
    asked = []

    def offline(model_id, *args, **kwargs):
        asked.append(model_id)
        raise OSError("[Errno 101] Network is unreachable\nlong hub trace ...")

    monkeypatch.setattr(open_clip.factory, "_get_hf_config", offline)
    with pytest.raises(BackboneLoadError) as info:
        load_clip("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert asked == ["laion/CLIP-ViT-B-32-laion2B-s34B-b79K"]
    msg = str(info.value)
    assert "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in msg and "local path" in msg and "\n" not in msg


@pytest.mark.parametrize("tag,quick_gelu", [("openai", True), ("laion2b_s34b_b88k", False)])
def test_model_tag_pairs_fetch_that_tags_weights(monkeypatch, tag, quick_gelu):
    import open_clip

    asked = []

    def offline(cfg, *args, **kwargs):
        asked.append(cfg)
        raise OSError("offline")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    with pytest.raises(BackboneLoadError, match=f"{tag}.*ViT-B-16"):
        load_clip("ViT-B-16", pretrained=tag)
    assert asked == [open_clip.pretrained.get_pretrained_cfg("ViT-B-16", tag)]
    assert bool(asked[0].get("quick_gelu", False)) == quick_gelu


def test_openai_clip_spelling_and_published_names_stay():
    assert _resolve("ViT-B/16") == ("ViT-B-16", False)
    assert _resolve("clip_vit_b16") == ("ViT-B-16", True)
    assert _resolve("CLIP-ViT-B/16") == ("ViT-B-16", True)
