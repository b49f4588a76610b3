"""Classifier initialisations: semantic (text encoder), class means, linear probing."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .tuners import fp32_layer_norm

__all__ = [
    "CLASSIFIER_INITS",
    "CLASS_PROMPT",
    "FEATURE_INITS",
    "class_mean_weights",
    "class_prompts",
    "default_tokenizer",
    "encode_text_unprojected",
    "linear_probing_weights",
    "project_text",
    "semantic_weights",
    "text_parts",
]

# classifier_init: "semantic" from the text encoder's class prompts, the FEATURE_INITS from image
# features of the training set, "random" keeps the classifier's own random initialisation.
FEATURE_INITS = ("class_mean", "linear_probing")
CLASSIFIER_INITS = ("semantic", *FEATURE_INITS, "random")
CLASS_PROMPT = "a photo of a {}."
_TEXT_BATCH = 1000  # the published code encodes prompts in chunks of 1000 to bound memory


def class_prompts(classnames: Sequence[str]):
    """``"a photo of a {name}."`` with underscores read as spaces."""
    return [CLASS_PROMPT.format(str(n).replace("_", " ")) for n in classnames]


def text_parts(clip_model):
    """The text tower pieces of an open_clip CLIP (plain or CustomTextCLIP)."""
    src = clip_model.text if hasattr(clip_model, "text") else clip_model
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    missing = [n for n in needed if not hasattr(src, n)]
    if missing:
        raise TypeError(f"unsupported text encoder {type(src).__name__}: missing {missing}")
    return src


def default_tokenizer(clip_model):
    """open_clip's CLIP BPE tokenizer with the model's context length."""
    from open_clip.tokenizer import SimpleTokenizer

    ctx = getattr(text_parts(clip_model), "context_length", None) or getattr(clip_model, "context_length", 77)
    return SimpleTokenizer(context_length=ctx)


@torch.no_grad()
def encode_text_unprojected(clip_model, tokens: torch.Tensor) -> torch.Tensor:
    """EOT-token feature after ``ln_final`` and before ``text_projection`` ``[N, width]``.

    The EOT token is the largest token id of each row (CLIP's vocabulary puts it last).
    """
    t = text_parts(clip_model)
    dtype = t.token_embedding.weight.dtype
    x = t.token_embedding(tokens).to(dtype) + t.positional_embedding.to(dtype)
    mask = getattr(t, "attn_mask", None)
    x = t.transformer(x, attn_mask=mask)
    x = fp32_layer_norm(x, t.ln_final.weight, t.ln_final.bias, t.ln_final.eps)
    return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]


def project_text(clip_model, feats: torch.Tensor) -> torch.Tensor:
    """Apply ``text_projection`` (a Parameter matrix or an ``nn.Linear``)."""
    proj = text_parts(clip_model).text_projection
    if proj is None:
        return feats
    if isinstance(proj, nn.Linear):
        return proj(feats.to(proj.weight.dtype))
    return feats.to(proj.dtype) @ proj


@torch.no_grad()
def class_text_features(clip_model, classnames, tokenizer=None) -> torch.Tensor:
    """Normalised projected text features of the class prompts ``[K, embed_dim]`` (fp32)."""
    tokenizer = tokenizer or default_tokenizer(clip_model)
    prompts = class_prompts(classnames)
    device = text_parts(clip_model).token_embedding.weight.device
    out = []
    for i in range(0, len(prompts), _TEXT_BATCH):
        tokens = tokenizer(prompts[i : i + _TEXT_BATCH]).to(device)
        out.append(project_text(clip_model, encode_text_unprojected(clip_model, tokens)).float())
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def semantic_weights(clip_model, classnames, tokenizer=None) -> torch.Tensor:
    """Semantic-aware classifier init ``normalize(normalize(t @ P_text) @ P_vis.T)`` ``[K, D]``.

    Maps the class text features back through the visual projection into the pre-projection
    image feature space, where the classifier lives.
    """
    t = class_text_features(clip_model, classnames, tokenizer)
    vproj = getattr(clip_model.visual, "proj", None)
    if vproj is None:
        return t
    return F.normalize(t @ vproj.detach().float().T, dim=-1)


def _check_feats(features, labels, num_classes):
    features = torch.as_tensor(features)
    labels = torch.as_tensor(labels).long().view(-1)
    if features.dim() != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"features must be [N, D] with one label each; got features "
            f"{tuple(features.shape)} and labels {tuple(labels.shape)}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got range [{int(labels.min())}, {int(labels.max())}]")
    present = torch.bincount(labels, minlength=num_classes)
    if (present == 0).any():
        bad = (present == 0).nonzero().flatten().tolist()
        raise ValueError(f"no features for class index {bad[0]} (classes without features: {bad[:20]})")
    return features.float(), labels


@torch.no_grad()
def class_mean_weights(features, labels, num_classes: int) -> torch.Tensor:
    """Normalised per-class mean of ``features`` ``[K, D]``."""
    features, labels = _check_feats(features, labels, num_classes)
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels.to(features.device), features.double())
    counts = torch.bincount(labels, minlength=num_classes).to(sums)
    return F.normalize((sums / counts[:, None]).float(), dim=-1)


def linear_probing_weights(features, labels, num_classes: int) -> torch.Tensor:
    """Normalised weights of a class-balanced L2 logistic regression (lbfgs, 100 iters) ``[K, D]``."""
    from sklearn.linear_model import LogisticRegression

    features, labels = _check_feats(features, labels, num_classes)
    clf = LogisticRegression(solver="lbfgs", max_iter=100, C=1.0, class_weight="balanced")
    clf.fit(features.cpu().numpy(), labels.cpu().numpy())
    coef = np.asarray(clf.coef_)
    if num_classes == 2 and coef.shape[0] == 1:
        # sklearn keeps one row for a binary problem: the positive class; the other is its negation.
        coef = np.concatenate([-coef, coef], axis=0)
    return F.normalize(torch.from_numpy(coef).float(), dim=-1).to(features.device)
