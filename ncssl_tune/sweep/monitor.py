"""Driver-side pieces of a sweep that watch trials: the collapse stopper, how a trial ended (status and reason,
from its last result), and the callback that prints the live table and writes trials.csv."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper

from ncssl_tune.naming import config_id, fmt_number, short_names
from ncssl_tune.spec import CollapseStopConfig
from ncssl_tune.vocab import ENDED, PARAM_PREFIX, RESULT_STREAK, RUNNING, TAG_COLLAPSE, TAG_STATUS

ID_COLUMNS = ("trial_id", "method", "status", "stop_reason", "config_id")  # config_id: shared by repeats
FINAL_COLUMNS = ("epoch", "loss", "effective_rank", "effective_rank_frac", "effective_rank_h", "entropy",
                 "entropy_cond", "avg_corr", "std_l2", "lidar", "lidar_h", "alpha_req", "alpha_req_h", "collapse",
                 "collapse_h", "fewshot_acc", "knn_acc", "probe_acc", "probe_epoch", "images_per_s", "epoch_seconds",
                 "metrics_seconds")


def collapse_stop_reason(cfg: CollapseStopConfig, result: dict[str, Any]) -> str | None:
    """Why the collapse stopper stops a trial at this result, or None. A function of the result alone (the trial
    reports how many consecutive epochs it has been in its collapse state, `collapse_streak`), so the stopper,
    the live table and the tracker agree on the reason without sharing any state."""
    epoch = result.get("epoch", 0)
    if epoch < cfg.min_epoch or result.get(TAG_STATUS) != RUNNING:
        return None
    state, n = result.get(TAG_COLLAPSE, "none"), result.get(RESULT_STREAK, 0)
    if state == "total" and cfg.total and n >= cfg.total_patience:
        return f"collapse_total (epoch {epoch})"
    if state == "dimensional" and cfg.dimensional and n >= cfg.dimensional_patience:
        return f"collapse_dimensional (epoch {epoch})"
    return None


class CollapseStopper(Stopper):
    """Stops a trial after `total_patience` consecutive epochs in total collapse (and, when enabled,
    `dimensional_patience` epochs in dimensional collapse); see `collapse_stop_reason`. Holds no state."""

    def __init__(self, cfg: CollapseStopConfig):
        self.cfg = cfg

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return collapse_stop_reason(self.cfg, result) is not None

    def stop_all(self) -> bool:
        return False


def trial_outcome(result: dict | None, collapse_stop: CollapseStopConfig, scheduler: str,
                  error: str | None = None) -> tuple[str, str]:
    """(status, stop_reason) of a trial that ended, from its last result: finished, diverged, stopped (by the
    collapse stopper or else the scheduler) or error. A last result still "running" means somebody stopped the
    trial before its last epoch; the collapse stopper's rule tells whether it was that."""
    if error is not None:
        return "error", error
    result = result or {}
    status = result.get("status", "")
    if status == "running":
        return "stopped", (collapse_stop_reason(collapse_stop, result)
                           or ("asha" if scheduler == "asha" else "stopped"))
    if status == "diverged":
        return "diverged", str(result.get("error", ""))
    return status or "stopped", ""


