"""Search-space YAML -> validated SweepSpec. The file format is documented in search_spaces/vicreg.yaml.

Validation happens once, here, before anything is started or written: every error is a `SpecError` whose
message names the file, the dotted key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ncssl_tune.config import (
    SECTIONS,
    ConfigError,
    TrainConfig,
    bounded,
    build,
    choice,
    coerce,
    install_plugins,
    set_dotted,
)
from ncssl_tune.vocab import OBJECTIVES

PARAM_TYPES = ("float", "logfloat", "int", "logint", "categorical")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; accept it as a float, as YAML 1.2 and Python do."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


class SpecError(ValueError):
    """A bad search-space file or flag; str() is the whole user-facing message."""


@dataclass
class SchedulerConfig:
    name: Literal["asha", "fifo"] = "asha"  # ASHA stops the worst trials at each rung
    grace_period: int = bounded(2, ge=1)  # epochs every trial gets before ASHA may stop it
    reduction_factor: float = bounded(3.0, gt=1)  # ASHA keeps 1/reduction_factor of trials per rung


@dataclass
class CollapseStopConfig:
    total: bool = True  # stop a trial whose embeddings collapsed totally
    total_patience: int = bounded(1, ge=1)  # consecutive epochs in total collapse before stopping
    dimensional: bool = False  # also stop sustained dimensional collapse
    dimensional_patience: int = bounded(3, ge=1)  # consecutive epochs in dimensional collapse before stopping
    min_epoch: int = bounded(2, ge=1)  # never stop before this epoch (early epochs can look collapsed during warmup)


@dataclass
class SearchConfig:
    metric: str = choice("fewshot_acc", OBJECTIVES)  # objective: fewshot_acc, probe_acc, knn_acc or a label-free
    # metric (LABEL_FREE)
    mode: str | None = choice(None, ("max", "min"))  # None takes the objective's natural direction
    num_samples: int = bounded(12, ge=1)  # configurations to sample (each trained `repeats` times)
    algorithm: Literal["tpe", "random", "grid", "qmc"] = "tpe"  # Optuna sampler; qmc: scrambled Sobol (a study)
    repeats: int = bounded(1, ge=1)  # trials per configuration, training seeds train.seed + r·1000 (a study)
    seed: int = bounded(0, ge=0)  # sampler seed: same seed => same proposals
    max_concurrent: int = bounded(2, ge=1)  # trials running at once (also bounded by the resources available)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    collapse_stop: CollapseStopConfig = field(default_factory=CollapseStopConfig)
    max_failures: int = bounded(1, ge=0)  # retries of a crashed trial from its last checkpoint


@dataclass
class ResourcesConfig:
    cpu: float = bounded(1.0, gt=0, note="fractions allowed", fmt="g")  # CPUs per trial (also the torch thread
    # count, rounded up)
    gpu: float = bounded(0.0, ge=0, note="0 = CPU only, fractions share a GPU", fmt="g")  # GPUs per trial;
    # fractions pack several trials on one GPU


@dataclass
class Param:
    """One swept key: a distribution, optional `when` conditions on other keys."""

    key: str
    type: str = field(metadata={"choices": PARAM_TYPES})
    low: float | None = None
    high: float | None = None
    step: float | None = None
    values: list | None = None
    when: dict = field(default_factory=dict)

    def endpoints(self) -> list:
        return list(self.values) if self.type == "categorical" else [self.low, self.high]

    def active(self, chosen: dict[str, Any], base: TrainConfig) -> bool:
        """Whether this param is sampled, given the values `chosen` so far: every `when` condition must hold, a
        key not chosen counting with its value in `base` (its default when the file does not set it)."""
        return all((chosen[k] if k in chosen else base.get(k)) == v for k, v in self.when.items())


@dataclass
class SweepSpec:
    name: str
    path: str
    base: TrainConfig  # the five config sections after --set, validated
    search: SearchConfig
    resources: ResourcesConfig
    space: list[Param]
    raw: dict  # the whole file after --set overrides, for logging
    pinned: dict = field(default_factory=dict)  # swept keys fixed by --set (removed from the space)

    @property
    def mode(self) -> str:
        return self.search.mode or OBJECTIVES[self.search.metric]

    def train_config(self, overrides: dict | None = None) -> TrainConfig:
        """The base configuration with dotted `overrides` (e.g. one trial's sampled values)."""
        return self.base.with_overrides(overrides or {})


TOP_KEYS = ("name", *SECTIONS, "search", "resources", "space")


def parse_set(items: list[str]) -> list[tuple[str, Any]]:
    """`--set KEY=VALUE` items -> (key, typed value); values are parsed as YAML scalars/lists."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=5")
        try:
            out.append((key.strip(), yaml.load(value, Loader=_Loader)))
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or e.__class__.__name__
            raise SpecError(f"--set {item!r}: {key.strip()}: value {value!r} is not valid YAML ({problem}); "
                            "quote strings, write lists as [a, b]") from None
    return out


def load_spec(path: str | Path, sets: list[str] | None = None, **flags: Any) -> SweepSpec:
    """Read and validate a search-space file; `sets` are `--set KEY=VALUE` strings, applied before validation.

    flags: num_samples, epochs, seed, name (None = keep the file's value).
    """
    p = Path(path)
    if p.is_dir():
        raise SpecError(f"{p}: is a directory; expected a search-space YAML file")
    if not p.is_file():
        raise SpecError(f"{p}: no such search-space file")
    try:
        raw = yaml.load(p.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: cannot read: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{p}: expected a mapping with keys {', '.join(TOP_KEYS)}; got {type(raw).__name__}")
    # An empty section (`search:` with nothing under it) means all defaults, and --set can fill it.
    raw = {k: {} if v is None and k in TOP_KEYS[1:] else v for k, v in raw.items()}
    overrides = parse_set(sets or [])
    origin = {key: f"--set {item.strip()}" for item, (key, _) in zip(sets or [], overrides)}  # key -> its flag
    for name, key in (("num_samples", "search.num_samples"), ("epochs", "train.epochs"),
                      ("seed", "search.seed"), ("name", "name")):
        if flags.get(name) is not None:
            overrides.append((key, flags[name]))
            origin[key] = f"--{name.replace('_', '-')} {flags[name]}"
    if flags.get("seed") is not None:
        overrides.append(("train.seed", flags["seed"]))
        origin["train.seed"] = f"--seed {flags['seed']}"
    from ncssl_tune.core.plugins import PluginError

    try:  # a broken plugin is named before any value of the file is read against the registries it extends
        install_plugins()
    except PluginError as e:
        raise SpecError(str(e)) from None
    pinned: dict[str, Any] = {}
    try:
        for key, value in overrides:
            if key.split(".")[0] not in TOP_KEYS:
                raise ConfigError(key, f"unknown key; allowed top-level keys: {', '.join(TOP_KEYS)}")
            if key.startswith("space."):
                raise ConfigError(key, "the search space cannot be changed with --set; edit the file")
            set_dotted(raw, key, value)
            if isinstance(raw.get("space"), dict) and key in raw["space"]:
                pinned[key] = value
        if pinned:
            raw["space"] = pin(raw["space"], pinned)
        spec = _validate(raw, p)
    except ConfigError as e:
        flag = _flag_of(e.key, origin)
        raise SpecError(f"{flag or p}: {e.key}: {e.message}") from None
    spec.pinned = pinned
    return spec


def _flag_of(key: str, origin: dict[str, str]) -> str | None:
    """The flag that set `key`, a section above it or a key below it (the value under validation is the flag's)."""
    for k, flag in origin.items():
        if key == k or key.startswith(k + ".") or k.startswith(key + "."):
            return flag
    return None


def pin(raw_space: dict, pinned: dict[str, Any]) -> dict:
    """The space without the keys `pinned` by flags: a fixed value is not sampled. A parameter conditioned on a
    pinned key is kept, its condition dropped, when the pinned value meets it, and removed when it does not (it
    could never be sampled), as is, in turn, one conditioned on a removed key."""
    space = {k: v for k, v in raw_space.items() if k not in pinned}
    gone: set[str] = set()
    changed = True
    while changed:
        changed = False
        for key, entry in list(space.items()):
            when = entry.get("when") if isinstance(entry, dict) else None
            if not isinstance(when, dict):
                continue
            if any(k in gone or (k in pinned and pinned[k] != v) for k, v in when.items()):
                del space[key]
                gone.add(key)
                changed = True
            elif any(k in pinned for k in when):
                rest = {k: v for k, v in when.items() if k not in pinned}
                space[key] = {**{f: v for f, v in entry.items() if f != "when"}, **({"when": rest} if rest else {})}
    return space


def _validate(raw: dict, p: Path) -> SweepSpec:
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown top-level key; allowed: {', '.join(TOP_KEYS)}")
    name = coerce(str, raw.get("name", p.stem), "name")
    if not name or any(c in name for c in "/\\:") or name.startswith("."):
        raise ConfigError("name", f"{name!r} cannot name a folder; use letters, digits, '-', '_'")
    base = TrainConfig.from_dict({k: copy.deepcopy(raw[k]) for k in SECTIONS if k in raw})
    search = build(SearchConfig, raw.get("search", {}), "search.")
    resources = build(ResourcesConfig, raw.get("resources", {}), "resources.")
    if resources.gpu > 1 and resources.gpu != int(resources.gpu):
        raise ConfigError("resources.gpu", f"above 1 must be a whole number of GPUs, got {resources.gpu}")
    space = _parse_space(raw.get("space", {}), base, search)
    _check_views(base, search)
    _check_rungs(base, search)
    _check_repeats(search, space)
    return SweepSpec(name=name, path=str(p), base=base, search=search, resources=resources, space=space, raw=raw)


def asha_rungs(search: SearchConfig, epochs: int) -> list[int]:
    """Epochs at which ASHA compares trials (Ray compares at the first result with epoch >= each milestone)."""
    rungs, k = [], 0
    while search.scheduler.grace_period * search.scheduler.reduction_factor ** k < epochs:
        rungs.append(math.ceil(search.scheduler.grace_period * search.scheduler.reduction_factor ** k))
        k += 1
    return rungs


def _check_views(cfg: TrainConfig, search: SearchConfig) -> None:
    """An objective measured on augmented views needs them, or every trial would report NaN."""
    if search.metric in ("lidar", "lidar_h", "entropy_cond") and not cfg.eval.cond_views:
        raise ConfigError("search.metric", f"{search.metric} is measured on eval.cond_views augmented views per "
                                           "sample, but eval.cond_views is 0; set it to 2 or more")


def _check_repeats(search: SearchConfig, space: list[Param]) -> None:
    """Repeats measure the seed noise of a fixed set of configurations: an adaptive sampler would propose from the
    first repeats' results while the others still run, and a swept seed would make repeats differ in more."""
    if search.repeats == 1:
        return
    if search.algorithm == "tpe":
        raise ConfigError("search.repeats", "repeats need a non-adaptive sampler; set search.algorithm to qmc, "
                                            "random or grid (or search.repeats to 1 for a tpe search)")
    if any(p.key == "train.seed" for p in space):
        raise ConfigError("space.train.seed", "search.repeats sets each repeat's training seed; do not sweep it")


def _check_rungs(cfg: TrainConfig, search: SearchConfig) -> None:
    """ASHA must compare fresh values: a probe measured 4 epochs before the rung would rank trials on stale data."""
    every = {"probe_acc": ("eval.probe_every", cfg.eval.probe_every),
             "knn_acc": ("eval.knn_every", cfg.eval.knn_every),
             "fewshot_acc": ("eval.knn_every", cfg.eval.knn_every)}.get(search.metric)
    if search.scheduler.name != "asha" or every is None:
        return
    key, n = every
    rungs = asha_rungs(search, cfg.train.epochs)
    stale = [r for r in rungs if not (n and r % n == 0) and not (search.metric == "probe_acc" and r == 1)]
    if stale:
        raise ConfigError(key, f"ASHA compares {search.metric} at epochs {rungs} but {key}={n} does not measure it "
                               f"at epoch(s) {stale}; use a {key} that divides every rung (e.g. 1), change "
                               f"search.scheduler.grace_period, or use scheduler fifo")


def _parse_space(raw_space: Any, base: TrainConfig, search: SearchConfig) -> list[Param]:
    if not isinstance(raw_space, dict):
        raise ConfigError("space", "expected a mapping of dotted config keys to distributions")
    params: list[Param] = []
    for key, entry in raw_space.items():
        where = f"space.{key}"
        if not isinstance(key, str) or key.split(".")[0] not in SECTIONS:
            raise ConfigError(where, f"swept keys are dotted config keys under {', '.join(SECTIONS)}")
        if not isinstance(entry, dict):
            raise ConfigError(where, "expected a mapping like {type: logfloat, low: 1, high: 100}")
        param = build(Param, {"key": key, **entry}, where + ".")
        if param.type == "categorical":
            if not param.values:
                raise ConfigError(f"{where}.values", "a categorical needs a non-empty list of values")
            bad = [v for v in param.values if v is not None and not isinstance(v, (bool, int, float, str))]
            if bad:
                raise ConfigError(f"{where}.values", "Optuna categoricals hold scalars "
                                  f"(str, number, bool, null), got {bad[0]!r}")
            if param.low is not None or param.high is not None:
                raise ConfigError(where, "a categorical takes values, not low/high")
        else:
            _check_range(param, where, search)
        if param.when and search.algorithm == "grid":
            raise ConfigError(f"{where}.when", "conditional parameters need algorithm tpe or random, not grid")
        earlier = {q.key: q for q in params if q.type == "categorical"}
        for cond_key, cond_value in param.when.items():
            # The define-by-run function sees only keys sampled before this one; a condition on anything else
            # would be constant (never sampled, or a redundant condition), so it is refused.
            if cond_key not in earlier:
                raise ConfigError(f"{where}.when.{cond_key}", "a condition names a categorical key swept "
                                  f"earlier in this file; swept so far: {', '.join(earlier) or '(none)'}")
            if cond_value not in earlier[cond_key].values:
                raise ConfigError(f"{where}.when.{cond_key}", f"{cond_value!r} is never sampled; "
                                  f"choose from: {', '.join(map(str, earlier[cond_key].values))}")
        # Every end point must make a valid configuration: catches unknown keys, wrong types, bad values.
        for value in param.endpoints():
            try:
                base.with_overrides({**param.when, key: value})
            except ConfigError as e:
                if e.message.startswith("unknown"):  # the key itself is wrong, whatever the value: say so alone,
                    raise ConfigError(where, e.message) from None  # as --set and the file's own keys do
                raise ConfigError(where, f"value {value!r} is not valid for {e.key}: {e.message}") from None
        params.append(param)
    return params


def _check_range(param: Param, where: str, search: SearchConfig) -> None:
    if param.values is not None and search.algorithm != "grid":
        raise ConfigError(f"{where}.values", f"values belong to categorical (or grid) parameters, not {param.type}")
    for end in ("low", "high"):
        if getattr(param, end) is None:
            raise ConfigError(f"{where}.{end}", f"a {param.type} needs low and high")
        if not math.isfinite(getattr(param, end)):
            raise ConfigError(f"{where}.{end}", "must be finite")
    if param.low >= param.high:
        raise ConfigError(where, f"empty or inverted range: low={param.low} must be < high={param.high}")
    if param.type.startswith("log") and param.low <= 0:
        raise ConfigError(f"{where}.low", f"a {param.type} range needs low > 0, got {param.low}")
    if param.type.endswith("int"):
        for end in ("low", "high"):
            if getattr(param, end) != int(getattr(param, end)):
                raise ConfigError(f"{where}.{end}", f"an {param.type} needs whole numbers, got {getattr(param, end)}")
        param.low, param.high = int(param.low), int(param.high)
    if param.step is not None and (param.step <= 0 or param.type.startswith("log")):
        raise ConfigError(f"{where}.step", "step must be > 0 and cannot be combined with a log scale")
    if param.step is not None and param.type == "int" and param.step != int(param.step):
        raise ConfigError(f"{where}.step", f"an int range needs a whole step, got {param.step}")


def resolved(spec: SweepSpec) -> dict:
    """The spec as plain data (for --dry-run printing and logging)."""
    return {"name": spec.name, "base": spec.base.to_dict(),
            "search": dataclasses.asdict(spec.search), "resources": dataclasses.asdict(spec.resources),
            "space": [dataclasses.asdict(p) for p in spec.space]}
