"""LayerNorm computed in fp32 on activations of any dtype, the result in the input's dtype.

The published code runs every LayerNorm in fp32 and casts back (for stability in half
precision). Written as that, a bf16 LayerNorm is four passes and two fp32 temporaries each way:
``x.float()``, the fp32 LayerNorm, ``.to(bf16)``, and the three again in the backward. PyTorch's
CPU LayerNorm also reads bf16 activations with fp32 weights directly ("mixed type"): fp32
statistics and arithmetic, the result rounded to bf16 once, the input gradient too; the same
numbers up to the order of fp32 sums, without the casts. Its weight and bias gradients, though,
lose precision (relative error ~5e-2 against ~5e-7 for the cast form, measured at 1576 x 768), so
it is used only where the LayerNorm's weights are frozen, as the backbone's are in LIFT+.

Which form runs for bf16 on CPU is the measured choice ``layer_norm_bf16`` (:mod:`.choices`;
``LIFTPLUS_FAST_LAYER_NORM=fused|cast``): ``fused`` is the mixed-type LayerNorm, ``cast`` the
published structure.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from . import choices

__all__ = ["ENV_VAR", "fp32_layer_norm"]

ENV_VAR = "LIFTPLUS_FAST_LAYER_NORM"


def _cast(x, weight, bias, eps):
    return F.layer_norm(
        x.float(),
        (x.shape[-1],),
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    ).to(x.dtype)


def _mixed(x, weight, bias, eps):
    return F.layer_norm(
        x,
        (x.shape[-1],),
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )


def _time_forms(rows: int = 2 * 197, width: int = 768) -> Dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(rows, width, generator=g).to(torch.bfloat16)
    w, b = torch.ones(width), torch.zeros(width)

    def run(form):
        return lambda: form(x, w, b, 1e-5).backward(grad)

    # Under a millisecond each: ten rounds, so that a preempted round cannot decide.
    return choices.best_seconds({"fused": run(_mixed), "cast": run(_cast)}, rounds=10)


def _decide():
    return choices.faster(_time_forms(), prefer="fused")


CHOICE = choices.define(choices.Choice("layer_norm_bf16", ("fused", "cast"), ENV_VAR, _decide))


def fp32_layer_norm(x, weight, bias, eps):
    """``LayerNorm(x)`` computed in fp32 and returned in ``x.dtype`` (see the module doc)."""
    if (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias)))
        and choices.get(CHOICE.name) == "fused"
    ):
        return _mixed(x, weight, bias, eps)
    return _cast(x, weight, bias, eps)
