"""The embedded-default demo: LIFT+ learns from a random tiny ViT and LA helps the tail."""
import os

import pytest

from liftplus_fast.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(output_dir=str(out), progress=False)


def test_lift_plus_beats_chance_by_a_wide_margin(demo):
    _, results = demo
    lift = results["LIFT+ (AdaptFormer, cosine, LA)"].metrics
    assert lift["overall"] >= 35.0  # 10 balanced test classes: chance is 10 %


def test_logit_adjustment_beats_ce_on_few_shot_classes(demo):
    _, results = demo
    lift = results["LIFT+ (AdaptFormer, cosine, LA)"].metrics
    ce = results["CE classifier fine-tuning"].metrics
    assert lift["few"] > ce["few"] + 10.0


def test_demo_writes_the_comparison_plot(demo):
    out, _ = demo
    png = out / "per_class_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "run1_lift+" / "metrics.json").exists() and (out / "run2_lp" / "metrics.json").exists()
