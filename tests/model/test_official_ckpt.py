"""Published checkpoint format: hand-built state dicts against an independent re-implementation."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from liftplus_fast.model import build_lift_model
from liftplus_fast.model.tuners import bottleneck_dim

from .conftest import CLASSNAMES, COUNTS, K, cfg_for

D, L = 64, 3


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def published_logits(clip, tuner, images, heads=4, scale=25.0):
    """LIFT+ forward written from the published formulas (sequence-first, explicit softmax)."""
    sd = {k: v.detach() for k, v in clip.visual.state_dict().items()}
    p = clip.visual.conv1.weight.shape[-1]
    x = F.conv2d(images, sd["conv1.weight"], stride=p).flatten(2).permute(2, 0, 1)  # [N, B, D]
    b = x.shape[1]
    x = torch.cat([sd["class_embedding"].expand(1, b, -1), x]) + sd["positional_embedding"][:, None]
    if "ln_pre.weight" in sd:  # open_clip configs may drop ln_pre (no_ln_pre)
        x = _ln(x, sd["ln_pre.weight"], sd["ln_pre.bias"])
    raw = x.shape[0]
    for i in range(L):
        pre = f"transformer.resblocks.{i}."
        g = lambda n, pre=pre: sd[pre + n]  # noqa: E731
        t = {
            k[len(f"image_encoder.blocks.{i}.") :]: v
            for k, v in tuner.items()
            if k.startswith(f"image_encoder.blocks.{i}.")
        }
        if "prompt" in t:
            x = torch.cat([x[:1], t["prompt"][:, None].expand(-1, b, -1), x[-(raw - 1) :]])
        n = x.shape[0]
        h = _ln(x, g("ln_1.weight"), g("ln_1.bias"))
        qkv = h @ g("attn.in_proj_weight").T + g("attn.in_proj_bias")
        q, k_, v = qkv.chunk(3, -1)
        if "attn.lora.q.down" in t:
            q = q + h @ t["attn.lora.q.down"] @ t["attn.lora.q.up"] / t["attn.lora.q.down"].shape[1]
            v = v + h @ t["attn.lora.v.down"] @ t["attn.lora.v.up"] / t["attn.lora.v.down"].shape[1]
        if "attn.ssf.in_proj.scale" in t:
            q, k_, v = (torch.cat([q, k_, v], -1) * t["attn.ssf.in_proj.scale"] + t["attn.ssf.in_proj.shift"]).chunk(
                3, -1
            )
        hd = D // heads
        split = lambda z, n=n, hd=hd: z.reshape(n, b * heads, hd).transpose(0, 1)  # noqa: E731
        att = torch.softmax(split(q) @ split(k_).transpose(1, 2) / math.sqrt(hd), -1) @ split(v)
        o = att.transpose(0, 1).reshape(n, b, D) @ g("attn.out_proj.weight").T + g("attn.out_proj.bias")
        if "attn.ssf.out_proj.scale" in t:
            o = o * t["attn.ssf.out_proj.scale"] + t["attn.ssf.out_proj.shift"]
        a = x + o
        m = _ln(a, g("ln_2.weight"), g("ln_2.bias")) @ g("mlp.c_fc.weight").T + g("mlp.c_fc.bias")
        if "mlp.ssf.in_proj.scale" in t:
            m = m * t["mlp.ssf.in_proj.scale"] + t["mlp.ssf.in_proj.shift"]
        m = m * torch.sigmoid(1.702 * m)  # QuickGELU (tiny_vit, like OpenAI CLIP)
        m = m @ g("mlp.c_proj.weight").T + g("mlp.c_proj.bias")
        if "mlp.ssf.out_proj.scale" in t:
            m = m * t["mlp.ssf.out_proj.scale"] + t["mlp.ssf.out_proj.shift"]
        if "adaptformer.scale" in t:
            z = _ln(a, t["adaptformer.norm.weight"], t["adaptformer.norm.bias"])
            z = torch.relu(z @ t["adaptformer.down.weight"].T + t["adaptformer.down.bias"])
            m = m + t["adaptformer.scale"] * (z @ t["adaptformer.up.weight"].T + t["adaptformer.up.bias"])
        x = a + m
    f = _ln(x[0], sd["ln_post.weight"], sd["ln_post.bias"])
    w = tuner["classifier.weight"]
    return scale * (f / f.norm(dim=-1, keepdim=True)) @ (w / w.norm(dim=-1, keepdim=True)).T


def _rand(*shape, gen, mean=0.0, std=0.1):
    return torch.randn(shape, generator=gen) * std + mean


def handmade_tuner(method, gen):
    sd = {"classifier.weight": _rand(K, D, gen=gen, std=1.0)}
    for i in range(L):
        pre = f"image_encoder.blocks.{i}."
        if method == "lift+":
            r = bottleneck_dim(K, L, 2)
            sd.update(
                {
                    pre + "adaptformer.scale": _rand(gen=gen, mean=1.0),
                    pre + "adaptformer.norm.weight": _rand(D, gen=gen, mean=1.0),
                    pre + "adaptformer.norm.bias": _rand(D, gen=gen),
                    pre + "adaptformer.down.weight": _rand(r, D, gen=gen),
                    pre + "adaptformer.down.bias": _rand(r, gen=gen),
                    pre + "adaptformer.up.weight": _rand(D, r, gen=gen),
                    pre + "adaptformer.up.bias": _rand(D, gen=gen),
                }
            )
        elif method == "lora":
            r = bottleneck_dim(K, L, 4)
            for s in "qv":
                sd[pre + f"attn.lora.{s}.down"] = _rand(D, r, gen=gen)
                sd[pre + f"attn.lora.{s}.up"] = _rand(r, D, gen=gen)
        elif method == "ssf":
            for site, n in (
                ("attn.ssf.in_proj", 3 * D),
                ("attn.ssf.out_proj", D),
                ("mlp.ssf.in_proj", 4 * D),
                ("mlp.ssf.out_proj", D),
            ):
                sd[pre + f"{site}.scale"] = _rand(n, gen=gen, mean=1.0)
                sd[pre + f"{site}.shift"] = _rand(n, gen=gen)
        elif method == "vpt":
            sd[pre + "prompt"] = _rand(bottleneck_dim(K, L, 1), D, gen=gen)
    return sd


@pytest.mark.parametrize("method", ["lift+", "lora", "ssf", "vpt"])
def test_handmade_official_checkpoint_gives_published_predictions(method, fresh_clip, tokenizer, images):
    gen = torch.Generator().manual_seed(3)
    tuner = handmade_tuner(method, gen)
    model = build_lift_model(fresh_clip, cfg_for(method), COUNTS, CLASSNAMES, tokenizer)
    assert set(model.official_tuner_state_dict()) == set(tuner)
    model.load_official_tuner({"tuner": tuner})
    model.eval()
    with torch.no_grad():
        ours = model(images)
        ref = published_logits(fresh_clip, tuner, images)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("method", ["lift+", "adapter", "lora", "vpt", "ssf", "bitfit", "fft", "aft", "lp"])
def test_official_round_trip(method, tiny_clip_and_tok, images):
    clip, tok = tiny_clip_and_tok
    src = build_lift_model(copy.deepcopy(clip), cfg_for(method), COUNTS, CLASSNAMES, tok)
    with torch.no_grad():
        for p in src.tuner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    exported = src.official_tuner_state_dict()
    assert len(exported) == len(src.tuner.state_dict())
    dst = build_lift_model(copy.deepcopy(clip), cfg_for(method), COUNTS, CLASSNAMES, tok)
    dst.load_official_tuner({"module." + k: v for k, v in exported.items()})
    for k, v in dst.official_tuner_state_dict().items():
        assert torch.equal(v, exported[k]), k
    with torch.no_grad():
        torch.testing.assert_close(dst(images), src(images), rtol=1e-5, atol=1e-5)


def test_published_key_names(tiny_clip_and_tok):
    # The names the published PEFT_Block gives them: attention / MLP tuners in "attn" / "mlp"
    # sub-dicts, backbone tensors named after its in_proj / out_proj linears.
    clip, tok = tiny_clip_and_tok
    keys = {}
    for method in ("bitfit", "fft", "aft", "ssf", "lora", "vpt", "adapter"):
        m = build_lift_model(copy.deepcopy(clip), cfg_for(method), COUNTS, CLASSNAMES, tok)
        keys[method] = set(m.official_tuner_state_dict())
    assert {
        "image_encoder.blocks.0.attn_in_proj_bias",
        "image_encoder.blocks.0.attn_out_proj_bias",
        "image_encoder.blocks.0.mlp_in_proj_bias",
        "image_encoder.blocks.0.norm1_bias",
    } <= keys["bitfit"]
    assert "image_encoder.blocks.0.attn_in_proj_weight" not in keys["bitfit"]
    assert {
        "image_encoder.blocks.2.mlp_out_proj_weight",
        "image_encoder.blocks.0.norm1_weight",
        "image_encoder.blocks.0.attn_in_proj_weight",
    } <= keys["fft"]
    assert len(keys["fft"]) == 3 * 12 + 1
    assert {
        "image_encoder.blocks.1.mlp.aft.in_proj.masked_weight.optimized_params",
        "image_encoder.blocks.1.mlp.aft.in_proj.masked_weight.mask",
        "image_encoder.blocks.1.attn.aft.in_proj.masked_bias.optimized_params",
        "image_encoder.blocks.1.attn.aft.out_proj.masked_bias.mask",
    } <= keys["aft"]
    assert {
        "image_encoder.blocks.0.attn.ssf.in_proj.scale",
        "image_encoder.blocks.0.attn.ssf.out_proj.shift",
        "image_encoder.blocks.0.mlp.ssf.in_proj.scale",
        "image_encoder.blocks.0.mlp.ssf.out_proj.shift",
    } <= keys["ssf"]
    assert {"image_encoder.blocks.0.attn.lora.q.down", "image_encoder.blocks.0.attn.lora.v.up"} <= keys["lora"]
    assert "image_encoder.blocks.0.prompt" in keys["vpt"]
    assert {"image_encoder.blocks.0.mlp.adapter.norm.weight", "image_encoder.blocks.0.mlp.adapter.up.bias"} <= keys[
        "adapter"
    ]
    assert all("classifier.weight" in k for k in keys.values())
    # nothing of the package's own names leaks out
    assert not any(s in k for ks in keys.values() for k in ks for s in ("attn_in.", "mlp_out.", "_in_weight"))


def test_aft_masks_drawn_like_published(tiny_clip_and_tok):
    # Published generate_mask: a new generator seeded with aft_seed for each tensor, randperm
    # of numel, the first int(numel * ratio) indices set.
    clip, tok = tiny_clip_and_tok
    model = build_lift_model(
        copy.deepcopy(clip), cfg_for("aft", **{"v.aft_seed": 7, "v.aft_ratio": 0.1}), COUNTS, CLASSNAMES, tok
    )
    sd = model.official_tuner_state_dict()
    masks = {k: v for k, v in sd.items() if k.endswith(".mask")}
    assert len(masks) == 3 * 4 * 2
    for k, mask in masks.items():
        n = mask.numel()
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(7), dtype=torch.int64)[: int(n * 0.1)]
        expect = torch.zeros(n, dtype=torch.bool).scatter_(0, idx, True).view(mask.shape)
        assert torch.equal(mask, expect), k


def test_mismatched_checkpoints_raise(fresh_clip, tokenizer):
    model = build_lift_model(fresh_clip, cfg_for("lift+"), COUNTS, CLASSNAMES, tokenizer)
    good = model.official_tuner_state_dict()
    # another class count
    bad = dict(good, **{"classifier.weight": torch.zeros(K + 1, D)})
    with pytest.raises(ValueError, match="classifier.weight"):
        model.load_official_tuner(bad)
    # another backbone width
    bad = {k: (torch.zeros(*[s * 2 if s == D else s for s in v.shape]) if v.dim() else v) for k, v in good.items()}
    with pytest.raises(ValueError, match=r"shape"):
        model.load_official_tuner(bad)
    # another block count (a 12-block checkpoint has block 3 onwards)
    bad = dict(good)
    bad.update({k.replace("blocks.2.", "blocks.3."): v for k, v in good.items() if "blocks.2." in k})
    with pytest.raises(ValueError, match="blocks.3"):
        model.load_official_tuner(bad)
    # missing keys
    with pytest.raises(ValueError, match="missing"):
        model.load_official_tuner({"classifier.weight": good["classifier.weight"]})
    # a failed load copies nothing
    after = model.official_tuner_state_dict()
    assert all(torch.equal(after[k], good[k]) for k in good)
