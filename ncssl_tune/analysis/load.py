"""The analysis's MLflow I/O: a sweep's runs in as DataFrames, its report out as artifacts of the parent run.

`load_runs`: one row per trial child run, with the objective, its mode and the reference scores read from the
sweep's parent run; `load_epochs`: one row per trial and epoch; `fetch_spectra`: the final spectra of the trials
the report shows; `log_report`: the report's files onto the parent run. mlflow is imported when first called, and
neither Ray, Optuna nor torch ever: `ncssl-sweep analyze` starts in about a second.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ncssl_tune.analysis.result import REFERENCES
from ncssl_tune.analysis.stats import spectrum_picks
from ncssl_tune.records.runs import child_runs
from ncssl_tune.records.spectra import read_spectrum_csv
from ncssl_tune.records.store import TrackingError, sqlite_path
from ncssl_tune.vocab import (
    OBJECTIVES,
    SPECTRUM_CSV,
    TAG_COLLAPSE,
    TAG_COLLAPSE_H,
    TAG_CONFIG,
    TAG_KIND,
    TAG_METHOD,
    TAG_OBJECTIVE,
    TAG_REASON,
    TAG_STATUS,
    TAG_TRIAL,
    TAG_TRIAL_NUMBER,
)
from ncssl_tune.vocab import PARAM_PREFIX as PARAM

REPORT_FOLDER = "analysis"  # the parent run's artifact folder that receives the report


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    # One progress bar per downloaded spectrum would bury the summary the CLI prints.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(tracking_uri)


def _sweep_info(run) -> dict[str, Any]:
    """Objective, mode and reference scores as the sweep recorded them on its parent run. References: params or
    metrics reference_<name>_<objective>, reference.<name>.<objective> or reference_<name>."""
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
    # the spread of the random-init encoder over its initialisations (core.train.reference_scores)
    sd = metrics.get(f"reference_random_init_sd_{metric}")
    inits = sum(1 for k in metrics if k.startswith("reference_random_init_") and k.endswith(f"_{metric}")
                and k.removesuffix(f"_{metric}").removeprefix("reference_random_init_").isdigit())
    return {"objective": metric, "mode": mode, "reference": ref,
            "reference_sd": {"random_init": sd, "inits": inits} if sd is not None else {}}


def load_runs(experiment: str, tracking_uri: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per trial child run of the sweep's parent run (default: the experiment's latest sweep run):
    run_id, trial_id, method, status, stop_reason, collapse, collapse_h, run_status, final metrics by name,
    params as `param.<dotted key>` (numeric where every value parses). df.attrs holds parent_run_id, experiment,
    objective, mode and reference. Raises TrackingError when the store, the experiment or the objective is missing."""
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
    runs = child_runs(c, exp.experiment_id, parent_run_id)
    rows = []
    for r in runs:
        t = r.data.tags
        rows.append({"run_id": r.info.run_id, "trial_id": t.get(TAG_TRIAL, ""), "method": t.get(TAG_METHOD, ""),
                     "status": t.get(TAG_STATUS, ""), "stop_reason": t.get(TAG_REASON, ""),
                     "config_id": t.get(TAG_CONFIG, ""), "trial_number": t.get(TAG_TRIAL_NUMBER, ""),
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


def log_report(tracking_uri: str, parent_run_id: str, files: Iterable[Path]) -> None:
    """Every file of the report becomes an artifact of the sweep's parent run, in the folder `analysis/`."""
    c = _client(tracking_uri)
    for f in files:
        c.log_artifact(parent_run_id, str(f), REPORT_FOLDER)


def log_parent_summary(tracking_uri: str, parent_run_id: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
    """The sweep's answer (analysis.parent) on its parent run: metrics and tags, the description among them."""
    from mlflow.entities import Metric, RunTag

    c = _client(tracking_uri)
    now = int(time.time() * 1000)
    c.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                tags=[RunTag(k, v) for k, v in tags.items()])
