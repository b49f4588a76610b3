"""Parameter-efficient tuner modules and the registry that installs them into ViT blocks.

A tuner attaches to the site of the block it tunes (as HF PEFT's layers wrap the module they
tune): :class:`~liftplus_fast.model.peft_vit.PEFTBlock` names its sites (``SITES``) and calls
whatever is attached there; it never asks which tuners exist. A tuner module implements the
hook of its site:

* linear sites ``attn_in``, ``attn_out``, ``mlp_in``, ``mlp_out``: ``tune_weight(x, weight,
  bias) -> (weight, bias)`` (before the projection) and/or ``tune_output(x, y) -> y`` (after
  it; ``x`` is the projection's input);
* ``mlp``: ``tune_output(h, m) -> m`` on the MLP branch (``h`` the ``ln_2`` output);
* ``tokens``: ``tune_tokens(x, raw_len, batch_first) -> x`` on the block input;
* ``residual``: ``tune_residual(x, m) -> x + m'``, the block output (one tuner at most).

Adding a tuner: one module implementing its hook, one installer that stores it in the block's
:class:`BlockTuner` under its published name and calls ``block.attach(site, module)``, and one
entry in :data:`TUNERS`. Each tuner module acts on the last (feature) dimension only, so it does
not care whether the backbone runs batch-first or sequence-first. Parameter names follow the
published LIFT+ code so that the tuner's ``state_dict()`` is the official checkpoint layout.
"""

from __future__ import annotations

import ast
import math
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..errors import UserInputError
from ..ops import gemm
from ..ops.layer_norm import fp32_layer_norm

__all__ = [
    "AFT_LOCS",
    "AdaptFormer",
    "Adapter",
    "BlockTuner",
    "DeepPrompt",
    "LoRA",
    "MaskedLinear",
    "MaskedParameter",
    "QVLoRA",
    "SSF",
    "TUNERS",
    "bottleneck_dim",
    "check_layers",
    "fp32_layer_norm",
    "install_tuners",
    "parse_layers",
    "tuner_sizes",
]

Layers = Union[None, int, str, Sequence[int]]
LAYERS_EXPECTED = (
    "None, a block count k >= 0 (0: none), a list of block indices, 'deep' (all), or a list or range "
    "of integers written as text, such as '[1, 2]', 'range(3)' or 'range(0, 12, 2)'"
)


# Bounds of a layers expression: far above any backbone's block count, far below what could
# cost memory or time to read.
_MAX_EXPRESSION_CHARS = 1000
_MAX_BLOCK_INDEX = 4096


def _read_layers_expression(text: str) -> List[int]:
    """The block indices of a layers expression, read as data (``ValueError`` saying why not).

    The published code passes these strings to ``eval``; its documented forms are read here by a
    literal reader instead: a list or tuple of integers (``"[1, 2]"``, ``"(0, -1)"``) and
    ``range(stop)``, ``range(start, stop)``, ``range(start, stop, step)`` of integers (also
    inside ``list(...)``). Nothing else is accepted, so a tuner_config.json, a checkpoint's
    config or a command line can never make the package run code.
    """
    if len(text) > _MAX_EXPRESSION_CHARS:
        raise ValueError(f"longer than {_MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ValueError(f"not an expression ({type(exc).__name__})") from None
    return _layer_list(tree.body)


def _layer_list(node: ast.AST) -> List[int]:
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_layer_index(e) for e in node.elts]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        if node.func.id == "list" and len(node.args) == 1:
            return _layer_list(node.args[0])
        if node.func.id == "range" and 1 <= len(node.args) <= 3:
            bounds = [_layer_index(a) for a in node.args]
            if len(bounds) == 3 and bounds[2] == 0:
                raise ValueError("range() step must not be zero")
            return list(range(*bounds))
    raise ValueError("only a list of integers or range(...) of integers is read")


def _layer_index(node: ast.AST) -> int:
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign, node = (-1 if isinstance(node.op, ast.USub) else 1), node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) <= _MAX_BLOCK_INDEX:
        return sign * node.value
    raise ValueError(f"integers between -{_MAX_BLOCK_INDEX} and {_MAX_BLOCK_INDEX} only")


