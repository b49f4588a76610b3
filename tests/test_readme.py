"""The README's and the getting-started guide's examples run as written: every command line parses
(and resolves to a config), the Python snippet runs (on the tiny backbone and the embedded data
instead of CLIP and CIFAR) and its parameter count is the real one."""

import os
import re
import shlex

import pytest

from liftplus_fast.cli import build_parser, resolve_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/getting-started.md")


def _blocks(doc, language):
    text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _command_lines(doc):
    for block in _blocks(doc, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["torchrun"]:
                words = words[words.index("liftplus_fast") :]
            if words[:1] in (["liftplus-fast"], ["liftplus_fast"]):
                yield words[1:]


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_parses_and_resolves(doc):
    commands = list(_command_lines(doc))
    assert commands, doc
    for words in commands:
        args = build_parser().parse_args(words)
        files = any(w.endswith(".yaml") for w in words) or "--config-dir" in words
        if args.command in ("train", "test") and not files:  # config files named there are the reader's
            cfg = resolve_command(args, test_only=args.command == "test")
            assert cfg.dataset == args.data and cfg.method, words


def test_the_python_snippet_runs(tmp_path, monkeypatch, capsys):
    (snippet,) = _blocks("README.md", "python")
    call = 'dataset="cifar100_ir100", backbone="clip_vit_b16"'
    assert call in snippet
    tiny = 'dataset="digits_lt", backbone="tiny_vit", pretrained=None, resolution=32, num_workers=0, progress=False'
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet.replace(call, tiny), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    accuracies = [float(v) for v in printed[-2].split()]
    assert len(accuracies) == 4 and all(0 <= a <= 100 for a in accuracies)
    assert printed[-1].startswith("trainable params: ") and (tmp_path / "runs/cifar/per_class.csv").is_file()


def test_the_parameter_count_is_the_real_one():
    import open_clip

    import liftplus_fast as lf
    from liftplus_fast.model.tuner_files import format_trainable_parameters

    (snippet,) = _blocks("README.md", "python")
    shown = re.search(r"# (trainable params: .*)", snippet).group(1).strip()
    # CIFAR-100's 100 classes on OpenAI's ViT-B/16 architecture (random weights: the same count)
    clip = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    cfg = lf.make_config("lift+", {"num_classes": 100, "prec_train": "fp32"})
    names = [f"class {i}" for i in range(100)]
    model = lf.build_lift_model(clip, cfg, [5] * 100, names, tokenizer=None, init_classifier=False)
    assert format_trainable_parameters(model) == shown
