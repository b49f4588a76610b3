"""Configuration of a LIFT+ run, with the option names of the published LIFT+ code.

:class:`LiftConfig` holds every option, each declared once as a field with its type, default,
check and one line of help (:func:`liftplus_fast.options.option`); :class:`TunerConfig` holds
the ``v.*`` / ``l.*`` tuner options the same way. :data:`OPTION_CHECKS` and :func:`option_table`
are read from those declarations, and the choices of an option come from the part that
implements it (:data:`liftplus_fast.model.classifiers.CLASSIFIERS`, ...). :data:`METHODS` maps a
method name (``-m`` of the command line) to its preset; :func:`make_config` applies a method
preset and ``key value`` overrides (``v.adaptformer_dim 8`` style, as the published command line
takes them).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import InitVar, dataclass, field, fields
from typing import Any, Dict, Iterable, List, Optional

from .data.transforms import MDA_FUNCS
from .errors import UserInputError
from .model.classifiers import CLASSIFIERS
from .model.inits import CLASSIFIER_INITS
from .model.losses import LOSSES
from .model.precision import PRECISIONS
from .model.text_head import COOP_CLS_POSITIONS, COOP_INITS
from .model.tuners import AFT_LOCS, Layers, check_layers
from .options import (
    OptionInfo,
    check_fields,
    check_value,
    choice,
    describe,
    flag,
    integer,
    key_value_pairs,
    number,
    option,
    parse_value,
    rgb,
    text,
)
from .options import device as device_check

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

# Non-finite loss policies (nonfinite_loss), implemented by the training loop.
NONFINITE_LOSS = ("error", "skip")

# Every option below is declared once: its type (the annotation), default, check and one line of
# help (liftplus_fast.options.option). Vocabularies come from the parts that implement them.
_LAYERS_HELP = "{} blocks: None (all), k (the last k; 0: none), a list, or an expression such as 'range(3)'"
_DIM = integer(lo=1, optional=True)


@dataclass
class TunerConfig:
    """Which parameter-efficient tuners go into an encoder, and where (``v.*``: image, ``l.*``: text).

    ``*_layers``: ``None`` (all blocks), an int k (the last k blocks; 0 selects none, so the
    tuner adds nothing, as in the published partial fine-tuning sweep), a list of block indices
    or an expression string such as ``"[1, 2]"`` or ``"range(3)"``. ``*_dim`` / ``pt_len``:
    ``None`` picks the published rule from the class count. The tuners are those
    :data:`liftplus_fast.model.tuners.TUNERS` installs, in its order.
    """

    fft: bool = option(False, flag, "full fine-tuning (FFT) of the selected blocks")
    fft_layers: Layers = option(None, check_layers, _LAYERS_HELP.format("FFT"))
    bitfit: bool = option(False, flag, "bias-terms fine-tuning (BitFit)")
    bitfit_layers: Layers = option(None, check_layers, _LAYERS_HELP.format("BitFit"))
    pt: bool = option(False, flag, "prompt tuning (VPT-deep): learnable tokens in every selected block")
    pt_layers: Layers = option(None, check_layers, _LAYERS_HELP.format("prompt-tuning"))
    pt_len: Optional[int] = option(None, _DIM, "prompt length; None: the published rule from the class count")
    lora: bool = option(False, flag, "low-rank adaptation (LoRA) of the query and value projections")
    lora_layers: Layers = option(None, check_layers, _LAYERS_HELP.format("LoRA"))
    lora_dim: Optional[int] = option(None, _DIM, "LoRA bottleneck dimension; None: the published rule")
    adapter: bool = option(False, flag, "Adapter: a bottleneck in series after the MLP")
    adapter_layers: Layers = option(None, check_layers, _LAYERS_HELP.format("Adapter"))
    adapter_dim: Optional[int] = option(None, _DIM, "Adapter bottleneck dimension; None: the published rule")
    adaptformer: bool = option(False, flag, "AdaptFormer: a scaled bottleneck parallel to the MLP")
    adaptformer_layers: Layers = option(None, check_layers, _LAYERS_HELP.format("AdaptFormer"))
    adaptformer_dim: Optional[int] = option(None, _DIM, "AdaptFormer bottleneck dimension; None: the published rule")
    ssf: bool = option(False, flag, "scaling and shifting (SSF) of the linear layers' outputs")
    ssf_layers: Layers = option(None, check_layers, _LAYERS_HELP.format("SSF"))
    aft: bool = option(False, flag, "arbitrary fine-tuning (AFT): a random fixed subset of the weights")
    aft_layers: Layers = option(None, check_layers, _LAYERS_HELP.format("AFT"))
    aft_ratio: Optional[float] = option(
        None,
        number(float, lo=0, hi=1, lo_open=True, optional=True),
        "fraction of the weights AFT trains; None: as many weights as a linear classifier (classes x width)",
    )
    aft_loc: str = option("all", choice(AFT_LOCS), "where AFT picks weights: attention, MLP or all linear layers")
    aft_seed: int = option(0, integer(lo=0), "seed of the AFT weight masks")
    unfreeze_bn: bool = option(False, flag, "train the BatchNorm layers (affine and statistics) of a ResNet backbone")


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

    method: str = option(
        "lift+", text(), f"the method: a preset ({', '.join(METHODS)}) or the name of a method config file"
    )
    num_classes: Optional[int] = option(None, integer(lo=2, optional=True), "classes; None: the data set's")
    # data
    dataset: str = option("cifar100_ir100", text(), "data set name (cifar100_ir100, imagenet_lt, places_lt, ...)")
    root: str = option("./data", text(), "folder where the data sets are stored")
    split_dir: Optional[str] = option(
        None, text(optional=True), "folder of a list-file data set's train.txt, test.txt, classnames.txt; None: root"
    )
    data_cache: Optional[str] = option(
        None, text(optional=True), "decode-once cache folder (liftplus-fast cache); None: decode the source images"
    )
    allow_skipped: bool = option(False, flag, "train from a cache whose build skipped undecodable training images")
    augment_on_device: bool = option(
        False, flag, "decode and augment cached images in batches on the training device (needs data_cache)"
    )
    resolution: int = option(224, integer(lo=1), "side of the square input images in pixels")
    mean: tuple = option(CLIP_MEAN, rgb(False), "per-channel mean the images are normalised with")
    std: tuple = option(CLIP_STD, rgb(True), "per-channel standard deviation the images are normalised with")
    num_workers: int = option(4, integer(lo=0), "data-loading processes (at most the CPU count)")
    # backbone
    backbone: str = option(
        "clip_vit_b16", text(), "backbone: a published name (clip_vit_b16, ...), an open_clip or timm model name"
    )
    pretrained: Optional[str] = option(
        "openai",
        text(optional=True),
        "backbone weights: an open_clip tag, 'default' (timm's), a checkpoint file, or None (random)",
    )
    # run
    seed: Optional[int] = option(0, integer(lo=0, optional=True), "seed of Python, NumPy and torch; None: unseeded")
    deterministic: bool = option(True, flag, "deterministic algorithms, for reproducible results")
    device: str = option("auto", device_check, "where to run: auto (CUDA when available), cpu, cuda or cuda:N")
    prec_train: str = option(
        "amp", choice(PRECISIONS), "training precision; amp: fp16 with loss scaling on CUDA, bf16 on CPU"
    )
    prec_test: str = option("fp16", choice(PRECISIONS), "evaluation precision (every half precision is bf16 on CPU)")
    # optimisation
    num_epochs: int = option(5, integer(lo=1), "training epochs")
    batch_size: int = option(128, integer(lo=1), "images per optimiser step (over all processes)")
    accum_step: int = option(1, integer(lo=1), "gradient-accumulation micro-batches per step; must divide batch_size")
    lr: float = option(0.02, number(lo=0, lo_open=True), "SGD learning rate, cosine-annealed over the epochs")
    weight_decay: float = option(5e-4, number(lo=0), "SGD weight decay")
    momentum: float = option(0.9, number(lo=0, hi=1), "SGD momentum")
    loss_type: str = option("LA", choice(tuple(LOSSES)), "training loss (LA: logit-adjusted cross-entropy)")
    la_tau: float = option(1.0, number(lo=0), "strength of the LA loss's logit adjustment (tau)")
    # augmentation and test
    mda: bool = option(True, flag, "minimalist data augmentation; False: random resized crop and flip")
    mda_func: str = option("convex", choice(MDA_FUNCS), "how MDA's smallest crop area grows over the epochs")
    tte: bool = option(False, flag, "test-time ensembling over five crops of each test image")
    expand: Optional[int] = option(
        None,
        integer(lo=0, optional=True),
        "pixels the test resize adds to resolution before cropping; None: 24 with tte, else resolution // 7",
    )
    # method
    zero_shot: bool = option(False, flag, "evaluate zero-shot CLIP, without training")
    classifier: Optional[str] = option(
        None,
        choice(tuple(CLASSIFIERS), optional=True),
        "classifier head on the image feature; None (the published default): CLIP's text encoder as the head",
    )
    classifier_scale: float = option(25.0, number(lo=0, lo_open=True), "logit scale of the classifier")
    classifier_init: Optional[str] = option(
        "semantic",
        choice(CLASSIFIER_INITS, optional=True),
        "classifier initialisation: class-name prompts (semantic), image features, or random",
    )
    v: TunerConfig = field(default_factory=TunerConfig, metadata={"help": "image-encoder tuners (v.* options)"})
    l: TunerConfig = field(  # noqa: E741 (published name)
        default_factory=text_tuner_defaults, metadata={"help": "text-encoder tuners (l.* options)"}
    )
    # CLIP-side methods of the published code (text prompts, projections, CLIP-Adapter)
    coop: bool = option(False, flag, "context optimisation (CoOp): learnable context tokens in the class prompts")
    coop_init: Optional[str] = option(
        None, choice(COOP_INITS, optional=True), "initial CoOp contexts: None (random) or those of 'a photo of a'"
    )
    coop_ctx_len: int = option(4, integer(lo=1), "number of learnable CoOp context tokens")
    coop_cls_pos: str = option("end", choice(COOP_CLS_POSITIONS), "position of the class name in the CoOp prompts")
    proj_tuning: bool = option(False, flag, "fine-tune CLIP's image and text projections")
    clip_adapter: bool = option(False, flag, "CLIP-Adapters on the projected image and text features")
    clip_adapter_dim: int = option(4, integer(lo=1), "hidden dimension of the CLIP-Adapters")
    # outputs
    test_only: bool = option(False, flag, "load a trained tuner (model_dir) and evaluate it")
    model_dir: Optional[str] = option(
        None,
        text(optional=True),
        "trained tuner to load: a run folder, checkpoint file or tuner folder; None with test_only: the run's own",
    )
    output_dir: Optional[str] = option(
        None,
        text(optional=True),
        "folder of the run's files; on the command line output_dir X is output/X (as published); None: no files",
    )
    print_freq: int = option(10, integer(lo=1), "a training log line every this many batches")
    confusion_matrix: bool = option(
        False,
        flag,
        "also write the test confusion matrix (confusion.npy; confusion.png when the classes are few enough to read)",
    )
    # reliability
    nonfinite_loss: str = option(
        "error", choice(NONFINITE_LOSS), "a step with a non-finite loss: error stops the run, skip skips the step"
    )
    dist_timeout: float = option(
        1800.0, number(lo=0, lo_open=True), "seconds a data-parallel collective waits for a stalled process"
    )
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
        """Inverse of :meth:`to_dict`: every value checked, unknown keys and values that are not
        options (a dict read from a file) raise ``ValueError`` naming them."""
        d = _option_dict(d, "")
        v = TunerConfig(**_option_dict(d.pop("v", {}), "v."))
        if "l" in d:
            d["l"] = TunerConfig(**_option_dict(d["l"], "l."))
        for key in ("mean", "std"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(v=v, apply_preset=False, **d)


def _option_dict(d: Any, prefix: str) -> Dict[str, Any]:
    """``d`` when it is a dict of known option names of ``LiftConfig`` (``prefix`` "") or
    ``TunerConfig`` ("v." / "l."), else :class:`UserInputError` naming what is not."""
    if not isinstance(d, dict):
        what = f"the {prefix}* options" if prefix else "a LiftConfig's options"
        raise UserInputError(f"{what} must be a mapping of names to values; got {d!r}")
    known = {f.name for f in fields(TunerConfig if prefix else LiftConfig)}
    unknown = sorted(str(k) for k in set(d) - known)
    if unknown:
        where = f"{prefix}* " if prefix else ""
        raise UserInputError(f"unknown {where}option(s): {', '.join(prefix + k for k in unknown)}")
    return dict(d)


def resolve_method(name: str) -> str:
    """Canonical method name, or ``ValueError`` listing the known ones."""
    key = METHOD_ALIASES.get(name.lower(), name.lower())
    if key not in METHODS:
        raise UserInputError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return key


# Published scripts/run_expand.sh passes ``tte_expand``, which the published config does not
# have (its yacs merge refuses it); it means ``expand``, so it is read as that here.
OPTION_ALIASES = {"tte_expand": "expand"}


def _gpu_as_device(value: Any) -> str:
    # Published ``gpu N`` runs on cuda:N; ``gpu None`` is its DataParallel over every GPU, which
    # is torchrun here: one process takes the default device.
    if value is None:
        return "auto"
    ok, n, expected = integer(lo=0)(value)
    if not ok:
        raise UserInputError(f"option gpu must be {expected} or None (it is read as device cuda:N); got {value!r}")
    return f"cuda:{n}"


# Published options read as another option here: name -> (that option, how the value becomes its).
TRANSLATED_OPTIONS = {"gpu": ("device", _gpu_as_device)}
TRANSLATED_HELP = {
    "tte_expand": "read as expand (the published scripts/run_expand.sh passes it; its own config has no such key)",
    "gpu": "gpu N is read as device cuda:N; gpu None (the published DataParallel) as device auto",
}


def is_option(key: str) -> bool:
    """Whether ``key`` names an option (``lr``, ``v.adaptformer_dim``, a published alias such as ``gpu``)."""
    key = OPTION_ALIASES.get(key, key)
    if key.startswith("v_"):
        key = "v." + key[2:]
    return key in OPTION_CHECKS or key in TRANSLATED_OPTIONS


def set_option(cfg: LiftConfig, key: str, value: Any) -> None:
    """Set ``key`` (``lr``, ``v.adaptformer_dim``, ``l.lora``, ...) from a value or its string form."""
    value = parse_value(value)
    key = OPTION_ALIASES.get(key, key)
    if key in TRANSLATED_OPTIONS:
        key, translate = TRANSLATED_OPTIONS[key]
        value = translate(value)
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


@dataclass(frozen=True)
class ConfigSource:
    """Options from one place, in the order they are set: a preset, a config file, the command line.

    ``settings`` holds ``(key, value, line)`` triples; ``line`` (1-based) is known for a config
    file, whose ``path`` then prefixes every error about its settings. ``label`` names the source
    in the default output folder name (a preset's name, a file's stem).
    """

    label: str
    settings: tuple = ()
    path: Optional[str] = None

    def get(self, key: str, default: Any = None) -> Any:
        """The value the source sets ``key`` to last, or ``default``."""
        return next((value for k, value, _ in reversed(self.settings) if k == key), default)

    def apply(self, cfg: "LiftConfig") -> None:
        """Set every option of the source on ``cfg``, in order."""
        for key, value, line in self.settings:
            try:
                set_option(cfg, key, value)
            except UserInputError as exc:
                if self.path is None:
                    raise
                where = self.path if line is None else f"{self.path}, line {line}"
                raise UserInputError(f"{where}: {exc}") from None


def options_source(label: str, items: Iterable) -> ConfigSource:
    """A :class:`ConfigSource` of ``(key, value)`` pairs (a dict's items, ``key value`` pairs)."""
    return ConfigSource(label, tuple((k, v, None) for k, v in items))


def preset_source(kind: str, name: str) -> ConfigSource:
    """The options a known name of ``-d`` / ``-b`` / ``-m`` (``kind`` data, backbone or method) sets:
    the data set's name; the backbone's name and preset (:func:`backbone_preset`); the method's
    name and preset (:data:`METHODS`)."""
    if kind == "data":
        return options_source(name, [("dataset", name)])
    if kind == "backbone":
        return options_source(name, [("backbone", name), *backbone_preset(name).items()])
    if kind == "method":
        method = resolve_method(name)
        return options_source(name, [("method", method), *METHODS[method].items()])
    raise ValueError(f"kind must be 'data', 'backbone' or 'method'; got {kind!r}")


def merge_config(sources: Iterable[ConfigSource]) -> LiftConfig:
    """A :class:`LiftConfig` from the published defaults and each source in turn (the later wins),
    checked as a whole. The published merge order is data, backbone, method, then the options."""
    cfg = LiftConfig(apply_preset=False)
    for source in sources:
        source.apply(cfg)
    validate(cfg)
    return cfg


def make_config(
    method: str = "lift+", overrides: Optional[Dict[str, Any]] = None, opts: Iterable[str] = ()
) -> LiftConfig:
    """A :class:`LiftConfig` for ``method`` with keyword ``overrides`` and ``key value`` ``opts``.

    Applied in the published merge order: the backbone preset (see :func:`backbone_preset`; the
    backbone is the one named last in ``overrides`` or ``opts``), the method preset, then
    ``overrides``, then ``opts``, so anything given explicitly wins.
    """
    pairs = key_value_pairs(opts)
    backbone = (overrides or {}).get("backbone", LiftConfig.backbone)
    backbone = next((v for k, v in reversed(pairs) if k == "backbone"), backbone)
    return merge_config(
        [
            options_source(backbone, backbone_preset(backbone).items()),
            preset_source("method", method),
            options_source("overrides", (overrides or {}).items()),
            options_source("options", pairs),
        ]
    )


def validate(cfg: LiftConfig) -> None:
    """Check every option's type and range by name, normalising values in place.

    Raises ``ValueError`` naming the first option that is wrong and what it expects. Ints are
    accepted for float options, and lists for ``mean``/``std``.
    """
    for target, prefix in ((cfg, ""), (cfg.v, "v."), (cfg.l, "l.")):
        check_fields(target, prefix)
    if cfg.batch_size % cfg.accum_step:
        raise UserInputError(f"batch_size ({cfg.batch_size}) must be divisible by accum_step ({cfg.accum_step})")
    if cfg.augment_on_device and cfg.data_cache is None:
        raise UserInputError("augment_on_device True needs data_cache (a folder built by liftplus-fast cache)")


def check_option(name: str, value: Any) -> Any:
    """``value`` checked (and normalised) for option ``name``, or ``ValueError`` naming it."""
    check = OPTION_CHECKS.get(name)
    if check is None:
        raise UserInputError(f"unknown option {name!r}")
    return check_value(name, check, value)


def _option_fields(target) -> Dict[str, Any]:
    return {f.name: f.metadata["check"] for f in fields(target) if f.metadata.get("check") is not None}


# Every option by the name the command line uses, with its check: read from the declarations.
OPTION_CHECKS: Dict[str, Any] = {
    **_option_fields(LiftConfig),
    **{f"v.{name}": check for name, check in _option_fields(TunerConfig).items()},
    **{f"l.{name}": check for name, check in _option_fields(TunerConfig).items()},
}


def option_table() -> List[OptionInfo]:
    """Every option with its type, default, what it accepts and one line of help, in declaration
    order (image-encoder ``v.*`` and text-encoder ``l.*`` tuner options after the others)."""
    cfg = LiftConfig(apply_preset=False)
    return describe(cfg) + describe(cfg.v, "v.") + describe(cfg.l, "l.")
