"""Classifier heads on the pre-projection image feature (weights kept in fp32)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops

__all__ = [
    "CLASSIFIERS",
    "CosineClassifier",
    "L2NormClassifier",
    "LayerNormClassifier",
    "LinearClassifier",
    "build_classifier",
]


class LinearClassifier(nn.Linear):
    """Plain linear head; weight rows drawn uniform(-1, 1) then clipped to norm ≤ 1."""

    def __init__(self, feat_dim: int, num_classes: int, bias: bool = True, **_):
        super().__init__(feat_dim, num_classes, bias=bias, dtype=torch.float32)

    def reset_parameters(self):
        """Published random init: ``uniform(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5)``."""
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x):
        """Logits ``[B, K]`` in fp32."""
        return F.linear(x.float(), self.weight, self.bias)


class CosineClassifier(LinearClassifier):
    """``scale * normalize(x) @ normalize(W).T``, no bias (LIFT+ uses scale 25)."""

    def __init__(self, feat_dim: int, num_classes: int, scale: float = 25.0, **_):
        super().__init__(feat_dim, num_classes, bias=False)
        self.scale = float(scale)

    def forward(self, x):
        """Cosine logits through the shared op (same math as the fused loss)."""
        return ops.cosine_logits(x.float(), self.weight, self.scale)


class L2NormClassifier(LinearClassifier):
    """``x @ normalize(W).T`` (features left as they are)."""

    def __init__(self, feat_dim: int, num_classes: int, **_):
        super().__init__(feat_dim, num_classes, bias=False)

    def forward(self, x):
        """Logits with unit-norm class weights."""
        return F.linear(x.float(), F.normalize(self.weight, dim=-1))


class LayerNormClassifier(LinearClassifier):
    """``LN(x) @ normalize(W).T`` with a parameter-free LayerNorm (eps 1e-12)."""

    def __init__(self, feat_dim: int, num_classes: int, **_):
        super().__init__(feat_dim, num_classes, bias=False)

    def forward(self, x):
        """Logits of the standardised feature against unit-norm class weights."""
        x = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-12)
        return F.linear(x, F.normalize(self.weight, dim=-1))


CLASSIFIERS = {c.__name__: c for c in (CosineClassifier, LinearClassifier, L2NormClassifier, LayerNormClassifier)}


def build_classifier(name: str, feat_dim: int, num_classes: int, scale: float = 25.0) -> nn.Module:
    """The classifier called ``name`` (a key of :data:`CLASSIFIERS`)."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; expected one of {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[name](feat_dim, num_classes, scale=scale)
