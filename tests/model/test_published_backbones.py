"""The published non-ViT-CLIP backbones: timm ImageNet-21k ViTs, CLIP ResNets, timm ResNets."""

import copy

import pytest
import torch

from liftplus_fast.config import make_config
from liftplus_fast.model import BackboneLoadError, build_lift_model, load_backbone
from liftplus_fast.model.timm_backbones import load_timm, timm_input_config
from liftplus_fast.train import build_run_config

K = 5
COUNTS = [30, 12, 6, 3, 1]
NAMES = ["apple", "bear", "car", "dog", "eel"]


@pytest.fixture(scope="module")
def timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_base_patch16_224", pretrained=False, depth=3, embed_dim=32, num_heads=2, img_size=32, num_classes=0
    ).eval()


@pytest.fixture(scope="module")
def clip_rn():
    import open_clip

    torch.manual_seed(0)
    vision = {"image_size": 64, "layers": (1, 1, 1, 1), "width": 8, "head_width": 64}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    return open_clip.model.CLIP(16, vision, text, quick_gelu=True).eval()


@pytest.fixture(scope="module")
def timm_rn():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=0).eval()


def _cfg(method, backbone, **kw):
    return make_config(method, {"num_classes": K, "backbone": backbone, "prec_train": "fp32", **kw})


def test_timm_vit_feature_is_timms_own(timm_vit):
    model = build_lift_model(copy.deepcopy(timm_vit), _cfg("lp", "in21k_vit_b16"), COUNTS, NAMES)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = timm_vit.forward_head(timm_vit.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.encode_image(x), ref, rtol=1e-5, atol=1e-5)
    assert model.feature_dim == 32


@pytest.mark.parametrize("method", ["lift+", "fft", "bitfit", "vpt", "lora", "adapter", "ssf", "aft"])
def test_every_vit_tuner_trains_on_a_timm_vit(method, timm_vit):
    model = build_lift_model(copy.deepcopy(timm_vit), _cfg(method, "in21k_vit_b16"), COUNTS, NAMES)
    loss, logits = model.training_loss(torch.randn(2, 3, 32, 32), torch.tensor([0, 4]))
    loss.backward()
    assert logits.shape == (2, K) and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.tuner.parameters())
    keys = set(model.official_tuner_state_dict())
    published = {
        "lift+": "image_encoder.blocks.0.adaptformer.scale",
        "fft": "image_encoder.blocks.2.attn_in_proj_weight",
        "bitfit": "image_encoder.blocks.0.mlp_out_proj_bias",
        "vpt": "image_encoder.blocks.1.prompt",
        "lora": "image_encoder.blocks.0.attn.lora.v.down",
        "adapter": "image_encoder.blocks.0.mlp.adapter.up.weight",
        "ssf": "image_encoder.blocks.0.mlp.ssf.in_proj.shift",
        "aft": "image_encoder.blocks.0.attn.aft.out_proj.masked_weight.mask",
    }[method]
    assert published in keys


def test_timm_vit_backbone_tensors_are_the_ones_trained(timm_vit):
    vit = copy.deepcopy(timm_vit)
    model = build_lift_model(vit, _cfg("fft", "in21k_vit_b16"), COUNTS, NAMES)
    sd = model.official_tuner_state_dict()
    assert torch.equal(sd["image_encoder.blocks.1.attn_in_proj_weight"], vit.blocks[1].attn.qkv.weight)
    assert torch.equal(sd["image_encoder.blocks.1.mlp_in_proj_bias"], vit.blocks[1].mlp.fc1.bias)
    assert torch.equal(sd["image_encoder.blocks.1.norm2_weight"], vit.blocks[1].norm2.weight)


def test_backbone_without_text_encoder_is_a_clear_error(timm_vit):
    with pytest.raises(ValueError, match="classifier_init.*class_mean"):
        build_lift_model(
            copy.deepcopy(timm_vit), _cfg("lift+", "in21k_vit_b16", classifier_init="semantic"), COUNTS, NAMES
        )
    with pytest.raises(ValueError, match="zero-shot"):
        build_lift_model(copy.deepcopy(timm_vit), _cfg("zs", "in21k_vit_b16"), COUNTS, NAMES)


def test_clip_resnet_feature_is_the_attention_pool_output(clip_rn):
    model = build_lift_model(copy.deepcopy(clip_rn), _cfg("lp", "clip_rn50"), COUNTS, NAMES)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), clip_rn.visual(x), rtol=1e-5, atol=1e-5)
    # semantic init without a visual projection: the normalised projected text features
    w = model.classifier.weight
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(K), rtol=1e-5, atol=1e-5)


