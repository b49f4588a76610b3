"""Small faults: op arguments the backends disagreed on, meta tensors, the offline-weights hint."""

import pytest
import torch

from liftplus_fast.model import load_clip
from liftplus_fast.model.backbones import BackboneLoadError
from liftplus_fast.ops import adaptformer, la_cosine_cross_entropy
from liftplus_fast.ops._native import native_status


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_adaptformer_rejects_eps_that_is_not_positive(eps):
    d, r = 8, 4
    a = torch.randn(2, d)
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        adaptformer(
            a,
            a,
            torch.ones(d),
            torch.zeros(d),
            torch.randn(r, d),
            torch.zeros(r),
            torch.randn(d, r),
            torch.zeros(d),
            torch.tensor(0.1),
            eps=eps,
        )


def test_loss_op_runs_on_meta_tensors():
    feat = torch.empty(4, 8, device="meta", requires_grad=True)
    weight = torch.empty(3, 8, device="meta", requires_grad=True)
    loss, logits = la_cosine_cross_entropy(
        feat,
        weight,
        torch.empty(4, dtype=torch.int64, device="meta"),
        torch.empty(3, device="meta"),
        return_logits=True,
    )
    loss.backward()
    assert loss.shape == () and logits.shape == (4, 3) and feat.grad.shape == (4, 8)
    if not native_status().loaded:
        return  # the public op ran on the reference; there is no native op to try
    native = torch.ops.liftplus_fast.la_cosine_ce_fwd
    out = native(
        feat.detach(),
        weight.detach(),
        torch.empty(4, dtype=torch.int64, device="meta"),
        torch.empty(3, device="meta"),
        25.0,
        1.0,
        True,
        True,
    )
    assert out[1].shape == (4, 3) and out[3].shape == (4, 8)


def test_offline_message_names_the_command_line_option_too(monkeypatch):
    import open_clip

    def offline(*args, **kwargs):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    with pytest.raises(
        BackboneLoadError,
        match=r"--pretrained /path/to/ViT-B-32\.pt on the command line, "
        r"pretrained='/path/to/ViT-B-32\.pt' in Python",
    ):
        load_clip("clip_vit_b32", pretrained="openai")
