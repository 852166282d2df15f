"""Driver-side pieces of a sweep that watch trials: the collapse stopper, the Optuna searcher that records early
stops as PRUNED, and the callback that prints the live table and writes trials.csv."""

from __future__ import annotations

import csv
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from ncssl_tune.spec import CollapseStopConfig

FINAL_COLUMNS = ("epoch", "loss", "effective_rank", "effective_rank_frac", "effective_rank_h", "entropy",
                 "entropy_cond", "avg_corr", "std_l2", "collapse", "collapse_h", "knn_acc", "probe_acc",
                 "probe_epoch", "images_per_s", "epoch_seconds", "metrics_seconds")


class CollapseStopper(Stopper):
    """Stops a trial after `total_patience` consecutive epochs in total collapse (and, when enabled,
    `dimensional_patience` epochs in dimensional collapse). `reasons[trial_id]` records why."""

    def __init__(self, cfg: CollapseStopConfig):
        self.cfg = cfg
        self.streak: dict[str, tuple[str, int]] = {}
        self.reasons: dict[str, str] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        state = result.get("collapse", "none")
        prev, n = self.streak.get(trial_id, ("none", 0))
        n = n + 1 if state == prev else 1
        self.streak[trial_id] = (state, n)
        if result.get("epoch", 0) < self.cfg.min_epoch or result.get("status") != "running":
            return False
        if state == "total" and self.cfg.total and n >= self.cfg.total_patience:
            self.reasons[trial_id] = f"collapse_total (epoch {result['epoch']})"
            return True
        if state == "dimensional" and self.cfg.dimensional and n >= self.cfg.dimensional_patience:
            self.reasons[trial_id] = f"collapse_dimensional (epoch {result['epoch']})"
            return True
        return False

    def stop_all(self) -> bool:
        return False


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about trials that did not run to the end.

    Ray's OptunaSearch tells every trial that ended with a value as COMPLETE, so a trial stopped at epoch 2 by
    ASHA or the collapse stopper enters TPE as if its early value were final. Here a trial whose last result is
    still "running" is told PRUNED (its intermediate values were reported per epoch already), and a diverged
    trial or a non-finite objective is told FAIL.
    """

    def restore(self, checkpoint_path: str) -> None:
        """Reconcile the restored searcher with the study. The searcher state Ray saved with the experiment
        lags the study's journal when the driver died: a trial may have been told COMPLETE since (Ray reruns it
        from its checkpoint; its results must not be reported to the finished Optuna trial, which raises
        UpdateFinishedTrialError), and a trial may have been asked for by a Ray trial Ray never saved (it would
        stay RUNNING in the study for ever, beside a fresh one): such orphans are handed to the next new trials."""
        super().restore(checkpoint_path)
        by_number = {t.number: t for t in self._ot_study.get_trials(deepcopy=False)}
        known = set()
        for trial_id, ot_trial in self._ot_trials.items():
            known.add(ot_trial.number)
            frozen = by_number.get(ot_trial.number)
            if frozen is not None and frozen.state.is_finished():
                self._completed_trials.add(trial_id)
        self._orphans = [t._trial_id for n, t in sorted(by_number.items())
                         if n not in known and t.state == TrialState.RUNNING]

    def suggest(self, trial_id: str) -> dict | None:
        orphans = getattr(self, "_orphans", None)
        if orphans and callable(self._space) and trial_id not in self._ot_trials:
            # Optuna's Trial returns the values an orphan already holds and samples only what it lacks.
            self._ot_trials[trial_id] = optuna.Trial(self._ot_study, orphans.pop(0))
        return super().suggest(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        value = (result or {}).get(self.metric)
        status = (result or {}).get("status")
        # Mark first: if tell raises after storing the trial, Ray's second call must not tell it again.
        self._completed_trials.add(trial_id)
        try:
            self._tell(ot_trial, value, status, error, result)
        except RuntimeError as e:
            # GridSampler stops the study once its grid is used up; outside study.optimize that stop raises, after
            # the trial was stored. There is nothing to stop here: Ray's num_samples bounds the sweep.
            if "Study.stop" not in str(e):
                raise

    def _tell(self, ot_trial, value, status, error: bool, result: dict | None) -> None:
        if error or status == "diverged" or value is None or not math.isfinite(value):
            self._ot_study.tell(ot_trial, None, state=TrialState.FAIL)
        elif status == "running":
            # Ray skips on_trial_result for the result on which a stopper fired: report it here, so the study
            # holds the whole curve up to the stop.
            # (Optuna ignores, with a warning, a step it already holds.)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ot_trial.report(value, result["training_iteration"])
            self._ot_study.tell(ot_trial, None, state=TrialState.PRUNED)
        else:
            self._ot_study.tell(ot_trial, value, state=TrialState.COMPLETE)


def trial_outcome(trial_id: str, result: dict | None, reasons: dict[str, str], scheduler: str,
                  error: str | None = None) -> tuple[str, str]:
    """(status, stop_reason) of a trial that ended: finished, diverged, stopped (by the collapse stopper or
    ASHA) or error. A last result still "running" means somebody stopped the trial before its last epoch."""
    if error is not None:
        return "error", error
    result = result or {}
    status = result.get("status", "")
    if status == "running":
        return "stopped", reasons.get(trial_id) or ("asha" if scheduler == "asha" else "stopped")
    if status == "diverged":
        return "diverged", str(result.get("error", ""))
    return status or "stopped", ""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return str(v)


def read_trials(out_dir: str | Path) -> list[dict]:
    """The rows of <sweep folder>/trials.csv, as strings (what SweepMonitor wrote)."""
    with open(Path(out_dir) / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


class SweepMonitor(Callback):
    """Live table on stdout and results/<sweep>/trials.csv, one row per trial, rewritten as trials end.

    Its rows are part of the experiment state (get_state/set_state), so a resumed sweep keeps them.
    """

    def __init__(self, out_dir: Path, stopper: CollapseStopper, scheduler: str, interval_s: float = 10.0,
                 stream=None):
        self.out_dir = Path(out_dir)
        self.stopper = stopper
        self.scheduler = scheduler
        self.interval_s = interval_s
        self.stream = stream  # None: sys.stdout at print time (a stream does not pickle)
        self.rows: dict[str, dict] = {}
        self._last_print = 0.0

    # --- state carried across a resumed sweep
    def get_state(self) -> dict:
        return {"rows": self.rows}

    def set_state(self, state: dict) -> None:
        self.rows = dict(state.get("rows", {}))

    def _row(self, trial, result: dict | None, status: str | None = None, reason: str = "") -> dict:
        row = self.rows.setdefault(trial.trial_id, {"trial_id": trial.trial_id})
        row.update({f"param.{k}": v for k, v in trial.config.items()})
        if result:
            row["method"] = result.get("method", row.get("method", ""))
            for k in FINAL_COLUMNS:
                if k in result:
                    row[k] = result[k]
            row["status"] = result.get("status", "")
        if status:
            row["status"] = status
            row["stop_reason"] = reason
        return row

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._row(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trials, trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trials, trial, str(getattr(trial, "error_file", "") or "error"))

    def _end(self, trials, trial, error: str | None) -> None:
        result = trial.last_result or {}
        status, reason = trial_outcome(trial.trial_id, result, self.stopper.reasons, self.scheduler, error)
        self._row(trial, result, status, reason)
        self.write_csv()
        self.print_table(trials, force=True)

    def on_step_end(self, iteration, trials, **info):
        self.print_table(trials)

    def on_experiment_end(self, trials, **info):
        self.write_csv()

    def write_csv(self) -> None:
        if not self.rows:
            return
        cols: list[str] = ["trial_id", "method", "status", "stop_reason"]
        for row in self.rows.values():
            cols += [k for k in row if k not in cols]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / "trials.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for row in sorted(self.rows.values(), key=lambda r: r["trial_id"]):
                w.writerow(row)
        tmp.replace(self.out_dir / "trials.csv")

    def print_table(self, trials, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_print < self.interval_s:
            return
        self._last_print = now
        keys = sorted({k for t in trials for k in t.config})
        short = [k.split(".")[-1] for k in keys]
        head = ["trial", "method", *short, "epoch", "eff_rank", "knn", "probe", "status"]
        lines = []
        for t in trials:
            r = self.rows.get(t.trial_id, {})
            lines.append([t.trial_id[-5:], r.get("method", ""), *[_fmt(t.config.get(k, "-")) for k in keys],
                          _fmt(r.get("epoch", "-")), _fmt(r.get("effective_rank", "-")), _fmt(r.get("knn_acc", "-")),
                          _fmt(r.get("probe_acc", "-")), r.get("status", t.status.lower())])
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
        out = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [head, *lines]]
        print("\n".join(out) + "\n", file=self.stream or sys.stdout, flush=True)
