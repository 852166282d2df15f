"""Typed training configuration and the one validator that turns plain dicts into it.

Every section is a dataclass whose fields carry a one-line reason and, where a value has limits, declare them
(`bounded`, `choice`, `registered`). `build` walks the dataclass tree and checks every field against its
annotation and its declaration; the few rules that relate several fields are short functions at the end.
`TrainConfig.from_dict` is the only way user input (YAML, `--set`, a Ray Tune config dict) becomes a
configuration: unknown keys, wrong types and out-of-range values raise `ConfigError` naming the dotted key and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """Bad configuration; `key` is the dotted path of the offending entry."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


def bounded(default: Any, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
            le: float | None = None, what: str = "", kind: str = "", note: str = "", fmt: str = "") -> Any:
    """A field whose value (when not None) must lie within the given bounds. The message reads
    "{what} must be {kind}{rule} ({note}), got {value:fmt}", rule being "> 0", ">= 0", "in (0, 1)" or "in [0, 1]"."""
    bounds = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    return field(default=default, metadata={**bounds, "what": what, "kind": kind, "note": note, "fmt": fmt})


def choice(default: Any, options: typing.Iterable) -> Any:
    """A field whose value (when not None) is one of `options`, listed in this order in the message."""
    return field(default=default, metadata={"choices": tuple(options)})


def registered(default: str, registry: str) -> Any:
    """A field naming an entry of a registry dict, given as "module:NAME" and imported when checked: the core's
    registries import torch, which the records and the analysis, readers of this module, must not."""
    return field(default=default, metadata={"registry": registry})


