"""The statistics of the analysis: Spearman ρ with a Fisher-z interval and p-value, label-free selection regret,
the equal-budget study (every predictor against the objective at each epoch enough trials reached), the
hyperparameters that drive collapse and the trials whose spectra are shown. numpy and pandas only (scipy.stats
alone takes a second to import). The parts they return are described in analysis.result.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ncssl_tune.analysis.result import Driver, Selection
from ncssl_tune.vocab import CARRIED_PREFIX, FAILED
from ncssl_tune.vocab import PARAM_PREFIX as PARAM

MIN_N = 4  # Fisher z needs n - 3 > 0
WARN_N = 8  # below this, a visible warning: the interval is an approximation on very few points
MIN_TRIALS_PER_EPOCH = 6  # an epoch enters the equal-budget study when at least this many trials reached it
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def failed(df: pd.DataFrame) -> pd.Series:
    """Trials that diverged or errored (by status tag or MLflow run status)."""
    return df["status"].isin(FAILED) | (df["run_status"] == "FAILED")


def spearman(x, y) -> dict[str, Any]:
    """Spearman ρ (ties averaged) with a 95% interval and two-sided p from one and the same approximation.

    Fisher z with Bonett & Wright's (2000) variance for Spearman's ρ, (1 + ρ²/2) / (n - 3): the interval excludes
    0 exactly when p < 0.05. |ρ| = 1 has no finite z; it is replaced, for the interval and p only, by the midpoint
    between 1 and the next value ρ can take (one adjacent swap), 1 - 6/(n(n² - 1)), so a perfect order of 4 trials
    gets p ≈ 0.2, not 0 (the exact permutation p is 0.083); that end of the interval is then ±1.
    Returns n, rho, ci95, p and, when they apply, `reason` (no statistic) and `warning` (n < WARN_N).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    out: dict[str, Any] = {"n": n, "rho": None, "ci95": None, "p": None}
    if n < MIN_N:
        return {**out, "reason": f"needs at least {MIN_N} trials, got {n}"}
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {**out, "reason": f"{'the predictor' if np.ptp(x) == 0 else 'the objective'} is constant "
                                 f"across the {n} trials"}
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()  # ties get their average rank
    rho = float(np.corrcoef(rx, ry)[0, 1])
    r_max = 1 - 6 / (n * (n * n - 1))
    if abs(rho) > r_max:  # a perfect order, up to roundoff (0.9999999999999967)
        rho = math.copysign(1.0, rho)
    z = math.atanh(max(-r_max, min(r_max, rho)))
    se = math.sqrt((1 + rho * rho / 2) / (n - 3))
    lo, hi = math.tanh(z - Z95 * se), math.tanh(z + Z95 * se)
    if abs(rho) == 1.0:
        lo, hi = (lo, 1.0) if rho > 0 else (-1.0, hi)
    out.update(rho=rho, ci95=[lo, hi], p=math.erfc(abs(z) / se / math.sqrt(2)))  # two-sided normal tail
    if n < WARN_N:
        out["warning"] = f"only {n} trials: treat as anecdotal"
    return out


def sign(mode: str) -> int:
    return 1 if mode == "max" else -1


def selection(pred, obj, trial_ids, direction: str, mode: str) -> Selection | None:
    """Pick the trial with the best predictor value (in `direction`); regret = how much worse its objective is than
    the best trial's (in `mode`, so >= 0). Tied picks share the mean regret. Also the expected regret of a uniformly
    random pick among the same trials."""
    pred, obj = np.asarray(pred, float), np.asarray(obj, float)
    if len(pred) == 0:
        return None
    good = sign(mode) * obj  # larger is better
    regret = good.max() - good  # (n,)
    score = sign(direction) * pred
    picked = np.flatnonzero(score == score.max())
    i_best = int(np.argmax(good))
    return {"selected_trial": str(trial_ids[picked[0]]), "n_tied": len(picked),
            "selected_objective": float(obj[picked].mean()), "best_trial": str(trial_ids[i_best]),
            "best_objective": float(obj[i_best]), "regret": float(regret[picked].mean()),
            "random_regret": float(regret.mean())}


