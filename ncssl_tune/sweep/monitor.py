"""Driver-side pieces of a sweep that watch trials: the collapse stopper, how a trial ended (status and reason,
from its last result), and the callback that shows the sweep's progress and writes trials.csv.

Every trial is named the same way everywhere: its number (1-based, in the order Ray creates trials, the head of
its experiment tag, saved with the experiment) and its Ray trial id. On a terminal the live table is redrawn in
place; otherwise (a log file, CI) the monitor appends one line per event (a trial starts, a trial ends, a
periodic progress line) and the table once at the end, so a sweep of N trials writes O(N) lines, not one table
per event."""

from __future__ import annotations

import csv
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper

from ncssl_tune.naming import config_id, fmt_number, sampled_values, short_names, trial_index, trial_label
from ncssl_tune.spec import CollapseStopConfig
from ncssl_tune.vocab import (
    ENDED,
    PARAM_PREFIX,
    RESULT_STREAK,
    RUNNING,
    STOPPED,
    TAG_COLLAPSE,
    TAG_STATUS,
    TAG_TRIAL_NUMBER,
)

# config_id: shared by repeats
ID_COLUMNS = (TAG_TRIAL_NUMBER, "trial_id", "method", "status", "stop_reason", "config_id")
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


def trial_number(trial) -> int | None:
    """The trial's number: the head of the experiment tag Ray gives it when it creates it."""
    return trial_index(getattr(trial, "experiment_tag", None))


def short_state(status: str, reason: str = "") -> str:
    """One word for how a trial stands: running, finished, diverged, error, interrupted, pending, or for a trial
    stopped early who stopped it: collapse (the collapse stopper) or the scheduler (asha); another stopper's
    stop reads `stopped`."""
    if status == STOPPED:
        return "collapse" if reason.startswith("collapse") else (reason or STOPPED)
    return status or "pending"


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



# The live table's metric columns after the objective: (header, key in the trial's row).
# The last collapse class too: a trial that ends "finished" in total collapse must not read like a healthy one.
TABLE_METRICS = (("epoch", "epoch"), ("eff_rank", "effective_rank"), ("knn", "knn_acc"), ("probe", "probe_acc"),
                 ("collapse", TAG_COLLAPSE))
WAITING = ("running", "pending")  # short states of a trial that has not ended
TTY_INTERVAL_S = 2.0  # a table redrawn in place adds no lines: on a terminal it may follow the sweep closely


def metric_columns(metric: str | None) -> list[tuple[str, str]]:
    """The sweep's objective first, under its own name (what the sweep optimises is what a person looks for),
    then the other columns, without showing the objective twice."""
    rest = [(h, k) for h, k in TABLE_METRICS if k != metric]
    return [(metric, metric), *rest] if metric else rest


def _state(trial, rows: dict[str, dict]) -> str:
    r = rows.get(trial.trial_id, {})
    return short_state(r.get("status") or str(getattr(trial, "status", "")).lower(), r.get("stop_reason", ""))


def table_lines(trials, rows: dict[str, dict], metric: str | None = None, method: str = "") -> list[str]:
    """The live table: number and Ray id of each trial, its method (from its config before its first result;
    `method` when the space does not sample it), the sampled parameters under short unambiguous names
    (loss.vicreg.lam and loss.barlow_twins.lam are vicreg.lam and barlow_twins.lam), the objective, the other
    metrics rounded for reading, and its state (short_state)."""
    keys = sorted({k for t in trials for k in t.config} - {"loss.method"})  # the method column shows it
    ids = {t.trial_id: config_id(t.config) for t in trials}
    repeated = len(set(ids.values())) < len(ids)  # a study with repeats: which trials share a configuration
    metrics = metric_columns(metric)
    fixed = ["#", "trial_id", *(["config"] if repeated else []), "method"]
    names = short_names(keys, taken=[*fixed, *(h for h, _ in metrics), "state"])
    head = [*fixed, *(names[k] for k in keys), *(h for h, _ in metrics), "state"]
    lines = []
    for t in trials:
        r, n = rows.get(t.trial_id, {}), trial_number(t)
        lines.append([n if n is not None else "-", t.trial_id, *([ids[t.trial_id]] if repeated else []),
                      r.get("method") or t.config.get("loss.method") or method or "-",
                      *(fmt_number(t.config.get(k, "-")) for k in keys),
                      *(fmt_number(r.get(k, "-")) for _, k in metrics), _state(t, rows)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *lines]]


