"""End-to-end LIFT+ training step (forward, loss, backward, SGD step) on a ViT.

Candidates (docs/benchmarks.md): "reference" (every op on the pure-PyTorch reference path, the
published code's structure) and "compile" (``torch.compile`` of that same step) in the default
mixed precision (``prec_train="amp"``: bf16 autocast on CPU, fp16 on CUDA), "fused" (the
default backends, same precision), and "reference_fp32" (the reference in full precision).
Full mode uses CLIP ViT-B/16 at 224 px with K = 100 classes and B = 8 images (randomly
initialised: the weights do not change the cost); smoke mode a tiny ViT. The flops column
counts the GEMMs of the step so the measured GEMM throughput gives the compute floor.
"""
from __future__ import annotations

import contextlib
import copy
import os

import torch

import common
from liftplus_fast import build_lift_model, load_clip, make_config
from liftplus_fast.evaluate import autocast_context
from liftplus_fast.ops._dispatch import ENV_VAR

NAME = "train_step"


@contextlib.contextmanager
def backend(name):
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous


def _step_fn(model, images, labels, backend_name, precision, compile_loss=False):
    params = [p for p in model.tuner.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=5e-4)
    device = images.device

    def loss_fn(x, y):
        with autocast_context(device, precision):
            return model.training_loss(x, y)[0]

    if compile_loss:
        with backend(backend_name):
            loss_fn = common.compiled(loss_fn)

    def step():
        with backend(backend_name):
            loss = loss_fn(images, labels)
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
    return step


def _vit_gemm_flops(width, layers, tokens, batch, r, k):
    # Per block: qkv (3), attention out (1), MLP (8) width² GEMMs per token, plus attention
    # scores/values (2·tokens·width); the backward computes only input gradients of the
    # frozen weights (×2 in total), the adapter is small. Classifier: B·K·width, three times.
    per_token = 2 * (12 * width * width + 2 * tokens * width)
    frozen = layers * batch * tokens * per_token * 2
    adapter = layers * batch * tokens * 2 * 2 * width * r * 3
    return frozen + adapter + 3 * 2 * batch * k * width


def cases(smoke: bool):
    name, size, batch, k = ("tiny_vit", 32, 4, 10) if smoke else ("ViT-B-16", 224, 8, 100)
    torch.manual_seed(0)
    clip, tokenizer = load_clip(name, None)
    counts = [max(1, int(500 * 0.01 ** (i / (k - 1)))) for i in range(k)]
    cfg = make_config("lift+", {"num_classes": k, "resolution": size})
    classnames = [f"class {i}" for i in range(k)]
    ref_model = build_lift_model(clip, cfg, counts, classnames, tokenizer)
    fused_model = copy.deepcopy(ref_model)
    compile_model = copy.deepcopy(ref_model)
    fp32_model = copy.deepcopy(ref_model)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g)
    labels = torch.randint(0, k, (batch,), generator=g)
    candidates = {"reference": _step_fn(ref_model, images, labels, "reference", "amp"),
                  "compile": _step_fn(compile_model, images, labels, "reference", "amp", compile_loss=True),
                  "fused": _step_fn(fused_model, images, labels, "auto", "amp"),
                  "reference_fp32": _step_fn(fp32_model, images, labels, "reference", "fp32")}
    v = clip.visual
    width, layers = v.conv1.weight.shape[0], len(v.transformer.resblocks)
    tokens = (size // v.conv1.weight.shape[-1]) ** 2 + 1
    r = fused_model.image_encoder.blocks[0].tuner.adaptformer.down.weight.shape[0]
    case = common.Case(f"{name} B={batch} K={k} amp step", {"backbone": name, "B": batch, "K": k},
                       candidates, flops=_vit_gemm_flops(width, layers, tokens, batch, r, k))
    case.notes.append("GEMM-bound: the fused ops can only remove the non-GEMM share of the step; "
                      "amp = bf16 autocast on CPU")
    yield case
