"""PEFT surgery: identity at zero init, tuners that change features, parameter counts, grads."""

import pytest
import torch

from liftplus_fast.model import build_lift_model
from liftplus_fast.model.tuners import bottleneck_dim

from .conftest import CLASSNAMES, COUNTS, K, cfg_for, plain_preproj_feature

D, L, MLP = 64, 3, 256


@pytest.mark.parametrize("method", ["lift+", "adapter", "lora", "lp", "fft", "bitfit", "aft"])
def test_zero_init_tuners_keep_the_clip_feature(method, fresh_clip, tokenizer, images):
    model = build_lift_model(fresh_clip, cfg_for(method), COUNTS, CLASSNAMES, tokenizer)
    with torch.no_grad():
        ours = model.encode_image(images)
        ref = plain_preproj_feature(fresh_clip, images)
    assert ours.shape == (3, D)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["vpt", "ssf"])
def test_vpt_and_ssf_change_the_feature(method, fresh_clip, tokenizer, images):
    model = build_lift_model(fresh_clip, cfg_for(method), COUNTS, CLASSNAMES, tokenizer)
    with torch.no_grad():
        diff = (model.encode_image(images) - plain_preproj_feature(fresh_clip, images)).abs().max()
    assert diff > 1e-3


def test_nonzero_adaptformer_changes_the_feature(fresh_clip, tokenizer, images):
    model = build_lift_model(fresh_clip, cfg_for("lift+"), COUNTS, CLASSNAMES, tokenizer)
    with torch.no_grad():
        model.tuner.image_encoder.blocks[1].adaptformer.up.weight.normal_()
        diff = (model.encode_image(images) - plain_preproj_feature(fresh_clip, images)).abs().max()
    assert diff > 1e-3


@pytest.mark.parametrize("k,expected", [(100, 4), (365, 8), (1000, 32), (8142, 256)])
def test_bottleneck_rule_vit_b16(k, expected):
    assert bottleneck_dim(k, 12, 2) == expected


def _count(model):
    return sum(p.numel() for p in model.tuner.parameters())


def test_parameter_counts_per_method(tiny_clip_and_tok):
    import copy

    clip, tok = tiny_clip_and_tok
    cls = K * D
    r2 = bottleneck_dim(K, L, 2)
    r4 = bottleneck_dim(K, L, 4)
    plen = bottleneck_dim(K, L, 1)
    block = 2 * D + 3 * D * D + 3 * D + D * D + D + 2 * D + MLP * D + MLP + D * MLP + D
    biases = 2 * D + 3 * D + D + MLP + D
    expected = {
        "lift+": L * (2 * D + r2 * D + r2 + D * r2 + D + 1) + cls,
        "adapter": L * (2 * D + r2 * D + r2 + D * r2 + D) + cls,
        "lora": L * 2 * (D * r4 + r4 * D) + cls,
        "vpt": L * plen * D + cls,
        "ssf": L * 2 * (3 * D + D + MLP + D) + cls,
        "bitfit": L * biases + cls,
        "fft": L * block + cls,
        "lp": cls,
        "zs": 0,
    }
    for method, n in expected.items():
        model = build_lift_model(copy.deepcopy(clip), cfg_for(method), COUNTS, CLASSNAMES, tok)
        assert _count(model) == n, method
        assert all(p.requires_grad for p in model.tuner.parameters())
    # AFT: int(numel * ratio) entries per weight/bias, ratio = K / (L * (12 D + 9))
    model = build_lift_model(copy.deepcopy(clip), cfg_for("aft"), COUNTS, CLASSNAMES, tok)
    ratio = K / (L * (12 * D + 9))
    sizes = [3 * D * D, 3 * D, D * D, D, MLP * D, MLP, D * MLP, D]
    assert _count(model) == L * sum(int(s * ratio) for s in sizes) + cls


@pytest.mark.parametrize("method", ["lift+", "adapter", "lora", "vpt", "ssf", "bitfit", "fft", "aft"])
def test_gradients_reach_only_the_tuner(method, fresh_clip, tokenizer, images):
    model = build_lift_model(fresh_clip, cfg_for(method), COUNTS, CLASSNAMES, tokenizer)
    with torch.no_grad():  # make the zero-init up-projections non-zero so every tuner gets grads
        for name, p in model.tuner.named_parameters():
            if name.endswith("up.weight") or name.endswith(".up"):
                p.normal_(std=0.1)
    loss, _ = model.training_loss(images, torch.tensor([0, 2, 5]))
    loss.backward()
    tuner_ids = {id(p) for p in model.tuner.parameters()}
    for name, p in model.named_parameters():
        if id(p) in tuner_ids:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for p in model.tuner.parameters())


def test_aft_masks_are_seeded(tiny_clip_and_tok):
    import copy

    clip, tok = tiny_clip_and_tok
    masks = []
    for seed in (0, 0, 1):
        model = build_lift_model(copy.deepcopy(clip), cfg_for("aft", **{"v.aft_seed": seed}), COUNTS, CLASSNAMES, tok)
        masks.append(model.tuner.image_encoder.blocks[0].aft["mlp_in"].masked_weight.mask.clone())
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


def test_layer_selection_last_k(fresh_clip, tokenizer):
    model = build_lift_model(fresh_clip, cfg_for("lift+", **{"v.adaptformer_layers": 1}), COUNTS, CLASSNAMES, tokenizer)
    keys = model.official_tuner_state_dict().keys()
    assert {k.split(".")[2] for k in keys if k.startswith("image_encoder")} == {"2"}


