"""A researcher's workflow through the command line, on generated list-file data: train with a
published-format method file (a flag after the options), the run's record and results, test into
its own folder, predict, and the option listing."""

import csv
import hashlib
import json
import os
import subprocess
import sys

import pytest

from liftplus_fast.config import option_table
from liftplus_fast.data.synthetic_images import write_image_folder

NAMES = ["red_fox", "blue_jay", "green_frog", "snow_owl"]
METHOD_FILE = """# a method in the published configs/method format
classifier: "CosineClassifier"
v:
  adaptformer: True

num_epochs: 1
lr: 0.01
"""
SMALL = ["resolution", "32", "batch_size", "32", "num_workers", "0"]


def cli(cwd, *args):
    out = subprocess.run(
        [sys.executable, "-m", "liftplus_fast", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("workflow")
    write_image_folder(
        str(work / "data"), [110, 25, 6, 2], test_per_class=3, sizes=((40, 48), (48, 40)), classnames=NAMES
    )
    (work / "my_method.yaml").write_text(METHOD_FILE)
    args = ["train", "-d", "listfile", "--root", "data", "-b", "tiny_vit", "-m", "my_method.yaml"]
    out = cli(work, *args, *SMALL, "output_dir", "run1", "--no-progress")
    return work, work / "output" / "run1", args, out  # output_dir X is output/X, as published


def test_training_leaves_a_record_and_results(trained):
    work, run, args, out = trained
    assert "outputs in output/run1" in out.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "my_method" and config["v"]["adaptformer"] and config["lr"] == 0.01
    assert config["num_epochs"] == 1 and config["classifier"] == "CosineClassifier"

    with open(run / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [n.replace("_", " ") for n in NAMES]
    assert [r["train_images"] for r in rows] == ["110", "25", "6", "2"]
    assert [r["group"] for r in rows] == ["many", "med", "few", "few"]
    assert all(r["test_images"] == "3" and 0 <= float(r["accuracy"]) <= 100 for r in rows)

    record = json.loads((run / "run.json").read_text())
    typed = ["-m", "liftplus_fast", *args, *SMALL, "output_dir", "run1", "--no-progress"]
    assert record["status"] == "finished" and record["command"]["argv"][-len(typed) :] == typed
    assert record["versions"]["torch"] and record["versions"]["python"] and "cuda" in record["versions"]
    assert record["package"]["version"] and "ops" in record["backend"] and record["hardware"]["cpu"]
    r = record["model"]["sizes"]["v.adaptformer_dim"]  # the published rule: 2 ** floor(log2(4 / 6)) -> 1
    assert r == 1 and record["model"]["trainable_parameters"] > 0
    assert record["model"]["total_parameters"] > record["model"]["trainable_parameters"]
    assert {"data_s", "model_s", "train_s", "test_s", "total_s"} <= set(record["timings"])

    log = (run / "log.txt").read_text()
    assert "AdaptFormer r=1 on blocks [0, 1, 2]" in log and "v.adaptformer_dim 1" in log
    assert f"tuned parameters: {record['model']['trainable_parameters']} of " in log
    assert (run / "tuner" / "tuner.safetensors").is_file() and (run / "checkpoint.pth.tar").is_file()
    assert os.listdir(run / "tensorboard")


def test_test_writes_its_own_folder_and_leaves_the_run_alone(trained):
    work, run, args, _ = trained
    kept = {name: digest(run / name) for name in ("config.json", "metrics.json", "run.json", "per_class.csv")}
    results = {}
    for source in ("output/run1", "output/run1/tuner"):  # the pickle checkpoint, then the safetensors tuner
        out = cli(work, "test", *args[1:], *SMALL, "model_dir", source, "--no-progress", "confusion_matrix", "True")
        folder = os.path.join(work, out.stdout.strip().splitlines()[-1].removeprefix("outputs in "))
        assert os.path.dirname(folder) == str(run) and os.path.basename(folder).startswith("test-")
        assert {"metrics.json", "per_class.csv", "run.json", "config.json", "confusion.npy", "confusion.png"} <= set(
            os.listdir(folder)
        )
        results[source] = json.loads(open(os.path.join(folder, "metrics.json")).read())["metrics"]
    assert {name: digest(run / name) for name in kept} == kept
    trained_metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    for metrics in results.values():  # the same tuner, read from either file, scores the same
        assert metrics["per_class"] == trained_metrics["per_class"]


def test_predict_writes_one_row_per_image(trained):
    work, run, _, _ = trained
    out = cli(work, "predict", "--model-dir", "output/run1", "--images", "data/test", "--output", "preds.csv")
    with open(work / "preds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    images = sorted(
        os.path.relpath(os.path.join(dp, f), work) for dp, _, fs in os.walk(work / "data" / "test") for f in fs
    )
    assert sorted(r["image"] for r in rows) == images and "12 images predicted" in out.stdout
    assert all(r["name_1"] in [n.replace("_", " ") for n in NAMES] for r in rows)
    assert all(abs(sum(float(r[f"prob_{j}"]) for j in range(1, 5)) - 1) < 1e-3 for r in rows)


def test_options_lists_every_option(trained):
    out = cli(trained[0], "options")
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")}
    assert {row.name for row in option_table()} <= listed
    assert "docs/options.md" in cli(trained[0], "--help").stdout
