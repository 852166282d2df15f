"""The Ray Tune searcher of a sweep: an Optuna study driven through Optuna's public ask/tell API.

Why not Ray's OptunaSearch: it tells every trial that ended with a value as COMPLETE, so a trial stopped at
epoch 2 by ASHA or the collapse stopper enters TPE as if its early value were final; its state lags the study
when the driver is killed (Ray saves it with the experiment, every few seconds); and correcting either meant
reaching into its private attributes. Here:
- a trial whose last result is still "running" is told PRUNED, a diverged trial or a non-finite objective FAIL,
  an errored one FAIL; every trial's per-epoch objective is reported as intermediate values at step = epoch,
  the step of its MLflow metrics, up to its last result (Ray hands the result on which a scheduler or stopper
  stops a trial, ASHA's at max_t included, to on_trial_complete only);
- the study's metric name is the sweep's objective (optuna-dashboard's axes read it, not "Objective 0");
- the searcher's own state (Ray trial id -> Optuna trial, which are told, which are live) is written to
  `state_path` at every change, so a resumed sweep restores the state of the moment the driver died, not Ray's
  last snapshot;
- a trial run again after an error continues as a new Optuna trial with the same parameters (the failed
  attempt stays FAIL in the study, the new one counts): under its own id (`Tuner.restore(resume_errored=True)`)
  or as a new Ray trial with the errored one's config (`restart_errored=True`, which the sweep uses);
- it limits the trials running at once itself (Ray's ConcurrencyLimiter drops the results of trials it no
  longer counts as live, which a resumed errored trial is);
- with `repeats` R > 1 (a study design, non-adaptive samplers only: spec.py checks), each Optuna trial is one
  configuration trained R times: R Ray trials with the same sampled values and training seeds `seed_key` =
  base_seed + r·REPEAT_SEED_STEP, issued one after another. The Optuna trial is told once all R ended: COMPLETE
  with the mean objective when every repeat completed, else FAIL if one failed, else PRUNED. Its intermediate
  values are repeat 0's (a second report of a step is ignored). An errored repeat that `--resume` restarts
  continues as an Optuna trial of its own, as any errored trial does.

Each Optuna trial names the Ray trial(s) that ran it in its user attributes (what optuna-dashboard shows beside
its own 0-based number): `ray_trial_id` when suggested; at the end, before it is told, `trial_number` (the number
the live table, trials.csv and the MLflow run name give it), `mlflow_run_id` (the tracker adds it to the trial's
results), `collapse` (its last collapse class), `status` and `stop_reason` (as trials.csv has them). With repeats
each repeat's attributes are prefixed `repeat<r>.`. An errored trial has no last result: only its id and status.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from ncssl_tune.naming import trial_index
from ncssl_tune.spec import CollapseStopConfig
from ncssl_tune.sweep.monitor import trial_outcome
from ncssl_tune.vocab import (
    RESULT_MLFLOW_RUN,
    STEP_METRIC,
    TAG_COLLAPSE,
    TAG_REASON,
    TAG_STATUS,
    TAG_TRIAL,
    TAG_TRIAL_NUMBER,
)

log = logging.getLogger(__name__)

REPEAT_SEED_STEP = 1000  # repeat r trains with seed base + r·1000: two runs seeded s and s+1 share no training seed


class OptunaSearcher(Searcher):
    """Suggests each trial's parameters from `study.ask()` and the define-by-run `space(trial)`; tells Optuna
    how each trial ended (see the module docstring)."""

    def __init__(self, space: Callable[[optuna.Trial], None], metric: str, mode: str,
                 sampler: optuna.samplers.BaseSampler, storage: optuna.storages.BaseStorage | None = None,
                 study_name: str | None = None, max_concurrent: int = 0, state_path: str | Path | None = None,
                 repeats: int = 1, seed_key: str = "train.seed", base_seed: int = 0,
                 collapse_stop: CollapseStopConfig | None = None, scheduler: str = "fifo"):
        super().__init__(metric=metric, mode=mode)
        # how a trial ended (trial_outcome): for the Optuna trial's stop_reason attribute
        self.collapse_stop, self.scheduler = collapse_stop or CollapseStopConfig(), scheduler
        self.space = space
        self.study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler,
                                         direction="maximize" if mode == "max" else "minimize",
                                         load_if_exists=True)
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, with a warning no user can act on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.set_metric_names([metric])
        self.max_concurrent = max_concurrent
        self.state_path = Path(state_path) if state_path else None
        self.trials: dict[str, optuna.Trial] = {}  # Ray trial id -> its (latest) Optuna trial
        self.told: set[str] = set()  # Ray trial ids whose Optuna trial is finished
        self.errored: set[str] = set()  # ... told FAIL because the Ray trial errored (Ray may run it again)
        self.live: set[str] = set()  # Ray trial ids suggested and not yet ended
        self.repeats, self.seed_key, self.base_seed = repeats, seed_key, base_seed
        self.configs: dict[str, dict] = {}  # Ray trial id -> the config it was given (with its seed, if repeated)
        self.queued: list[tuple[optuna.Trial, dict]] = []  # repeats of the current configuration not yet issued
        self.ended: dict[int, list[tuple[TrialState, float | None]]] = {}  # Optuna number -> its ended repeats
        self.expected: dict[int, int] = {}  # Optuna number -> Ray trials it waits for, when not `repeats`
        self.prefixes: dict[str, str] = {}  # Ray trial id -> prefix of its user attributes (repeat<r>.)

    # --- Ray's Searcher interface
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        return not config  # the space is the define-by-run function; Ray's param_space stays empty

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if self.max_concurrent and len(self.live) >= self.max_concurrent:
            return None
        if self.queued:
            trial, config = self.queued.pop(0)
        else:
            trial = self._ask()
            config = dict(trial.params)
            if self.repeats > 1:
                configs = [{**config, self.seed_key: self.base_seed + r * REPEAT_SEED_STEP}
                           for r in range(self.repeats)]
                config, self.queued = configs[0], [(trial, c) for c in configs[1:]]
        self.trials[trial_id] = trial
        self.configs[trial_id] = config
        self.live.add(trial_id)
        if self.repeats > 1:
            self.prefixes[trial_id] = f"repeat{(config[self.seed_key] - self.base_seed) // REPEAT_SEED_STEP}."
        self._annotate(trial_id, {TAG_TRIAL: trial_id})
        self._save_state()
        return dict(config)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        trial = self._resumed(trial_id, result)
        if trial is not None:
            self._report(trial, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self._resumed(trial_id, result or {})
        self.live.discard(trial_id)
        if trial is None:
            self._save_state()
            return
        result = result or {}
        value, status = result.get(self.metric), result.get("status")
        # Marked first: if tell raises after storing the trial, a second call must not tell it again.
        self.told.add(trial_id)
        if error:
            self.errored.add(trial_id)
        self._annotate(trial_id, self._ending(result, error))
        try:
            if not error:
                # Ray skips on_trial_result for the result on which a stopper or the scheduler stopped the trial
                # (ASHA stops every trial at max_t, its last epoch): report it here, so the study holds the whole
                # curve, as MLflow does, for a complete trial as for a pruned one.
                self._report(trial, result)
            if error or status == "diverged" or value is None or not math.isfinite(value):
                state = TrialState.FAIL
            elif status == "running":
                state = TrialState.PRUNED
            else:
                state = TrialState.COMPLETE
            self._tell(trial, state, value)
        except RuntimeError as e:
            # GridSampler stops the study once its grid is used up; outside study.optimize that stop raises, after
            # the trial was stored. There is nothing to stop here: Ray's num_samples bounds the sweep.
            if "Study.stop" not in str(e):
                raise
        finally:
            self._save_state()

    # --- state: Ray saves it with the experiment; `state_path` holds the latest
    def get_state(self) -> dict:
        # The sampler too (as Optuna's FAQ restores one): a resumed sweep otherwise restarts its random number
        # generator from the seed and proposes the first trials' parameters again.
        return {"trials": self.trials, "told": self.told, "errored": self.errored, "live": self.live,
                "sampler": self.study.sampler, "configs": self.configs, "queued": self.queued, "ended": self.ended,
                "expected": self.expected, "prefixes": self.prefixes}

    def set_state(self, state: dict) -> None:
        self.trials, self.live = dict(state["trials"]), set(state["live"])
        self.told, self.errored = set(state["told"]), set(state["errored"])
        self.study.sampler = state["sampler"]
        # absent from the state files of sweeps started before repeats existed
        self.configs = dict(state.get("configs") or {t: dict(tr.params) for t, tr in self.trials.items()})
        self.queued, self.ended = list(state.get("queued", [])), dict(state.get("ended", {}))
        self.expected = dict(state.get("expected", {}))
        self.prefixes = dict(state.get("prefixes", {}))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        """Restore from `state_path` when it exists (written at every change), else from Ray's snapshot; then
        reconcile with the study (the driver may have died between a write to the study and to the state): a trial
        the study holds as finished is not told again, and a study trial asked for but never recorded is told FAIL
        instead of staying RUNNING for ever."""
        newest = self.state_path if self.state_path is not None and self.state_path.is_file() else checkpoint_path
        with open(newest, "rb") as f:
            self.set_state(pickle.load(f))
        frozen = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for trial_id, trial in self.trials.items():
            if frozen[trial.number].state.is_finished():
                self.told.add(trial_id)
            else:
                self.told.discard(trial_id)
        known = {t.number for t in self.trials.values()}
        for number, t in sorted(frozen.items()):
            if number not in known and t.state == TrialState.RUNNING:
                log.warning("Optuna trial %d was asked for but no Ray trial took it (driver killed); told FAIL",
                            number)
                self.study.tell(number, None, state=TrialState.FAIL)

    # --- helpers
    def _ending(self, result: dict, error: bool) -> dict:
        """The user attributes of a Ray trial that ended, from its last result (Ray's flattened copy of
        trial.last_result, where Ray has put the trial's experiment tag); an errored trial gets no result from Ray:
        its status and stop reason only. getattr: a searcher pickled with a sweep started before these
        attributes existed lacks them."""
        status, reason = trial_outcome(None if error else result, getattr(self, "collapse_stop", CollapseStopConfig()),
                                       getattr(self, "scheduler", "fifo"), "error" if error else None)
        attrs = {TAG_STATUS: status, TAG_REASON: reason, TAG_TRIAL_NUMBER: trial_index(result.get("experiment_tag")),
                 RESULT_MLFLOW_RUN: result.get(RESULT_MLFLOW_RUN), TAG_COLLAPSE: result.get(TAG_COLLAPSE)}
        return {k: v for k, v in attrs.items() if v is not None}

    def _annotate(self, trial_id: str, attrs: dict) -> None:
        """Set user attributes on the Optuna trial of a Ray trial (optuna.Trial.set_user_attr), while it is still
        running: Optuna refuses to change a finished trial. A failure is logged: it must not end the sweep."""
        trial, prefix = self.trials.get(trial_id), getattr(self, "prefixes", {}).get(trial_id, "")
        try:
            for key, value in attrs.items():
                trial.set_user_attr(prefix + key, value)
        except Exception as e:  # noqa: BLE001 - bookkeeping only
            log.warning("Optuna trial of Ray trial %s: user attributes not set (%s)", trial_id, e)

    def _tell(self, trial: optuna.Trial, state: TrialState, value: float | None) -> None:
        """Tell Optuna how a Ray trial ended; with repeats, once the configuration's last repeat has ended."""
        ended = self.ended.setdefault(trial.number, [])
        ended.append((state, value))
        if len(ended) < self.expected.get(trial.number, self.repeats):
            return
        self.ended.pop(trial.number, None)
        states = {s for s, _ in ended}
        if states == {TrialState.COMPLETE}:
            self.study.tell(trial, sum(v for _, v in ended) / len(ended), state=TrialState.COMPLETE)
        else:
            self.study.tell(trial, None, state=TrialState.FAIL if TrialState.FAIL in states else TrialState.PRUNED)

    def _report(self, trial: optuna.Trial, result: dict) -> None:
        """The result's objective as an intermediate value at its epoch, MLflow's step for the trial's metrics."""
        value, step = result.get(self.metric), result.get(STEP_METRIC, result.get("training_iteration"))
        if value is not None and math.isfinite(value) and isinstance(step, int):
            with warnings.catch_warnings():  # a step reported again (after a restore, at the end) is ignored
                warnings.simplefilter("ignore")
                trial.report(value, step)

    def _ask(self, params: dict | None = None) -> optuna.Trial:
        """A new Optuna trial; with `params`, one holding exactly those values (Optuna's enqueue_trial)."""
        if params is not None:
            self.study.enqueue_trial(params)
        trial = self.study.ask()
        self.space(trial)  # define-by-run: the space's suggest_* calls fill trial.params
        return trial

    def _resumed(self, trial_id: str, result: dict) -> optuna.Trial | None:
        """The Optuna trial a result of `trial_id` belongs to: None for a trial already told (Ray reruns a
        finished trial from its checkpoint after a driver kill: its results are not new) or unknown; a new trial
        with the same parameters when an errored Ray trial runs again, resumed (same id) or restarted (a new id
        whose config, in the result, is an errored trial's)."""
        trial, source = self.trials.get(trial_id), trial_id
        if trial is not None and trial_id not in self.told:
            return trial
        if trial is None:
            config = result.get("config") or {k[len("config/"):]: v for k, v in result.items()
                                               if k.startswith("config/")}  # Ray flattens nested keys with "/"
            old = next((t for t in sorted(self.errored) if config and self.configs[t] == config), None)
            if old is None:
                return None
            self.errored.discard(old)  # one restart continues one failed attempt
            trial, source = self.trials[old], old
        elif trial_id not in self.errored:
            return None
        trial = self._ask(dict(trial.params))
        log.info("Ray trial %s runs again after an error: Optuna trial %d continues it", trial_id, trial.number)
        self.trials[trial_id] = trial
        self.configs[trial_id] = dict(self.configs.get(source, trial.params))
        self.expected[trial.number] = 1  # one repeat run again: its own Optuna trial
        self.told.discard(trial_id)
        self.errored.discard(trial_id)
        self.live.add(trial_id)
        self.prefixes.pop(trial_id, None)
        self._annotate(trial_id, {TAG_TRIAL: trial_id})
        self._save_state()
        return trial

    def _save_state(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(self.get_state(), f)
        os.replace(tmp, self.state_path)  # a kill mid-write leaves the previous state whole
