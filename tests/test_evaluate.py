"""Evaluation metrics and TTE paths against a hand-computed oracle."""

import math

import pytest
import torch
import torch.nn.functional as F

from liftplus_fast.evaluate import evaluate, metrics_from_counts


def test_metrics_from_counts_groups_by_training_size():
    cls_num_list = [500, 150, 60, 25, 10, 3]  # many, many, med, med, few, few
    correct = torch.tensor([9, 8, 5, 4, 1, 0])
    total = torch.tensor([10, 10, 10, 10, 10, 10])
    m = metrics_from_counts(correct, total, cls_num_list)
    assert m["overall"] == pytest.approx(100 * 27 / 60)
    assert m["mean"] == pytest.approx(45.0)
    assert m["many"] == pytest.approx(85.0) and m["med"] == pytest.approx(45.0) and m["few"] == pytest.approx(5.0)
    assert m["per_class"] == [90.0, 80.0, 50.0, 40.0, 10.0, 0.0]


def test_classes_without_test_images_are_left_out_of_the_mean():
    m = metrics_from_counts(torch.tensor([1, 0]), torch.tensor([2, 0]), [200, 5])
    assert m["mean"] == pytest.approx(50.0)
    assert m["per_class"][1] is None and math.isnan(m["few"])


class CosineToy(torch.nn.Module):
    """Linear encoder + cosine classifier, with the hooks evaluate's TTE shortcut uses."""

    supports_feature_tte = True

    def __init__(self, k=5, d=12):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.enc = torch.nn.Linear(3 * 4 * 4, d)
        self.weight = torch.nn.Parameter(torch.randn(k, d, generator=g))

    def encode_image(self, x):
        return self.enc(x.flatten(1))

    def classifier_logits_from_unit(self, unit):
        return 25.0 * unit @ F.normalize(self.weight, dim=-1).T

    def forward(self, x):
        return 25.0 * F.normalize(self.encode_image(x), dim=-1) @ F.normalize(self.weight, dim=-1).T


def _oracle(model, batches, k):
    correct, total = torch.zeros(k), torch.zeros(k)
    for images, labels in batches:
        logits = (
            torch.stack([model(images[:, c]) for c in range(images.shape[1])]).mean(0)
            if images.dim() == 5
            else model(images)
        )
        pred = logits.argmax(-1)
        for y, p in zip(labels.tolist(), pred.tolist()):
            total[y] += 1
            correct[y] += int(y == p)
    return 100 * correct.sum() / total.sum()


@pytest.mark.parametrize("feature_tte", [True, False])
def test_tte_evaluation_matches_published_crop_averaging(feature_tte):
    torch.manual_seed(0)
    model = CosineToy()
    batches = [(torch.randn(6, 5, 3, 4, 4), torch.randint(0, 5, (6,))) for _ in range(4)]
    m = evaluate(model, batches, [200, 50, 50, 10, 5], tte=True, progress=False, feature_tte=feature_tte)
    assert m["overall"] == pytest.approx(float(_oracle(model, batches, 5)))
    assert m["num_samples"] == 24


def test_plain_evaluation_and_bad_shapes():
    torch.manual_seed(1)
    model = CosineToy()
    batches = [(torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,)))]
    m = evaluate(model, batches, [200, 50, 50, 10, 5], progress=False)
    assert m["overall"] == pytest.approx(float(_oracle(model, batches, 5)))
    with pytest.raises(ValueError, match="tte=True"):
        evaluate(model, batches, [200, 50, 50, 10, 5], tte=True, progress=False)
    with pytest.raises(ValueError, match="cls_num_list has 3"):
        evaluate(model, batches, [200, 50, 5], progress=False)


def test_half_precision_is_bf16_on_cpu():
    from liftplus_fast.evaluate import autocast_context

    for precision in ("amp", "fp16", "bf16"):
        with autocast_context(torch.device("cpu"), precision):
            assert torch.is_autocast_enabled("cpu")
            out = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
        assert out.dtype == torch.bfloat16
    with autocast_context(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision"):
        autocast_context(torch.device("cpu"), "int8")


def test_feature_space_tte_equals_crop_logit_averaging_on_a_lift_model():
    import liftplus_fast as lf

    torch.manual_seed(0)
    clip, tok = lf.load_clip("tiny_vit", None)
    cfg = lf.make_config("lift+", {"num_classes": 5, "resolution": 32, "prec_train": "fp32"})
    model = lf.build_lift_model(clip, cfg, [200, 50, 50, 10, 5], [f"c{i}" for i in range(5)], tok)
    assert model.supports_feature_tte
    batches = [(torch.randn(6, 5, 3, 32, 32), torch.randint(0, 5, (6,))) for _ in range(3)]
    crops = torch.cat([b[0] for b in batches]).flatten(0, 1)
    with torch.no_grad():
        per_crop = model(crops).reshape(18, 5, -1).mean(1)
        unit = lf.ops.tte_mean_unit_features(model.encode_image(crops).reshape(18, 5, -1).transpose(0, 1))
        torch.testing.assert_close(model.classifier_logits_from_unit(unit), per_crop, rtol=1e-5, atol=1e-5)
    fast = evaluate(model, batches, [200, 50, 50, 10, 5], tte=True, progress=False, feature_tte=True)
    slow = evaluate(model, batches, [200, 50, 50, 10, 5], tte=True, progress=False, feature_tte=False)
    assert fast["per_class"] == slow["per_class"]


def test_format_accuracy_names_empty_groups():
    from liftplus_fast.evaluate import format_accuracy

    assert format_accuracy(12.345) == "12.35%"
    assert format_accuracy(math.nan) == "n/a" and format_accuracy(None) == "n/a"
    m = metrics_from_counts(torch.tensor([3, 1]), torch.tensor([4, 2]), [50, 30])  # no class > 100
    assert m["many"] != m["many"] and format_accuracy(m["many"]) == "n/a"
