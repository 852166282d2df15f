"""What a study design adds to the analysis: configurations trained several times (repeats), every one to the same
budget. Trials stopped by the total-collapse stopper carried to the final epoch, per-configuration means over
repeats, the test-retest reliability of the objective and of each predictor (the noise ceiling), early prediction
(predictor at epoch e against the objective at the final epoch) and the agreement of two runs' predictor rankings.

Definitions (docs/definitions.md, "Study design"):
- test-retest reliability r: Spearman ρ between repeat 0 and repeat 1 over configurations; for the mean of R
  repeats, Spearman-Brown r_R = R·r / (1 + (R-1)·r).
- noise ceiling of a predictor: √(r_obj,R · r_pred,R), the largest correlation two measures with these
  reliabilities can show (Spearman's attenuation), for the per-configuration means the headline correlates.
numpy and pandas only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ncssl_tune.analysis.stats import selection, sign, spearman

COLLAPSE_STOP = "collapse_total"  # stop_reason prefix of the total-collapse stopper (sweep/monitor.py)


def carry_forward(epochs: pd.DataFrame, runs: pd.DataFrame, until: int) -> pd.DataFrame:
    """Trials ended by the total-collapse stopper keep their last measured values at every later epoch up to
    `until`, flagged `carried` = True: a representation that collapsed to a point stays there (the stopper ends it
    only once it is), and leaving it out of later epochs would drop the worst configurations from every late
    comparison. Trials stopped for any other reason (ASHA) are not carried: their future is unknown.
    epochs: one row per (run_id, epoch); runs: run_id and stop_reason."""
    out = epochs.assign(carried=False)
    if "stop_reason" not in runs or epochs.empty:
        return out
    stopped = runs.loc[runs["stop_reason"].fillna("").astype(str).str.startswith(COLLAPSE_STOP), "run_id"]
    extra = []
    for run_id in stopped:
        own = epochs[epochs["run_id"] == run_id]
        if own.empty:
            continue
        last = own.loc[own["epoch"].astype(int).idxmax()]
        extra += [{**last.to_dict(), "epoch": e, "carried": True} for e in range(int(last["epoch"]) + 1, until + 1)]
    return pd.concat([out, pd.DataFrame(extra)], ignore_index=True) if extra else out


def config_means(epochs: pd.DataFrame, runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """One row per (config_id, epoch): the mean of `columns` over the repeats measured there (`n_repeats` of
    them). The row's run_id is the configuration's id, so the per-trial statistics apply to configurations."""
    e = epochs.merge(runs[["run_id", "config_id"]], on="run_id")
    cols = [c for c in columns if c in e]
    num = e[cols].apply(pd.to_numeric, errors="coerce")
    g = pd.concat([e[["config_id", "epoch"]], num], axis=1).groupby(["config_id", "epoch"], as_index=False)
    out = g.mean(numeric_only=True).merge(g.size().rename(columns={"size": "n_repeats"}), on=["config_id", "epoch"])
    return out.rename(columns={"config_id": "run_id"})


def spearman_brown(r: float, repeats: int) -> float:
    """Reliability of the mean of `repeats` measurements, each of reliability r."""
    return repeats * r / (1 + (repeats - 1) * r)


def retest(epochs: pd.DataFrame, runs: pd.DataFrame, column: str, epoch: int) -> dict[str, Any]:
    """How well repeat 1 of a configuration reproduces repeat 0 in `column` at `epoch` (Spearman over the
    configurations that have both), the reliability of the mean of R repeats (Spearman-Brown), and the
    within-configuration SD (pooled over configurations: √ of the mean within-configuration variance)."""
    e = epochs[epochs["epoch"] == epoch].merge(runs[["run_id", "config_id", "repeat"]], on="run_id")
    if column not in e:
        return {"n_configs": 0, "r": None, "reason": f"{column} not measured at epoch {epoch}"}
    e = e[np.isfinite(pd.to_numeric(e[column], errors="coerce"))]
    wide = e.pivot_table(index="config_id", columns="repeat", values=column, aggfunc="mean")
    repeats = int(runs["repeat"].nunique())
    out: dict[str, Any] = {"n_configs": 0, "repeats": repeats, "r": None, "r_mean": None, "within_sd": None}
    if 0 not in wide or 1 not in wide:
        return {**out, "reason": "no configuration was trained twice"}
    both = wide[[0, 1]].dropna()
    s = spearman(both[0], both[1])
    within = e.groupby("config_id")[column].agg(lambda v: np.var(v.astype(float), ddof=1) if len(v) > 1 else np.nan)
    out.update(n_configs=len(both), r=s["rho"], ci95=s["ci95"],
               within_sd=float(math.sqrt(within.dropna().mean())) if within.notna().any() else None)
    if s["rho"] is not None:
        out["r_mean"] = spearman_brown(s["rho"], repeats) if s["rho"] > -1 / max(repeats - 1, 1) else None
    else:
        out["reason"] = s.get("reason")
    return out


def ceiling(r_objective: float | None, r_predictor: float | None) -> float | None:
    """The largest |ρ| a predictor of reliability r_predictor can show with an objective of reliability
    r_objective (attenuation); None when either reliability is unknown or not positive."""
    if r_objective is None or r_predictor is None or r_objective <= 0 or r_predictor <= 0:
        return None
    return math.sqrt(r_objective * r_predictor)


def early_prediction(cfg: pd.DataFrame, predictors: dict[str, str], objective: str, mode: str,
                     final_epoch: int) -> dict[str, list[dict[str, Any]]]:
    """For every predictor (and the objective itself, measured early) and every epoch e: Spearman ρ of its value at
    e with the objective at `final_epoch`, oriented so that ρ > 0 means "agrees", and the regret of picking the
    configuration it ranks first at e (final objective of the best configuration minus that of the pick).
    cfg: one row per (run_id, epoch) — configurations from config_means, or trials."""
    final = cfg[cfg["epoch"] == final_epoch].set_index("run_id")[objective].astype(float)
    final = final[np.isfinite(final)]
    out: dict[str, list[dict[str, Any]]] = {}
    for p, direction in {**predictors, objective: mode}.items():
        if p not in cfg:
            continue
        rows = []
        for ep in sorted(int(e) for e in cfg["epoch"].unique() if e <= final_epoch):
            at = cfg[cfg["epoch"] == ep].set_index("run_id")[p].astype(float)
            ids = [i for i in at.index if i in final.index and np.isfinite(at[i])]
            if not ids:
                continue
            s = spearman(sign(direction) * at[ids].to_numpy(), sign(mode) * final[ids].to_numpy())
            sel = selection(at[ids].to_numpy(), final[ids].to_numpy(), np.array(ids), direction, mode)
            rows.append({"epoch": ep, "n": s["n"], "rho": s["rho"], "ci95": s["ci95"],
                         "regret": sel["regret"] if sel else None,
                         "random_regret": sel["random_regret"] if sel else None})
        out[p] = rows
    return out


def kendall_tau(a: list[str], b: list[str]) -> float | None:
    """Kendall's τ-a between two rankings of the same items (best first); items in only one are left out."""
    common = [x for x in a if x in b]
    n = len(common)
    if n < 2:
        return None
    pos = {x: i for i, x in enumerate(b)}
    concordant = sum(1 if pos[common[i]] < pos[common[j]] else -1 for i in range(n) for j in range(i + 1, n))
    return concordant / (n * (n - 1) / 2)


