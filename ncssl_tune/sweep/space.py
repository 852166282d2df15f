"""SweepSpec.space -> an Optuna define-by-run function and the sampler for the chosen algorithm.

`DefineByRun` is a module-level class holding only plain data, so it pickles with the searcher state and a
restored sweep can rebuild its study (a lambda or closure would not survive `Tuner.restore`).
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any

import numpy as np
import optuna

from ncssl_tune.config import TrainConfig
from ncssl_tune.spec import Param, SweepSpec


class DefineByRun:
    """Samples the params in file order; a param with `when` is sampled only if every condition holds."""

    def __init__(self, params: list[Param], base: TrainConfig):
        self.params = params
        self.base = base

    def __call__(self, trial: optuna.Trial) -> None:
        chosen: dict[str, Any] = {}
        for p in self.params:
            if p.active(chosen, self.base):
                chosen[p.key] = suggest(trial, p)


def suggest(trial: optuna.Trial, p: Param) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(p.key, p.values)
    if p.type in ("float", "logfloat"):
        return trial.suggest_float(p.key, p.low, p.high, log=p.type == "logfloat", step=p.step)
    return trial.suggest_int(p.key, p.low, p.high, log=p.type == "logint", step=int(p.step or 1))


def grid_values(p: Param, points: int = 3) -> list:
    """Grid points of one param: its listed values, else `points` values evenly spaced (log-spaced for log types)."""
    if p.values:
        return list(p.values)
    space = np.geomspace if p.type.startswith("log") else np.linspace
    vals = space(p.low, p.high, points)
    if p.type.endswith("int"):
        return sorted({round(v) for v in vals})
    return [float(v) for v in vals]


def grid_size(spec: SweepSpec) -> int:
    return int(np.prod([len(grid_values(p)) for p in spec.space])) if spec.space else 1


class StratifiedStartupTPE(optuna.samplers.TPESampler):
    """TPE whose start-up trials draw each categorical param's values in turn, in a seeded order per param, so the
    first n_startup trials hold every value ⌊n/k⌋ or ⌈n/k⌉ times; numeric params stay at random.

    With independent random start-up draws, a value can be missing from every start-up trial (1 in 27 for 4
    trials and 3 values), and TPE does not go back to it: with the default sweep's 12 trials and random
    objectives, one of the three projector widths was never sampled for 4 of 10 seeds, so no analysis could see
    the projector at all. Module-level and plain data: it pickles with the searcher state."""

    def __init__(self, *, seed: int | None = None, n_startup_trials: int = 10, **kwargs: Any):
        super().__init__(seed=seed, n_startup_trials=n_startup_trials, **kwargs)
        self._startup = n_startup_trials
        self._order_seed = 0 if seed is None else seed

    def sample_independent(self, study, trial, param_name, param_distribution):
        if trial.number < self._startup and isinstance(param_distribution, optuna.distributions.CategoricalDistribution):
            choices = param_distribution.choices
            # one seeded order per param (stable across processes: no hash()), repeated as trials go on
            key = [zlib.crc32(param_name.encode()), self._order_seed]
            order = np.random.default_rng(key).permutation(len(choices))
            return choices[order[trial.number % len(choices)]]
        return super().sample_independent(study, trial, param_name, param_distribution)


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    s = spec.search
    if s.algorithm == "tpe":
        # multivariate TPE models interactions (e.g. lambda x gamma), which collapse boundaries have; the constant
        # liar counts the running trials (max_concurrent of them) as bad, so two trials proposed while neither has
        # a result are not proposed side by side (Optuna's advice for parallel runs).
        return StratifiedStartupTPE(seed=s.seed, n_startup_trials=min(10, max(2, s.num_samples // 3)),
                                    multivariate=True, group=True, constant_liar=True)
    if s.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.algorithm == "qmc":
        # Scrambled Sobol points fill the space evenly and reproducibly for a seed (a study, not a search). Optuna
        # samples the first trial at random and takes the search space from it; a conditional key absent from
        # that trial is sampled at random too.
        with warnings.catch_warnings():  # "experimental" since Optuna 3.0: nothing a user can act on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=s.seed)
    return optuna.samplers.GridSampler({p.key: grid_values(p) for p in spec.space}, seed=s.seed)


def warm_sampler(spec: SweepSpec) -> None:
    """Two asks of the sweep's sampler on a throwaway in-memory study (no file, no seed state shared with the
    sweep's), so that what Optuna imports on a sampler's first relative sample is imported here, on run_sweep's
    start-up thread, and not in Tune's loop: QMC imports scipy.stats there (0.7 s idle, 2-3 s on busy cores),
    and while the loop waited every running trial waited in its report (a 2.8 s stall of both slots after the
    study's first trial ended)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as build_tuner: no "new study created" line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(sampler=make_sampler(spec), storage=optuna.storages.InMemoryStorage())
    space = DefineByRun(spec.space, spec.base)
    for _ in range(2):
        trial = study.ask()
        space(trial)
        study.tell(trial, 0.0)


def describe(spec: SweepSpec) -> list[str]:
    """One human line per swept param, for --dry-run."""
    lines = []
    for p in spec.space:
        dist = f"one of {p.values}" if p.type == "categorical" else f"{p.type} [{p.low}, {p.high}]"
        cond = " when " + ", ".join(f"{k}={v}" for k, v in p.when.items()) if p.when else ""
        lines.append(f"  {p.key}: {dist}{cond}")
    lines += [f"  {k}: pinned to {v!r} by --set (not swept)" for k, v in spec.pinned.items()]
    return lines


