"""Published-format config files for -d/-b/-m, the published merge order and the command line's
published meanings (gpu N, output_dir X, flags after the options)."""

import os

import pytest

from liftplus_fast.cli import build_parser, resolve_command
from liftplus_fast.config import CLIP_MEAN, make_config
from liftplus_fast.config_files import config_source, read_config_file
from liftplus_fast.errors import MissingInputError, UserInputError
from liftplus_fast.train import build_run_config

# Copies of the published configs/ files (text as published, including the missing final newline).
PUBLISHED = {
    "data/imagenet_lt.yaml": 'dataset: "ImageNet_LT" \nroot: "Path/To/Dataset"\n',
    "backbone/clip_vit_b16.yaml": 'backbone: "CLIP-ViT-B/16"\nresolution: 224\n'
    "mean: (0.48145466, 0.4578275, 0.40821073)\nstd: (0.26862954, 0.26130258, 0.27577711)\n"
    'classifier_init: "semantic"',
    "backbone/clip_vit_l14@336px.yaml": 'backbone: "CLIP-ViT-L/14@336px"\nresolution: 336\n'
    "mean: (0.48145466, 0.4578275, 0.40821073)\nstd: (0.26862954, 0.26130258, 0.27577711)\n"
    'classifier_init: "semantic"',
    "method/lift+.yaml": 'classifier: "CosineClassifier"\nv:\n  adaptformer: True',
    "method/lift.yaml": 'classifier: "CosineClassifier"\nv:\n  adaptformer: True\n\n'
    "num_epochs: 10\nlr: 0.01\n\nmda: False",
    "method/coop.yaml": "coop: True\n\nnum_epochs: 50\nbatch_size: 32\nlr: 0.002\n\nmda: False",
    "method/zs.yaml": "zero_shot: True",
}


@pytest.fixture
def configs(tmp_path):
    for rel, text in PUBLISHED.items():
        path = tmp_path / "configs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "configs"


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("method", ["lift+", "lift", "coop", "zs"])
def test_a_copy_of_the_published_configs_means_what_the_names_mean(configs, method):
    from_files = build_run_config(
        dataset=str(configs / "data/imagenet_lt.yaml"),
        backbone=str(configs / "backbone/clip_vit_b16.yaml"),
        method=str(configs / f"method/{method}.yaml"),
        pretrained=None,
    )
    by_name = build_run_config(dataset="ImageNet_LT", backbone="clip_vit_b16", method=method, pretrained=None)
    a, b = from_files.to_dict(), by_name.to_dict()
    # The published files name the backbone in their spelling and the data root as a placeholder.
    assert a.pop("backbone") == "CLIP-ViT-B/16" and b.pop("backbone") == "clip_vit_b16"
    assert a.pop("root") == "Path/To/Dataset" and b.pop("root") == "./data"
    assert a == b
    assert from_files.mean == CLIP_MEAN  # the string "(0.48145466, ...)" read as yacs reads it


def test_config_dir_finds_names_before_the_presets(configs, tmp_path):
    (configs / "method" / "lift+.yaml").write_text('classifier: "CosineClassifier"\nv:\n  adaptformer: True\nlr: 0.5')
    cfg = build_run_config(dataset="imagenet_lt", method="lift+", config_dir=str(configs), pretrained=None)
    assert cfg.lr == 0.5 and cfg.v.adaptformer and cfg.method == "lift+"
    # A name without a file in the folder is the known name.
    assert build_run_config(dataset="imagenet_lt", method="lp", config_dir=str(configs)).v.adaptformer is False
    with pytest.raises(UserInputError, match=r"unknown method 'mine'.*no .*method/mine\.yaml"):
        build_run_config(dataset="imagenet_lt", method="mine", config_dir=str(configs))


def test_merge_order_is_data_backbone_method_then_options(tmp_path):
    data = _write(tmp_path, "d.yaml", "dataset: digits_lt\nresolution: 100\nlr: 0.1\nnum_epochs: 2")
    backbone = _write(tmp_path, "b.yaml", "backbone: tiny_vit\nresolution: 32\nlr: 0.2")
    method = _write(tmp_path, "my_method.yaml", "classifier: CosineClassifier\nv:\n  lora: True\nlr: 0.3")
    cfg = build_run_config(data, backbone=backbone, method=method, opts=["num_epochs", "3"])
    assert (cfg.dataset, cfg.backbone, cfg.method) == ("digits_lt", "tiny_vit", "my_method")
    assert cfg.resolution == 32 and cfg.lr == 0.3 and cfg.num_epochs == 3 and cfg.v.lora
    # A method file without a classifier key means the published default: the CLIP text head.
    text_head = _write(tmp_path, "prompting.yaml", "coop: True\nlr: 0.002")
    assert build_run_config("digits_lt", backbone="tiny_vit", method=text_head).classifier is None