def pair(hi: float) -> Any:
    """An optional (low, high) range with 0 < low <= high <= hi; YAML lists become tuples of floats."""
    return field(default=None, metadata={"pair": hi})


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _problem(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with `value` under the declaration of field `f`, or None."""
    m = f.metadata
    if value is None or not m:
        return None
    if "choices" in m:
        return None if value in m["choices"] else f"got {value!r}; choose from: {', '.join(map(str, m['choices']))}"
    if "registry" in m:
        module, name = m["registry"].split(":")
        names = getattr(importlib.import_module(module), name)
        return None if value in names else f"unknown {f.name} {value!r}; choose from: {', '.join(sorted(names))}"
    if "pair" in m:
        hi = m["pair"]
        ok = (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_num(a) for a in value)
              and 0 < value[0] <= value[1] <= hi)
        return None if ok else f"must be (low, high) with 0 < low <= high <= {hi}, got {value!r}"
    lo, hi = m.get("gt", m.get("ge")), m.get("lt", m.get("le"))
    if lo is None and hi is None:
        return None
    if (_is_num(value) and (lo is None or (value > lo if "gt" in m else value >= lo))
            and (hi is None or (value < hi if "lt" in m else value <= hi))):
        return None
    if hi is None:
        rule = f"{'>' if 'gt' in m else '>='} {lo}"
    else:
        rule = f"in {'(' if 'gt' in m else '['}{lo}, {hi}{')' if 'lt' in m else ']'}"
    note = f" ({m['note']})" if m["note"] else ""
    shown = format(value, m["fmt"]) if m["fmt"] and _is_num(value) else repr(value)
    return f"{m['what'] + ' ' if m['what'] else ''}must be {m['kind']}{rule}{note}, got {shown}"


def check(obj: Any, prefix: str) -> None:
    """Check the fields of the dataclass `obj` against their declarations, as a standalone option group:
    ConfigError("{prefix}{field} {problem}") (AugmentConfig built directly, or by dataclasses.replace)."""
    for f in dataclasses.fields(obj):
        problem = _problem(f, getattr(obj, f.name))
        if problem:
            raise ConfigError("", f"{prefix}{f.name} {problem}")


def _strength(hi: float = math.inf) -> Any:
    return bounded(None, ge=0.0, le=hi, kind="a number ")


@dataclass
class AugmentConfig:
    """Augmentation strengths; None means "the default for this image size" (core.augment.default_augment).

    An option group: in a TrainConfig errors read "data.augment: flip_p must be ...", built alone
    "augment.flip_p must be ...". Every value is checked by its declaration alone (no annotation coercion), so a
    wrong type reads like a wrong range."""

    crop_scale: tuple[float, float] | None = pair(1.0)  # area fraction kept by the random resized crop
    crop_ratio: tuple[float, float] | None = pair(math.inf)  # aspect-ratio range of the crop
    flip_p: float | None = _strength(1.0)  # horizontal flip; 0 for digits, which are not mirror-invariant
    jitter_p: float | None = _strength(1.0)  # probability of colour jitter
    brightness: float | None = _strength()  # factor drawn from [1 - b, 1 + b]
    contrast: float | None = _strength()  # same form as brightness
    saturation: float | None = _strength()  # same form; needs 3 channels
    hue: float | None = _strength(0.5)  # shift drawn from [-h, h], h <= 0.5; needs 3 channels
    grayscale_p: float | None = _strength(1.0)  # hides colour so it cannot carry the whole signal; needs 3 channels
    blur_p: float | None = _strength(1.0)  # Gaussian blur, sigma 0.1..2, kernel ~10% of the image
    solarize_p: float | None = _strength(1.0)  # invert pixels above 0.5
    noise_std: float | None = _strength(1.0)  # additive Gaussian pixel noise, always applied when > 0

    def __post_init__(self) -> None:
        check(self, "augment.")
        for key in ("crop_scale", "crop_ratio"):
            v = getattr(self, key)
            if v is not None:
                setattr(self, key, (float(v[0]), float(v[1])))  # YAML gives lists

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        """Build from a config mapping; unknown keys are errors that list the allowed ones."""
        return build(cls, d, "augment.", group="")


@dataclass
class DataConfig:
    dataset: str = registered("digits", "ncssl_tune.core.data:DATASETS")  # a dataset of the registry
    root: str | None = None  # folder holding the files of disk datasets (cifar10, stl10, imagefolder, ...)
    seed: int = bounded(0, ge=0)  # seed of the fixed train/test split (independent of the training seed)
    test_fraction: float = bounded(0.2, gt=0, lt=1)  # share of the embedded/synthetic data held out for evaluation
    image_size: int | None = bounded(None, gt=0)  # resize every image to this size; None keeps the dataset's size
    synthetic: dict = field(default_factory=dict)  # options of the synthetic generator (n, size, channels, classes)
    # How trials hold the data (docs/data.md): "auto" streams a streamable dataset (imagefolder) larger than
    # memory_cap_gb from disk and holds any other in memory, one copy per Ray node; "shared" forces that copy,
    # "private" a copy per trial, "stream" reading from disk batch by batch
    storage: Literal["auto", "shared", "private", "stream"] = "auto"
    memory_cap_gb: float | None = bounded(None, gt=0)  # auto streams above this; None: 80% of a node's object store
    workers: int | None = bounded(None, gt=0)  # threads decoding a streamed dataset; None: the trial's CPUs
    # overrides of the per-image-size default augmentation; an option group: errors name data.augment
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={"group": True})


@dataclass
class ModelConfig:
    backbone: str = registered("small_cnn", "ncssl_tune.core.models:BACKBONES")  # a backbone of the registry
    projector: str = "512-512-512"  # widths of the projector MLP; "" means z = h
    width: int | None = None  # small_cnn feature width F (None: its default, 128)
    norm: Literal["batch", "none"] = "batch"  # BatchNorm in small_cnn and projector hidden layers; "none"
    # removes BN's implicit protection against collapse (ResNets always keep theirs)
    # The architectural anti-collapse mechanisms (docs/definitions.md); None takes the loss method's default
    # (METHOD_MECHANISMS: SimSiam and BYOL have some, every other method none), an explicit value wins.
    predictor: str | None = None  # hidden widths of the predictor MLP q on the online branch, p = q(z) with z's width
    # D; "" means none (p = z). "64" is SimSiam's bottleneck D -> 64 -> D
    stop_grad: bool | None = None  # detach the target branch's z (no gradient through it); an EMA target implies it
    ema: bool | None = None  # the target branch is an EMA copy of backbone + projector instead of the same weights
    ema_tau: float | None = bounded(None, ge=0, lt=1, what="EMA momentum")  # τ₀ of the EMA, cosine-scheduled to 1
    # over the training steps; None: 0.996 (BYOL). Only with an EMA target
    channels_last: bool = True  # memory format for conv backbones on CUDA (faster convolutions)
    compile: bool = False  # torch.compile the model (CUDA only; pays a start-up cost)


# Keyword arguments of each loss in ncssl_tune.core.losses, with the paper defaults that the functions' own signatures
# carry (tests/test_config.py checks that the two agree, name for name and value for value).
@dataclass
class VICRegParams:
    lam: float = bounded(25.0, ge=0)  # λ, weight of the invariance term (MSE between the views)
    mu: float = bounded(25.0, ge=0)  # μ, weight of the variance term (hinge on each dimension's std)
    nu: float = bounded(1.0, ge=0)  # ν, weight of the covariance term (off-diagonal covariances)
    gamma: float = bounded(1.0, gt=0)  # γ, target std of each dimension


@dataclass
class BarlowTwinsParams:
    lam: float = bounded(0.0051, ge=0)  # λ, weight of the off-diagonal (redundancy reduction) term
    scale: float = bounded(1.0, gt=0)  # overall factor of the loss


@dataclass
class WMSEParams:
    w_size: int = bounded(128, gt=0)  # rows whitened together; >= 2 x embedding width and a divisor of the batch size
    w_iter: int = bounded(1, gt=0)  # random sub-batch splits whitened per step
    eps: float = bounded(0.0, ge=0, le=1, what="whitening shrinkage")  # shrinkage of the covariance toward I


@dataclass
class SimCLRParams:
    temperature: float = bounded(0.1, gt=0)  # τ of NT-Xent


@dataclass
class InvarianceParams:
    pass  # the negative control has no parameter


@dataclass
class SimSiamParams:
    pass  # the method is its architecture: predictor and stop-gradient (model.*)


@dataclass
class BYOLParams:
    pass  # the method is its architecture: predictor and EMA target (model.*; τ₀ is model.ema_tau)


@dataclass
class LossConfig:
    method: str = registered("vicreg", "ncssl_tune.core.losses:LOSSES")  # a loss of the registry
    vicreg: VICRegParams = field(default_factory=VICRegParams)
    barlow_twins: BarlowTwinsParams = field(default_factory=BarlowTwinsParams)
    wmse: WMSEParams = field(default_factory=WMSEParams)
    simclr: SimCLRParams = field(default_factory=SimCLRParams)
    invariance: InvarianceParams = field(default_factory=InvarianceParams)
    simsiam: SimSiamParams = field(default_factory=SimSiamParams)
    byol: BYOLParams = field(default_factory=BYOLParams)

    def params(self) -> dict:
        """Keyword arguments for the selected loss."""
        return dataclasses.asdict(getattr(self, self.method))

    def __reduce__(self) -> tuple:
        # Rebuilt from its values, so that a process that unpickles it (a Ray worker) first loads the installed
        # plugin losses, whose parameters extend this class (install_plugins)
        return _loss_config, (dataclasses.asdict(self),)


@dataclass
class OptimConfig:
    epochs: int = bounded(20, gt=0)  # passes over the training split
    batch_size: int = bounded(256, gt=0)  # images per step (each seen as two views)
    optimizer: Literal["adamw", "lars"] = "adamw"  # LARS for large-batch ResNet runs
    lr: float = bounded(3e-3, gt=0)  # peak learning rate after warmup (not scaled by batch size)
    weight_decay: float = bounded(1e-4, ge=0)  # decoupled for AdamW; LARS skips biases and norm parameters
    warmup_epochs: float = bounded(2.0, ge=0)  # linear warmup, then cosine decay to lr * final_lr_frac
    final_lr_frac: float = bounded(0.01, ge=0)  # end of the cosine schedule, as a share of lr
    seed: int = bounded(0, ge=0)  # weights, batch order and augmentations; same seed => same metrics on CPU
    device: str = "auto"  # "auto" (CUDA when visible), "cpu", "cuda", "cuda:N"
    threads: int | None = bounded(None, gt=0)  # torch CPU threads; None leaves torch's default (the trainable
    # sets cpus/trial)
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU where bf16 is slower
    checkpoint_every: int = bounded(1, gt=0)  # epochs between checkpoints when a checkpoint directory is given


@dataclass
class EvalConfig:
    eval_samples: int = bounded(512, gt=0)  # M: fixed subset of the train split on which collapse metrics are computed
    cond_views: int = bounded(2, ge=0)  # K augmented views per sample for entropy_cond; 0 skips it
    cond_samples: int = bounded(128, gt=0)  # first samples of the eval subset used for entropy_cond (K x this forwards)
    knn_every: int = bounded(1, ge=0)  # epochs between kNN evaluations (cheap); the last epoch always has one
    probe_every: int = bounded(1, ge=0)  # epochs between linear probes (first and last always have one); ASHA on
    # probe_acc needs a probe at every rung, and on digits a probe costs ~0.2 s
    knn_k: int = bounded(20, gt=0)  # neighbours of the weighted cosine kNN
    knn_t: float = bounded(0.07, gt=0)  # temperature of the kNN vote weights
    probe_val_fraction: float = bounded(0.2, gt=0, lt=1)  # share of train carved out to choose the probe's weight decay
    probe_weight_decays: list = field(default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2])  # probe L2 grid
    fewshot_k: int = bounded(5, ge=0)  # labels per class of the few-labels probe (fewshot_acc, on kNN's schedule);
    # 0 skips it
    fewshot_draws: int = bounded(5, gt=0)  # independent label draws averaged in fewshot_acc (the same draws for
    # every trial)
    fewshot_weight_decay: float = bounded(1e-2, ge=0)  # fixed L2 of the few-labels probe: k labels per class leave
    # no validation
    collapse_total_std: float = 0.05  # total collapse when std_l2 * sqrt(D) falls below this
    collapse_dim_frac: float = 0.05  # dimensional collapse when effective_rank_frac falls below this


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=lambda: LossConfig())  # late-bound: plugins extend the class
    train: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_dict(cls, raw: dict | None) -> TrainConfig:
        """Validate a nested dict (sections data/model/loss/train/eval) into a TrainConfig."""
        install_plugins()
        cfg = build(cls, raw or {}, "")
        _check_relations(cfg)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, dotted: dict[str, Any]) -> TrainConfig:
        """A validated copy with dotted keys set ({"loss.vicreg.lam": 3.0}): the one way the spec, the trainable
        and tests derive a configuration from another. ConfigError names the offending key."""
        d = self.to_dict()
        for key, value in dotted.items():
            set_dotted(d, key, value)
        return TrainConfig.from_dict(d)

    def get(self, dotted: str) -> Any:
        """The value at a dotted key ("model.norm"); a key nobody set holds its default."""
        obj: Any = self
        for part in dotted.split("."):
            obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        return obj


@dataclass(frozen=True)
class Mechanisms:
    """The architectural mechanisms a run uses, each resolved from model.* and the method's defaults."""

    predictor: str  # hidden widths of q ("" none)
    stop_grad: bool
    ema_tau: float | None  # τ₀ of the EMA target; None: the target branch shares the online weights

    @property
    def asymmetric(self) -> bool:
        """Whether the two branches differ, so that the loss is taken in both directions (docs/definitions.md)."""
        return bool(self.predictor) or self.stop_grad or self.ema_tau is not None


BYOL_TAU = 0.996  # BYOL's τ₀ (Grill et al. 2020), the default of model.ema_tau whenever an EMA target is on
# What each method brings when model.predictor / stop_grad / ema are unset; any other method has none of them.
# A predictor default is a function of the projector's widths (D = the embedding width): SimSiam's is a bottleneck
# D -> D/4 -> D (its 2048 -> 512 -> 2048), BYOL's has the projector's first width as its hidden layer (its projector
# and predictor are both 4096 -> 256).
METHOD_MECHANISMS: dict[str, dict[str, Any]] = {
    "simsiam": {"predictor": lambda widths: str(max(1, widths[-1] // 4)), "stop_grad": True, "ema": False},
    "byol": {"predictor": lambda widths: str(widths[0]), "stop_grad": True, "ema": True},
}


def mechanisms(cfg: TrainConfig, feat_dim: int | None = None) -> Mechanisms:
    """Resolve model.predictor, stop_grad, ema and ema_tau against cfg.loss.method's defaults.

    feat_dim: the backbone's width, the embedding width when the projector is "" (needed only then, for a method's
    default predictor; without it the small_cnn width is assumed)."""
    m, method = cfg.model, METHOD_MECHANISMS.get(cfg.loss.method, {})
    ema = m.ema if m.ema is not None else method.get("ema", False)
    stop_grad = m.stop_grad if m.stop_grad is not None else method.get("stop_grad", False) or ema
    predictor = m.predictor
    if predictor is None:
        make = method.get("predictor")
        if make is None:
            predictor = ""
        else:
            widths = [int(w) for w in m.projector.split("-")] if m.projector else [feat_dim or m.width or 128]
            predictor = make(widths)
    tau = (m.ema_tau if m.ema_tau is not None else BYOL_TAU) if ema else None
    return Mechanisms(predictor=predictor, stop_grad=stop_grad, ema_tau=tau)


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# method -> its parameter dataclass; install_plugins adds the plugin losses'
LOSS_PARAMS: dict[str, type] = {k: v for k, v in typing.get_type_hints(LossConfig).items() if k != "method"}


def install_plugins() -> None:
    """Load the installed plugins (core/plugins.py) and give each plugin loss a parameter section loss.<name>, typed
    and bounded like the built-in ones: LossConfig becomes a subclass with one field per plugin loss. Idempotent;
    a broken plugin raises PluginError naming its entry point."""
    global LossConfig
    from ncssl_tune.core.plugins import load_plugins

    new = {name: ps for name, ps in load_plugins().items() if name not in LOSS_PARAMS}
    if not new:
        return
    for name, ps in new.items():
        cls = dataclasses.make_dataclass(
            "".join(w.capitalize() for w in name.split("_")) + "PluginParams",
            [(p.name, p.type, bounded(p.default, **p.bounds)) for p in ps], namespace={"__module__": __name__})
        globals()[cls.__name__] = cls  # found by name where a Ray worker unpickles a configuration
        LOSS_PARAMS[name] = cls
    extended = dataclasses.make_dataclass(
        "LossConfig", [(name, LOSS_PARAMS[name], field(default_factory=LOSS_PARAMS[name])) for name in new],
        bases=(LossConfig,), namespace={"__module__": __name__, "__doc__": LossConfig.__doc__})
    LossConfig = extended


def _loss_config(values: dict) -> LossConfig:
    install_plugins()
    return build(LossConfig, values, "loss.")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(d: dict, key: str, value: Any) -> None:
    """Set d["a"]["b"] = value for key "a.b", creating intermediate dicts."""
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(key, f"'{p}' is a value, not a section")
        d = nxt
    d[parts[-1]] = value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return {"dict": "mapping", "list": "list"}.get(tp.__name__, tp.__name__)
    return str(tp)


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, key)
            except ConfigError:
                errors.append(_type_name(a))
        raise ConfigError(key, f"expected {' or '.join(errors)} (or null), got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"got {value!r}; choose from: {', '.join(map(str, allowed))}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # YAML reads a one-layer projector "64" as a number
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return list(value)
    raise TypeError(f"unsupported annotation {tp!r} at {key}")


def build(cls: type, raw: Any, prefix: str, group: str | None = None) -> Any:
    """The dataclass `cls` from a mapping, every field checked against its annotation and its declared bounds or
    choices, nested dataclasses too: the one walk over the configuration tree. ConfigError names the dotted key
    (`prefix` + field) and what is allowed; inside an option `group` it names the group and the message starts
    with the option ("data.augment: flip_p must be ...")."""
    where = group or prefix.rstrip(".") or "configuration"
    if not isinstance(raw, dict):
        raise ConfigError(where, f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    unknown = sorted(set(raw) - set(names))
    if unknown and group is not None:
        raise ConfigError(where, f"unknown key(s) {unknown}; allowed: {', '.join(names)}")
    if unknown and cls in LOSS_PARAMS.values():
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown parameter; allowed: {', '.join(names) or '(none)'}")
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key; allowed keys in {where}: {', '.join(names)}")
    kwargs = {}
    for f in fields:
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                choices = f.metadata.get("choices")
                raise ConfigError(f"{prefix}{f.name}", "required" + (f"; choose from: {', '.join(map(str, choices))}"
                                                                    if choices else ""))
            continue
        tp, key, value = hints[f.name], f"{prefix}{f.name}", raw[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build(tp, value, "", key) if f.metadata.get("group") else build(tp, value, key + ".")
            continue
        if group is None:  # an option of a group is checked by its declaration alone
            value = coerce(tp, value, key)
        problem = _problem(f, value)
        if problem:
            raise ConfigError(group, f"{key} {problem}") if group is not None else ConfigError(key, problem)
        kwargs[f.name] = value
    return cls(**kwargs)


def _check_relations(cfg: TrainConfig) -> None:
    """The rules a single field's declaration cannot state: relations between fields, and formats."""
    from ncssl_tune.core.data import SYNTHETIC_DEFAULTS, streamable

    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.eval
    if d.storage == "stream" and d.dataset not in streamable():
        raise ConfigError("data.storage", f"stream reads image files batch by batch, which only "
                          f"{', '.join(streamable())} can; {d.dataset} is held in memory (allowed: auto, shared, "
                          "private)")
    if d.synthetic and d.dataset != "synthetic":
        raise ConfigError("data.synthetic", f"options of the synthetic generator, but data.dataset is "
                          f"{d.dataset!r}; remove them or set data.dataset: synthetic")
    unknown = sorted(set(d.synthetic) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise ConfigError(f"data.synthetic.{unknown[0]}", f"unknown option; allowed: {', '.join(SYNTHETIC_DEFAULTS)}")
    if m.backbone != "small_cnn" and (m.width is not None or m.norm != "batch"):
        raise ConfigError("model.width" if m.width is not None else "model.norm",
                          f"only small_cnn takes width and norm; {m.backbone} has fixed widths and BatchNorm")
    if m.width is not None and (m.width < 4 or m.width % 4):
        raise ConfigError("model.width", f"must be a positive multiple of 4, got {m.width}")
    spec = m.projector
    if spec and not all(p.isdigit() and int(p) > 0 for p in spec.split("-")):
        raise ConfigError("model.projector", f"got {spec!r}; expected positive widths joined by '-', e.g. '2048-2048-2048'")
    _check_mechanisms(cfg)
    if t.device != "auto" and t.device != "cpu" and not t.device.startswith("cuda"):
        raise ConfigError("train.device", f"got {t.device!r}; choose from: auto, cpu, cuda, cuda:N")
    if e.cond_views == 1:
        raise ConfigError("eval.cond_views", "needs at least 2 views (or 0 to skip entropy_cond)")
    if e.cond_views and e.cond_samples < 2:  # LiDAR's between-sample covariance needs two samples
        raise ConfigError("eval.cond_samples", f"needs at least 2 samples, got {e.cond_samples}")
    if not e.probe_weight_decays or any(not _is_num(w) or w < 0 for w in e.probe_weight_decays):
        raise ConfigError("eval.probe_weight_decays", f"expected a non-empty list of numbers >= 0, got {e.probe_weight_decays!r}")
    if cfg.loss.method == "wmse":
        w_size = cfg.loss.wmse.w_size
        if spec and w_size < 2 * int(spec.split("-")[-1]):
            raise ConfigError("loss.wmse.w_size", f"w_size {w_size} must be >= 2 x embedding width "
                              f"{spec.split('-')[-1]} (last projector layer) for a well-conditioned whitening")
        if t.batch_size % w_size:
            raise ConfigError("loss.wmse.w_size", f"batch size {t.batch_size} must be a multiple of w_size {w_size}")


def _check_mechanisms(cfg: TrainConfig) -> None:
    """The mechanism combinations that mean nothing: an EMA target without a gradient to stop, a τ₀ without an EMA."""
    m = cfg.model
    if m.predictor and not all(p.isdigit() and int(p) > 0 for p in m.predictor.split("-")):
        raise ConfigError("model.predictor", f"got {m.predictor!r}; expected the hidden widths joined by '-', e.g. "
                          "'64' (its output always has the embedding's width), or '' for none")
    method = METHOD_MECHANISMS.get(cfg.loss.method, {})
    ema = m.ema if m.ema is not None else method.get("ema", False)
    whose = "" if m.ema is not None else f" (loss.method {cfg.loss.method}'s default)"
    if m.ema_tau is not None and not ema:
        raise ConfigError("model.ema_tau", f"set to {m.ema_tau}, but model.ema is false{whose}: there is no EMA "
                          "target to schedule; remove model.ema_tau or set model.ema: true")
    if ema and m.stop_grad is False:
        raise ConfigError("model.stop_grad", f"false with model.ema true{whose}: the EMA target's weights are not "
                          "trained, so no gradient flows through it to stop; remove model.stop_grad or set model.ema: "
                          "false")