def check_layers(value) -> Tuple[bool, Any, str]:
    """The option check of a ``*_layers`` value (the forms :func:`parse_layers` reads)."""
    if value is None or value == "deep":  # "deep": every block (VPT-deep), the published l.pt_layers
        return True, value, LAYERS_EXPECTED
    if isinstance(value, bool):
        return False, value, LAYERS_EXPECTED
    if isinstance(value, int):
        return value >= 0, value, LAYERS_EXPECTED
    if isinstance(value, str):
        try:
            _read_layers_expression(value)
        except ValueError:
            return False, value, LAYERS_EXPECTED
        return True, value, LAYERS_EXPECTED
    if isinstance(value, (list, tuple)):
        return all(isinstance(i, int) and not isinstance(i, bool) for i in value), list(value), LAYERS_EXPECTED
    return False, value, LAYERS_EXPECTED


def parse_layers(layers: Layers, n_layers: int) -> List[int]:
    """Block indices selected by a ``*_layers`` option: ``None`` or ``"deep"`` (all blocks), an
    int k (the last k blocks; 0 selects none), a list of indices or an expression string such
    as ``"[1, 2]"`` or ``"range(3)"``."""
    if layers is None or layers == "deep":
        return list(range(n_layers))
    if isinstance(layers, bool):
        raise UserInputError(f"layers must be None, an int, a list or an expression; got {layers!r}")
    if isinstance(layers, int):
        if not 0 <= layers <= n_layers:
            raise UserInputError(f"layers={layers} selects the last k blocks; k must be in [0, {n_layers}]")
        return list(range(n_layers - layers, n_layers))
    if isinstance(layers, str):
        try:
            parsed = _read_layers_expression(layers)
        except ValueError as exc:
            raise UserInputError(f"could not read layers expression {layers!r}: {exc}") from None
        return parse_layers(parsed, n_layers)
    out = [int(i) for i in layers]
    bad = [i for i in out if not -n_layers <= i < n_layers]
    if bad:
        raise UserInputError(f"layer indices {bad} are out of range for {n_layers} blocks")
    return [i % n_layers for i in out]


def bottleneck_dim(num_classes: int, n_layers: int, divisor: int) -> int:
    """The published bottleneck rule ``2 ** max(0, floor(log2(K / (divisor * L))))``.

    ``divisor`` is 2 for Adapter/AdaptFormer, 4 for LoRA and 1 for the VPT prompt length.
    """
    return 2 ** max(0, int(math.log2(num_classes / (n_layers * divisor))))


class _Bottleneck(nn.Module):
    """``norm``, ``down``, ``up`` of a bottleneck: LN weight 1/bias 0, down kaiming, up zero."""

    def __init__(self, dim: int, bottle_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottle_dim)
        self.up = nn.Linear(bottle_dim, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)


class Adapter(_Bottleneck):
    """Bottleneck ``up(relu(down(LN(x))))`` in series after the MLP."""

    def forward(self, x):
        """The bottleneck output (without the residual), in the dtype of ``x``."""
        h = fp32_layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps)
        h = F.relu(gemm.linear(h, self.down.weight, self.down.bias))
        return gemm.linear(h, self.up.weight, self.up.bias)

    def tune_output(self, h, m):
        """Site ``mlp``: the adapter in series after the MLP, ``m + adapter(m)``."""
        return m + self(m)


class AdaptFormer(_Bottleneck):
    """Bottleneck parallel to the MLP with a trainable scalar ``scale`` (init 1), run by the
    fused :func:`liftplus_fast.ops.adaptformer` (whose reference states the math)."""

    def __init__(self, dim: int, bottle_dim: int):
        super().__init__(dim, bottle_dim)
        self.scale = nn.Parameter(torch.ones([]))

    def tune_residual(self, a, mlp_out):
        """Site ``residual``: ``a + (mlp_out + scale * up(relu(down(LN(a)))))``."""
        return ops.adaptformer(
            a,
            mlp_out,
            self.norm.weight,
            self.norm.bias,
            self.down.weight,
            self.down.bias,
            self.up.weight,
            self.up.bias,
            self.scale,
            self.norm.eps,
        )


