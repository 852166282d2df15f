"""Which label-free metric predicts the sweep's objective, at equal budgets, over a sweep's MLflow runs.

`run_analysis` = `load_runs` (one row per trial child run; the objective, its mode and reference scores read from
the sweep's parent run) + `load_epochs` (one row per trial and epoch) -> `analyze` (an AnalysisResult, plain
JSON; analysis.result documents every field) -> `write_report` (analysis.json, report.md, PNG plots) ->
artifacts of the parent run. Imports neither Ray nor Optuna: `ncssl-sweep analyze` starts in about a second.

Equal budgets: ASHA stops trials at different epochs, so final values compare trials of different lengths. Every
predictor is instead correlated with the objective at each epoch that at least MIN_TRIALS_PER_EPOCH trials
reached, and the headline is the last such epoch. Scopes: all trials, healthy ones (collapse class `none` at
their last epoch), and each method when a sweep has several. Statistics: stats; MLflow I/O: load; report: report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ncssl_tune.analysis.load import fetch_spectra, load_epochs, load_runs, log_parent_summary, log_report
from ncssl_tune.analysis.parent import parent_summary
from ncssl_tune.analysis.repeats import analyze_study, is_study
from ncssl_tune.analysis.report import write_report
from ncssl_tune.analysis.result import REFERENCES, AnalysisResult, Driver, OptunaCounts, Scope
from ncssl_tune.analysis.stats import MIN_TRIALS_PER_EPOCH, driver, equal_budget, failed, swept_params
from ncssl_tune.records.store import check_tracking_uri, quiet_store_setup
from ncssl_tune.vocab import FINISHED, LABEL_FREE, PARAM_PREFIX

DRIVER_RESPONSE = "effective_rank"  # what "drives collapse" is measured on


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


def same_as(scopes_: dict[str, Scope]) -> dict[str, str]:
    """Scope -> an earlier scope whose headline table holds the very same trials at the same epoch (so the same
    numbers): shown once, not twice."""
    out: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, s in scopes_.items():
        key = (s["headline_epoch"], tuple(s.get("headline_trials", ())))
        if s["headline_epoch"] is not None and key in seen:
            out[name] = seen[key]
        seen.setdefault(key, name)
    return out


def analyze(runs: pd.DataFrame, epochs: pd.DataFrame, objective: str, mode: str,
            reference: dict[str, float | None] | None = None,
            min_trials: int = MIN_TRIALS_PER_EPOCH) -> AnalysisResult:
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
    result["drivers"] = drivers_of(ok, objective)
    result["optuna"] = optuna_counts(runs)
    # Each trial's final values: at unequal budgets (ASHA, stoppers) these mix epochs, which the report says.
    result["drivers_epochs"] = sorted({int(e) for e in ok["epoch"].dropna()}) if "epoch" in ok else []
    result["same_as"] = same_as(result["scopes"])
    if (lidar := lidar_rank(ok)) is not None:
        result["lidar"] = lidar
    if is_study(ok):
        # The loss and its named terms are the baselines a label-free predictor has to beat.
        baselines = {c: "min" for c in epochs.columns if c == "loss" or c.startswith("loss_")}
        result["study"] = analyze_study(ok, epochs, objective, mode, predictors, baselines, scopes,
                                lambda rows: drivers_of(rows, objective), min_trials)
    return _json_safe(result)


def optuna_counts(runs: pd.DataFrame) -> OptunaCounts:
    """How many of the sweep's Optuna trials are COMPLETE (analysis.result.OptunaCounts), read from the runs'
    status tags as the searcher tells Optuna: finished is COMPLETE, anything else is not."""
    done = runs["status"] == FINISHED
    if is_study(runs):
        per_config = done.groupby(runs["config_id"]).all()
        return {"complete": int(per_config.sum()), "trials": len(per_config)}
    return {"complete": int(done.sum()), "trials": len(runs)}


def lidar_rank(runs: pd.DataFrame) -> dict[str, Any] | None:
    """Trials whose LiDAR of z cannot work: its within-sample scatter, from K views of M samples, has rank at most
    M(K-1); below the embedding width D the ridge δ fills the rest and LiDAR measures δ (docs/metrics.md)."""
    cols = [f"{PARAM_PREFIX}{k}" for k in ("model.projector", "eval.cond_samples", "eval.cond_views")]
    if not all(c in runs for c in cols) or runs.empty:
        return None
    width = runs[cols[0]].astype(str).str.split("-").str[-1]
    d = pd.to_numeric(width, errors="coerce")
    dof = pd.to_numeric(runs[cols[1]], errors="coerce") * (pd.to_numeric(runs[cols[2]], errors="coerce") - 1)
    bad = dof < d
    return {"trials": int(d.notna().sum()), "rank_deficient": int(bad.sum()),
            "widths": sorted({int(v) for v in d[bad].dropna()}), "views_dof": sorted({int(v) for v in dof.dropna()})}


def drivers_of(rows: pd.DataFrame, objective: str) -> list[Driver]:
    """How each swept hyperparameter moves the final effective rank (and the objective), strongest first. The
    training seed is not a hyperparameter: repeats vary it on purpose."""
    params = [c for c in swept_params(rows) if c != f"{PARAM_PREFIX}train.seed"]
    return sorted((driver(rows, c, DRIVER_RESPONSE, (objective,)) for c in params), key=lambda d: -d["strength"])


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


def run_analysis(experiment: str, tracking_uri: str, out_dir: str | Path, log_to_parent: bool = True,
                 parent_run_id: str | None = None, tracking_checked: bool = False) -> AnalysisResult:
    """load_runs + load_epochs -> analyze -> write_report into out_dir; every file also becomes an artifact
    (folder `analysis/`) of the sweep's parent run. The store is checked first, unless tracking_checked: the
    caller (the CLI) checked it at its own start, and the store is asked once per command."""
    quiet_store_setup()
    if not tracking_checked:
        check_tracking_uri(tracking_uri)
    df = load_runs(experiment, tracking_uri, parent_run_id)
    objective, mode = df.attrs["objective"], df.attrs["mode"]
    losses = [c for c in df.columns if c == "loss" or c.startswith("loss_")]  # the study's baselines
    logged = [m for m in [*LABEL_FREE, objective, "probe_epoch", *losses] if m in df.columns]
    epochs = load_epochs(tracking_uri, list(df["run_id"]), list(dict.fromkeys(logged)))
    result = analyze(df, epochs, objective, mode, df.attrs["reference"])
    if df.attrs.get("reference_sd"):
        result["reference_sd"] = df.attrs["reference_sd"]
    result.update(experiment=experiment, parent_run_id=df.attrs["parent_run_id"])
    df = _normalize(df, [DRIVER_RESPONSE, objective])
    spectra = fetch_spectra(tracking_uri, df, objective, mode)
    files = write_report(result, df, epochs, out_dir, spectra)
    if log_to_parent:
        log_report(tracking_uri, df.attrs["parent_run_id"], files)
        # the answer where MLflow's runs page lands: the parent run's metrics, tags and description
        log_parent_summary(tracking_uri, df.attrs["parent_run_id"], *parent_summary(result, df))
    return result
