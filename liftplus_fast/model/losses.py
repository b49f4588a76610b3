"""Long-tail losses of the published LIFT+ code, device-agnostic (the LDAM there needs CUDA).

Every loss takes ``(logits [B, K], labels [B])`` and returns the mean loss. Class statistics
are registered as buffers so ``.to(device)`` moves them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BalancedSoftmaxLoss",
    "ClassBalancedLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "GeneralizedReweightLoss",
    "LADELoss",
    "LDAMLoss",
    "LOSSES",
    "LogitAdjustedLoss",
    "build_loss",
    "check_cls_num_list",
    "log_prior",
]


def check_cls_num_list(cls_num_list, num_classes: int = None, need_positive: bool = True) -> torch.Tensor:
    """Class counts as a float tensor; ``ValueError`` on a length mismatch or an empty class."""
    counts = torch.as_tensor([float(c) for c in cls_num_list], dtype=torch.float32)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"cls_num_list must be a non-empty list of class counts; got shape {tuple(counts.shape)}")
    if num_classes is not None and counts.numel() != num_classes:
        raise ValueError(f"cls_num_list has {counts.numel()} entries but num_classes is {num_classes}")
    if (counts < 0).any():
        raise ValueError(
            f"cls_num_list has negative counts at class indices {(counts < 0).nonzero().flatten().tolist()}"
        )
    if need_positive and (counts == 0).any():
        bad = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"class index {bad[0]} has zero training images (all such classes: {bad[:20]}); its log prior would be -inf"
        )
    return counts


def log_prior(cls_num_list) -> torch.Tensor:
    """``log(n_k / sum n)`` as fp32 (checks that every class has images)."""
    counts = check_cls_num_list(cls_num_list)
    return torch.log(counts / counts.sum())


class CrossEntropyLoss(nn.Module):
    """Plain cross-entropy."""

    # A loss with ``prior_tau`` is exactly CE(logits + prior_tau * log prior): the model may run
    # it through the fused op (``ops.la_cosine_cross_entropy``) instead of ``forward``.
    prior_tau = 0.0

    def forward(self, logits, labels):
        """Mean CE."""
        return F.cross_entropy(logits.float(), labels)


class FocalLoss(nn.Module):
    """Focal loss ``mean((1 - p_y)^γ · CE)`` (γ = 2)."""

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0; got {gamma}")
        self.gamma = gamma

    def forward(self, logits, labels):
        """Mean focal loss."""
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        return ((1 - torch.exp(-ce)) ** self.gamma * ce).mean()


class LDAMLoss(nn.Module):
    """Label-distribution-aware margin: subtract ``s · m_y`` from the true-class logit.

    ``m_k ∝ n_k^(-1/4)``, the largest margin being ``max_m``; ``s`` is the classifier scale
    because the logits come already scaled.
    """

    def __init__(self, cls_num_list, max_m: float = 0.5, s: float = 30.0):
        super().__init__()
        counts = check_cls_num_list(cls_num_list)
        m = counts.pow(-0.25)
        self.register_buffer("m_list", m * (max_m / m.max()))
        self.s = float(s)

    def forward(self, logits, labels):
        """Mean CE of the margin-adjusted logits."""
        logits = logits.float()
        margin = torch.zeros_like(logits).scatter_(1, labels.view(-1, 1), (self.m_list[labels] * self.s).view(-1, 1))
        return F.cross_entropy(logits - margin, labels)


class _WeightedCE(nn.Module):
    def forward(self, logits, labels):
        """Mean class-weighted CE (PyTorch's weighted mean)."""
        return F.cross_entropy(logits.float(), labels, weight=self.per_cls_weights)


class ClassBalancedLoss(_WeightedCE):
    """CE weighted by the inverse effective number ``(1-β)/(1-β^n_k)`` (mean-normalised)."""

    def __init__(self, cls_num_list, beta: float = 0.9999):
        super().__init__()
        counts = check_cls_num_list(cls_num_list).double()
        w = (1.0 - beta) / (1.0 - beta**counts)
        self.register_buffer("per_cls_weights", (w / w.mean()).float())


class GeneralizedReweightLoss(_WeightedCE):
    """CE weighted by ``prior^(-exp_scale)`` (mean-normalised)."""

    def __init__(self, cls_num_list, exp_scale: float = 1.0):
        super().__init__()
        counts = check_cls_num_list(cls_num_list)
        w = 1.0 / (counts / counts.sum()) ** exp_scale
        self.register_buffer("per_cls_weights", w / w.mean())


class LogitAdjustedLoss(nn.Module):
    """``CE(logits + τ · log prior, y)``."""

    def __init__(self, cls_num_list, tau: float = 1.0):
        super().__init__()
        self.register_buffer("log_prior", log_prior(cls_num_list))
        self.tau = float(tau)

    @property
    def prior_tau(self) -> float:
        """The logit-adjustment strength τ (see :attr:`CrossEntropyLoss.prior_tau`)."""
        return self.tau

    def forward(self, logits, labels):
        """Mean logit-adjusted CE."""
        return F.cross_entropy(logits.float() + self.tau * self.log_prior.unsqueeze(0), labels)


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced softmax: logit adjustment with τ = 1."""

    def __init__(self, cls_num_list):
        super().__init__(cls_num_list, tau=1.0)


class LADELoss(nn.Module):
    """LADE: logit-adjusted CE plus a regularised MINE estimate of each class's log-ratio.

    ``loss = CE(z + log π) + w · (−Σ_k π_k (f_k − s_k − λ s_k²))`` with ``f_k`` the mean logit
    of class k over its samples in the batch and ``s_k = logsumexp_b(z_bk − log π_k + log(1/K)) −
    log B``.
    """

    def __init__(self, cls_num_list, remine_lambda: float = 0.1, estim_loss_weight: float = 0.1):
        super().__init__()
        counts = check_cls_num_list(cls_num_list)
        self.num_classes = counts.numel()
        self.register_buffer("prior", counts / counts.sum())
        self.remine_lambda = remine_lambda
        self.estim_loss_weight = estim_loss_weight

    def forward(self, logits, labels):
        """Mean LADE loss."""
        logits = logits.float()
        ce = F.cross_entropy(logits + torch.log(self.prior).unsqueeze(0), labels)
        onehot = labels.view(1, -1) == torch.arange(self.num_classes, device=labels.device).view(-1, 1)
        x_p = logits.T * onehot  # K x B
        x_q = (logits - torch.log(self.prior + 1e-9) + math.log(1.0 / self.num_classes + 1e-9)).T  # K x B
        n_k = onehot.sum(-1).float()
        first = x_p.sum(-1) / (n_k + 1e-8)
        second = torch.logsumexp(x_q, -1) - math.log(x_q.shape[-1])
        estim = first - second - self.remine_lambda * second**2
        return ce + self.estim_loss_weight * (-(estim * self.prior).sum())


def build_loss(cfg, cls_num_list) -> nn.Module:
    """The loss module of ``cfg.loss_type`` for the class counts ``cls_num_list``."""
    if cfg.num_classes is not None and len(cls_num_list) != cfg.num_classes:
        raise ValueError(f"cls_num_list has {len(cls_num_list)} entries but cfg.num_classes is {cfg.num_classes}")
    if cfg.loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {cfg.loss_type!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[cfg.loss_type](cfg, cls_num_list)


def _unweighted(loss: type):
    def build(cfg, cls_num_list):
        check_cls_num_list(cls_num_list, need_positive=False)
        return loss()

    return build


# loss_type -> builder(cfg, cls_num_list): the published names (utils/losses.py).
LOSSES = {
    "CE": _unweighted(CrossEntropyLoss),
    "Focal": _unweighted(FocalLoss),
    "LDAM": lambda cfg, counts: LDAMLoss(counts, s=cfg.classifier_scale),
    "CB": lambda cfg, counts: ClassBalancedLoss(counts),
    "GRW": lambda cfg, counts: GeneralizedReweightLoss(counts),
    "BS": lambda cfg, counts: BalancedSoftmaxLoss(counts),
    "LA": lambda cfg, counts: LogitAdjustedLoss(counts, tau=cfg.la_tau),
    "LADE": lambda cfg, counts: LADELoss(counts),
}
