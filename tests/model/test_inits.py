"""Classifier initialisations and the zero-shot head."""

import torch
import torch.nn.functional as F

from liftplus_fast.model import LinearClassifier, build_lift_model

from .conftest import CLASSNAMES, COUNTS, K, cfg_for


def test_semantic_init_matches_the_formula(fresh_clip, tokenizer):
    model = build_lift_model(fresh_clip, cfg_for("lift+"), COUNTS, CLASSNAMES, tokenizer)
    w = model.tuner.classifier.weight.detach()
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(K))

    prompts = [f"a photo of a {n.replace('_', ' ')}." for n in CLASSNAMES]
    tokens = tokenizer(prompts)
    c = fresh_clip
    with torch.no_grad():
        x = c.token_embedding(tokens) + c.positional_embedding
        x = c.transformer(x, attn_mask=c.attn_mask)
        x = F.layer_norm(x, (x.shape[-1],), c.ln_final.weight, c.ln_final.bias, c.ln_final.eps)
        eot = x[torch.arange(K), tokens.argmax(-1)]
        t = F.normalize(eot @ c.text_projection, dim=-1)
        expected = F.normalize(t @ c.visual.proj.T, dim=-1)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-5)


def test_zero_shot_logits_are_clip_logits(fresh_clip, tokenizer, images):
    model = build_lift_model(fresh_clip, cfg_for("zs"), COUNTS, CLASSNAMES, tokenizer)
    assert sum(p.numel() for p in model.tuner.parameters()) == 0
    with torch.no_grad():
        ours = model(images)
        img = F.normalize(fresh_clip.encode_image(images), dim=-1)
        txt = F.normalize(
            fresh_clip.encode_text(tokenizer([f"a photo of a {n.replace('_', ' ')}." for n in CLASSNAMES])), dim=-1
        )
        ref = fresh_clip.logit_scale.exp() * img @ txt.T
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


def _feats():
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(K).repeat(4)
    centers = torch.randn(K, 64, generator=g) * 3
    return centers[labels] + torch.randn(len(labels), 64, generator=g), labels


def test_class_mean_init(fresh_clip, tokenizer):
    model = build_lift_model(fresh_clip, cfg_for("lift+", classifier_init="class_mean"), COUNTS, CLASSNAMES, tokenizer)
    f, y = _feats()
    model.init_classifier_from_features(f, y, "class_mean")
    expected = F.normalize(torch.stack([f[y == k].mean(0) for k in range(K)]), dim=-1)
    torch.testing.assert_close(model.tuner.classifier.weight.detach(), expected)


def test_linear_probing_init(fresh_clip, tokenizer):
    model = build_lift_model(fresh_clip, cfg_for("lift+"), COUNTS, CLASSNAMES, tokenizer)
    f, y = _feats()
    model.init_classifier_from_features(f, y, "linear_probing")
    w = model.tuner.classifier.weight.detach()
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(K))
    pred = (F.normalize(f) @ w.T).argmax(-1)
    assert (pred == y).float().mean() > 0.9


def test_missing_class_in_features_raises(fresh_clip, tokenizer):
    import pytest

    model = build_lift_model(fresh_clip, cfg_for("lift+"), COUNTS, CLASSNAMES, tokenizer)
    f, y = _feats()
    keep = y != 3
    with pytest.raises(ValueError, match="class index 3"):
        model.init_classifier_from_features(f[keep], y[keep], "class_mean")


def test_random_init_rows_have_norm_at_most_one():
    torch.manual_seed(0)
    w = LinearClassifier(300, 50).weight.detach()
    norms = w.norm(dim=-1)
    assert (norms <= 1 + 1e-5).all() and (norms > 0.5).all()
