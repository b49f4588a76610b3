"""What a run folder holds besides the checkpoint: per_class.csv, the confusion matrix, run.json's
facts (resolved tuner sizes, git state), and where a test and a trained tuner are found."""

import csv
import io
import os
import subprocess

import numpy as np
import pytest
import torch

from liftplus_fast import run_record
from liftplus_fast.checkpoint import save_checkpoint
from liftplus_fast.config import make_config
from liftplus_fast.errors import MissingInputError
from liftplus_fast.evaluate import evaluate
from liftplus_fast.model import build_lift_model, load_clip
from liftplus_fast.model.tuners import tuner_sizes
from liftplus_fast.result_files import PER_CLASS_COLUMNS, per_class_csv, write_results
from liftplus_fast.run_folder import model_run_folder, new_test_folder
from liftplus_fast.tuner_source import load_trained_tuner

NAMES = ["apple", "golden retriever", "car", "sea, turtle"]
COUNTS = [150, 100, 20, 3]


def test_per_class_csv_names_groups_and_accuracy():
    metrics = {"per_class": [50.0, None, 12.5, 100.0], "per_class_count": [4, 0, 8, 1]}
    rows = list(csv.reader(io.StringIO(per_class_csv(metrics, NAMES, COUNTS))))
    assert tuple(rows[0]) == PER_CLASS_COLUMNS
    assert rows[1:] == [
        ["0", "apple", "150", "many", "4", "50.0000"],
        ["1", "golden retriever", "100", "med", "0", ""],
        ["2", "car", "20", "med", "8", "12.5000"],
        ["3", "sea, turtle", "3", "few", "1", "100.0000"],
    ]


class _Fixed(torch.nn.Module):
    """A 'model' predicting a fixed class per image, read from the image's first pixel."""

    def __init__(self, k):
        super().__init__()
        self.k, self.w = k, torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), self.k).float()


def test_confusion_counts_and_files(tmp_path):
    labels = torch.tensor([0, 0, 1, 2, 3, 3])
    preds = torch.tensor([0, 1, 1, 2, 0, 3])
    images = preds.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    metrics = evaluate(_Fixed(4), [(images[:4], labels[:4]), (images[4:], labels[4:])], COUNTS, confusion=True)
    expected = np.zeros((4, 4), dtype=np.int64)
    for t, p in zip(labels.tolist(), preds.tolist()):
        expected[t, p] += 1
    assert np.array_equal(metrics["confusion"], expected)
    assert metrics["per_class"] == [50.0, 100.0, 100.0, 50.0] and metrics["per_class_count"] == [2, 1, 1, 2]
    written = write_results(str(tmp_path), metrics, classnames=NAMES, cls_num_list=COUNTS, label="m", title="t")
    assert set(written) == {"metrics.json", "per_class.csv", "per_class_accuracy.png", "confusion.npy", "confusion.png"}
    assert np.array_equal(np.load(tmp_path / "confusion.npy"), expected)
    assert "confusion" not in (tmp_path / "metrics.json").read_text()
    assert not any(name.startswith(".tmp") for name in os.listdir(tmp_path))


@pytest.mark.parametrize(
    "overrides, sizes",
    [
        # the published rule 2 ** floor(log2(K / (2 L))) for K = 40 classes, L = 3 blocks
        ({"v.adaptformer": True}, {"v.adaptformer_dim": 4}),
        ({"v.adaptformer": True, "v.adaptformer_dim": 5, "v.lora": True}, {"v.adaptformer_dim": 5, "v.lora_dim": 2}),
        ({"v.pt": True, "v.adapter": True, "v.adapter_layers": 1}, {"v.pt_len": 8, "v.adapter_dim": 16}),
    ],
)
def test_tuner_sizes_are_the_resolved_ones(overrides, sizes):
    clip, tok = load_clip("tiny_vit")
    k = 40
    cfg = make_config("lp", {"num_classes": k, "prec_train": "fp32", "backbone": "tiny_vit", **overrides})
    model = build_lift_model(clip, cfg, [5] * k, [f"c{i}" for i in range(k)], tok, init_classifier=False)
    assert tuner_sizes(model.tuner) == sizes
    facts = run_record.model_facts(model)
    assert facts["sizes"] == sizes and facts["trainable_parameters"] == sum(p.numel() for p in model.tuner.parameters())
    if "v.adaptformer_dim" in sizes:  # the log line names the resolved r
        assert f"AdaptFormer r={sizes['v.adaptformer_dim']} on blocks [0, 1, 2]" in facts["tuners"]


def test_git_state_is_the_packages_checkout_or_none(tmp_path, monkeypatch):
    state = run_record.git_state()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=run_record._PACKAGE_DIR, capture_output=True, text=True)
    if head.returncode == 0:
        assert state["commit"] == head.stdout.strip() and isinstance(state["dirty"], bool)
    else:
        assert state is None
    monkeypatch.setattr(run_record, "_PACKAGE_DIR", str(tmp_path))  # not a git checkout
    assert run_record.git_state() is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git program at all
    assert run_record.git_state() is None
    env = run_record.environment()
    assert env["git"] is None and env["versions"]["torch"] == torch.__version__


def test_where_tests_go_and_tuners_come_from(tmp_path):
    run = tmp_path / "run"
    (run / "tuner").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert model_run_folder(str(run / "tuner")) == str(run)
    save_checkpoint(str(run / "checkpoint.pth.tar"), {"classifier.weight": torch.ones(2, 3)})
    assert model_run_folder(str(run / "checkpoint.pth.tar")) == str(run)
    assert model_run_folder(str(tmp_path / "not_yet")) == str(tmp_path / "not_yet")
    first = new_test_folder(str(run))
    os.makedirs(first)
    second = new_test_folder(str(run))
    assert first != second and os.path.dirname(second) == str(run) and os.path.basename(second).startswith("test-")
    assert torch.equal(load_trained_tuner(str(run))["tuner"]["classifier.weight"], torch.ones(2, 3))
    with pytest.raises(MissingInputError, match="holds no trained tuner"):
        load_trained_tuner(str(tmp_path / "run" / "tuner"))
