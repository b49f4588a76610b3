"""The whole LIFT+ model traces under torch.compile(fullgraph=True), fused ops included."""

import copy

import torch

from liftplus_fast.model import build_lift_model

from .conftest import CLASSNAMES, COUNTS, cfg_for


def test_training_loss_compiles_fullgraph_and_matches_eager(fresh_clip, tokenizer, images):
    eager = build_lift_model(fresh_clip, cfg_for("lift+"), COUNTS, CLASSNAMES, tokenizer)
    with torch.no_grad():  # a non-zero adapter so its gradients are non-trivial
        for block in eager.image_encoder.blocks:
            block.tuner.adaptformer.up.weight.normal_(0, 0.05)
    compiled_model = copy.deepcopy(eager)
    labels = torch.tensor([0, 3, 5])

    loss_e, logits_e = eager.training_loss(images, labels)
    loss_e.backward()
    fn = torch.compile(lambda x, y: compiled_model.training_loss(x, y), fullgraph=True)
    loss_c, logits_c = fn(images, labels)
    loss_c.backward()

    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-5, atol=1e-5)
    for (name, pe), (_, pc) in zip(eager.tuner.named_parameters(), compiled_model.tuner.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=name)