def is_study(runs: pd.DataFrame) -> bool:
    """Whether a sweep trained some configuration more than once (search.repeats > 1)."""
    return "config_id" in runs and bool(runs["config_id"].astype(str).str.len().gt(0).all()) \
        and runs["config_id"].duplicated().any()


def with_repeat_index(runs: pd.DataFrame, seed_col: str = "param.train.seed") -> pd.DataFrame:
    """Repeat r of a configuration = its r-th training seed in increasing order (repeat 0 trains with train.seed)."""
    key = pd.to_numeric(runs[seed_col], errors="coerce") if seed_col in runs else runs["trial_id"].rank()
    return runs.assign(repeat=key.groupby(runs["config_id"]).rank(method="first").astype(int) - 1)


def _config_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: run_id and trial_id are its config_id; its collapse class is `none` only when
    every repeat ended healthy, else the class most of its repeats ended in; params from its first repeat."""
    def collapse(c: pd.Series) -> str:
        c = c.fillna("").astype(str)
        bad = c[c != "none"]
        return "none" if bad.empty else str(bad.mode().iloc[0])

    first = runs.sort_values("repeat").groupby("config_id", as_index=False).first()
    first["collapse"] = first["config_id"].map(runs.groupby("config_id")["collapse"].agg(collapse))
    return first.assign(run_id=first["config_id"], trial_id=first["config_id"])


def analyze_study(runs: pd.DataFrame, epochs: pd.DataFrame, objective: str, mode: str, predictors: dict[str, str],
          baselines: dict[str, str], scope_of, drivers_of, min_configs: int) -> dict[str, Any]:
    """The analysis of a study (configurations × repeats, every one to the same final epoch): per scope the
    predictors and baselines against the objective over per-configuration means at each epoch (headline: the final
    epoch), the noise ceiling of each, early prediction and the drivers at the final epoch.
    runs: healthy-or-collapsed trials (failed ones excluded) with config_id; scope_of(runs) -> {name: runs};
    drivers_of(config rows) -> drivers; equal_budget comes from stats."""
    from ncssl_tune.analysis.stats import equal_budget

    runs = with_repeat_index(runs)
    final = int(epochs["epoch"].max())
    carried = carry_forward(epochs[epochs["run_id"].isin(runs["run_id"])], runs, until=final)
    every = {**predictors, **baselines}
    cfg = config_means(carried, runs, [objective, *every])
    configs = _config_rows(runs)
    scopes = {name: equal_budget(cfg, _config_rows(r), every, objective, mode, min_configs)
              for name, r in scope_of(runs).items()}
    obj = retest(carried, runs, objective, final)
    noise = {"objective": obj, "predictors": {}}
    for p in every:
        rel = retest(carried, runs, p, final)
        rel["ceiling"] = ceiling(obj.get("r_mean"), rel.get("r_mean"))
        noise["predictors"][p] = rel
    for s in scopes.values():
        for row in s["table"]:
            row["baseline"] = row["predictor"] in baselines
            row["ceiling"] = noise["predictors"][row["predictor"]]["ceiling"]
    at_final = configs.drop(columns=[c for c in every if c in configs] + [objective], errors="ignore").merge(
        cfg[cfg["epoch"] == final].drop(columns=["epoch"]), on="run_id", how="left")
    return {
        "n_configs": len(configs), "repeats": int(runs["repeat"].max()) + 1, "n_trials": len(runs),
        "final_epoch": final, "baselines": baselines,
        "carried_trials": sorted(carried.loc[carried["carried"], "run_id"].map(
            dict(zip(runs["run_id"], runs["trial_id"]))).unique().tolist()),
        "scopes": scopes, "noise": noise,
        "early": early_prediction(cfg, every, objective, mode, final),
        "drivers": drivers_of(at_final),
    }