class LoRA(nn.Module):
    """Low-rank update ``x @ down @ up / r`` with ``down`` [D, r] kaiming and ``up`` zero."""

    def __init__(self, dim: int, bottle_dim: int, out_dim: int = None):
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        self.down = nn.Parameter(torch.empty(dim, bottle_dim))
        self.up = nn.Parameter(torch.zeros(bottle_dim, out_dim))
        # Same call on the same [D, r] layout as the published code, so the same init bounds.
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.scale = 1.0 / bottle_dim

    def forward(self, x):
        """The low-rank delta for input ``x``."""
        return gemm.linear(gemm.linear(x, self.down.t()), self.up.t()) * self.scale


class QVLoRA(nn.ModuleDict):
    """LoRA on the query and value projections (``q``, ``v``), at site ``attn_in``."""

    def __init__(self, dim: int, bottle_dim: int):
        super().__init__({"q": LoRA(dim, bottle_dim), "v": LoRA(dim, bottle_dim)})

    def tune_output(self, h, qkv):
        """Add the low-rank deltas of ``h`` to the q and v thirds of the packed projection."""
        q, k, v = qkv.chunk(3, dim=-1)
        return torch.cat([q + self["q"](h), k, v + self["v"](h)], dim=-1)


class SSF(nn.Module):
    """Per-feature affine ``x * scale + shift`` (scale ~ N(1, .02), shift ~ N(0, .02))."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))
        self.shift = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.scale, mean=1.0, std=0.02)
        nn.init.normal_(self.shift, std=0.02)

    def forward(self, x):
        """Scale and shift the last dimension of ``x``."""
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)

    def tune_output(self, x, y):
        """Linear sites: scale and shift the projection's output."""
        return self(y)


