"""The analysis as people read it: analysis.json, report.md with its plots, and the console summary. Everything
comes from one AnalysisResult (analysis.result). Numbers are rounded to 3 significant digits here; analysis.json
keeps full precision."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ncssl_tune.analysis import plots
from ncssl_tune.analysis.html import to_html
from ncssl_tune.analysis.report_study import study_markdown, study_summary
from ncssl_tune.analysis.result import AnalysisResult, Scope, TableRow
from ncssl_tune.analysis.stats import WARN_N, spectrum_picks


def g3(v: Any) -> str:
    """3 significant digits; – for a missing value."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.3g}" if isinstance(v, (float, np.floating)) else str(v)


def rho_cell(r: TableRow) -> str:
    if r.get("rho") is None:
        return f"– ({r.get('reason', 'no data')})"
    lo, hi = r["ci95"]
    return f"{g3(r['rho'])} [{g3(lo)}, {g3(hi)}]"


def summary_lines(result: AnalysisResult) -> list[str]:
    """What the console prints after a sweep or `ncssl-sweep analyze`: per scope, the headline epoch and the three
    predictors that agree best with the objective."""
    o = result["objective"]
    lead = study_summary(result)
    lines = [*(lead if result.get("study") else []), (f"objective {o['metric']} ({o['mode']}); label-free predictors ranked by Spearman rho at the last epoch "
             f"that at least {result['min_trials_per_epoch']} trials reached")]
    dup = result["same_as"]
    for name, s in result["scopes"].items():
        if s["headline_epoch"] is None:
            lines.append(f"  {name} ({s['n_trials']} trials): {s.get('reason', 'no data')}")
            continue
        if name in dup:
            lines.append(f"  {name} ({s['n_trials']} trials), epoch {s['headline_epoch']}: the same trials as {dup[name]}")
            continue
        top = [r for r in s["table"] if r["rho"] is not None][:3]
        head = f"  {name} ({s['n_trials']} trials), epoch {s['headline_epoch']}:"
        warn = next((r["warning"] for r in top if r.get("warning")), "")
        lines.append(head + (f" WARNING {warn}" if warn else ""))
        for r in top:
            sel = r["selection"] or {}
            lines.append(f"    {r['predictor']:<22} rho {rho_cell(r)}, p = {g3(r['p'])}, n = {r['n']}; pick regret "
                         f"{g3(sel.get('regret'))} (random pick {g3(sel.get('random_regret'))})")
    return lines if result.get("study") else [*lines, *lead]