def _by_number(trials) -> list:
    return sorted(trials, key=lambda t: (trial_number(t) or 0, t.trial_id))


class SweepMonitor(Callback):
    """Progress on stdout and results/<sweep>/trials.csv, one row per trial, rewritten as trials end. The console
    rounds numbers for reading; trials.csv keeps them at full precision.

    On a terminal the table is drawn in place (ANSI cursor movement; `rich` is not a dependency), redrawn every
    min(`interval_s`, TTY_INTERVAL_S) seconds and when a trial starts or ends, cut to the terminal's height (running trials first,
    then the best ended ones). Elsewhere one line per event and the whole table once at the end (module doc).

    `metric`/`mode`: the sweep's objective, the table's first metric column and what "best" means; `method`: the
    method of trials whose space does not sample loss.method. Its rows are part of the experiment state
    (get_state/set_state), so a resumed sweep keeps them.
    """

    def __init__(self, out_dir: Path, collapse_stop: CollapseStopConfig, scheduler: str, interval_s: float = 10.0,
                 stream=None, *, metric: str | None = None, mode: str = "max", method: str = ""):
        self.out_dir = Path(out_dir)
        self.collapse_stop = collapse_stop
        self.scheduler = scheduler
        self.interval_s = interval_s
        self.stream = stream  # None: sys.stdout at print time (a stream does not pickle)
        self.metric, self.mode, self.method = metric, mode, method
        self.rows: dict[str, dict] = {}
        self.interrupted: list[str] = []  # trials the sweep left unfinished (Ctrl+C), set at its end
        self._reset_console()

    def _reset_console(self) -> None:
        self._last_print = 0.0
        self._start = time.monotonic()
        self._drawn = 0  # lines of the table now on the terminal, redrawn in place
        self._announced: set[str] = set()  # trials whose start this session printed
        self._fresh = False  # results arrived since the last progress line

    # --- state carried across a resumed sweep (the console's own counters start again)
    def get_state(self) -> dict:
        return {"rows": self.rows}

    def set_state(self, state: dict) -> None:
        self.rows = dict(state.get("rows", {}))

    def __setstate__(self, state: dict) -> None:  # an unpickled monitor (Ray's saved callbacks) draws afresh
        self.__dict__.update(state)
        self._reset_console()

    def _row(self, trial, result: dict | None, status: str | None = None, reason: str = "") -> dict:
        row = self.rows.setdefault(trial.trial_id, {"trial_id": trial.trial_id, "config_id": config_id(trial.config)})
        number = trial_number(trial)
        if number is not None:
            row[TAG_TRIAL_NUMBER] = number
        row.update({f"{PARAM_PREFIX}{k}": v for k, v in trial.config.items()})
        row.setdefault("method", trial.config.get("loss.method") or self.method)
        if result:
            row["method"] = result.get("method") or row["method"]
            for k in (*FINAL_COLUMNS, *([self.metric] if self.metric else [])):
                if k in result:
                    row[k] = result[k]
            row["status"] = result.get("status", "")
        if status:
            row["status"] = status
            row["stop_reason"] = reason
        return row

    # --- Ray Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial, None)
        if self._tty():
            self._redraw(trials)
        elif trial.trial_id not in self._announced:
            self._announced.add(trial.trial_id)
            self._print(f"start  {self._describe(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._row(trial, result)
        self._fresh = True

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trials, trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trials, trial, str(getattr(trial, "error_file", "") or "error"))

    def _end(self, trials, trial, error: str | None) -> None:
        result = trial.last_result or {}
        status, reason = trial_outcome(result, self.collapse_stop, self.scheduler, error)
        row = self._row(trial, result, status, reason)
        self.write_csv()
        if self._tty():
            self._redraw(trials)
            return
        state = short_state(status, reason)
        detail = f" ({reason})" if reason and reason != state else ""
        epoch = f"  epoch {row['epoch']}" if "epoch" in row else ""
        metrics = " ".join(f"{h}={fmt_number(row[k])}" for h, k in metric_columns(self.metric)
                           if k in row and k != "epoch")
        self._print(f"end    {self._label(trial)}  {state}{detail[:100]}{epoch}  {metrics}".rstrip())

    def on_step_end(self, iteration, trials, **info):
        tty = self._tty()
        if time.monotonic() - self._last_print < (min(self.interval_s, TTY_INTERVAL_S) if tty else self.interval_s):
            return
        if tty:
            self._redraw(trials)
        elif self._fresh:  # a quiet sweep (all trials pending) adds no lines
            self._print(self.progress(trials))

    def on_experiment_end(self, trials, **info):
        """A trial Ray did not end (no on_trial_complete/error: the sweep was interrupted, Ctrl+C) is marked
        interrupted; a resumed sweep runs it again. Then the whole table, once (in place on a terminal)."""
        self.interrupted = []
        for t in trials:
            if self.rows.get(t.trial_id, {}).get("status") not in ENDED:
                self._row(t, None, "interrupted", "")
                self.interrupted.append(t.trial_id)
        self.write_csv()
        if self._tty():
            self._redraw(trials, fit=False)
        elif trials:
            self._print("\n".join([*table_lines(_by_number(trials), self.rows, self.metric, self.method),
                                   self.progress(trials)]))

    # --- trials.csv
    def write_csv(self) -> None:
        if not self.rows:
            return
        cols = csv_columns(list(self.rows.values()))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / "trials.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for row in sorted(self.rows.values(), key=lambda r: (int(r.get(TAG_TRIAL_NUMBER) or 0), r["trial_id"])):
                w.writerow(row)
        tmp.replace(self.out_dir / "trials.csv")

    # --- the console
    def best(self, trials):
        """The trial with the best objective value reported so far, or None."""
        def value(t):
            v = self.rows.get(t.trial_id, {}).get(self.metric)
            return v if isinstance(v, (int, float)) and math.isfinite(v) else None
        scored = [t for t in trials if value(t) is not None]
        if not scored:
            return None
        return (max if self.mode == "max" else min)(scored, key=value)

    def progress(self, trials) -> str:
        """`[2m05s] 3 running, 5 ended (2 finished, 2 asha, 1 collapse); best #2 (ab12cd34) fewshot_acc=0.52`"""
        states = [_state(t, self.rows) for t in trials]
        ended = [s for s in states if s not in WAITING]
        counts = ", ".join(f"{ended.count(s)} {s}" for s in dict.fromkeys(sorted(ended)))
        waiting = ", ".join(f"{states.count(s)} {s}" for s in WAITING if s in states)
        line = f"[{_clock(time.monotonic() - self._start)}] {waiting or '0 running'}, {len(ended)} ended"
        line += f" ({counts})" if counts else ""
        best = self.best(trials) if self.metric else None
        if best is not None:
            line += f"; best {self._label(best)} {self.metric}={fmt_number(self.rows[best.trial_id][self.metric])}"
        return line

    def _label(self, trial) -> str:
        return trial_label(trial_number(trial), trial.trial_id)

    def _describe(self, trial) -> str:
        method = trial.config.get("loss.method") or self.method
        return " ".join([self._label(trial), *([method] if method else []), *sampled_values(trial.config)])

    def _out(self):
        return self.stream or sys.stdout

    def _tty(self) -> bool:
        isatty = getattr(self._out(), "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def _print(self, text: str) -> None:
        self._last_print = time.monotonic()
        self._fresh = False
        print(text, file=self._out(), flush=True)

    def _redraw(self, trials, fit: bool = True) -> None:
        """Draw the table over its previous drawing: up to its first line, clear to the end of the screen, write.
        Lines are cut to the terminal's width (a wrapped line would throw the count of lines to go up off) and,
        unless `fit` is off (the final table), the rows to its height."""
        size = shutil.get_terminal_size()
        shown = _by_number(trials)
        note = []
        room = size.lines - 3  # header, progress line, one spare line for the cursor
        if fit and len(shown) > max(room, 1):
            keep = sorted(shown, key=lambda t: (_state(t, self.rows) not in WAITING, self._rank(t)))[:max(room - 1, 1)]
            note = [f"... {len(shown) - len(keep)} more trials in trials.csv"]
            shown = _by_number(keep)
        lines = [*table_lines(shown, self.rows, self.metric, self.method), *note, self.progress(trials)]
        lines = [line[:size.columns - 1] for line in lines]
        up = f"\r\x1b[{self._drawn}A" if self._drawn else ""
        self._print(f"{up}\x1b[J" + "\n".join(lines))
        self._drawn = len(lines)

    def _rank(self, trial) -> float:
        """Sort key putting the best objective value first, trials without one last."""
        v = self.rows.get(trial.trial_id, {}).get(self.metric)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return math.inf
        return -v if self.mode == "max" else v


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