def spectrum_picks(runs: pd.DataFrame, objective: str, mode: str, available: set[str]) -> dict[str, pd.Series]:
    """Distinct trials by final objective among those with a spectrum in `available`: best, median and worst (as
    many as there are trials), plus the first collapsed one (collapse total or dimensional) when none of those is."""
    u = runs[~failed(runs) & runs["run_id"].isin(available) & np.isfinite(runs[objective].astype(float))]
    if u.empty:
        return {}
    u = u.assign(_good=sign(mode) * u[objective].astype(float)).sort_values("_good", ascending=False,
                                                                              ignore_index=True)
    idx = {"best": 0, "worst": len(u) - 1, "median": len(u) // 2}  # in this order: 2 trials are best and worst
    chosen: dict[str, int] = {}
    for label, i in idx.items():
        if i not in chosen.values():
            chosen[label] = i
    picks = {label: u.iloc[chosen[label]] for label in ("best", "median", "worst") if label in chosen}
    seen = set(chosen.values())
    collapsed = u[u["collapse"].isin(["total", "dimensional"])]
    if len(collapsed) and not (set(collapsed.index) & seen):
        row = collapsed.iloc[0]
        picks[f"collapsed ({row['collapse']})"] = row
    return picks


def fresh(epochs: pd.DataFrame, objective: str) -> pd.Series:
    """Rows whose objective was measured at that epoch. The linear probe's outputs (probe_acc, probe_*) are
    computed on a schedule and carried in between (probe_epoch says when they were measured): a carried value would
    compare trials at unequal budgets again. Every other metric (kNN, the few-labels probe, the label-free ones) is
    reported only at the epochs it is measured."""
    ok = np.isfinite(epochs[objective].astype(float)) if objective in epochs else pd.Series(False, epochs.index)
    if objective.startswith(CARRIED_PREFIX) and "probe_epoch" in epochs:
        ok &= epochs["probe_epoch"].astype(float) == epochs["epoch"].astype(float)
    return ok


def equal_budget(epochs: pd.DataFrame, trials: pd.DataFrame, predictors: dict[str, str], objective: str,
                 mode: str, min_trials: int = MIN_TRIALS_PER_EPOCH) -> dict[str, Any]:
    """Each predictor against the objective at every epoch that >= min_trials of `trials` reached (objective measured
    there); the headline is the last such epoch. epochs: one row per (run_id, epoch) with a column per metric;
    trials: one row per trial with run_id and trial_id. rho is Spearman's ρ of the predictor oriented so that larger
    means better (× -1 for `min` predictors) with the objective oriented the same way, so ρ > 0 always means "agrees".
    Returns a result.Scope with int epoch keys (analyze makes them strings, as JSON has them).
    """
    e = epochs[epochs["run_id"].isin(trials["run_id"]) & fresh(epochs, objective)]
    counts = e.groupby("epoch")["run_id"].nunique()
    reached = sorted(int(k) for k, v in counts.items() if v >= min_trials)
    out: dict[str, Any] = {"n_trials": len(trials), "min_trials": min_trials,
                           "epochs": {int(k): int(v) for k, v in counts.items()}, "qualifying_epochs": reached,
                           "headline_epoch": reached[-1] if reached else None, "curves": {}, "table": []}
    if not reached:
        most = int(counts.max()) if len(counts) else 0
        out["reason"] = f"no epoch was reached by {min_trials} trials (at most {most})"
        return out
    names = dict(zip(trials["run_id"], trials["trial_id"]))
    obj_sign = sign(mode)
    for p, direction in predictors.items():
        curve = []
        for ep in reached:
            rows = _rows(e, ep, p)
            s = spearman(sign(direction) * rows[p], obj_sign * rows[objective])
            curve.append({"epoch": ep, **{k: s[k] for k in ("n", "rho", "ci95", "p")}})
        out["curves"][p] = curve
    head = out["headline_epoch"]
    out["headline_trials"] = sorted(names[r] for r in e[e["epoch"] == head]["run_id"].unique())
    table = []
    for p, direction in predictors.items():
        rows = _rows(e, head, p)
        s = spearman(sign(direction) * rows[p], obj_sign * rows[objective])
        sel = selection(rows[p], rows[objective], rows["run_id"].map(names).to_numpy(), direction, mode)
        table.append({"predictor": p, "direction": direction, **s, "selection": sel})
    # competition ranks (1, 2, 2, 4): equal values, e.g. effective_rank and its _frac at one width, share a rank
    rho_key = [-r["rho"] if r["rho"] is not None else math.inf for r in table]
    regret_key = [r["selection"]["regret"] if r["selection"] else math.inf for r in table]
    for r, a, b in zip(table, rho_key, regret_key):
        r["rank_rho"] = 1 + sum(k < a for k in rho_key)
        r["rank_regret"] = 1 + sum(k < b for k in regret_key)
    out["table"] = sorted(table, key=lambda r: r["rank_rho"])
    return out


def _rows(e: pd.DataFrame, epoch: int, predictor: str) -> pd.DataFrame:
    rows = e[e["epoch"] == epoch]
    if predictor not in rows:
        return rows.iloc[:0].assign(**{predictor: np.nan})
    return rows[np.isfinite(rows[predictor].astype(float))]


def swept_params(df: pd.DataFrame) -> list[str]:
    """Param columns whose values vary across the trials (the sampled hyperparameters)."""
    return [c for c in df.columns if c.startswith(PARAM) and df[c].dropna().astype(str).nunique() > 1]


def driver(df: pd.DataFrame, col: str, response: str, also: tuple[str, ...]) -> Driver:
    """How strongly the hyperparameter `col` moves `response` (final values): |Spearman ρ| for a numeric one, the
    correlation ratio η for a categorical one (with per-value means of `response` and of `also`)."""
    d = df[df[col].notna()]
    out: Any = {"param": col[len(PARAM):], "n": len(d)}  # a Driver, with keys named after metrics
    metrics = (response, *also)
    if pd.api.types.is_numeric_dtype(d[col]):
        out["kind"] = "numeric"
        for metric in metrics:
            m = d[np.isfinite(d[metric].astype(float))] if metric in d else d.iloc[:0]
            s = spearman(m[col].astype(float), m[metric].astype(float)) if metric in d else {"rho": None}
            out[metric] = {"rho": s["rho"], "p": s["p"], "n": s["n"]} if s["rho"] is not None else None
        out["strength"] = abs(out[response]["rho"]) if out[response] else 0.0
        return out
    out["kind"] = "categorical"
    groups = d.groupby(d[col].astype(str))
    out["values"] = {str(v): {"n": len(g), **{m: _mean(g[m]) if m in g else None for m in metrics}}
                     for v, g in groups}
    r = d[response].astype(float)
    r = r[np.isfinite(r)]
    total = float(((r - r.mean()) ** 2).sum())
    between = sum(len(g) * (g.mean() - r.mean()) ** 2 for _, g in r.groupby(d.loc[r.index, col].astype(str)))
    out["strength"] = math.sqrt(between / total) if total > 0 else 0.0  # correlation ratio eta, in [0, 1]
    return out


def _mean(s: pd.Series) -> float | None:
    s = s.astype(float)
    s = s[np.isfinite(s)]
    return float(s.mean()) if len(s) else None