def _scope_section(name: str, s: Scope, objective: str, duplicate_of: str | None) -> list[str]:
    lines = [f"### {name} ({s['n_trials']} trials)", ""]
    if s["headline_epoch"] is None:
        return lines + [f"No table: {s.get('reason', 'no data')}.", ""]
    counts = ", ".join(f"{e}: {n}" for e, n in s["epochs"].items())
    lines += [(f"Headline epoch **{s['headline_epoch']}**, the last epoch that at least {s['min_trials']} of these "
              f"trials reached (trials with a fresh {objective} per epoch: {counts})."), ""]
    if duplicate_of:
        return lines + [(f"At epoch {s['headline_epoch']} these are the same {len(s['headline_trials'])} trials as in "
                        f"`{duplicate_of}`: the table is the one above."), ""]
    small = [r for r in s["table"] if r.get("warning")]
    if small:
        lines += [(f"> **Warning: fewer than {WARN_N} trials** ({small[0]['n']}). The intervals are approximations on "
                  "very few points; treat every row as anecdotal."), ""]
    sel0 = next((r["selection"] for r in s["table"] if r["selection"]), None)
    if sel0:
        lines += [(f"Best trial at epoch {s['headline_epoch']}: {sel0['best_trial']} ({objective} = "
                   f"{g3(sel0['best_objective'])}); a random pick loses {g3(sel0['random_regret'])} on average."), ""]
    lines += [(f"| rank ρ | predictor | better | n | Spearman ρ [95% CI] | p | picked trial | its {objective} | "
              "regret | rank regret |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["table"]:
        sel = r["selection"] or {}
        tied = f" (+{sel['n_tied'] - 1} tied)" if sel.get("n_tied", 1) > 1 else ""
        lines.append(f"| {r['rank_rho']} | {r['predictor']} | {'higher' if r['direction'] == 'max' else 'lower'} | "
                     f"{r['n']} | {rho_cell(r)} | {g3(r['p'])} | {sel.get('selected_trial', '–')}{tied} | "
                     f"{g3(sel.get('selected_objective'))} | {g3(sel.get('regret'))} | {r['rank_regret']} |")
    return lines + [""]


def _optuna_note(result: AnalysisResult) -> list[str]:
    """Why optuna-dashboard's hyperparameter importance can disagree with the table below: it reads only the
    study's COMPLETE trials (analysis.result.OptunaCounts), the table every trial that did not fail."""
    counts = result.get("optuna")
    if not counts or counts["complete"] == counts["trials"]:
        return []
    n_ok = result["n_trials"] - result["excluded"]["diverged_or_failed"]
    return [(f"optuna-dashboard's hyperparameter importance is computed on the study's {counts['complete']} COMPLETE "
             f"trials of {counts['trials']}: Optuna holds trials stopped early (ASHA, collapse) as PRUNED and "
             f"diverged ones as FAIL, and leaves them out. This table reads all {n_ok} trials that did not diverge or "
             "fail, so the two can rank parameters differently (e.g. one whose values only the stopped trials "
             "tried)."), ""]


def markdown(result: AnalysisResult, plot_files: dict[str, str | None]) -> str:
    o, ex = result["objective"], result["excluded"]
    obj = o["metric"]
    ref = {k: v for k, v in (result.get("reference") or {}).items() if v is not None}
    lines = [f"# Collapse analysis: {result.get('experiment', 'sweep')}", "",
             f"Parent run `{result.get('parent_run_id', '?')}`. {result['n_trials']} trials "
             f"({', '.join(f'{v} {k}' for k, v in result['status_counts'].items()) or 'none'}); excluded: "
             f"{ex['diverged_or_failed']} diverged or failed. Collapse class of z at each trial's last epoch: "
             + (", ".join(f"{k} {v}" for k, v in result["collapse_counts"].items()) or "–") + ".", "",
             f"Objective: `{obj}` ({o['mode']}), as the sweep recorded it (search.metric)."
             + (" Reference scores: " + ", ".join(f"{k} {g3(v)}" for k, v in ref.items()) + "." if ref else "")
             + (f" The random-init encoder's is the mean of {sd['inits']} initialisations, SD {g3(sd['random_init'])}."
                if (sd := result.get("reference_sd")) else ""), "",
             f"## Which label-free metric predicts {obj}?", "",
             (f"Equal budgets: each predictor is compared with {obj} at the same epoch, over the trials that reached "
             f"it. ρ is Spearman's, with each predictor oriented so that ρ > 0 means it agrees with {obj} "
             "(`better` says which way each is read); interval and p from one Fisher-z approximation, so the "
             "interval excludes 0 exactly when p < 0.05. Regret: pick the trial with the best predictor value; "
             f"regret = best {obj} − its {obj}. Scope `healthy`: trials whose z ended in collapse class `none`."), ""]
    lidar = result.get("lidar") or {}
    if lidar.get("rank_deficient"):
        at = lines.index(f"## Which label-free metric predicts {obj}?")
        lines[at:at] = [(f"> **LiDAR of z is rank-deficient in {lidar['rank_deficient']} of {lidar['trials']} trials:** "
                         f"its within-sample scatter has rank at most M(K−1) = {', '.join(map(str, lidar['views_dof']))}"
                         f" (eval.cond_samples × (eval.cond_views − 1)) below the width of z "
                         f"({', '.join(map(str, lidar['widths']))}), so the ridge δ decides its value there. Raise "
                         "eval.cond_samples or eval.cond_views to measure it."), ""]
    if result.get("study"):  # the study's rows are the reliable ones: they lead, the per-trial reading follows
        at = lines.index(f"## Which label-free metric predicts {obj}?")
        lines[at:at + 1] = [*study_markdown(result), (f"## The same trials one by one: which label-free metric "
                                                     f"predicts {obj}?")]
    for name, s in result["scopes"].items():
        lines += _scope_section(name, s, obj, result["same_as"].get(name))
    mixed = result.get("drivers_epochs", [])
    lines += ["## Which hyperparameters drive collapse", "",
              ((f"Each trial's final values, taken at epochs {', '.join(map(str, mixed))}: unequal budgets, so a "
                "hyperparameter that let trials run longer also reads as a driver. " if len(mixed) > 1 else
                "Final values. ") + "Numeric: Spearman ρ with the final value; categorical: correlation ratio η with "
               "effective_rank and per-value means."), "",
              *_optuna_note(result),
              f"| param | kind | n | strength | effective_rank | {obj} |", "|---|---|---|---|---|---|"]
    for d in result["drivers"]:
        ms = ("effective_rank", obj)
        if d["kind"] == "numeric":
            cells = [f"ρ={g3(d[m]['rho'])} (p={g3(d[m]['p'])})" if d.get(m) else "–" for m in ms]
        else:
            cells = ["; ".join(f"{v}: {g3(s.get(m))}" for v, s in d["values"].items()) for m in ms]
        lines.append(f"| {d['param']} | {d['kind']} | {d['n']} | {g3(d['strength'])} | " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""]
    for title, name in plot_files.items():
        lines += [f"### {title}", "", f"![{title}]({name})" if name else "(not enough data for this plot)", ""]
    return "\n".join(lines)


def write_report(result: AnalysisResult, runs: pd.DataFrame, epochs: pd.DataFrame, out_dir: str | Path,
                 spectra: dict[str, dict] | None = None) -> list[Path]:
    """analysis.json, report.md, report.html (the same text with the plots embedded, for MLflow's artifact viewer)
    and the plots; spectra: run_id -> {"z": [...], "h": [...]}. A plot whose data is missing is skipped and the
    report says so."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "analysis.json"]
    files[0].write_text(json.dumps(result, indent=2, allow_nan=False))
    obj, mode = result["objective"]["metric"], result["objective"]["mode"]
    picks = spectrum_picks(runs, obj, mode, set(spectra or {}))
    map_drivers = plots.map_drivers(result["drivers"])
    has_table = any(s["table"] for s in result["scopes"].values())
    plot_files: dict[str, str | None] = {}
    study = [("How early can you tell?", "early_prediction.png", plots.early_prediction, (result,), True)]
    for title, name, fn, args, ready in [*(study if result.get("study") else []),
        ("Predictors ranked (ρ and selection regret)", "predictors.png", plots.predictors, (result,), has_table),
        ("ρ over epochs", "rho_over_epochs.png", plots.rho_over_epochs, (result,), has_table),
        (f"Effective rank vs {obj} at the headline epoch", "rank_vs_objective.png", plots.rank_vs_objective,
         (result, runs, epochs), result["scopes"]["all"]["headline_epoch"] is not None),
        ("Spectra of the best, median and worst trials, each at its last epoch", "spectra.png", plots.spectra, (picks, spectra, obj),
         bool(picks)),
        ("Effective rank over epochs", "rank_over_epochs.png", plots.histories, (runs, epochs),
         "effective_rank" in epochs and epochs["effective_rank"].notna().any()),
        (f"Collapse map ({', '.join(d['param'] for d in map_drivers) or 'needs two swept params'})",
         "collapse_map.png", plots.collapse_map, (runs, map_drivers, obj), len(map_drivers) == 2),
    ]:
        plot_files[title] = name if ready else None
        if ready:
            fn(*args, out / name)
            files.append(out / name)
    md = markdown(result, plot_files)
    (out / "report.md").write_text(md)
    # rendered from the same text, after the plots exist: it embeds them
    (out / "report.html").write_text(to_html(md, out, title=f"Collapse analysis: {result.get('experiment', 'sweep')}"))
    files += [out / "report.md", out / "report.html"]
    return files
