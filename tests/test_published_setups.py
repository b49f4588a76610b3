"""Every command of the published LIFT+ scripts resolves here and builds its model.

The commands below are written down from the published repository's ``scripts/*.sh`` (536
``python main.py ...`` lines, 14 scripts). Each is parsed by our command line exactly as given
(only the program name differs), must resolve to a config with the published meaning, and each
distinct set-up (data set x backbone x method x model options) is built on a small random
backbone of the same depth and kind, then run forward and backward once.
"""

import copy
import itertools
import os

import pytest
import torch

from liftplus_fast.cli import build_parser, resolve_command
from liftplus_fast.config import CLIP_MEAN
from liftplus_fast.model import build_lift_model
from liftplus_fast.run_folder import own_model_dir

DATA3 = ("imagenet_lt", "places_lt", "inat2018")
DATA2 = ("imagenet_lt", "places_lt")
INAT = "num_epochs 15"


def _cmds():
    """``{script: [command options after 'python main.py', ...]}`` as published."""
    s = {}
    abl = [
        "v.adaptformer False classifier_init None mda False tte False",
        "v.adaptformer True classifier_init None mda False tte False",
        "v.adaptformer True classifier_init semantic mda False tte False",
        "v.adaptformer True classifier_init semantic mda True tte False",
        "v.adaptformer True classifier_init semantic mda True tte True",
    ]
    s["run_ablation"] = [f"-d {d} -b clip_vit_b16 -m lp {o}" for d in DATA2 for o in abl]
    ratios = ("0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1.0")
    lrs6 = ("0.03", "0.02", "0.01", "0.005", "0.002", "0.001")
    s["run_aft_ratio"] = [
        f"-d {d} -b clip_vit_b16 -m aft v.aft_ratio {r} lr {lr}" for d in DATA2 for r in ratios for lr in lrs6
    ]
    s["run_backbones"] = [
        *(f"-d {d} -b clip_vit_l14 -m lift+ accum_step 4{t}" for d in DATA2 for t in ("", " test_only True tte True")),
        *(f"-d inat2018 -b clip_vit_l14 -m lift+ {INAT} accum_step 4{t}" for t in ("", " test_only True tte True")),
        *(
            f"-d inat2018 -b clip_vit_l14@336px -m lift+ {INAT} accum_step 8{t}"
            for t in ("", " test_only True tte True")
        ),
        *(f"-d {d} -b clip_rn50 -m lp v.{m} True" for d in DATA2 for m in ("ssf", "bitfit")),
    ]
    s["run_bottle_dim"] = [
        *(
            f"-d {d} -b clip_vit_b16 -m lift+ {o} tte True"
            for d in DATA2
            for o in ["v.adaptformer False"] + [f"v.adaptformer_dim {2**i}" for i in range(9)]
        ),
        *(
            f"-d inat2018 -b clip_vit_b16 -m lift+ {INAT} {o} tte True"
            for o in ["v.adaptformer False"] + [f"v.adaptformer_dim {r}" for r in range(64, 513, 64)]
        ),
    ]
    cls = [
        "classifier LinearClassifier",
        "classifier L2NormClassifier",
        *(f"classifier CosineClassifier classifier_scale {c}" for c in (15, 20, 25, 30, 35)),
    ]
    s["run_classifiers"] = [
        f"-d {d} -b clip_vit_b16 -m lift+{' ' + INAT if d == 'inat2018' else ''} {o} tte True"
        for d in DATA3
        for o in cls
    ]
    ep = {
        ("lift", "imagenet_lt"): "5 0.02 10 0.01 15 0.0066 20 0.005 25 0.004 30 0.0033",
        ("lift", "places_lt"): "5 0.02 10 0.01 15 0.0066 20 0.005 25 0.004 30 0.0033",
        ("lift", "inat2018"): "5 0.04 10 0.02 15 0.0133 20 0.01 25 0.008 30 0.0066 35 0.0057 40 0.005 "
        "45 0.0044 50 0.004",
        ("lift+", "imagenet_lt"): "5 0.02 10 0.01 15 0.0066 20 0.005 25 0.004 30 0.0033",
        ("lift+", "places_lt"): "5 0.02 10 0.01 15 0.0066 20 0.005 25 0.004 30 0.0033",
        ("lift+", "inat2018"): "5 0.06 10 0.03 15 0.02 20 0.015 25 0.012 30 0.01 35 0.0085 40 0.0075 "
        "45 0.0066 50 0.006",
    }
    s["run_epochs"] = []
    for (m, d), pairs in ep.items():
        p = pairs.split()
        s["run_epochs"] += [
            f"-d {d} -b clip_vit_b16 -m {m} num_epochs {e} lr {lr} tte True" for e, lr in zip(p[::2], p[1::2])
        ]
    expand = range(0, 49, 4)
    s["run_expand"] = [
        *(
            f"-d {d} -b clip_vit_b16 -m lift+ test_only True tte {t} tte_expand {e}"
            for d in DATA2
            for t in ("False", "True")
            for e in expand
        ),
        *(f"-d inat2018 -b clip_vit_b16 -m lift+ {INAT} test_only True tte False tte_expand {e}" for e in expand),
        *(f"-d inat2018 -b clip_vit_b16 -m lift+ {INAT} test_only True tte True expand {e}" for e in expand),
    ]
    s["run_ft_methods"] = [
        f"-d {d} -b clip_vit_b16 -m {o} tte True"
        for d in DATA2
        for o in (
            "zs",
            "lp lr 0.03",
            f"fft v.fft_layers 12 lr {'0.001' if d == 'imagenet_lt' else '0.002'}",
            "aft v.aft_ratio 0.005 lr 0.02",
            "lp v.bitfit True",
            "lp v.pt True",
            "lp v.adapter True",
            "lp v.lora True",
            "lp v.adaptformer True",
        )
    ]
    s["run_init_methds"] = [
        f"-d {d} -b clip_vit_b16 -m lift+ classifier_init {i} tte True"
        for d in DATA2
        for i in ("None", "linear_probing", "class_mean", "semantic")
    ]
    s["run_losses"] = [
        f"-d {d} -b clip_vit_b16 -m lift+{' ' + INAT if d == 'inat2018' else ''} loss_type {loss} tte True"
        for d in DATA3
        for loss in ("CE", "Focal", "LDAM", "CB", "GRW", "LADE", "LA")
    ]
    tt = ("", " test_only True tte True")
    s["run_main"] = [
        *(f"-d {d} -b clip_vit_b16 -m lift+{t}" for d in DATA2 for t in tt),
        *(f"-d places_lt -b in21k_vit_b16 -m lift+{t}" for t in tt),
        *(f"-d inat2018 -b {b} -m lift+ {INAT}{t}" for b in ("clip_vit_b16", "in21k_vit_b16") for t in tt),
        *(f"-d cifar100_ir{r} -b clip_vit_b16 -m lift+{t}" for t in tt for r in (100, 50, 10)),
        *(f"-d cifar100_ir{r} -b in21k_vit_b16 -m lift+{t}" for t in tt for r in (100, 50, 10)),
    ]
    s["run_mda_func"] = [
        f"-d {d} -b clip_vit_b16 -m lift+{' ' + INAT if d == 'inat2018' else ''} mda_func {f} tte True"
        for d in DATA3
        for f in ("min", "convex", "linear", "concave", "max")
    ]
    s["run_partial"] = [
        f"-d {d} -b clip_vit_b16 -m fft{' ' + INAT if d == 'inat2018' else ''} v.fft_layers {k} lr {lr}"
        for d in DATA3
        for k in (0, 1, 2, 3, 6, 9, 12)
        for lr in lrs6
    ]
    s["run_zsclip"] = [
        *(f"-d {d} -b clip_vit_b16 -m {m}" for d in DATA2 for m in ("zs", "lp lr 0.03")),
        *(f"-d inat2018_{k} -b clip_vit_b16 -m zs" for k in "kpcofgs"),
        "-d inat2018 -b clip_vit_b16 -m zs",
    ]
    return s