def test_clip_resnet_zero_shot_matches_clip(clip_rn):
    model = build_lift_model(copy.deepcopy(clip_rn), _cfg("zs", "clip_rn50"), COUNTS, NAMES)
    x = torch.randn(2, 3, 64, 64)
    import open_clip

    tok = open_clip.get_tokenizer("RN50")
    with torch.no_grad():
        img = torch.nn.functional.normalize(clip_rn.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(clip_rn.encode_text(tok([f"a photo of a {n}." for n in NAMES])), dim=-1)
        ref = clip_rn.logit_scale.exp() * img @ txt.T
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backbone_name", ["clip_rn", "timm_rn"])
def test_resnet_tuners_use_published_names_and_train(backbone_name, request):
    net = request.getfixturevalue(backbone_name)
    name = "clip_rn50" if backbone_name == "clip_rn" else "in1k_rn50"
    x = torch.randn(2, 3, 64, 64)
    keys = {}
    for method, extra in (
        ("lp", {"v.ssf": True}),
        ("lp", {"v.bitfit": True}),
        ("fft", {}),
        ("lp", {"v.unfreeze_bn": True}),
    ):
        model = build_lift_model(copy.deepcopy(net), _cfg(method, name, **extra), COUNTS, NAMES)
        if model.cfg.classifier_init == "class_mean":
            model.init_classifier_from_features(torch.randn(10, model.feature_dim), torch.arange(5).repeat(2))
        loss, _ = model.training_loss(x, torch.tensor([0, 3]))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in model.tuner.parameters())
        keys[(method, tuple(extra))] = set(model.official_tuner_state_dict())
    assert {"image_encoder.ssf.scale", "image_encoder.ssf.shift"} <= keys[("lp", ("v.ssf",))]
    bitfit = keys[("lp", ("v.bitfit",))] - {"classifier.weight"}
    assert "image_encoder.blocks.0_bn1_bias" in bitfit and all(k.endswith("_bias") for k in bitfit)
    assert "image_encoder.blocks.0_conv1_weight" in keys[("fft", ())]
    assert any(k.endswith("_downsample_1_weight") for k in keys[("fft", ())])
    assert {"image_encoder.blocks.0_bn1.running_mean", "image_encoder.blocks.0_bn1.weight"} <= keys[
        ("lp", ("v.unfreeze_bn",))
    ]


def test_unfreeze_bn_updates_running_statistics(clip_rn):
    model = build_lift_model(copy.deepcopy(clip_rn), _cfg("lp", "clip_rn50", **{"v.unfreeze_bn": True}), COUNTS, NAMES)
    bn = model.image_encoder.blocks[0].bn1
    before = bn.running_mean.clone()
    model.tuner.train()
    assert bn.training and not model.image_encoder.visual.bn1.training  # the stem stays frozen
    model.training_loss(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))[0].backward()
    assert not torch.equal(bn.running_mean, before) and bn.weight.grad is not None


def test_vit_only_tuner_on_a_resnet_is_a_clear_error(clip_rn):
    with pytest.raises(ValueError, match="v.adaptformer needs a ViT"):
        build_lift_model(copy.deepcopy(clip_rn), _cfg("lift+", "clip_rn50"), COUNTS, NAMES)


@pytest.mark.parametrize(
    "backbone_name, method, extra",
    [
        ("timm_vit", "lora", {}),
        ("timm_vit", "aft", {}),
        ("clip_rn", "lp", {"v.ssf": True}),
        ("timm_rn", "lp", {"v.unfreeze_bn": True}),
        ("timm_rn", "fft", {}),
    ],
)
def test_checkpoint_round_trip_on_other_backbones(backbone_name, method, extra, request):
    net = request.getfixturevalue(backbone_name)
    name = {"timm_vit": "in21k_vit_b16", "clip_rn": "clip_rn50", "timm_rn": "in1k_rn50"}[backbone_name]
    size = 32 if backbone_name == "timm_vit" else 64
    src = build_lift_model(copy.deepcopy(net), _cfg(method, name, **extra), COUNTS, NAMES)
    with torch.no_grad():
        for p in src.tuner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    exported = src.official_tuner_state_dict()
    dst = build_lift_model(copy.deepcopy(net), _cfg(method, name, **extra), COUNTS, NAMES)
    dst.load_official_tuner({"tuner": exported})
    x = torch.randn(2, 3, size, size)
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-5)


def test_backbone_presets_follow_the_published_configs():
    cfg = build_run_config(backbone="in21k_vit_b16@384px", pretrained=None)
    assert (cfg.resolution, cfg.mean, cfg.classifier_init) == (384, (0.5, 0.5, 0.5), "class_mean")
    cfg = build_run_config(backbone="in1k_rn101", pretrained=None)
    assert (cfg.resolution, cfg.std, cfg.classifier_init) == (224, (0.229, 0.224, 0.225), "class_mean")
    assert build_run_config(backbone="clip_vit_l14@336px").resolution == 336
    # given explicitly, it wins (published merge order: options after the backbone config)
    assert build_run_config(backbone="clip_vit_l14@336px", opts=["resolution", "224"]).resolution == 224
    assert build_run_config(backbone="clip_vit_l14@336px", resolution=280).resolution == 280
    # plain names bring their own input size
    cfg = build_run_config(backbone="vit_small_patch16_384", pretrained=None)
    assert (cfg.resolution, cfg.classifier_init) == (384, "class_mean")  # a timm model has no text encoder
    cfg = build_run_config(backbone="ViT-L-14-336")
    assert (cfg.resolution, cfg.classifier_init) == (336, "semantic")
    assert build_run_config(backbone="resnet18", opts=["classifier_init", "linear_probing"]).classifier_init == (
        "linear_probing"
    )
    assert timm_input_config("resnet50")["mean"] == (0.485, 0.456, 0.406)


def test_timm_weights_from_a_local_file(timm_vit, tmp_path):
    import timm

    path = tmp_path / "vit.pth"
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, num_classes=0)
    torch.save(ref.state_dict(), path)
    model = load_timm("vit_small_patch16_224", str(path), depth=2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), other)
    with pytest.raises(BackboneLoadError, match="does not fit"):
        load_timm("vit_small_patch16_224", str(other), depth=2)


def test_unknown_backbone_and_unreachable_weights_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="timm model name"):
        load_backbone("no_such_net_9000")
    import timm

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BackboneLoadError, match="local file"):
        load_timm("in21k_vit_b16", "default")