@pytest.mark.parametrize(
    "text, match",
    [
        ("lr: 0.1\nlearning_rate: 0.2\n", r"cfg\.yaml, line 2: unknown option 'learning_rate'"),
        ("v:\n  adaptformer: True\n  adaptformr_dim: 8\n", r"cfg\.yaml, line 3: unknown option 'v\.adaptformr_dim'"),
        ("lr: 0.1\nnum_epochs: 0\n", r"cfg\.yaml, line 2: option num_epochs must be an integer >= 1; got 0"),
        ("lr: 0.1\nlr: 0.2\n", r"cfg\.yaml, line 2: option 'lr' is set twice \(first on line 1\)"),
        ("- lr\n- 0.1\n", r"cfg\.yaml, line 1: a config file must be a mapping"),
        ("v: True\n", r"cfg\.yaml, line 1: 'v' must be a mapping"),
        ("lr: [0.1\n", r"cfg\.yaml: not a valid YAML config file"),
        ("tte: {a: 1}\n", r"cfg\.yaml, line 1: option 'tte' takes a value, not a mapping"),
        ("lr: 0.1\nmethod: lora\n", r"cfg\.yaml, line 2: 'method' is not set in a config file"),
    ],
)
def test_bad_config_files_name_file_key_and_line(tmp_path, text, match):
    path = _write(tmp_path, "cfg.yaml", text)
    with pytest.raises(UserInputError, match=match):
        build_run_config("digits_lt", backbone="tiny_vit", method=path)


def test_no_config_file_can_run_code(tmp_path):
    marker = tmp_path / "ran"
    text = f"lr: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(UserInputError, match="not a valid YAML config file"):
        read_config_file(_write(tmp_path, "evil.yaml", text))
    assert not marker.exists()


def test_settings_keep_file_order_and_lines(tmp_path):
    text = "# comment\nclassifier: CosineClassifier\n\nv:\n  adaptformer: True\nmda: False\n"
    path = _write(tmp_path, "m.yaml", text)
    assert read_config_file(path) == (
        ("classifier", "CosineClassifier", 2),
        ("v.adaptformer", True, 5),
        ("mda", False, 6),
    )
    assert read_config_file(_write(tmp_path, "empty.yaml", "")) == ()
    with pytest.raises(MissingInputError, match="method config file not found"):
        config_source("method", str(tmp_path / "nope.yaml"))


def test_published_gpu_option_is_the_device():
    assert make_config("lift+", opts=["gpu", "1"]).device == "cuda:1"
    assert make_config("lift+", opts=["gpu", "None"]).device == "auto"
    with pytest.raises(UserInputError, match="option gpu must be an integer >= 0"):
        make_config("lift+", opts=["gpu", "first"])


def _resolve(*words, command="train"):
    args = build_parser().parse_args([command, *words])
    return args, resolve_command(args, test_only=command == "test")


def test_flags_may_follow_the_options():
    args, cfg = _resolve("-d", "digits_lt", "-b", "tiny_vit", "num_epochs", "1", "--no-progress")
    assert args.no_progress and args.opts == ["num_epochs", "1"] and cfg.num_epochs == 1
    args, _ = _resolve("-d", "digits_lt", "num_epochs", "2", "--root", "/r", "--overwrite", "tte", "True")
    assert (args.root, args.overwrite, args.opts) == ("/r", True, ["num_epochs", "2", "tte", "True"])
    # A word in a value's place stays a value, whatever it starts with.
    args = build_parser().parse_args(["train", "-d", "x", "seed", "-1", "--no-progress", "expand", "--3"])
    assert args.opts == ["seed", "-1", "expand", "--3"] and args.no_progress


def test_output_dir_keeps_its_published_meaning(tmp_path):
    _, cfg = _resolve("-d", "digits_lt", "-b", "tiny_vit", "output_dir", "my_run")
    assert cfg.output_dir == os.path.join("output", "my_run")
    _, cfg = _resolve("-d", "digits_lt", "-b", "tiny_vit", "--output-dir", str(tmp_path / "x"))
    assert cfg.output_dir == str(tmp_path / "x")
    _, cfg = _resolve("-d", "digits_lt", "-b", "tiny_vit", "-m", "lp", "lr", "0.03")
    assert cfg.output_dir == os.path.join("output", "digits_lt_tiny_vit_lp_lr_0.03")
    with pytest.raises(UserInputError, match="output folder is given twice"):
        _resolve("-d", "digits_lt", "--output-dir", "a", "output_dir", "b")


def test_a_test_writes_into_a_new_folder_of_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _, cfg = _resolve("-d", "digits_lt", "-b", "tiny_vit", "model_dir", str(run), command="test")
    assert cfg.test_only and cfg.model_dir == str(run)
    assert os.path.dirname(cfg.output_dir) == str(run) and os.path.basename(cfg.output_dir).startswith("test-")
    _, cfg = _resolve("-d", "digits_lt", "model_dir", str(run), "--output-dir", str(tmp_path / "t"), command="test")
    assert cfg.output_dir == str(tmp_path / "t")