SCRIPTS = _cmds()
PUBLISHED_COUNTS = {
    "run_ablation": 10,
    "run_aft_ratio": 120,
    "run_backbones": 12,
    "run_bottle_dim": 29,
    "run_classifiers": 21,
    "run_epochs": 44,
    "run_expand": 78,
    "run_ft_methods": 18,
    "run_init_methds": 8,
    "run_losses": 21,
    "run_main": 22,
    "run_mda_func": 15,
    "run_partial": 126,
    "run_zsclip": 12,
}
COMMANDS = [c for cmds in SCRIPTS.values() for c in cmds]
NUM_CLASSES = {
    "imagenet_lt": 1000,
    "places_lt": 365,
    "inat2018": 8142,
    "cifar100_ir100": 100,
    "cifar100_ir50": 100,
    "cifar100_ir10": 100,
    "inat2018_k": 6,
    "inat2018_p": 25,
    "inat2018_c": 57,
    "inat2018_o": 272,
    "inat2018_f": 1118,
    "inat2018_g": 4401,
    "inat2018_s": 8142,
}
# Options that change the run but not the model that is built.
RUN_ONLY = {"lr", "num_epochs", "accum_step", "mda", "mda_func", "tte", "expand", "tte_expand", "test_only"}


def _resolve(cmd):
    args = build_parser().parse_args(["test" if " test_only True" in cmd else "train"] + cmd.split())
    return args, resolve_command(args)


