"""Which label-free metric predicts the sweep's objective, at equal budgets, over a sweep's MLflow runs.

`run_analysis` = `load_runs` (one row per trial child run; the objective, its mode and reference scores read from
the sweep's parent run) + `load_epochs` (one row per trial and epoch) -> `analyze` (numbers, a JSON-safe dict) ->
`write_report` (analysis.json, report.md, PNG plots) -> artifacts of the parent run. Imports neither Ray nor
Optuna: `ncssl-sweep analyze` starts in about a second.

Equal budgets: ASHA stops trials at different epochs, so final values compare trials of different lengths. Every
predictor is instead correlated with the objective at each epoch that at least MIN_TRIALS_PER_EPOCH trials
reached, and the headline is the last such epoch. Scopes: all trials, healthy ones (collapse class `none` at
their last epoch), and each method when a sweep has several. Statistics: analysis_stats; report: analysis_report.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ncssl_tune.analysis.report import spectrum_picks, summary_lines, write_report
from ncssl_tune.analysis.stats import MIN_TRIALS_PER_EPOCH, driver, equal_budget, failed, swept_params
from ncssl_tune.records.spectra import read_spectrum_csv
from ncssl_tune.records.store import TrackingError, check_tracking_uri, sqlite_path
from ncssl_tune.vocab import (
    LABEL_FREE,
    OBJECTIVES,
    PARENT_TAG,
    SPECTRUM_CSV,
    TAG_COLLAPSE,
    TAG_COLLAPSE_H,
    TAG_KIND,
    TAG_METHOD,
    TAG_OBJECTIVE,
    TAG_REASON,
    TAG_STATUS,
    TAG_TRIAL,
)
from ncssl_tune.vocab import PARAM_PREFIX as PARAM

__all__ = ["analyze", "load_epochs", "load_runs", "run_analysis", "summary_lines", "write_report"]

# Parent-run params or metrics reference_<name>_<objective>, reference.<name>.<objective> or reference_<name>:
# the objective's score without SSL (a randomly initialised encoder, raw pixels).
REFERENCES = ("random_init", "pixels")
DRIVER_RESPONSE = "effective_rank"  # what "drives collapse" is measured on


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    # One progress bar per downloaded spectrum would bury the summary the CLI prints.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(tracking_uri)


def _sweep_info(run) -> dict[str, Any]:
    """Objective, mode and reference scores as the sweep recorded them on its parent run."""
    params, metrics = run.data.params, run.data.metrics
    metric = params.get("search.metric")
    if not metric:
        raise TrackingError(f"sweep run {run.info.run_id} records no param search.metric, so the objective to "
                            f"correlate with is unknown")
    mode = params.get("search.mode")
    if mode not in ("max", "min"):  # "null": the objective's natural direction, also in the tag `objective`
        tag = run.data.tags.get(TAG_OBJECTIVE, "")
        mode = tag[tag.rfind("(") + 1:-1] if tag.endswith(("(max)", "(min)")) else OBJECTIVES.get(metric)
    if mode is None:
        raise TrackingError(f"sweep run {run.info.run_id}: objective {metric!r} has no recorded search.mode and no "
                            f"known direction")
    ref = {}
    for name in REFERENCES:  # the objective's own reference score first, then a plain one
        keys = (f"reference_{name}_{metric}", f"reference.{name}.{metric}", f"reference_{name}")
        raw = next((d[k] for k in keys for d in (metrics, params) if k in d), None)
        try:
            ref[name] = float(raw) if raw is not None else None
        except ValueError:
            ref[name] = None
    return {"objective": metric, "mode": mode, "reference": ref}


def load_runs(experiment: str, tracking_uri: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per trial child run of the sweep's parent run (default: the experiment's latest sweep run):
    run_id, trial_id, method, status, stop_reason, collapse, collapse_h, run_status, final metrics by name,
    params as `param.<dotted key>` (numeric where every value parses). df.attrs holds parent_run_id, experiment,
    objective, mode and reference. Raises TrackingError when the store, the experiment or the objective is missing."""
    check_tracking_uri(tracking_uri)
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():  # MLflow would quietly create an empty database there
        raise TrackingError(f"no MLflow database at {db} ({tracking_uri}); pass the --tracking-uri the sweep used "
                            f"(default: sqlite:///RESULTS_DIR/mlflow.db)")
    c = _client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"no MLflow experiment {experiment!r} at {tracking_uri}; the experiment is named after "
                            f"the sweep (its name: or --name)")
    if parent_run_id is None:
        parents = c.search_runs([exp.experiment_id], f"tags.{TAG_KIND} = 'sweep'", max_results=1,
                                order_by=["attributes.start_time DESC"])
        if not parents:
            raise TrackingError(f"experiment {experiment!r} at {tracking_uri} holds no sweep run")
        parent_run_id = parents[0].info.run_id
    info = _sweep_info(c.get_run(parent_run_id))
    runs, token = [], None
    while True:
        page = c.search_runs([exp.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000,
                             page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    rows = []
    for r in runs:
        t = r.data.tags
        rows.append({"run_id": r.info.run_id, "trial_id": t.get(TAG_TRIAL, ""), "method": t.get(TAG_METHOD, ""),
                     "status": t.get(TAG_STATUS, ""), "stop_reason": t.get(TAG_REASON, ""),
                     "collapse": t.get(TAG_COLLAPSE, ""), "collapse_h": t.get(TAG_COLLAPSE_H, ""),
                     "run_status": r.info.status, **r.data.metrics,
                     **{PARAM + k: v for k, v in r.data.params.items()}})
    df = pd.DataFrame(rows, columns=None if rows else ["run_id", "trial_id", "method", "status", "run_status"])
    for col in [c for c in df.columns if c.startswith(PARAM)]:
        raw = df[col].where(df[col] != "null")
        num = pd.to_numeric(raw, errors="coerce")
        if num.notna().sum() == raw.notna().sum():
            df[col] = num
    df = df.sort_values("trial_id", ignore_index=True)
    df.attrs.update(parent_run_id=parent_run_id, experiment=experiment, **info)
    return df


def load_epochs(tracking_uri: str, run_ids: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per (run_id, epoch) with a column per metric (NaN where a run did not log it at that epoch)."""
    c = _client(tracking_uri)
    points: dict[tuple[str, int], dict[str, float]] = {}
    for run_id in run_ids:
        for m in metrics:
            for h in c.get_metric_history(run_id, m):
                points.setdefault((run_id, int(h.step)), {})[m] = h.value
    rows = [{"run_id": r, "epoch": e, **v} for (r, e), v in sorted(points.items())]
    return pd.DataFrame(rows, columns=["run_id", "epoch", *metrics]).reindex(columns=["run_id", "epoch", *metrics])


def _normalize(df: pd.DataFrame, numeric: list[str]) -> pd.DataFrame:
    """The columns analyze and the plots rely on, added when absent (e.g. a hand-made frame)."""
    df = df.copy()
    for col in ("run_id", "trial_id", "method", "status", "run_status", "collapse"):
        if col not in df:
            df[col] = df.index.astype(str) if col in ("run_id", "trial_id") else ""
    for col in numeric:
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
    return df


def scopes(ok: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """all, healthy (collapse of z `none` at the trial's last epoch) and, with several methods, one per method."""
    out = {"all": ok, "healthy": ok[ok["collapse"] == "none"]}
    methods = sorted(m for m in ok["method"].dropna().unique() if m)
    if len(methods) > 1:
        out.update({f"method={m}": ok[ok["method"] == m] for m in methods})
    return out


def predictors_of(epochs: pd.DataFrame, objective: str) -> dict[str, str]:
    """The label-free metrics the runs logged, with their direction; the objective itself is not its predictor."""
    return {p: d for p, d in LABEL_FREE.items()
            if p != objective and p in epochs and np.isfinite(epochs[p].astype(float)).any()}


def analyze(runs: pd.DataFrame, epochs: pd.DataFrame, objective: str, mode: str,
            reference: dict[str, float | None] | None = None, min_trials: int = MIN_TRIALS_PER_EPOCH) -> dict:
    """Equal-budget predictor study per scope, plus the hyperparameters that move the final effective rank.
    runs: one row per trial (final metrics, tags, param.* columns); epochs: one row per (run_id, epoch)."""
    runs = _normalize(runs, [DRIVER_RESPONSE, objective])
    bad = failed(runs)
    ok = runs[~bad]
    predictors = predictors_of(epochs, objective)
    result: dict[str, Any] = {
        "objective": {"metric": objective, "mode": mode},
        "n_trials": len(runs),
        "status_counts": {str(k): int(v) for k, v in runs["status"].value_counts().items()},
        "collapse_counts": {str(k): int(v) for k, v in ok["collapse"].value_counts().items() if k},
        "excluded": {"diverged_or_failed": int(bad.sum())},
        "predictors": predictors,
        "min_trials_per_epoch": min_trials,
        "scopes": {name: equal_budget(epochs, s, predictors, objective, mode, min_trials)
                   for name, s in scopes(ok).items()},
        "reference": {k: (reference or {}).get(k) for k in REFERENCES},
    }
    drivers = [driver(ok, c, DRIVER_RESPONSE, (objective,)) for c in swept_params(ok)]
    result["drivers"] = sorted(drivers, key=lambda d: -d["strength"])
    return _json_safe(result)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def fetch_spectra(tracking_uri: str, runs: pd.DataFrame, objective: str, mode: str) -> dict[str, dict]:
    """The spectra of the trials spectrum_picks shows, downloaded for those picks only: a trial without one is
    dropped and the picks are made again among the rest."""
    from mlflow.exceptions import MlflowException

    c, out, missing = _client(tracking_uri), {}, set()
    with tempfile.TemporaryDirectory() as tmp:
        while True:
            available = set(runs["run_id"]) - missing
            wanted = [r["run_id"] for r in spectrum_picks(runs, objective, mode, available).values()]
            todo = [r for r in wanted if r not in out]
            if not todo:
                return {r: out[r] for r in wanted}
            for run_id in todo:
                try:
                    out[run_id] = read_spectrum_csv(c.download_artifacts(run_id, SPECTRUM_CSV, Path(tmp) / run_id))
                except (MlflowException, OSError):
                    missing.add(run_id)  # no spectrum logged for this trial


def run_analysis(experiment: str, tracking_uri: str, out_dir: str | Path, log_to_parent: bool = True,
                 parent_run_id: str | None = None) -> dict:
    """load_runs + load_epochs -> analyze -> write_report into out_dir; every file also becomes an artifact
    (folder `analysis/`) of the sweep's parent run."""
    df = load_runs(experiment, tracking_uri, parent_run_id)
    objective, mode = df.attrs["objective"], df.attrs["mode"]
    logged = [m for m in [*LABEL_FREE, objective, "probe_epoch"] if m in df.columns]
    epochs = load_epochs(tracking_uri, list(df["run_id"]), list(dict.fromkeys(logged)))
    result = analyze(df, epochs, objective, mode, df.attrs["reference"])
    result.update(experiment=experiment, parent_run_id=df.attrs["parent_run_id"])
    df = _normalize(df, [DRIVER_RESPONSE, objective])
    spectra = fetch_spectra(tracking_uri, df, objective, mode)
    files = write_report(result, df, epochs, out_dir, spectra)
    if log_to_parent:
        c = _client(tracking_uri)
        for f in files:
            c.log_artifact(df.attrs["parent_run_id"], str(f), "analysis")
    return result
