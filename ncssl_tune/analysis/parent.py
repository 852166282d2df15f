"""The sweep's answer on its parent run, where MLflow's runs page lands: the best trial and its score, the
headline predictor with its ρ, and a short markdown description (MLflow's run description, tag
mlflow.note.content) that names them with the references and where the report is. Pure functions of the
analysis result and the loaded runs; load.log_parent_summary writes them."""

from __future__ import annotations

import math

import pandas as pd

from ncssl_tune.analysis.result import REFERENCES, AnalysisResult, TableRow
from ncssl_tune.analysis.stats import failed
from ncssl_tune.naming import fmt_number, trial_label
from ncssl_tune.vocab import BEST_PREFIX, TAG_BEST_TRIAL, TAG_HEADLINE_PREDICTOR, TAG_HEADLINE_RHO, TAG_NOTE

REPORT_ARTIFACT = "analysis/report.html"  # load.REPORT_FOLDER + report.write_report's rendered report


def best_trial(runs: pd.DataFrame, objective: str, mode: str) -> pd.Series | None:
    """The trial with the best last value of the objective among those that did not fail, as the sweep's export
    picks it (sweep/export.py); None when no trial has a value."""
    if objective not in runs or runs.empty:
        return None
    ok = runs[~failed(runs)]
    values = pd.to_numeric(ok[objective], errors="coerce")
    values = values[values.map(lambda v: math.isfinite(v))]
    if values.empty:
        return None
    return ok.loc[values.idxmax() if mode == "max" else values.idxmin()]


def headline(result: AnalysisResult) -> TableRow | None:
    """The first row of the equal-budget ranking over all trials (the best ρ), or None without one. For a study,
    its per-configuration ranking (the answer its report leads with)."""
    scope = (result.get("study") or result)["scopes"].get("all") or {}
    return next((r for r in scope.get("table") or [] if r.get("rho") is not None and not r.get("baseline")), None)


def label(row: pd.Series) -> str:
    """`#12 (249dd059)`, as the console and trials.csv name the trial."""
    number = str(row.get("trial_number", ""))
    return trial_label(int(number) if number.isdigit() else None, str(row.get("trial_id", "")))


def parent_summary(result: AnalysisResult, runs: pd.DataFrame) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) for the parent run: best_<objective>, best_trial, headline_predictor, headline_rho and the
    description. Without a finished trial there is no best; without a headline epoch the headline reads none."""
    objective, mode = result["objective"]["metric"], result["objective"]["mode"]
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    lines = [f"**Objective**: {objective} ({mode})"]
    best = best_trial(runs, objective, mode)
    if best is not None:
        metrics[BEST_PREFIX + objective] = float(best[objective])
        tags[TAG_BEST_TRIAL] = label(best)
        lines.append(f"**Best trial**: {tags[TAG_BEST_TRIAL]}, {objective} = {fmt_number(float(best[objective]))}")
    refs = [f"{name.replace('_', '-')} {fmt_number(v)}" for name in REFERENCES
            if (v := (result.get("reference") or {}).get(name)) is not None]
    if refs:
        lines.append(f"**References** ({objective}): {', '.join(refs)}")
    top = headline(result)
    if top is not None:
        tags[TAG_HEADLINE_PREDICTOR] = top["predictor"]
        tags[TAG_HEADLINE_RHO] = f"{top['rho']:.3f}"
        ci = top.get("ci95")
        interval = f" [{fmt_number(ci[0])}, {fmt_number(ci[1])}]" if ci and None not in ci else ""
        lines.append(f"**Headline predictor**: {top['predictor']}, Spearman ρ = {fmt_number(top['rho'])}{interval}"
                     f" (n = {top['n']})")
    else:  # written too, so that an earlier analysis's headline does not stay on the run
        tags[TAG_HEADLINE_PREDICTOR], tags[TAG_HEADLINE_RHO] = "none", ""
        lines.append("**Headline predictor**: none (no epoch reached by enough trials)")
    lines.append(f"**Report**: artifact `{REPORT_ARTIFACT}` (also report.md, analysis.json)")
    tags[TAG_NOTE] = "\n\n".join(lines)
    return metrics, tags
