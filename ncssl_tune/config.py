"""Typed training configuration and the one validator that turns plain dicts into it.

Every section is a dataclass whose fields carry a one-line reason. `TrainConfig.from_dict` is the only way
user input (YAML, `--set`, a Ray Tune config dict) becomes a configuration: unknown keys, wrong types and
out-of-range values raise `ConfigError` naming the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
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


@dataclass
class DataConfig:
    dataset: str = "digits"  # registry name in ncssl_tune.core.data.DATASETS
    root: str | None = None  # folder holding the files of disk datasets (cifar10, stl10, imagefolder, ...)
    seed: int = 0  # seed of the fixed train/test split (independent of the training seed)
    test_fraction: float = 0.2  # share of the embedded/synthetic data held out for evaluation
    image_size: int | None = None  # resize every image to this size; None keeps the dataset's size
    synthetic: dict = field(default_factory=dict)  # options of the synthetic generator (n, size, channels, classes)
    augment: dict = field(default_factory=dict)  # overrides of the per-image-size default augmentation


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"  # registry name in ncssl_tune.core.models.BACKBONES
    projector: str = "512-512-512"  # widths of the projector MLP; "" means z = h
    width: int | None = None  # small_cnn feature width F (None: its default, 128)
    norm: Literal["batch", "none"] = "batch"  # BatchNorm in small_cnn and projector hidden layers; "none"
    # removes BN's implicit protection against collapse (ResNets always keep theirs)
    channels_last: bool = True  # memory format for conv backbones on CUDA (faster convolutions)
    compile: bool = False  # torch.compile the model (CUDA only; pays a start-up cost)


# Keyword arguments of each loss in ncssl_tune.core.losses, with the paper defaults that the functions' own signatures
# carry (tests/test_config.py checks that the two agree, name for name and value for value).
@dataclass
class VICRegParams:
    lam: float = 25.0  # λ, weight of the invariance term (MSE between the views)
    mu: float = 25.0  # μ, weight of the variance term (hinge on each dimension's std)
    nu: float = 1.0  # ν, weight of the covariance term (off-diagonal covariances)
    gamma: float = 1.0  # γ, target std of each dimension


@dataclass
class BarlowTwinsParams:
    lam: float = 0.0051  # λ, weight of the off-diagonal (redundancy reduction) term
    scale: float = 1.0  # overall factor of the loss


@dataclass
class WMSEParams:
    w_size: int = 128  # rows whitened together; >= 2 x embedding width and a divisor of the batch size
    w_iter: int = 1  # random sub-batch splits whitened per step
    eps: float = 0.0  # shrinkage of the covariance toward I before whitening, in [0, 1]


@dataclass
class SimCLRParams:
    temperature: float = 0.1  # τ of NT-Xent


@dataclass
class InvarianceParams:
    pass  # the negative control has no parameter


@dataclass
class LossConfig:
    method: str = "vicreg"  # registry name in ncssl_tune.core.losses.LOSSES
    vicreg: VICRegParams = field(default_factory=VICRegParams)
    barlow_twins: BarlowTwinsParams = field(default_factory=BarlowTwinsParams)
    wmse: WMSEParams = field(default_factory=WMSEParams)
    simclr: SimCLRParams = field(default_factory=SimCLRParams)
    invariance: InvarianceParams = field(default_factory=InvarianceParams)

    def params(self) -> dict:
        """Keyword arguments for the selected loss."""
        return dataclasses.asdict(getattr(self, self.method))


@dataclass
class OptimConfig:
    epochs: int = 20  # passes over the training split
    batch_size: int = 256  # images per step (each seen as two views)
    optimizer: Literal["adamw", "lars"] = "adamw"  # LARS for large-batch ResNet runs
    lr: float = 3e-3  # peak learning rate after warmup (not scaled by batch size)
    weight_decay: float = 1e-4  # decoupled for AdamW; LARS skips biases and norm parameters
    warmup_epochs: float = 2.0  # linear warmup, then cosine decay to lr * final_lr_frac
    final_lr_frac: float = 0.01  # end of the cosine schedule, as a share of lr
    seed: int = 0  # weights, batch order and augmentations; same seed => same metrics on CPU
    device: str = "auto"  # "auto" (CUDA when visible), "cpu", "cuda", "cuda:N"
    threads: int | None = None  # torch CPU threads; None leaves torch's default (the trainable sets cpus/trial)
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU where bf16 is slower
    checkpoint_every: int = 1  # epochs between checkpoints when a checkpoint directory is given


@dataclass
class EvalConfig:
    eval_samples: int = 512  # M: fixed subset of the train split on which collapse metrics are computed
    cond_views: int = 2  # K augmented views per sample for entropy_cond; 0 skips it
    cond_samples: int = 128  # first samples of the eval subset used for entropy_cond (K x this forwards)
    knn_every: int = 1  # epochs between kNN evaluations (cheap); the last epoch always has one
    probe_every: int = 1  # epochs between linear probes (first and last always have one); ASHA on probe_acc needs
    # a probe at every rung, and on digits a probe costs ~0.2 s
    knn_k: int = 20  # neighbours of the weighted cosine kNN
    knn_t: float = 0.07  # temperature of the kNN vote weights
    probe_val_fraction: float = 0.2  # share of train carved out to choose the probe's weight decay
    probe_weight_decays: list = field(default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2])  # probe L2 grid
    fewshot_k: int = 5  # labels per class of the few-labels probe (fewshot_acc, on kNN's schedule); 0 skips it
    fewshot_draws: int = 5  # independent label draws averaged in fewshot_acc (the same draws for every trial)
    fewshot_weight_decay: float = 1e-2  # fixed L2 of the few-labels probe: k labels per class leave no validation
    collapse_total_std: float = 0.05  # total collapse when std_l2 * sqrt(D) falls below this
    collapse_dim_frac: float = 0.05  # dimensional collapse when effective_rank_frac falls below this


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_dict(cls, raw: dict | None) -> TrainConfig:
        """Validate a nested dict (sections data/model/loss/train/eval) into a TrainConfig."""
        cfg = build(cls, raw or {}, "")
        _check_values(cfg)
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


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# method -> its parameter dataclass
LOSS_PARAMS: dict[str, type] = {k: v for k, v in typing.get_type_hints(LossConfig).items() if k != "method"}


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


def build(cls: type, raw: Any, prefix: str) -> Any:
    """The dataclass `cls` from a mapping, every field checked against its annotation (nested dataclasses too);
    ConfigError names the dotted key (`prefix` + field) and what is allowed."""
    where = prefix.rstrip(".") or "configuration"
    if not isinstance(raw, dict):
        raise ConfigError(where, f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown and cls in LOSS_PARAMS.values():
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown parameter; allowed: {', '.join(names) or '(none)'}")
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key; allowed keys in {where}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, raw[name], key + ".")
        else:
            kwargs[name] = coerce(tp, raw[name], key)
    return cls(**kwargs)


def _positive(key: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _check_loss_params(loss: LossConfig) -> None:
    # Imported here: losses imports torch, and the registry is the single source of valid names.
    from ncssl_tune.core.losses import LOSSES

    if loss.method not in LOSSES:
        raise ConfigError("loss.method", f"unknown method {loss.method!r}; choose from: {', '.join(sorted(LOSSES))}")
    for method in LOSS_PARAMS:
        for k, v in dataclasses.asdict(getattr(loss, method)).items():
            _positive(f"loss.{method}.{k}", v, allow_zero=k in ("eps", "nu", "mu", "lam"))
    if loss.wmse.eps > 1:
        raise ConfigError("loss.wmse.eps", f"whitening shrinkage must be in [0, 1], got {loss.wmse.eps}")


def _check_data(d: DataConfig) -> None:
    from ncssl_tune.core.augment import AugmentConfig
    from ncssl_tune.core.data import DATASETS, SYNTHETIC_DEFAULTS

    if d.dataset not in DATASETS:
        raise ConfigError("data.dataset",
                          f"unknown dataset {d.dataset!r}; choose from: {', '.join(sorted(DATASETS))}")
    _positive("data.seed", d.seed, allow_zero=True)
    if d.synthetic and d.dataset != "synthetic":
        raise ConfigError("data.synthetic", f"options of the synthetic generator, but data.dataset is "
                          f"{d.dataset!r}; remove them or set data.dataset: synthetic")
    unknown = sorted(set(d.synthetic) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise ConfigError(f"data.synthetic.{unknown[0]}",
                          f"unknown option; allowed: {', '.join(SYNTHETIC_DEFAULTS)}")
    try:
        AugmentConfig.from_dict(d.augment)
    except (TypeError, ValueError) as e:
        raise ConfigError("data.augment", str(e).removeprefix("augment: ").removeprefix("augment.")) from None


def _check_values(cfg: TrainConfig) -> None:
    from ncssl_tune.core.models import BACKBONES

    _check_data(cfg.data)
    if not 0 < cfg.data.test_fraction < 1:
        raise ConfigError("data.test_fraction", f"must be in (0, 1), got {cfg.data.test_fraction}")
    _positive("data.image_size", cfg.data.image_size)
    if cfg.model.backbone not in BACKBONES:
        raise ConfigError(
            "model.backbone", f"unknown backbone {cfg.model.backbone!r}; choose from: {', '.join(sorted(BACKBONES))}"
        )
    if cfg.model.backbone != "small_cnn" and (cfg.model.width is not None or cfg.model.norm != "batch"):
        raise ConfigError("model.width" if cfg.model.width is not None else "model.norm",
                          f"only small_cnn takes width and norm; {cfg.model.backbone} has fixed widths and BatchNorm")
    if cfg.model.width is not None and (cfg.model.width < 4 or cfg.model.width % 4):
        raise ConfigError("model.width", f"must be a positive multiple of 4, got {cfg.model.width}")
    spec = cfg.model.projector
    if spec and not all(p.isdigit() and int(p) > 0 for p in spec.split("-")):
        raise ConfigError("model.projector", f"got {spec!r}; expected positive widths joined by '-', e.g. '2048-2048-2048'")
    _check_loss_params(cfg.loss)
    t = cfg.train
    for name in ("epochs", "batch_size", "lr", "checkpoint_every"):
        _positive(f"train.{name}", getattr(t, name))
    for name in ("weight_decay", "warmup_epochs", "final_lr_frac"):
        _positive(f"train.{name}", getattr(t, name), allow_zero=True)
    _positive("train.threads", t.threads)
    _positive("train.seed", t.seed, allow_zero=True)
    if t.device != "auto" and t.device != "cpu" and not t.device.startswith("cuda"):
        raise ConfigError("train.device", f"got {t.device!r}; choose from: auto, cpu, cuda, cuda:N")
    e = cfg.eval
    _positive("eval.eval_samples", e.eval_samples)
    _positive("eval.knn_k", e.knn_k)
    _positive("eval.knn_t", e.knn_t)
    _positive("eval.cond_samples", e.cond_samples)
    _positive("eval.fewshot_draws", e.fewshot_draws)
    _positive("eval.fewshot_weight_decay", e.fewshot_weight_decay, allow_zero=True)
    for name in ("cond_views", "knn_every", "probe_every", "fewshot_k"):
        _positive(f"eval.{name}", getattr(e, name), allow_zero=True)
    if e.cond_views == 1:
        raise ConfigError("eval.cond_views", "needs at least 2 views (or 0 to skip entropy_cond)")
    if e.cond_views and e.cond_samples < 2:  # LiDAR's between-sample covariance needs two samples
        raise ConfigError("eval.cond_samples", f"needs at least 2 samples, got {e.cond_samples}")
    if not 0 < e.probe_val_fraction < 1:
        raise ConfigError("eval.probe_val_fraction", f"must be in (0, 1), got {e.probe_val_fraction}")
    if not e.probe_weight_decays or any(
        isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in e.probe_weight_decays
    ):
        raise ConfigError("eval.probe_weight_decays", f"expected a non-empty list of numbers >= 0, got {e.probe_weight_decays!r}")
    if cfg.loss.method == "wmse":
        w_size = cfg.loss.wmse.w_size
        if spec and w_size < 2 * int(spec.split("-")[-1]):
            raise ConfigError("loss.wmse.w_size", f"w_size {w_size} must be >= 2 x embedding width "
                              f"{spec.split('-')[-1]} (last projector layer) for a well-conditioned whitening")
        if t.batch_size % w_size:
            raise ConfigError(
                "loss.wmse.w_size", f"batch size {t.batch_size} must be a multiple of w_size {w_size}"
            )
