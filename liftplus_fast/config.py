"""Configuration of a LIFT+ run, with the option names of the published LIFT+ code.

:class:`LiftConfig` holds every option; :data:`METHODS` maps a method name (``-m`` of the
command line) to its preset; :func:`make_config` applies a method preset and ``key value``
overrides (``v.adaptformer_dim 8`` style, as the published command line takes them).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
from dataclasses import InitVar, dataclass, field, fields
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from .errors import UserInputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN_STD = (0.5, 0.5, 0.5)

# What the published configs/backbone/*.yaml set besides the backbone name. make_config applies
# it after the method preset and before explicit options (the published merge order).
_CLIP_PRESET = {"resolution": 224, "mean": CLIP_MEAN, "std": CLIP_STD, "classifier_init": "semantic"}
_IN21K_PRESET = {"resolution": 224, "mean": HALF_MEAN_STD, "std": HALF_MEAN_STD, "classifier_init": "class_mean"}
_IN1K_PRESET = {"resolution": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "classifier_init": "class_mean"}
BACKBONE_PRESETS: Dict[str, Dict[str, Any]] = {
    "clip_vit_b16": _CLIP_PRESET,
    "clip_vit_b32": _CLIP_PRESET,
    "clip_vit_l14": _CLIP_PRESET,
    "clip_vit_l14@336px": {**_CLIP_PRESET, "resolution": 336},
    "clip_rn50": _CLIP_PRESET,
    "clip_rn101": _CLIP_PRESET,
    "in21k_vit_b16": _IN21K_PRESET,
    "in21k_vit_b16@384px": {**_IN21K_PRESET, "resolution": 384},
    "in21k_vit_l16": _IN21K_PRESET,
    "in21k_vit_l16@384px": {**_IN21K_PRESET, "resolution": 384},
    "in1k_rn50": _IN1K_PRESET,
    "in1k_rn101": _IN1K_PRESET,
    "in1k_rn152": _IN1K_PRESET,
}

Layers = Union[None, int, str, Sequence[int]]


@dataclass
class TunerConfig:
    """Which parameter-efficient tuners go into the image encoder, and where (``v.*`` options).

    ``*_layers``: ``None`` (all blocks), an int k (the last k blocks; 0 selects none, so the
    tuner adds nothing, as in the published partial fine-tuning sweep), a list of block indices
    or an expression string such as ``"[1, 2]"`` or ``"range(3)"``. ``*_dim`` / ``pt_len``:
    ``None`` picks the published rule from the class count. ``unfreeze_bn`` trains the
    BatchNorm layers (affine and running statistics) of a ResNet backbone.
    """

    fft: bool = False
    fft_layers: Layers = None
    bitfit: bool = False
    bitfit_layers: Layers = None
    pt: bool = False
    pt_layers: Layers = None
    pt_len: Optional[int] = None
    lora: bool = False
    lora_layers: Layers = None
    lora_dim: Optional[int] = None
    adapter: bool = False
    adapter_layers: Layers = None
    adapter_dim: Optional[int] = None
    adaptformer: bool = False
    adaptformer_layers: Layers = None
    adaptformer_dim: Optional[int] = None
    ssf: bool = False
    ssf_layers: Layers = None
    aft: bool = False
    aft_layers: Layers = None
    aft_ratio: Optional[float] = None
    aft_loc: str = "all"
    aft_seed: int = 0
    unfreeze_bn: bool = False


def text_tuner_defaults() -> TunerConfig:
    """The published defaults of the text-encoder tuners (``l.*`` options)."""
    return TunerConfig(pt_layers="deep", pt_len=2, lora_dim=4, adapter_dim=4, adaptformer_dim=4)


@dataclass
class LiftConfig:
    """Every option of a run. Defaults are the published LIFT+ defaults (method ``lift+``).

    ``LiftConfig(method="lora", num_classes=K)`` applies the method's preset (:data:`METHODS`)
    to every option not given, so the method named is the method built; a value given (even one
    equal to the default, and any ``v.*`` field given in ``v=TunerConfig(...)``) always wins.
    :func:`make_config` applies presets and overrides in an explicit order, and
    :meth:`from_dict` restores a saved config as it was (no preset).
    """

    method: str = "lift+"
    num_classes: Optional[int] = None
    # data
    dataset: str = "cifar100_ir100"
    root: str = "./data"
    # Folder of the split files of list-file data sets (train.txt, test.txt, classnames.txt);
    # None: the data root.
    split_dir: Optional[str] = None
    # Decode-once cache folder (built by `liftplus-fast cache`); None: decode the source images.
    data_cache: Optional[str] = None
    # Train from a cache whose build skipped undecodable training images.
    allow_skipped: bool = False
    # Decode and augment cached images in batches on the training device (the GPU) rather
    # than in the DataLoader workers.
    augment_on_device: bool = False
    resolution: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    num_workers: int = 4
    # backbone
    backbone: str = "clip_vit_b16"
    pretrained: Optional[str] = "openai"
    # run
    seed: Optional[int] = 0
    deterministic: bool = True
    device: str = "auto"
    # Mixed precision, owned by the model (frozen weights stored once in the half type): "amp"
    # trains in fp16 with a gradient scaler on CUDA, in bf16 on CPU (the CPU's fast half type); "fp16"/"bf16" name the
    # half type; "fp32" is full precision (use it to reproduce fp32 numbers exactly).
    prec_train: str = "amp"  # fp32 / amp / fp16 / bf16
    prec_test: str = "fp16"  # fp32 / fp16 / bf16 (half precision is bf16 on CPU)
    # optimisation
    num_epochs: int = 5
    batch_size: int = 128
    accum_step: int = 1
    lr: float = 0.02
    weight_decay: float = 5e-4
    momentum: float = 0.9
    loss_type: str = "LA"
    la_tau: float = 1.0
    # augmentation and test
    mda: bool = True
    mda_func: str = "convex"
    tte: bool = False
    expand: Optional[int] = None
    # method
    zero_shot: bool = False
    classifier: Optional[str] = "CosineClassifier"
    classifier_scale: float = 25.0
    classifier_init: Optional[str] = "semantic"
    v: TunerConfig = field(default_factory=TunerConfig)
    l: TunerConfig = field(default_factory=text_tuner_defaults)  # noqa: E741 (published name)
    # CLIP-side methods of the published code (text prompts, projections, CLIP-Adapter)
    coop: bool = False
    coop_init: Optional[str] = None
    coop_ctx_len: int = 4
    coop_cls_pos: str = "end"
    proj_tuning: bool = False
    clip_adapter: bool = False
    clip_adapter_dim: int = 4
    # outputs
    test_only: bool = False
    model_dir: Optional[str] = None
    output_dir: Optional[str] = None
    print_freq: int = 10
    # reliability
    nonfinite_loss: str = "error"  # "error": stop the run; "skip": skip the step (as a grad scaler)
    dist_timeout: float = 1800.0  # seconds a collective waits for a stalled process
    apply_preset: InitVar[bool] = True

    def __post_init__(self, apply_preset: bool) -> None:
        if apply_preset:
            self.method = resolve_method(self.method)
            _fill_preset(self)
        validate(self)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict of every option."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LiftConfig":
        """Inverse of :meth:`to_dict` (unknown keys raise ``ValueError``)."""
        d = dict(d)
        v = TunerConfig(**d.pop("v", {}))
        if "l" in d:
            d["l"] = TunerConfig(**d["l"])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserInputError(f"unknown LiftConfig option(s): {', '.join(unknown)}")
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(v=v, apply_preset=False, **d)


# Method presets: ``-m NAME`` of the command line. Keys are LiftConfig options; ``v.x`` sets
# TunerConfig.x. Names follow the published configs plus one name per compared tuner.
METHODS: Dict[str, Dict[str, Any]] = {
    "lift+": {"classifier": "CosineClassifier", "v.adaptformer": True},
    "lift": {"classifier": "CosineClassifier", "v.adaptformer": True, "num_epochs": 10, "lr": 0.01, "mda": False},
    "zs": {"zero_shot": True, "classifier": None},
    "lp": {"classifier": "CosineClassifier"},
    "fft": {"classifier": "CosineClassifier", "v.fft": True},
    "bitfit": {"classifier": "CosineClassifier", "v.bitfit": True},
    "vpt": {"classifier": "CosineClassifier", "v.pt": True},
    "lora": {"classifier": "CosineClassifier", "v.lora": True},
    "adapter": {"classifier": "CosineClassifier", "v.adapter": True},
    "adaptformer": {"classifier": "CosineClassifier", "v.adaptformer": True},
    "ssf": {"classifier": "CosineClassifier", "v.ssf": True},
    "aft": {"classifier": "CosineClassifier", "v.aft": True},
    "ce": {"classifier": "CosineClassifier", "v.adaptformer": True, "loss_type": "CE"},
    # configs/method/coop.yaml: prompt learning with the CLIP text head (no classifier).
    "coop": {"coop": True, "classifier": None, "num_epochs": 50, "batch_size": 32, "lr": 0.002, "mda": False},
}
METHOD_ALIASES = {
    "zero_shot": "zs",
    "zeroshot": "zs",
    "linear_probe": "lp",
    "full": "fft",
    "full_finetune": "fft",
    "vpt_deep": "vpt",
    "arbitrary": "aft",
    "liftplus": "lift+",
}

LOSSES = ("CE", "Focal", "LDAM", "CB", "GRW", "BS", "LA", "LADE")
CLASSIFIERS = ("CosineClassifier", "LinearClassifier", "L2NormClassifier", "LayerNormClassifier")
CLASSIFIER_INITS = ("semantic", "class_mean", "linear_probing", "random", None)
MDA_FUNCS = ("min", "max", "linear", "convex", "concave")
AFT_LOCS = ("attn", "mlp", "all")
PRECISIONS_TRAIN = ("fp32", "amp", "fp16", "bf16")
PRECISIONS_TEST = ("fp32", "fp16", "bf16", "amp")


def resolve_method(name: str) -> str:
    """Canonical method name, or ``ValueError`` listing the known ones."""
    key = METHOD_ALIASES.get(name.lower(), name.lower())
    if key not in METHODS:
        raise UserInputError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return key


def _parse_value(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# Published scripts/run_expand.sh passes ``tte_expand``, which the published config does not
# have (its yacs merge refuses it); it means ``expand``, so it is read as that here.
OPTION_ALIASES = {"tte_expand": "expand"}


def set_option(cfg: LiftConfig, key: str, value: Any) -> None:
    """Set ``key`` (``lr``, ``v.adaptformer_dim``, ``l.lora``, ...) from a value or its string form."""
    value = _parse_value(value)
    key = OPTION_ALIASES.get(key, key)
    target, name = cfg, key
    if key.startswith("v.") or key.startswith("v_"):
        target, name = cfg.v, key[2:]
    elif key.startswith("l."):
        target, name = cfg.l, key[2:]
    known = {f.name for f in fields(target)}
    if name not in known:
        raise UserInputError(
            f"unknown option {key!r}; known options: "
            + ", ".join(sorted(known if isinstance(target, TunerConfig) else known - {"v", "l"}))
        )
    prefix = "v." if target is cfg.v else "l." if target is cfg.l else ""
    setattr(target, name, check_option(prefix + name, value))


def _track_given(cls) -> None:
    """Wrap a dataclass ``__init__`` to record which fields the caller gave (``_given``)."""
    init = cls.__init__
    names = [f.name for f in fields(cls)]

    def __init__(self, *args, **kwargs):
        object.__setattr__(self, "_given", frozenset(names[: len(args)]) | frozenset(kwargs))
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    __init__.__signature__ = inspect.signature(init)
    cls.__init__ = __init__


_track_given(TunerConfig)
_track_given(LiftConfig)


def backbone_preset(backbone: Optional[str]) -> Dict[str, Any]:
    """The options a published backbone config sets (resolution, mean/std, classifier init);
    ``{}`` for other names. Published spellings (``CLIP-ViT-B/16``, ``IN21K-ViT-B/16``) work."""
    if not backbone:
        return {}
    key = str(backbone).lower().replace("clip-", "clip_").replace("in21k-", "in21k_").replace("in1k-", "in1k_")
    key = key.replace("vit-", "vit_").replace("/", "").replace("-", "")
    return dict(BACKBONE_PRESETS.get(key, BACKBONE_PRESETS.get(str(backbone), {})))


def _fill_preset(cfg: LiftConfig) -> None:
    """Apply ``cfg.method``'s and ``cfg.backbone``'s presets to the options the caller did not give."""
    for key, value in list(METHODS[cfg.method].items()) + list(backbone_preset(cfg.backbone).items()):
        if key.startswith("v."):
            target, name = cfg.v, key[2:]
            given = "v" in cfg._given and name in getattr(cfg.v, "_given", ())
        else:
            target, name = cfg, key
            given = name in cfg._given
        if not given:
            setattr(target, name, value)


def make_config(
    method: str = "lift+", overrides: Optional[Dict[str, Any]] = None, opts: Iterable[str] = ()
) -> LiftConfig:
    """A :class:`LiftConfig` for ``method`` with keyword ``overrides`` and ``key value`` ``opts``.

    Applied in the published merge order: the method preset, the backbone preset (see
    :func:`backbone_preset`; the backbone is the one named in ``overrides`` or ``opts``), then
    ``overrides``, then ``opts``, so anything given explicitly wins.
    """
    cfg = LiftConfig(method=resolve_method(method), apply_preset=False)
    for key, value in METHODS[cfg.method].items():
        set_option(cfg, key, value)
    opts = list(opts)
    if len(opts) % 2:
        raise UserInputError(f"options must come as 'key value' pairs; got {opts}")
    pairs = list(zip(opts[::2], opts[1::2]))
    backbone = (overrides or {}).get("backbone", cfg.backbone)
    backbone = next((v for k, v in reversed(pairs) if k == "backbone"), backbone)
    for key, value in backbone_preset(backbone).items():
        set_option(cfg, key, value)
    for key, value in (overrides or {}).items():
        set_option(cfg, key, value)
    for key, value in pairs:
        set_option(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: LiftConfig) -> None:
    """Check every option's type and range by name, normalising values in place.

    Raises ``ValueError`` naming the first option that is wrong and what it expects. Ints are
    accepted for float options, and lists for ``mean``/``std``.
    """
    for target, prefix in ((cfg, ""), (cfg.v, "v."), (cfg.l, "l.")):
        for f in fields(target):
            if f.name not in ("v", "l"):
                setattr(target, f.name, check_option(prefix + f.name, getattr(target, f.name)))
    if cfg.batch_size % cfg.accum_step:
        raise UserInputError(f"batch_size ({cfg.batch_size}) must be divisible by accum_step ({cfg.accum_step})")
    if cfg.augment_on_device and cfg.data_cache is None:
        raise UserInputError("augment_on_device True needs data_cache (a folder built by liftplus-fast cache)")


def check_option(name: str, value: Any) -> Any:
    """``value`` checked (and normalised) for option ``name``, or ``ValueError`` naming it."""
    check = OPTION_CHECKS.get(name)
    if check is None:
        raise UserInputError(f"unknown option {name!r}")
    ok, out, expected = check(value)
    if not ok:
        raise UserInputError(f"option {name} must be {expected}; got {value!r}")
    return out


def check_aft_loc(loc: str) -> None:
    """``UserInputError`` unless ``loc`` is an AFT location (:data:`AFT_LOCS`)."""
    check_option("v.aft_loc", loc)


def _number(kind, lo=None, hi=None, lo_open=False, hi_open=False, optional=False):
    # A checker returns (ok, normalised value, what is expected) so every message has one shape.
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        bounds.append(f"{'<' if hi_open else '<='} {hi}")
    what = ("an integer" if kind is int else "a finite number") + (" " + " and ".join(bounds) if bounds else "")
    if optional:
        what += " or None"

    def check(value):
        if value is None:
            return optional, value, what
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value, what
        if kind is int and not (isinstance(value, int) or float(value).is_integer()):
            return False, value, what
        if kind is float and not math.isfinite(value):
            return False, value, what
        value = kind(value)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            return False, value, what
        if hi is not None and (value > hi or (hi_open and value == hi)):
            return False, value, what
        return True, value, what

    return check


def _choice(values, optional=False):
    what = "one of " + ", ".join(repr(v) for v in values) + (" or None" if optional else "")

    def check(value):
        return (value is None and optional) or (isinstance(value, str) and value in values), value, what

    return check


def _flag(value):
    return isinstance(value, bool), value, "True or False"


def _text(optional=False, nonempty=True):
    what = ("a non-empty string" if nonempty else "a string") + (" or None" if optional else "")

    def check(value):
        if value is None:
            return optional, value, what
        return isinstance(value, str) and (bool(value.strip()) or not nonempty), value, what

    return check


def _triple(positive):
    what = "three finite numbers (one per RGB channel)" + (", all > 0" if positive else "")

    def check(value):
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 3
            or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or (positive and x <= 0)
                for x in value
            )
        ):
            return False, value, what
        return True, tuple(float(x) for x in value), what

    return check


def _layers(value):
    what = (
        "None, a block count k >= 0 (0: none), a list of block indices, 'deep' (all) or an "
        "expression such as 'range(3)'"
    )
    if value is None:
        return True, value, what
    if isinstance(value, bool):
        return False, value, what
    if isinstance(value, int):
        return value >= 0, value, what
    if value == "deep":  # every block (VPT-deep); the published default of l.pt_layers
        return True, value, what
    if isinstance(value, str):
        try:
            parsed = list(eval(value, {"__builtins__": {}}, {"range": range, "list": list}))  # noqa: S307
        except Exception:  # user text: any failure means it is not a layers expression
            return False, value, what
        return all(isinstance(i, int) and not isinstance(i, bool) for i in parsed), value, what
    if isinstance(value, (list, tuple)):
        return all(isinstance(i, int) and not isinstance(i, bool) for i in value), list(value), what
    return False, value, what


def _device(value):
    what = "'auto', 'cpu', 'cuda' or 'cuda:N'"
    ok = isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None
    return ok, value, what


_dim = _number(int, lo=1, optional=True)
# Every option, by the name the command line uses, with its type and range.
OPTION_CHECKS = {
    "method": _choice(tuple(METHODS)),
    "num_classes": _number(int, lo=2, optional=True),
    "dataset": _text(),
    "root": _text(),
    "backbone": _text(),
    "split_dir": _text(optional=True),
    "data_cache": _text(optional=True),
    "allow_skipped": _flag,
    "augment_on_device": _flag,
    "resolution": _number(int, lo=1),
    "mean": _triple(False),
    "std": _triple(True),
    "num_workers": _number(int, lo=0),
    "pretrained": _text(optional=True),
    "seed": _number(int, lo=0, optional=True),
    "deterministic": _flag,
    "device": _device,
    "prec_train": _choice(PRECISIONS_TRAIN),
    "prec_test": _choice(PRECISIONS_TEST),
    "num_epochs": _number(int, lo=1),
    "batch_size": _number(int, lo=1),
    "accum_step": _number(int, lo=1),
    "lr": _number(float, lo=0, lo_open=True),
    "weight_decay": _number(float, lo=0),
    "momentum": _number(float, lo=0, hi=1),
    "loss_type": _choice(LOSSES),
    "la_tau": _number(float, lo=0),
    "mda": _flag,
    "mda_func": _choice(MDA_FUNCS),
    "tte": _flag,
    "expand": _number(int, lo=0, optional=True),
    "zero_shot": _flag,
    "classifier": _choice(CLASSIFIERS, optional=True),
    "classifier_scale": _number(float, lo=0, lo_open=True),
    "classifier_init": _choice(tuple(c for c in CLASSIFIER_INITS if c is not None), optional=True),
    "test_only": _flag,
    "model_dir": _text(optional=True),
    "output_dir": _text(optional=True),
    "print_freq": _number(int, lo=1),
    "nonfinite_loss": _choice(("error", "skip")),
    "dist_timeout": _number(float, lo=0, lo_open=True),
    "v.pt_len": _dim,
    "v.lora_dim": _dim,
    "v.adapter_dim": _dim,
    "v.adaptformer_dim": _dim,
    "v.aft_ratio": _number(float, lo=0, hi=1, lo_open=True, optional=True),
    "v.aft_loc": _choice(AFT_LOCS),
    "v.aft_seed": _number(int, lo=0),
}
OPTION_CHECKS.update(
    {
        "coop": _flag,
        "coop_init": _choice(("photo",), optional=True),
        "coop_ctx_len": _number(int, lo=1),
        "coop_cls_pos": _choice(("front", "middle", "end")),
        "proj_tuning": _flag,
        "clip_adapter": _flag,
        "clip_adapter_dim": _number(int, lo=1),
        "v.unfreeze_bn": _flag,
        "l.unfreeze_bn": _flag,
    }
)
for _part in ("v", "l"):  # image (v.*) and text (l.*) encoder tuners share their options
    for _tuner in ("fft", "bitfit", "pt", "lora", "adapter", "adaptformer", "ssf", "aft"):
        OPTION_CHECKS[f"{_part}.{_tuner}"] = _flag
        OPTION_CHECKS[f"{_part}.{_tuner}_layers"] = _layers
    for _key in ("pt_len", "lora_dim", "adapter_dim", "adaptformer_dim", "aft_ratio", "aft_loc", "aft_seed"):
        OPTION_CHECKS[f"l.{_key}"] = OPTION_CHECKS[f"v.{_key}"]


def parse_layers(layers: Layers, n_layers: int) -> List[int]:
    """Block indices selected by a ``*_layers`` option (see :class:`TunerConfig`)."""
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
            parsed = eval(layers, {"__builtins__": {}}, {"range": range, "list": list})  # noqa: S307
        except Exception as exc:  # the expression is user text: report it whatever failed
            raise UserInputError(f"could not read layers expression {layers!r}: {exc}") from None
        return parse_layers(list(parsed), n_layers)
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