def test_the_published_command_list():
    assert {k: len(v) for k, v in SCRIPTS.items()} == PUBLISHED_COUNTS
    assert len(COMMANDS) == 536


def test_every_published_command_resolves_with_the_published_meaning():
    resolved = 0
    for cmd in COMMANDS:
        args, cfg = _resolve(cmd)
        opts = dict(zip(cmd.split()[6::2], cmd.split()[7::2]))
        assert cfg.dataset == args.data and cfg.backbone == args.backbone
        if "@336px" in cmd:
            assert cfg.resolution == 336
        elif args.backbone == "in21k_vit_b16":
            assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)
            assert cfg.classifier_init == "class_mean" and cfg.resolution == 224
        else:
            assert cfg.resolution == 224 and cfg.mean == CLIP_MEAN
        for key in ("tte_expand", "expand"):
            if key in opts:
                assert cfg.expand == int(opts[key])
        if "v.fft_layers" in opts:
            assert cfg.v.fft and cfg.v.fft_layers == int(opts["v.fft_layers"])
        if args.method == "lift":
            assert cfg.mda is False and cfg.num_epochs == int(opts.get("num_epochs", 10))
        if args.method == "zs":
            assert cfg.zero_shot
        if "test_only" in opts:
            # The training run's folder (the published rule); results go into a new folder of it.
            assert cfg.test_only and cfg.model_dir == own_model_dir(_default_folder(cmd))
            assert os.path.dirname(cfg.output_dir) == cfg.model_dir
        for key, value in opts.items():
            if key.startswith("v.") and value in ("True", "False"):
                assert getattr(cfg.v, key[2:]) is (value == "True")
        resolved += 1
    assert resolved == 536


def _default_folder(cmd):
    # The published main.py's output folder of a command: output/<data>_<backbone>_<method>_<opts>.
    words = cmd.split()
    return os.path.join("output", "_".join([words[1], words[3], words[5], *words[6:]]).replace("/", "-"))


def test_published_test_only_commands_find_their_training_run():
    trained = {_resolve(c)[1].output_dir for c in COMMANDS if "test_only" not in c}
    for cmd in COMMANDS:
        if " test_only True" not in cmd or "expand" in cmd:
            continue
        cfg = _resolve(cmd)[1]
        assert cfg.model_dir in trained, cmd
    # run_expand.sh evaluates the main runs' checkpoints
    cfg = _resolve("-d imagenet_lt -b clip_vit_b16 -m lift+ test_only True tte True tte_expand 8")[1]
    assert cfg.model_dir == _resolve("-d imagenet_lt -b clip_vit_b16 -m lift+")[1].output_dir


# --- building every distinct set-up on small random backbones of the same depth -----------------


def _small_backbone(name):
    import open_clip
    import timm

    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    torch.manual_seed(0)
    if name.startswith("clip_vit"):
        layers, patch = (12, 16) if name == "clip_vit_b16" else (24, 14)
        size = 336 if name.endswith("@336px") else 224
        vision = {"image_size": size, "layers": layers, "width": 32, "head_width": 16, "patch_size": patch}
        return open_clip.model.CLIP(16, vision, text, quick_gelu=True).eval()
    if name == "clip_rn50":
        vision = {"image_size": 224, "layers": (3, 4, 6, 3), "width": 8, "head_width": 64}
        return open_clip.model.CLIP(16, vision, text, quick_gelu=True).eval()
    if name == "in21k_vit_b16":
        return timm.create_model(
            "vit_base_patch16_224", pretrained=False, embed_dim=32, num_heads=2, num_classes=0
        ).eval()
    raise AssertionError(name)


def _setup_key(cmd):
    words = cmd.split()
    opts = tuple((k, v) for k, v in zip(words[6::2], words[7::2]) if k not in RUN_ONLY)
    return (words[1], words[3], words[5], opts, " test_only True" in cmd)


DISTINCT = {}
for _cmd in COMMANDS:
    DISTINCT.setdefault(_setup_key(_cmd), _cmd)


def test_distinct_setup_count():
    assert len(DISTINCT) == 185