def read_trials(out_dir: str | Path) -> list[dict]:
    """The rows of <sweep folder>/trials.csv, as strings (what SweepMonitor wrote)."""
    with open(Path(out_dir) / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def csv_columns(rows: list[dict]) -> list[str]:
    """trials.csv's columns in a stable order whatever order trials report in: who the trial is, its parameters
    (sorted by key), its metrics (FINAL_COLUMNS order), then anything else (sorted)."""
    keys = {k for row in rows for k in row}
    params = sorted(k for k in keys if k.startswith(PARAM_PREFIX))
    known = [*ID_COLUMNS, *params, *(k for k in FINAL_COLUMNS if k in keys)]
    return [*known, *sorted(keys - set(known))]


# The live table's metric columns: (header, key in the trial's row).
TABLE_METRICS = (("epoch", "epoch"), ("eff_rank", "effective_rank"), ("knn", "knn_acc"), ("probe", "probe_acc"))


def table_lines(trials, rows: dict[str, dict]) -> list[str]:
    """The live table: trial, method, the sampled parameters under short unambiguous names (loss.vicreg.lam and
    loss.barlow_twins.lam are vicreg.lam and barlow_twins.lam), the metrics rounded for reading, status."""
    keys = sorted({k for t in trials for k in t.config} - {"loss.method"})  # the method column shows it
    ids = {t.trial_id: config_id(t.config) for t in trials}
    repeated = len(set(ids.values())) < len(ids)  # a study with repeats: which trials share a configuration
    fixed = ["trial", *(["config"] if repeated else []), "method", *(h for h, _ in TABLE_METRICS), "status"]
    names = short_names(keys, taken=fixed)
    head = [*fixed[:-len(TABLE_METRICS) - 1], *(names[k] for k in keys), *(h for h, _ in TABLE_METRICS), "status"]
    lines = []
    for t in trials:
        r = rows.get(t.trial_id, {})
        lines.append([t.trial_id, *([ids[t.trial_id]] if repeated else []),
                      r.get("method") or t.config.get("loss.method", ""),
                      *(fmt_number(t.config.get(k, "-")) for k in keys),
                      *(fmt_number(r.get(k, "-")) for _, k in TABLE_METRICS), r.get("status", t.status.lower())])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *lines]]


class SweepMonitor(Callback):
    """Live table on stdout and results/<sweep>/trials.csv, one row per trial, rewritten as trials end. The table
    rounds numbers for reading; trials.csv keeps them at full precision.

    Its rows are part of the experiment state (get_state/set_state), so a resumed sweep keeps them.
    """

    def __init__(self, out_dir: Path, collapse_stop: CollapseStopConfig, scheduler: str, interval_s: float = 10.0,
                 stream=None):
        self.out_dir = Path(out_dir)
        self.collapse_stop = collapse_stop
        self.scheduler = scheduler
        self.interval_s = interval_s
        self.stream = stream  # None: sys.stdout at print time (a stream does not pickle)
        self.rows: dict[str, dict] = {}
        self.interrupted: list[str] = []  # trials the sweep left unfinished (Ctrl+C), set at its end
        self._last_print = 0.0

    # --- state carried across a resumed sweep
    def get_state(self) -> dict:
        return {"rows": self.rows}

    def set_state(self, state: dict) -> None:
        self.rows = dict(state.get("rows", {}))

    def _row(self, trial, result: dict | None, status: str | None = None, reason: str = "") -> dict:
        row = self.rows.setdefault(trial.trial_id, {"trial_id": trial.trial_id, "config_id": config_id(trial.config)})
        row.update({f"{PARAM_PREFIX}{k}": v for k, v in trial.config.items()})
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
        status, reason = trial_outcome(result, self.collapse_stop, self.scheduler, error)
        self._row(trial, result, status, reason)
        self.write_csv()
        self.print_table(trials, force=True)

    def on_step_end(self, iteration, trials, **info):
        self.print_table(trials)

    def on_experiment_end(self, trials, **info):
        """A trial Ray did not end (no on_trial_complete/error: the sweep was interrupted, Ctrl+C) is marked
        interrupted; a resumed sweep runs it again."""
        self.interrupted = []
        for t in trials:
            if self.rows.get(t.trial_id, {}).get("status") not in ENDED:
                self._row(t, None, "interrupted", "")
                self.interrupted.append(t.trial_id)
        self.write_csv()

    def write_csv(self) -> None:
        if not self.rows:
            return
        cols = csv_columns(list(self.rows.values()))
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
        print("\n".join(table_lines(trials, self.rows)) + "\n", file=self.stream or sys.stdout, flush=True)
