"""The CLIP text head and its tuners: CoOp, projection tuning, CLIP-Adapter, l.* text tuners."""

import copy

import pytest
import torch
import torch.nn.functional as F

from liftplus_fast.config import make_config
from liftplus_fast.model import build_lift_model
from liftplus_fast.model.text_head import coop_template

from .conftest import CLASSNAMES, COUNTS, K


def _cfg(method="coop", **kw):
    return make_config(method, {"num_classes": K, "backbone": "tiny_vit", "resolution": 32, "prec_train": "fp32", **kw})


def _clip_logits(clip, tok, images, prompts):
    img = F.normalize(clip.encode_image(images), dim=-1)
    txt = F.normalize(clip.encode_text(tok(prompts)), dim=-1)
    return clip.logit_scale.exp() * img @ txt.T


def test_coop_preset_is_the_published_one():
    cfg = _cfg()
    assert (cfg.coop, cfg.classifier, cfg.num_epochs, cfg.batch_size, cfg.lr, cfg.mda) == (
        True,
        None,
        50,
        32,
        0.002,
        False,
    )
    assert (cfg.coop_ctx_len, cfg.coop_cls_pos, cfg.coop_init) == (4, "end", None)


@pytest.mark.parametrize(
    "ctx_len, pos, template, rel",
    [
        (4, "end", "X X X X {}.", [0, 1, 2, 3]),
        (4, "front", "{} X X X X.", [-5, -4, -3, -2]),
        (3, "middle", "X {} X X.", [0, -3, -2]),
    ],
)
def test_coop_templates(ctx_len, pos, template, rel):
    assert coop_template(ctx_len, pos, None) == (template, rel)
    assert coop_template(ctx_len, pos, "photo") == ("a photo of a {}.", [0, 1, 2, 3, -1])


@pytest.mark.parametrize("pos", ["end", "front", "middle"])
def test_coop_context_replaces_the_x_tokens(pos, fresh_clip, tokenizer, images):
    model = build_lift_model(fresh_clip, _cfg(coop_cls_pos=pos), COUNTS, CLASSNAMES, tokenizer)
    head = model.text_head
    x_token = tokenizer(["X"])[0, 1]
    picked = head.tokens.gather(1, head.ctx_index)
    assert bool((picked == x_token).all())  # every context slot is an "X" of the template
    # with the context set to the X embeddings, the head is CLIP on the template prompts
    with torch.no_grad():
        head.text_encoder.ctx.copy_(fresh_clip.token_embedding.weight[x_token].expand_as(head.text_encoder.ctx))
        template, _ = coop_template(4, pos, None)
        ref = _clip_logits(fresh_clip, tokenizer, images, [template.format(n.replace("_", " ")) for n in CLASSNAMES])
        model.eval()
        torch.testing.assert_close(model(images), ref, rtol=1e-4, atol=1e-4)
    assert set(model.official_tuner_state_dict()) == {"text_encoder.ctx"}


def test_coop_trains_the_context_only(fresh_clip, tokenizer, images):
    model = build_lift_model(fresh_clip, _cfg(), COUNTS, CLASSNAMES, tokenizer)
    model.tuner.train()
    loss, _ = model.training_loss(images, torch.tensor([0, 1, 5]))
    loss.backward()
    ctx = model.tuner.text_encoder.ctx
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert [n for n, _ in model.tuner.named_parameters()] == ["text_encoder.ctx"]


def test_coop_photo_init_is_the_template_embeddings(fresh_clip, tokenizer):
    model = build_lift_model(fresh_clip, _cfg(coop_init="photo"), COUNTS, CLASSNAMES, tokenizer)
    ids = tokenizer(["a photo of a {}."])[0]
    eot = int(ids.argmax())
    expect = fresh_clip.token_embedding.weight[ids[[1, 2, 3, 4, eot - 1]]]
    torch.testing.assert_close(model.tuner.text_encoder.ctx, expect)


