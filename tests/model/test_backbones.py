"""load_clip: name resolution, tiny model, local files and the no-network error."""

import pytest
import torch

from liftplus_fast.model import BackboneLoadError, load_clip
from liftplus_fast.model.backbones import _resolve


def test_tiny_vit_shapes(tiny_clip_and_tok):
    model, tok = tiny_clip_and_tok
    v = model.visual
    assert v.conv1.out_channels == 64 and v.conv1.kernel_size == (8, 8)
    assert len(v.transformer.resblocks) == 3 and v.transformer.resblocks[0].attn.num_heads == 4
    assert len(model.transformer.resblocks) == 2 and model.context_length == 77
    assert v.proj.shape == (64, 64)
    assert tok(["a photo of a cat."]).shape == (1, 77)
    with torch.no_grad():
        assert model.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 64)


def test_published_names_map_to_quickgelu_openai_architectures():
    assert _resolve("clip_vit_b16") == ("ViT-B-16", True)
    assert _resolve("clip_vit_l14@336px") == ("ViT-L-14-336", True)
    assert _resolve("CLIP-ViT-B/32") == ("ViT-B-32", True)
    assert _resolve("clip_rn50") == ("RN50", True)
    assert _resolve("ViT-B-16") == ("ViT-B-16", False)


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError, match="clip_vit_b16.*tiny_vit"):
        load_clip("clip_vit_z99")


def test_nonexistent_local_file(tmp_path):
    with pytest.raises(BackboneLoadError, match="neither an existing file"):
        load_clip("tiny_vit", pretrained=str(tmp_path / "missing.pt"))


def test_no_network_gives_one_clear_sentence(monkeypatch):
    import open_clip

    def offline(*args, **kwargs):
        raise OSError("[Errno 101] Network is unreachable\nlong hub trace ...")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    with pytest.raises(BackboneLoadError) as info:
        load_clip("clip_vit_b32", pretrained="openai")
    msg = str(info.value)
    assert "Could not download" in msg and "local path" in msg and "\n" not in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_local_checkpoint_round_trip(tmp_path, tiny_clip_and_tok):
    model, _ = tiny_clip_and_tok
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded, _ = load_clip("tiny_vit", pretrained=str(path))
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_resnet_visual_is_refused_clearly():
    from open_clip.modified_resnet import ModifiedResNet

    from liftplus_fast.model.peft_vit import PEFTVisionTransformer

    with pytest.raises(NotImplementedError, match="ViT"):
        PEFTVisionTransformer(ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=2, image_size=64, width=8))


def test_model_built_from_an_openai_state_dict_wraps_and_trains():
    """The public contract: clip_model may come from open_clip.model.build_model_from_openai_state_dict."""
    import open_clip

    import liftplus_fast as lf

    torch.manual_seed(0)
    base = open_clip.model.CLIP(
        embed_dim=32,
        quick_gelu=True,
        vision_cfg=dict(image_size=32, layers=2, width=64, head_width=64, patch_size=8),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
    )
    clip = open_clip.model.build_model_from_openai_state_dict(base.state_dict()).float().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        proj, clip.visual.proj = clip.visual.proj, None
        plain = clip.visual(x)  # open_clip's own pre-projection feature, before any surgery
        clip.visual.proj = proj
    model = lf.build_lift_model(
        clip,
        lf.LiftConfig(method="lift+", num_classes=4, resolution=32, prec_train="fp32"),
        cls_num_list=[8, 4, 2, 1],
        classnames=list("abcd"),
        tokenizer=open_clip.get_tokenizer("ViT-B-16"),
    )
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), plain, rtol=1e-5, atol=1e-5)
    model.train()
    loss, logits = model.training_loss(x, torch.tensor([0, 3]))
    loss.backward()
    assert logits.shape == (2, 4) and torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.tuner.named_parameters() if "up" in n)