class MaskedParameter(nn.Module):
    """A frozen tensor whose masked entries are replaced by trainable values."""

    def __init__(self, base: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.optimized_params = nn.Parameter(torch.masked_select(base.detach(), mask).clone().float())
        self.register_buffer("mask", mask, persistent=True)
        # Keep a plain reference to the backbone's own (frozen) parameter rather than a buffer
        # copy: it follows the backbone through .to()/.half() and stays out of the checkpoint.
        self.__dict__["_base"] = base

    def forward(self):
        """The full tensor with the trained entries scattered in."""
        base = self._base.detach()
        return torch.masked_scatter(base, self.mask, self.optimized_params.to(base.dtype))


class MaskedLinear(nn.Module):
    """A Linear whose weight and bias are :class:`MaskedParameter` s."""

    def __init__(self, weight, bias, weight_mask, bias_mask):
        super().__init__()
        self.masked_weight = MaskedParameter(weight, weight_mask)
        self.masked_bias = MaskedParameter(bias, bias_mask)

    def weight_and_bias(self):
        """The effective ``(weight, bias)``."""
        return self.masked_weight(), self.masked_bias()

    def tune_weight(self, x, weight, bias):
        """Linear sites: the backbone's weight and bias with the trained entries, in ``x``'s dtype."""
        return tuple(t.to(x.dtype) for t in self.weight_and_bias())


class DeepPrompt:
    """Site ``tokens`` of VPT-deep: replaces the previous block's prompt by this block's.

    Not a module: the trained tensor is ``BlockTuner.prompt`` (the published name); this only
    reads it at the site.
    """

    def __init__(self, tuner: nn.Module):
        self.tuner = tuner

    def tune_tokens(self, x, raw_len: int, batch_first: bool):
        seq, batch = (1, 0) if batch_first else (0, 1)
        prompt = self.tuner.prompt.to(x.dtype).unsqueeze(batch)
        shape = list(x.shape)
        shape[seq] = prompt.shape[seq]
        prompt = prompt.expand(shape)
        cls_tok = x.narrow(seq, 0, 1)
        # The last raw_len-1 tokens are the patches; anything between CLS and them is the
        # previous block's prompt, which this block's prompt replaces.
        patches = x.narrow(seq, x.shape[seq] - (raw_len - 1), raw_len - 1)
        return torch.cat([cls_tok, prompt, patches], dim=seq)


class BlockTuner(nn.Module):
    """Per-block container of trained things, named as in the published ``PEFT_Block.tuner``
    (the state-dict layout); where they act is set by ``PEFTBlock.attach``.

    Attributes appear only when a tuner is installed: ``prompt``, ``lora`` (``q``, ``v``),
    ``adapter``, ``adaptformer``, ``ssf`` (``attn_in``, ``attn_out``, ``mlp_in``, ``mlp_out``),
    ``aft`` (masked linears) and backbone parameters under ``<site>_<weight|bias>`` names.
    """

    def has(self, name: str) -> bool:
        """Whether a tuner called ``name`` is installed."""
        return name in self._modules or name in self._parameters


# Published PEFT_Block parameter names of the open_clip ResidualAttentionBlock tensors.
def block_sites(block) -> Dict[str, nn.Parameter]:
    """``{published name: parameter}`` of a ResidualAttentionBlock, in published order."""
    return {
        "norm1_weight": block.ln_1.weight,
        "norm1_bias": block.ln_1.bias,
        "attn_in_weight": block.attn.in_proj_weight,
        "attn_in_bias": block.attn.in_proj_bias,
        "attn_out_weight": block.attn.out_proj.weight,
        "attn_out_bias": block.attn.out_proj.bias,
        "norm2_weight": block.ln_2.weight,
        "norm2_bias": block.ln_2.bias,
        "mlp_in_weight": block.mlp.c_fc.weight,
        "mlp_in_bias": block.mlp.c_fc.bias,
        "mlp_out_weight": block.mlp.c_proj.weight,
        "mlp_out_bias": block.mlp.c_proj.bias,
    }


def _linear_sites(block):
    return {
        "attn_in": (block.attn.in_proj_weight, block.attn.in_proj_bias),
        "attn_out": (block.attn.out_proj.weight, block.attn.out_proj.bias),
        "mlp_in": (block.mlp.c_fc.weight, block.mlp.c_fc.bias),
        "mlp_out": (block.mlp.c_proj.weight, block.mlp.c_proj.bias),
    }


def _width(block) -> int:
    return block.attn.in_proj_weight.shape[1]


# --- installers: (peft_blocks, layers, v, num_classes) -> description string ------------------


def _install_fft(blocks, layers, v, k):
    for i in layers:
        for name, p in block_sites(blocks[i].block).items():
            if p is not None and not blocks[i].tuner.has(name):
                blocks[i].tuner.register_parameter(name, p)
    return f"full fine-tuning of blocks {layers}"


def _install_bitfit(blocks, layers, v, k):
    for i in layers:
        for name, p in block_sites(blocks[i].block).items():
            if p is not None and name.endswith("bias") and not blocks[i].tuner.has(name):
                blocks[i].tuner.register_parameter(name, p)
    return f"BitFit on blocks {layers}"


def _install_pt(blocks, layers, v, k):
    length = v.pt_len or bottleneck_dim(k, len(layers), 1)
    for i in layers:
        prompt = nn.Parameter(torch.empty(length, _width(blocks[i].block)))
        nn.init.normal_(prompt, std=0.02)
        blocks[i].tuner.prompt = prompt
        blocks[i].attach("tokens", DeepPrompt(blocks[i].tuner))
    return f"VPT-deep, prompt length {length}, blocks {layers}"


def _bottleneck_installer(name: str, module: Callable, site: str, divisor: int, label: str) -> Callable:
    """Installer of a tuner with a bottleneck ``v.<name>_dim`` (published rule when unset)."""

    def install(blocks, layers, v, k):
        r = getattr(v, f"{name}_dim") or bottleneck_dim(k, len(layers), divisor)
        for i in layers:
            tuner = module(_width(blocks[i].block), r)
            setattr(blocks[i].tuner, name, tuner)
            blocks[i].attach(site, tuner)
        return f"{label} r={r} on blocks {layers}"

    return install


def _install_ssf(blocks, layers, v, k):
    for i in layers:
        sites = _linear_sites(blocks[i].block)
        blocks[i].tuner.ssf = nn.ModuleDict({s: SSF(w.shape[0]) for s, (w, _) in sites.items()})
        for site, ssf in blocks[i].tuner.ssf.items():
            blocks[i].attach(site, ssf)
    return f"SSF on blocks {layers}"


# v.aft_loc: where arbitrary fine-tuning masks weights, and the trained tensors per block
# (as multiples of the width, plus the biases' extra rows) its default ratio divides by.
AFT_SITES = {
    "attn": (("attn_in", "attn_out"), 4, 4),
    "mlp": (("mlp_in", "mlp_out"), 8, 5),
    "all": (("attn_in", "attn_out", "mlp_in", "mlp_out"), 12, 9),
}
AFT_LOCS = tuple(AFT_SITES)


def aft_ratio(num_classes: int, n_layers: int, width: int, loc: str) -> float:
    """Published default mask ratio: as many trained weights in all as a linear classifier of the
    ``num_classes`` classes has (``num_classes * width``)."""
    if loc not in AFT_SITES:
        raise UserInputError(f"option v.aft_loc must be one of {', '.join(map(repr, AFT_LOCS))}; got {loc!r}")
    _, per_width, extra = AFT_SITES[loc]
    return num_classes / (n_layers * (width * per_width + extra))


def _install_aft(blocks, layers, v, k):
    loc = v.aft_loc
    ratio = (
        float(v.aft_ratio)
        if v.aft_ratio is not None
        else aft_ratio(k, len(layers), _width(blocks[layers[0]].block), loc)
    )
    for i in layers:

        def mask_like(t):
            # A fresh generator seeded with aft_seed for every tensor, as the published
            # generate_mask draws it, so a mask depends on (seed, numel, ratio) alone.
            gen = torch.Generator().manual_seed(int(v.aft_seed))
            n = t.numel()
            idx = torch.randperm(n, generator=gen, dtype=torch.int64)[: int(n * ratio)]
            m = torch.zeros(n, dtype=torch.bool).scatter_(0, idx, True).view(t.shape)
            return m.to(t.device)

        sites = _linear_sites(blocks[i].block)
        chosen = AFT_SITES[loc][0]
        aft = nn.ModuleDict()
        for s in chosen:
            w, b = sites[s]
            wm = mask_like(w)
            bm = mask_like(b)
            aft[s] = MaskedLinear(w, b, wm, bm)
            blocks[i].attach(s, aft[s])
        blocks[i].tuner.aft = aft
    return f"arbitrary fine-tuning ({loc}, ratio {ratio:.3g}) on blocks {layers}"


# name -> installer, applied in the published order (fft, bitfit, pt, lora, adapter, adaptformer,
# ssf, aft) so layer selections and names match the published checkpoints.
TUNERS: Dict[str, Callable] = {
    "fft": _install_fft,
    "bitfit": _install_bitfit,
    "pt": _install_pt,
    "lora": _bottleneck_installer("lora", QVLoRA, "attn_in", 4, "LoRA"),
    "adapter": _bottleneck_installer("adapter", Adapter, "mlp", 2, "Adapter"),
    "adaptformer": _bottleneck_installer("adaptformer", AdaptFormer, "residual", 2, "AdaptFormer"),
    "ssf": _install_ssf,
    "aft": _install_aft,
}


def install_tuners(blocks, v, num_classes: int) -> List[str]:
    """Install every tuner enabled in ``v`` (a TunerConfig) into ``blocks`` (PEFT blocks)."""
    done = []
    for name, install in TUNERS.items():
        if getattr(v, name):
            layers = parse_layers(getattr(v, f"{name}_layers"), len(blocks))
            if not layers:  # e.g. v.fft_layers 0 of the published partial fine-tuning sweep
                done.append(f"{name}: no block selected")
                continue
            done.append(install(blocks, layers, v, num_classes))
    return done


def tuner_sizes(tuner: nn.Module) -> Dict[str, int]:
    """The sizes the installed tuners were built with, under the options that set them
    (``{"v.adaptformer_dim": 8, "l.pt_len": 2, ...}``): the bottleneck ``r`` and prompt length
    the published rule resolved when the option was ``None``, read from the tuner itself."""
    sizes: Dict[str, int] = {}
    for name, module in tuner.named_modules():
        group = "l." if name.startswith("text_encoder") else "v."
        if name in ("image_adapter", "text_adapter"):
            sizes["clip_adapter_dim"] = module.down.out_features
        elif isinstance(module, (AdaptFormer, Adapter)):
            sizes[group + ("adaptformer_dim" if isinstance(module, AdaptFormer) else "adapter_dim")] = (
                module.down.out_features
            )
        elif isinstance(module, QVLoRA):
            sizes[group + "lora_dim"] = module["q"].down.shape[1]
    for name, param in tuner.named_parameters():
        if name.endswith(".prompt"):
            sizes[("l." if name.startswith("text_encoder") else "v.") + "pt_len"] = param.shape[0]
    return sizes
