"""Every backbone family through the public API: lf.load_backbone, save_tuner and load_tuner.

Random weights only: a backbone is built with ``pretrained=None`` under a fixed seed, so
load_tuner, rebuilding the backbone named in the tuner's config under the same seed, gets the
same frozen weights and the predictions can be compared exactly.
"""

import copy

import pytest
import torch

import liftplus_fast as lf
from liftplus_fast.errors import UserInputError
from liftplus_fast.model.encoders import build_image_encoder, describe_encoder

K = 5
COUNTS = [30, 12, 6, 3, 1]
NAMES = ["apple", "bear", "car", "dog", "eel"]

# backbone name -> (family, feature width, blocks, input size, method, extra options)
FAMILIES = {
    "tiny_vit": ("CLIP ViT", 64, 3, 32, "lift+", {}),
    "clip_rn50": ("CLIP ResNet", 1024, 16, 224, "bitfit", {"v.ssf": True}),
    "in21k_vit_b16": ("timm ViT", 768, 12, 224, "lift+", {}),
    "resnet18": ("timm ResNet", 512, 8, 64, "lp", {"v.unfreeze_bn": True, "classifier_init": "class_mean"}),
}


def seeded_backbone(name):
    torch.manual_seed(0)
    return lf.load_backbone(name, None)


@pytest.fixture(scope="module")
def backbones():
    """Each family's backbone, built once (seed 0); tests take deep copies."""
    return {name: seeded_backbone(name) for name in FAMILIES}


def trained(backbone, tokenizer, name):
    method, extra = FAMILIES[name][4:]
    cfg = lf.make_config(
        method, {"num_classes": K, "backbone": name, "pretrained": None, "prec_train": "fp32", **extra}
    )
    model = lf.build_lift_model(backbone, cfg, COUNTS, NAMES, tokenizer, init_classifier=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # stand-in for training: every tuner tensor moves off its init
        for p in model.tuner.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def test_load_backbone_is_public_and_builds_every_family(backbones):
    assert "load_backbone" in lf.__all__
    for name, (family, width, blocks, *_) in FAMILIES.items():
        model, tokenizer = backbones[name]
        assert describe_encoder(build_image_encoder(model)) == {
            "image_encoder": family,
            "feature_dim": width,
            "blocks": blocks,
        }, name
        assert (tokenizer is not None) == family.startswith("CLIP"), name
    # the published spellings and the ImageNet-1k ResNet names resolve to timm models too
    model, tokenizer = lf.load_backbone("IN1K-RN50", None)
    assert tokenizer is None
    assert describe_encoder(build_image_encoder(model))["image_encoder"] == "timm ResNet"
    assert describe_encoder(build_image_encoder(model))["feature_dim"] == 2048


@pytest.mark.parametrize("name", ["in21k_vit_b16", "in1k_rn50", "IN21K-ViT-B/16", "resnet18"])
def test_load_clip_sends_timm_names_to_load_backbone(name):
    with pytest.raises(UserInputError, match=r"timm model, not a CLIP.*load_backbone"):
        lf.load_clip(name)


@pytest.mark.parametrize("pass_backbone", [True, False], ids=["backbone passed", "backbone from config"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_tuner_round_trip_gives_the_same_predictions(tmp_path, backbones, name, pass_backbone):
    backbone, tokenizer = backbones[name]
    size = FAMILIES[name][3]
    model = trained(copy.deepcopy(backbone), tokenizer, name)
    model.save_tuner(str(tmp_path))
    if pass_backbone:
        loaded = lf.load_tuner(str(tmp_path), copy.deepcopy(backbone), tokenizer)
    else:
        torch.manual_seed(0)  # the seed the backbone was built under
        loaded = lf.load_tuner(str(tmp_path))
    assert loaded.cfg == model.cfg and loaded.classnames == NAMES
    assert loaded.image_encoder.family == FAMILIES[name][0]
    saved, reloaded = model.official_tuner_state_dict(), loaded.official_tuner_state_dict()
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)
        for p in loaded.tuner.parameters():
            p.add_(0.05)
        assert not torch.allclose(loaded(images), expected)  # the tuner's tensors decide the predictions


@pytest.mark.parametrize(
    "trained_on, loaded_onto, differing",
    [
        ("tiny_vit", "resnet18", "family, feature width, block count"),
        ("in21k_vit_b16", "tiny_vit", "family, feature width, block count"),
        ("resnet18", "clip_rn50", "family, feature width, block count"),
    ],
)
def test_a_tuner_on_another_kind_of_backbone_is_refused_by_name(
    tmp_path, backbones, trained_on, loaded_onto, differing
):
    trained(copy.deepcopy(backbones[trained_on][0]), backbones[trained_on][1], trained_on).save_tuner(str(tmp_path))
    target = copy.deepcopy(backbones[loaded_onto][0])
    flags = [p.requires_grad for p in target.parameters()]
    family, width, blocks = FAMILIES[loaded_onto][:3]
    with pytest.raises(UserInputError) as err:
        lf.load_tuner(str(tmp_path), target)
    message = str(err.value)
    assert f"trained on backbone {trained_on!r} ({FAMILIES[trained_on][0]}" in message
    assert f"loaded onto is {family}, {width} wide, {blocks} blocks (differing: {differing})" in message
    assert [p.requires_grad for p in target.parameters()] == flags  # refused before touching it


def test_a_clip_resnet_of_another_size_names_width_and_blocks(tmp_path, backbones):
    import open_clip

    trained(copy.deepcopy(backbones["clip_rn50"][0]), None, "clip_rn50").save_tuner(str(tmp_path))
    vision = {"image_size": 64, "layers": (1, 1, 1, 1), "width": 8, "head_width": 64}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    small = open_clip.model.CLIP(16, vision, text, quick_gelu=True)
    with pytest.raises(
        UserInputError, match=r"CLIP ResNet, 16 wide, 4 blocks \(differing: feature width, block count\)"
    ):
        lf.load_tuner(str(tmp_path), small)


def test_a_file_recording_only_the_width_is_checked_on_the_width(tmp_path, backbones):
    import json

    from liftplus_fast.model.tuner_files import CONFIG_NAME

    trained(copy.deepcopy(backbones["tiny_vit"][0]), backbones["tiny_vit"][1], "tiny_vit").save_tuner(str(tmp_path))
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["image_encoder"], config["blocks"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(UserInputError, match=r"\(64 wide\).*\(differing: feature width\)"):
        lf.load_tuner(str(tmp_path), copy.deepcopy(backbones["resnet18"][0]))
    assert lf.load_tuner(str(tmp_path), copy.deepcopy(backbones["tiny_vit"][0])).image_encoder.family == "CLIP ViT"
