"""Tiny CLIP fixtures shared by the model tests (image 32, patch 8, width 64, 3 blocks)."""

import copy

import pytest
import torch

from liftplus_fast.config import make_config

K = 6
CLASSNAMES = ["apple", "golden_retriever", "car", "sea_turtle", "tree", "x_ray"]
COUNTS = [40, 20, 10, 6, 3, 1]


@pytest.fixture(scope="session")
def tiny_clip_and_tok():
    from liftplus_fast.model import load_clip

    torch.manual_seed(0)
    model, tok = load_clip("tiny_vit")
    return model, tok


@pytest.fixture
def fresh_clip(tiny_clip_and_tok):
    """A private copy of the tiny CLIP (build_lift_model freezes/unfreezes in place)."""
    return copy.deepcopy(tiny_clip_and_tok[0])


@pytest.fixture
def tokenizer(tiny_clip_and_tok):
    return tiny_clip_and_tok[1]


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def cfg_for(method="lift+", **overrides):
    """A config for the tiny model with K classes, in fp32 (these tests compare fp32 numbers)."""
    return make_config(method, overrides={"num_classes": K, "prec_train": "fp32", **overrides})


def plain_preproj_feature(clip_model, images):
    """open_clip's own pre-projection CLS feature (its blocks, its LayerNorms)."""
    v = clip_model.visual
    x = v.transformer(v._embeds(images))
    pooled, _ = v._pool(x)
    return pooled
