"""The PEFT wrapper follows open_clip both with and without ``ln_pre`` (tiny_vit has none)."""

import open_clip
import pytest
import torch

from liftplus_fast.model import build_lift_model

from .conftest import CLASSNAMES, COUNTS, cfg_for, plain_preproj_feature


@pytest.mark.parametrize("no_ln_pre", [False, True])
@pytest.mark.parametrize("method", ["lift+", "lora", "adapter"])
def test_zero_init_features_equal_open_clip(no_ln_pre, method, tokenizer, images):
    torch.manual_seed(0)
    vision = {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8, "no_ln_pre": no_ln_pre}
    text = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 1}
    clip = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    expected = plain_preproj_feature(clip, images)
    model = build_lift_model(clip, cfg_for(method), COUNTS, CLASSNAMES, tokenizer)
    torch.testing.assert_close(model.encode_image(images), expected, rtol=1e-5, atol=1e-5)
    assert hasattr(clip.visual.ln_pre, "weight") != no_ln_pre