@pytest.fixture(scope="module")
def small_backbones():
    return {b: _small_backbone(b) for b in sorted({k[1] for k in DISTINCT})}


def _step_key(key):
    # Set-ups that differ only in a number (bottleneck, ratio, scale) or the data set train the
    # same way; one of each such group runs a training step.
    data, backbone, method, opts, test_only = key
    shape = tuple((k, "#" if v.replace(".", "").isdigit() else v) for k, v in opts)
    return backbone, method, shape, test_only


@pytest.fixture
def memo_semantic_init(monkeypatch):
    # The semantic init of a set-up depends on the backbone and the class names only; the
    # set-ups share both, so compute it once per pair (8142 prompts through the text tower).
    from liftplus_fast.model import lift_model

    real, cache = lift_model.semantic_weights, {}

    def memo(clip_model, classnames, tokenizer=None):
        key = (clip_model.tag, len(classnames))
        if key not in cache:
            cache[key] = real(clip_model, classnames, tokenizer)
        return cache[key].clone()

    monkeypatch.setattr(lift_model, "semantic_weights", memo)


def test_every_distinct_published_setup_builds_and_trains(small_backbones, memo_semantic_init):
    from open_clip import get_tokenizer

    tokenize, cache = get_tokenizer("ViT-B-16"), {}

    def tokenizer(texts):  # the same class names recur across set-ups: tokenize each list once
        key = tuple(texts)
        if key not in cache:
            cache[key] = tokenize(texts)
        return cache[key]

    built, stepped, step_groups = 0, 0, {}
    for key, cmd in sorted(DISTINCT.items(), key=lambda kv: NUM_CLASSES[kv[0][0]]):
        _, cfg = _resolve(cmd)
        k = NUM_CLASSES[cfg.dataset]
        counts = [max(1, 500 // (i + 1)) for i in range(k)]
        names = [f"class {i}" for i in range(k)]
        train_step = not (cfg.zero_shot or cfg.test_only) and _step_key(key) not in step_groups
        base = small_backbones[cfg.backbone]
        backbone = copy.deepcopy(base) if train_step else base
        backbone.tag = cfg.backbone
        cfg.num_classes = k
        model = build_lift_model(backbone, cfg, counts, names, tokenizer=tokenizer)
        if cfg.classifier_init in ("class_mean", "linear_probing") and not cfg.test_only and model.classifier:
            g = torch.Generator().manual_seed(0)
            feats = torch.randn(k * 2, model.feature_dim, generator=g)
            model.init_classifier_from_features(feats, torch.arange(k).repeat(2), cfg.classifier_init)
        n_tuned = sum(p.numel() for p in model.tuner.parameters())
        assert (n_tuned == 0) == bool(cfg.zero_shot), cmd
        if ("v.fft_layers", "0") in key[3]:  # the last 0 blocks: only the classifier trains
            assert set(model.official_tuner_state_dict()) == {"classifier.weight"}
        if cfg.zero_shot or cfg.test_only:
            assert model.logits_from_features(torch.randn(2, model.feature_dim)).shape == (2, k), cmd
        if train_step:
            step_groups[_step_key(key)] = cmd
            images = torch.randn(2, 3, cfg.resolution, cfg.resolution)
            loss, logits = model.training_loss(images, torch.tensor([0, k - 1]))
            loss.backward()
            assert logits.shape == (2, k) and torch.isfinite(loss), cmd
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.tuner.parameters()), cmd
            stepped += 1
        built += 1
    assert built == len(DISTINCT) and stepped == len(step_groups) >= 30


def test_published_backbone_depths(small_backbones):
    # "the same depth": 12 blocks for B/16, 24 for L/14, RN50's (3, 4, 6, 3) bottlenecks
    depth = {"clip_vit_b16": 12, "clip_vit_l14": 24, "clip_vit_l14@336px": 24, "in21k_vit_b16": 12, "clip_rn50": 16}
    for name, model in small_backbones.items():
        from liftplus_fast.model.encoders import build_image_encoder

        assert len(build_image_encoder(model).blocks) == depth[name], name


def test_published_script_matrix_is_consistent():
    # one cell of each grid really differs from its neighbours (the loops above are not no-ops)
    assert len(set(SCRIPTS["run_aft_ratio"])) == 120 and len(set(SCRIPTS["run_partial"])) == 126
    assert sum(1 for c in COMMANDS if "test_only True" in c) == 78 + 11 + 4
    assert list(itertools.islice((c for c in COMMANDS if "in21k" in c), 1)) == [
        "-d places_lt -b in21k_vit_b16 -m lift+"
    ]