def test_proj_tuning_and_clip_adapter(fresh_clip, tokenizer, images):
    cfg = _cfg("zs", zero_shot=False, proj_tuning=True, clip_adapter=True, clip_adapter_dim=8)
    model = build_lift_model(fresh_clip, cfg, COUNTS, CLASSNAMES, tokenizer)
    keys = set(model.official_tuner_state_dict())
    assert {"image_proj", "text_proj", "image_adapter.down.weight", "text_adapter.up.bias"} <= keys
    assert model.tuner.image_proj is fresh_clip.visual.proj and model.tuner.text_proj is fresh_clip.text_projection
    assert model.tuner.image_adapter.down.weight.shape == (8, 64)
    # adapters start at zero: the head is CLIP's zero-shot head
    model.eval()
    with torch.no_grad():
        ref = _clip_logits(fresh_clip, tokenizer, images, [f"a photo of a {n.replace('_', ' ')}." for n in CLASSNAMES])
        torch.testing.assert_close(model(images), ref, rtol=1e-4, atol=1e-4)
    model.tuner.train()
    loss, _ = model.training_loss(images, torch.tensor([0, 1, 2]))
    loss.backward()
    assert all(p.grad is not None for p in model.tuner.parameters())


@pytest.mark.parametrize("tuner", ["lora", "adapter", "adaptformer", "ssf", "bitfit", "fft", "aft", "pt"])
def test_text_encoder_tuners(tuner, fresh_clip, tokenizer, images):
    opts = {f"l.{tuner}": True}
    if tuner == "pt":
        opts["l.pt_layers"] = None  # the published default "deep" is no layer expression
    model = build_lift_model(copy.deepcopy(fresh_clip), _cfg(coop=False, **opts), COUNTS, CLASSNAMES, tokenizer)
    keys = list(model.official_tuner_state_dict())
    assert keys and all(k.startswith("text_encoder.blocks.") for k in keys)
    if tuner == "lora":  # published default l.lora_dim 4
        assert model.tuner.text_encoder.blocks[0].lora["q"].down.shape == (64, 4)
    if tuner == "pt":  # published default l.pt_len 2
        assert model.tuner.text_encoder.blocks[0].prompt.shape == (2, 64)
    model.eval()
    if tuner not in ("pt", "ssf"):  # identity at init: CLIP's own zero-shot head (causal blocks)
        with torch.no_grad():
            ref = _clip_logits(
                fresh_clip, tokenizer, images, [f"a photo of a {n.replace('_', ' ')}." for n in CLASSNAMES]
            )
            torch.testing.assert_close(model(images), ref, rtol=1e-4, atol=1e-4)
    model.tuner.train()
    loss, _ = model.training_loss(images, torch.tensor([0, 1, 2]))
    loss.backward()
    assert all(p.grad is not None for p in model.tuner.parameters())


def test_text_tuner_checkpoint_round_trip(tiny_clip_and_tok, images):
    clip, tok = tiny_clip_and_tok
    cfg = _cfg(**{"l.lora": True, "l.ssf": True, "clip_adapter": True})
    src = build_lift_model(copy.deepcopy(clip), cfg, COUNTS, CLASSNAMES, tok)
    with torch.no_grad():
        for p in src.tuner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    exported = src.official_tuner_state_dict()
    assert "text_encoder.blocks.1.mlp.ssf.out_proj.scale" in exported and "text_encoder.ctx" in exported
    dst = build_lift_model(copy.deepcopy(clip), cfg, COUNTS, CLASSNAMES, tok)
    dst.load_official_tuner(exported)
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(images), src(images), rtol=1e-5, atol=1e-5)


def test_text_head_tuners_need_the_text_head(fresh_clip, tokenizer):
    with pytest.raises(ValueError, match="classifier None"):
        build_lift_model(fresh_clip, _cfg("lp", coop=True), COUNTS, CLASSNAMES, tokenizer)


def test_coop_trains_end_to_end(tmp_path):
    import liftplus_fast as lf

    r = lf.fast_train(
        dataset="digits_lt",
        root=str(tmp_path),
        backbone="tiny_vit",
        pretrained=None,
        method="coop",
        output_dir=str(tmp_path / "coop"),
        num_epochs=1,
        batch_size=64,
        num_workers=0,
        progress=False,
        prec_train="fp32",
        prec_test="fp32",
    )
    assert r.history and 0.0 <= r.metrics["overall"] <= 100.0
    ckpt = torch.load(tmp_path / "coop" / "checkpoint.pth.tar", weights_only=True)
    assert set(ckpt["tuner"]) == {"text_encoder.ctx"}
