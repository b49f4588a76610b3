"""fast_train end to end on the embedded default: outputs, resume, test-only, bad input."""

import json
import os

import pytest
import torch

import liftplus_fast as lf
from liftplus_fast import checkpoint as ckpt_mod
from liftplus_fast import train_loop

TINY = dict(
    dataset="digits_lt",
    backbone="tiny_vit",
    pretrained=None,
    resolution=32,
    batch_size=64,
    num_workers=0,
    progress=False,
)


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return lf.fast_train(method="lift+", output_dir=str(out), num_epochs=2, **TINY)


def test_outputs_and_metrics(two_epoch_run):
    r = two_epoch_run
    for name in ("config.json", "log.txt", "metrics.json", "checkpoint.pth.tar", "per_class_accuracy.png"):
        assert os.path.getsize(os.path.join(r.output_dir, name)) > 0, name
    m = r.metrics
    assert set(m) >= {"overall", "mean", "many", "med", "few", "per_class"}
    assert len(m["per_class"]) == 10 and 0.0 <= m["overall"] <= 100.0
    assert r.timings["train_s"] > 0 and r.timings["test_s"] > 0
    assert [h["epoch"] for h in r.history] == [1, 2]
    # The log says which implementation of each measured choice ran on this CPU, and why.
    log = open(os.path.join(r.output_dir, "log.txt")).read()
    for name in ("half_gemm", "attention_bf16", "attention_fp32", "bias_gelu_bf16", "layer_norm_bf16"):
        assert f"CPU implementation of {name}: " in log, name
    # The default mixed precision (bf16 autocast on CPU) trains with finite losses.
    assert r.config.prec_train == "amp" and all(h["loss"] == h["loss"] and h["loss"] < 1e3 for h in r.history)
    saved = json.load(open(os.path.join(r.output_dir, "metrics.json")))
    assert saved["metrics"]["overall"] == pytest.approx(m["overall"])
    cfg = json.load(open(os.path.join(r.output_dir, "config.json")))
    assert cfg["num_classes"] == 10 and cfg["v"]["adaptformer"] is True
    # The checkpoint holds only the tuner, in the published key layout.
    sd = torch.load(os.path.join(r.output_dir, "checkpoint.pth.tar"), weights_only=True)["tuner"]
    assert "classifier.weight" in sd and any(".adaptformer.down.weight" in k for k in sd)
    n_tuned = sum(p.numel() for p in r.tuner.parameters())
    assert sum(v.numel() for v in sd.values()) == n_tuned


def test_test_only_from_checkpoint_reproduces_metrics(two_epoch_run, tmp_path):
    r = lf.fast_train(
        method="lift+",
        output_dir=str(tmp_path / "t"),
        test_only=True,
        model_dir=two_epoch_run.output_dir,
        num_epochs=2,
        **TINY,
    )
    assert r.metrics["overall"] == pytest.approx(two_epoch_run.metrics["overall"])
    assert r.metrics["per_class"] == two_epoch_run.metrics["per_class"]


def test_resume_after_interruption_matches_uninterrupted_run(two_epoch_run, tmp_path, monkeypatch):
    real_save = ckpt_mod.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # simulated crash right after the first epoch's checkpoint

    out = tmp_path / "resumed"
    monkeypatch.setattr(train_loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        lf.fast_train(method="lift+", output_dir=str(out), num_epochs=2, **TINY)
    monkeypatch.setattr(train_loop, "save_checkpoint", real_save)
    r = lf.fast_train(method="lift+", output_dir=str(out), num_epochs=2, resume=True, **TINY)
    assert [h["epoch"] for h in r.history] == [2]
    a = r.model.official_tuner_state_dict()
    b = two_epoch_run.model.official_tuner_state_dict()
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(dataset="imagenet_1k"), ValueError, "imagenet_1k"),
        (dict(backbone="resnet9000"), ValueError, "resnet9000"),
        (dict(method="magic"), ValueError, "magic"),
        (dict(batch_size=64, accum_step=5), ValueError, "divisible"),
        (dict(resolution=224), ValueError, r"resolution=224 .* takes 32x32 images; set resolution 32"),
        (dict(test_only=True), ValueError, "test_only needs model_dir"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, exc, match, tmp_path):
    args = dict(TINY, method="lift+", output_dir=None, num_epochs=1)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        lf.fast_train(**args)


@pytest.mark.parametrize("method", ["zs", "lp", "fft", "bitfit", "vpt", "lora", "adapter", "ssf", "aft", "lift"])
def test_every_method_runs_end_to_end(method, tmp_path):
    r = lf.fast_train(method=method, output_dir=str(tmp_path / method), num_epochs=1, **dict(TINY, batch_size=128))
    assert 0.0 <= r.metrics["overall"] <= 100.0 and len(r.metrics["per_class"]) == 10
    if method == "zs":
        # Zero-shot trains nothing: no history, an empty tuner, the CLIP text head.
        assert r.history == [] and sum(p.numel() for p in r.tuner.parameters()) == 0
        assert r.model.classifier is None
    else:
        assert r.history and os.path.exists(os.path.join(r.output_dir, "checkpoint.pth.tar"))


@pytest.mark.parametrize("init", ["class_mean", "linear_probing", "random"])
def test_classifier_inits_run(init, tmp_path):
    r = lf.fast_train(method="lift+", output_dir=None, num_epochs=1, classifier_init=init, **dict(TINY, batch_size=128))
    w = r.model.classifier.weight.detach()
    assert torch.isfinite(w).all() and r.metrics["overall"] >= 0.0


def test_a_given_config_is_not_changed_by_the_run():
    opts = {k: v for k, v in TINY.items() if k != "progress"}
    cfg = lf.make_config("zs", opts)
    before = cfg.to_dict()
    r = lf.fast_train(config=cfg, progress=False)
    assert cfg.to_dict() == before and cfg.num_classes is None
    assert r.config.num_classes == 10 and r.config is not cfg


@pytest.mark.parametrize("native", [True, False])
def test_the_log_says_how_half_precision_runs_on_this_cpu(monkeypatch, native):
    from liftplus_fast.ops import choices
    from liftplus_fast.train import _precision_label

    monkeypatch.setitem(choices._OPTION, "half_gemm", "native" if native else "fp32")
    monkeypatch.setitem(choices._WHY, "half_gemm", "the reason measured")
    cpu = torch.device("cpu")
    assert _precision_label(cpu, "fp32") == "fp32"
    label = _precision_label(cpu, "amp")
    assert label.startswith("bf16 (asked amp")
    for text in (label, _precision_label(cpu, "bf16")):
        assert ("fp32 GEMMs of bf16 values; the reason measured" in text) is (not native)
