"""Configuration of a LIFT+ run, with the option names of the published LIFT+ code.

:class:`LiftConfig` holds every option; :data:`METHODS` maps a method name (``-m`` of the
command line) to its preset; :func:`make_config` applies a method preset and ``key value``
overrides (``v.adaptformer_dim 8`` style, as the published command line takes them).
"""
from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import InitVar, dataclass, field, fields
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Layers = Union[None, int, str, Sequence[int]]


@dataclass
class TunerConfig:
    """Which parameter-efficient tuners go into the image encoder, and where (``v.*`` options).

    ``*_layers``: ``None`` (all blocks), an int k (the last k blocks), a list of block indices
    or an expression string such as ``"[1, 2]"`` or ``"range(3)"``. ``*_dim`` / ``pt_len``:
    ``None`` picks the published rule from the class count.
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


@dataclass
class LiftConfig:
    """Every option of a run. Defaults are the published LIFT+ defaults (method ``lift+``).

    ``LiftConfig(method="lora", num_classes=K)`` applies the method's preset (:data:`METHODS`)
    to every option still at its default, so the method named is the method built; values given
    that differ from the defaults win. :func:`make_config` applies presets and overrides in an
    explicit order, and :meth:`from_dict` restores a saved config as it was (no preset).
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
    # Mixed precision, as the published code: "amp" trains with fp16 autocast and a gradient
    # scaler on CUDA, bf16 autocast on CPU (the CPU's fast half type); "fp16"/"bf16" name the
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
    # outputs
    test_only: bool = False
    model_dir: Optional[str] = None
    output_dir: Optional[str] = None
    print_freq: int = 10
    apply_preset: InitVar[bool] = True

    def __post_init__(self, apply_preset: bool) -> None:
        if apply_preset:
            self.method = resolve_method(self.method)
            _fill_preset(self)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict of every option."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LiftConfig":
        """Inverse of :meth:`to_dict` (unknown keys raise ``ValueError``)."""
        d = dict(d)
        v = TunerConfig(**d.pop("v", {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LiftConfig option(s): {', '.join(unknown)}")
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(v=v, apply_preset=False, **d)


# Method presets: ``-m NAME`` of the command line. Keys are LiftConfig options; ``v.x`` sets
# TunerConfig.x. Names follow the published configs plus one name per compared tuner.
METHODS: Dict[str, Dict[str, Any]] = {
    "lift+": {"classifier": "CosineClassifier", "v.adaptformer": True},
    "lift": {"classifier": "CosineClassifier", "v.adaptformer": True, "num_epochs": 10,
             "lr": 0.01, "mda": False},
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
}
METHOD_ALIASES = {"zero_shot": "zs", "zeroshot": "zs", "linear_probe": "lp", "full": "fft",
                  "full_finetune": "fft", "vpt_deep": "vpt", "arbitrary": "aft", "liftplus": "lift+"}

LOSSES = ("CE", "Focal", "LDAM", "CB", "GRW", "BS", "LA", "LADE")
CLASSIFIERS = ("CosineClassifier", "LinearClassifier", "L2NormClassifier", "LayerNormClassifier")
CLASSIFIER_INITS = ("semantic", "class_mean", "linear_probing", "random", None)
MDA_FUNCS = ("min", "max", "linear", "convex", "concave")
PRECISIONS_TRAIN = ("fp32", "amp", "fp16", "bf16")
PRECISIONS_TEST = ("fp32", "fp16", "bf16", "amp")


def resolve_method(name: str) -> str:
    """Canonical method name, or ``ValueError`` listing the known ones."""
    key = METHOD_ALIASES.get(name.lower(), name.lower())
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
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


def set_option(cfg: LiftConfig, key: str, value: Any) -> None:
    """Set ``key`` (``lr``, ``v.adaptformer_dim``, ...) from a value or its string form."""
    value = _parse_value(value)
    target, name = cfg, key
    if key.startswith("v.") or key.startswith("v_"):
        target, name = cfg.v, key[2:]
    known = {f.name for f in fields(target)}
    if name not in known:
        raise ValueError(f"unknown option {key!r}; known options: "
                         + ", ".join(sorted(known if target is cfg.v else known - {"v"})))
    if name in ("mean", "std") and value is not None:
        value = tuple(value)
    setattr(target, name, value)


def _option_default(target, name: str) -> Any:
    f = {f.name: f for f in fields(target)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _fill_preset(cfg: LiftConfig) -> None:
    """Apply ``cfg.method``'s preset to the options still at their defaults."""
    for key, value in METHODS[cfg.method].items():
        target, name = (cfg.v, key[2:]) if key.startswith("v.") else (cfg, key)
        if getattr(target, name) == _option_default(target, name):
            setattr(target, name, value)


def make_config(method: str = "lift+", overrides: Optional[Dict[str, Any]] = None,
                opts: Iterable[str] = ()) -> LiftConfig:
    """A :class:`LiftConfig` for ``method`` with keyword ``overrides`` and ``key value`` ``opts``."""
    cfg = LiftConfig(method=resolve_method(method), apply_preset=False)
    for key, value in METHODS[cfg.method].items():
        set_option(cfg, key, value)
    for key, value in (overrides or {}).items():
        set_option(cfg, key, value)
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"options must come as 'key value' pairs; got {opts}")
    for key, value in zip(opts[::2], opts[1::2]):
        set_option(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: LiftConfig) -> None:
    """Raise ``ValueError`` naming the first option that is out of its range."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(msg)

    need(cfg.loss_type in LOSSES, f"loss_type must be one of {LOSSES}; got {cfg.loss_type!r}")
    need(cfg.classifier in CLASSIFIERS + (None,),
         f"classifier must be one of {CLASSIFIERS} or None; got {cfg.classifier!r}")
    need(cfg.classifier_init in CLASSIFIER_INITS,
         f"classifier_init must be one of {CLASSIFIER_INITS}; got {cfg.classifier_init!r}")
    need(cfg.mda_func in MDA_FUNCS, f"mda_func must be one of {MDA_FUNCS}; got {cfg.mda_func!r}")
    need(cfg.prec_train in PRECISIONS_TRAIN,
         f"prec_train must be one of {PRECISIONS_TRAIN}; got {cfg.prec_train!r}")
    need(cfg.prec_test in PRECISIONS_TEST,
         f"prec_test must be one of {PRECISIONS_TEST}; got {cfg.prec_test!r}")
    need(isinstance(cfg.num_epochs, int) and cfg.num_epochs >= 1,
         f"num_epochs must be a positive integer; got {cfg.num_epochs!r}")
    need(isinstance(cfg.batch_size, int) and cfg.batch_size >= 1,
         f"batch_size must be a positive integer; got {cfg.batch_size!r}")
    need(isinstance(cfg.accum_step, int) and cfg.accum_step >= 1,
         f"accum_step must be a positive integer; got {cfg.accum_step!r}")
    need(cfg.batch_size % cfg.accum_step == 0,
         f"batch_size ({cfg.batch_size}) must be divisible by accum_step ({cfg.accum_step})")
    need(cfg.lr > 0, f"lr must be positive; got {cfg.lr!r}")
    need(cfg.num_classes is None or (isinstance(cfg.num_classes, int) and cfg.num_classes >= 2),
         f"num_classes must be an integer >= 2; got {cfg.num_classes!r}")
    need(cfg.data_cache is None or isinstance(cfg.data_cache, str),
         f"data_cache must be a cache folder (built by liftplus-fast cache) or None; got {cfg.data_cache!r}")
    need(not cfg.augment_on_device or cfg.data_cache is not None,
         "augment_on_device True needs data_cache (a folder built by liftplus-fast cache)")
    need(cfg.v.aft_loc in ("attn", "mlp", "all"),
         f"v.aft_loc must be 'attn', 'mlp' or 'all'; got {cfg.v.aft_loc!r}")


def parse_layers(layers: Layers, n_layers: int) -> List[int]:
    """Block indices selected by a ``*_layers`` option (see :class:`TunerConfig`)."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, bool):
        raise ValueError(f"layers must be None, an int, a list or an expression; got {layers!r}")
    if isinstance(layers, int):
        if not 1 <= layers <= n_layers:
            raise ValueError(f"layers={layers} selects the last k blocks; k must be in [1, {n_layers}]")
        return list(range(n_layers - layers, n_layers))
    if isinstance(layers, str):
        try:
            parsed = eval(layers, {"__builtins__": {}}, {"range": range, "list": list})  # noqa: S307
        except Exception as exc:  # the expression is user text: report it whatever failed
            raise ValueError(f"could not read layers expression {layers!r}: {exc}") from None
        return parse_layers(list(parsed), n_layers)
    out = [int(i) for i in layers]
    bad = [i for i in out if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(f"layer indices {bad} are out of range for {n_layers} blocks")
    return [i % n_layers for i in out]


def bottleneck_dim(num_classes: int, n_layers: int, divisor: int) -> int:
    """The published bottleneck rule ``2 ** max(0, floor(log2(K / (divisor * L))))``.

    ``divisor`` is 2 for Adapter/AdaptFormer, 4 for LoRA and 1 for the VPT prompt length.
    """
    return 2 ** max(0, int(math.log2(num_classes / (n_layers * divisor))))