@pytest.mark.parametrize("method", ["lift+", "lora", "aft", "vpt"])
def test_low_precision_backbone_keeps_fp32_tuner(method, fresh_clip, tokenizer, images):
    model = build_lift_model(fresh_clip, cfg_for(method), COUNTS, CLASSNAMES, tokenizer)
    model.image_encoder.visual.to(torch.bfloat16)
    feats = model.encode_image(images)
    assert feats.dtype == torch.bfloat16
    loss, _ = model.training_loss(images, torch.tensor([0, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.tuner.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None, name


class _Double:
    """A toy tuner for site ``mlp_in``: doubles the projection's output."""

    def tune_output(self, x, y):
        return 2 * y


def test_a_new_tuner_attaches_to_its_site_without_touching_the_block(fresh_clip, tokenizer, images):
    from liftplus_fast.model.peft_vit import PEFTBlock

    model = build_lift_model(fresh_clip, cfg_for("lp"), COUNTS, CLASSNAMES, tokenizer)
    blk = model.image_encoder.blocks[0]
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        before = blk(x, 5)
        # The same as doubling the MLP input projection's weight and bias.
        fc = blk.block.mlp.c_fc
        fc.weight.mul_(2)
        fc.bias.mul_(2)
        expected = blk(x, 5)
        fc.weight.div_(2)
        fc.bias.div_(2)
        assert not blk.attached("mlp_in")
        blk.attach("mlp_in", _Double())
        assert blk.attached("mlp_in")
        after = blk(x, 5)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="site must be one of"):
        blk.attach("mlp_middle", _Double())
    with pytest.raises(TypeError, match="defines none of"):
        blk.attach("residual", _Double())
    assert "tokens" in PEFTBlock.SITES


def test_the_block_output_has_one_owner(fresh_clip, tokenizer):
    model = build_lift_model(fresh_clip, cfg_for("lift+"), COUNTS, CLASSNAMES, tokenizer)
    blk = model.image_encoder.blocks[0]
    assert blk.attached("residual")
    with pytest.raises(ValueError, match="already has a tuner"):
        blk.attach("residual", blk.tuner.adaptformer)


# fp64 where every op of the method takes it (tight bounds); the fused AdaptFormer op is fp32 at
# most.
@pytest.mark.parametrize(
    "method,dtype,tol",
    [
        ("vpt", torch.float64, 1e-10),
        ("lora", torch.float64, 1e-10),
        ("ssf", torch.float64, 1e-10),
        ("aft", torch.float64, 1e-10),
        ("fft", torch.float64, 1e-10),
        ("lift+", torch.float32, 1e-2),
    ],
)
def test_the_last_block_run_for_cls_alone_gives_the_full_blocks_feature(
    method, dtype, tol, fresh_clip, tokenizer, images, monkeypatch
):
    # The encoder runs its last block for the CLS token only; running every block on every
    # token must give the same feature and the same tuner gradients.
    model = build_lift_model(fresh_clip, cfg_for(method), COUNTS, CLASSNAMES, tokenizer).to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.tuner.parameters():  # away from the zero inits, so every tuner acts
            p.add_(0.05 * torch.randn_like(p))
    enc, x = model.image_encoder, images.to(dtype)
    pruned = enc(x)
    calls = []
    blocks = list(enc.blocks)
    for blk in blocks:
        original = blk.forward
        blk.forward = lambda x, raw_len, first_only=False, _f=original: calls.append(first_only) or _f(x, raw_len)
    try:
        full = enc(x)
    finally:
        for blk in blocks:
            del blk.forward
    assert calls[-1] is True and not any(calls[:-1])  # the pruned call asked for CLS only
    monkeypatch.setenv("LIFTPLUS_FAST_BACKEND", "reference")
    calls.clear()
    for blk in blocks:
        blk.forward = lambda x, raw_len, first_only=False, _f=blk.forward: calls.append(first_only) or _f(x, raw_len)
    try:
        torch.testing.assert_close(enc(x), full, rtol=1e-5, atol=1e-5)  # other kernels, same math
    finally:
        for blk in blocks:
            del blk.forward
    assert calls and not any(calls)  # the reference backend keeps the published full last block
    monkeypatch.delenv("LIFTPLUS_FAST_BACKEND")
    assert pruned.shape == full.shape == (images.shape[0], enc.width)
    torch.testing.assert_close(pruned, full, rtol=1e-5 * (tol < 1e-5) + 1e-5, atol=1e-5)
    grads = []
    for out in (pruned, full):
        model.tuner.zero_grad()
        out.square().sum().backward(retain_graph=True)
        grads.append([None if p.grad is None else p.grad.clone() for p in model.tuner.parameters()])
    # fp64: each tensor to its own size. fp32: to the largest gradient of the tuner, the size
    # fp32's rounding noise scales with: this tiny random model amplifies it to ~3e-3 of that
    # through its blocks, so a small tensor (block 0's AdaptFormer scale) can differ by a few
    # per cent of its own size, by an amount that differs between kernels and CPUs.
    overall = max(float(g.abs().max()) for g in grads[1] if g is not None and g.numel())
    for (name, _), a, b in zip(model.tuner.named_parameters(), *grads):
        assert (a is None) == (b is None), name
        if a is not None and a.numel():
            scale = overall if dtype == torch.float32 else float(b.abs().max()) + 1e-30
            assert float((a - b).abs().max()) <= tol * scale, (name, float((a - b).abs().max()), scale)
