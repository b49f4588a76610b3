"""LiftConfig, method presets, published-style overrides and the published size rules."""

import pytest

from liftplus_fast.config import METHODS, LiftConfig, make_config, resolve_method
from liftplus_fast.model.tuners import bottleneck_dim, parse_layers


def test_lift_plus_defaults_are_the_published_recipe():
    cfg = make_config("lift+")
    assert cfg.classifier == "CosineClassifier" and cfg.v.adaptformer
    assert (cfg.lr, cfg.batch_size, cfg.num_epochs, cfg.momentum, cfg.weight_decay) == (0.02, 128, 5, 0.9, 5e-4)
    assert cfg.loss_type == "LA" and cfg.classifier_scale == 25 and cfg.classifier_init == "semantic"
    assert cfg.mda and cfg.mda_func == "convex" and cfg.seed == 0


def test_lift_preset_differs_as_published():
    cfg = make_config("lift")
    assert (cfg.num_epochs, cfg.lr, cfg.mda) == (10, 0.01, False)


def test_published_style_opts_and_nested_keys():
    cfg = make_config(
        "lift+",
        opts=[
            "num_epochs",
            "15",
            "tte",
            "True",
            "v.adaptformer_dim",
            "8",
            "v.adaptformer_layers",
            "[0, 2]",
            "output_dir",
            "None",
        ],
    )
    assert cfg.num_epochs == 15 and cfg.tte is True
    assert cfg.v.adaptformer_dim == 8 and cfg.v.adaptformer_layers == [0, 2]
    assert cfg.output_dir is None


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"loss_type": "Hinge"}, "loss_type"),
        ({"batch_size": 10, "accum_step": 3}, "divisible"),
        ({"mda_func": "cubic"}, "mda_func"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"prec_train": "int8"}, "prec_train"),
    ],
)
def test_bad_options_name_the_option(bad, match):
    with pytest.raises(ValueError, match=match):
        make_config("lift+", bad)


def test_unknown_option_and_method():
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        make_config("lift+", {"learning_rate": 1})
    with pytest.raises(ValueError, match=r"unknown method 'lift\+\+'"):
        make_config("lift++")
    with pytest.raises(ValueError, match="key value"):
        make_config("lift+", opts=["lr"])


def test_every_method_builds_and_aliases_resolve():
    for name in METHODS:
        assert make_config(name).method == name
    assert resolve_method("linear_probe") == "lp" and resolve_method("LIFT+") == "lift+"


def test_config_dict_round_trip():
    cfg = make_config("lora", {"num_classes": 365, "v.lora_dim": 4})
    back = LiftConfig.from_dict(cfg.to_dict())
    assert back == cfg
    with pytest.raises(ValueError, match="unknown"):
        LiftConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_parse_layers_forms():
    assert parse_layers(None, 12) == list(range(12))
    assert parse_layers(3, 12) == [9, 10, 11]
    assert parse_layers("range(3)", 12) == [0, 1, 2]
    assert parse_layers([0, -1], 12) == [0, 11]
    assert parse_layers(0, 12) == []  # published: the last 0 blocks, i.e. none
    for bad in (-1, 13, [12], "import os"):
        with pytest.raises(ValueError):
            parse_layers(bad, 12)


@pytest.mark.parametrize("k, r", [(100, 4), (365, 8), (1000, 32), (8142, 256)])
def test_adaptformer_bottleneck_rule_vit_b16(k, r):
    assert bottleneck_dim(k, 12, 2) == r


def test_lora_and_prompt_rules():
    assert bottleneck_dim(1000, 12, 4) == 16  # LoRA r for ImageNet-LT
    assert bottleneck_dim(1000, 12, 1) == 64  # VPT prompt length
    assert bottleneck_dim(10, 12, 2) == 1  # never below 1


def test_direct_construction_builds_the_named_method():
    from liftplus_fast import LiftConfig, make_config

    cfg = LiftConfig(method="lift+", num_classes=10)
    assert cfg.v.adaptformer and cfg.classifier == "CosineClassifier"
    assert LiftConfig().v.adaptformer  # the default method is LIFT+
    lift = LiftConfig(method="LIFT")
    assert (lift.method, lift.lr, lift.num_epochs, lift.mda) == ("lift", 0.01, 10, False)
    zs = LiftConfig(method="zs")
    assert zs.zero_shot and zs.classifier is None
    # Given values that differ from the defaults win over the preset.
    assert LiftConfig(method="lift", lr=0.05).lr == 0.05
    # ... and so do given values equal to the defaults (lr=0.02 and mda=True are the defaults).
    given = LiftConfig(method="lift", lr=0.02, mda=True)
    assert (given.lr, given.mda, given.num_epochs) == (0.02, True, 10)
    from liftplus_fast.config import TunerConfig

    assert not LiftConfig(method="lora", v=TunerConfig(lora=False)).v.lora
    assert LiftConfig(method="lora", v=TunerConfig(lora_dim=8)).v.lora
    assert LiftConfig(method="lora", num_classes=10).v.lora
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        LiftConfig(method="magic")
    # A saved config comes back as it was, even where it undid a preset value.
    saved = make_config("lift", {"lr": 0.02, "num_classes": 10})
    assert LiftConfig.from_dict(saved.to_dict()) == saved and saved.lr == 0.02


def test_direct_config_gives_adaptformer_in_every_block():
    import liftplus_fast as lf
    from liftplus_fast.model import load_clip

    clip, tok = load_clip("tiny_vit")
    model = lf.build_lift_model(
        clip,
        lf.LiftConfig(method="lift+", num_classes=4, resolution=32),
        cls_num_list=[8, 4, 2, 1],
        classnames=list("abcd"),
        tokenizer=tok,
    )
    blocks = {k.split(".")[2] for k in model.official_tuner_state_dict() if ".adaptformer." in k}
    assert blocks == {str(i) for i in range(len(clip.visual.transformer.resblocks))}
