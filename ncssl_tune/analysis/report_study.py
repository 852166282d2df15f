"""The study part of report.md and of the console summary (a sweep with search.repeats > 1): the headline over
every configuration at the final epoch, each ρ beside the noise ceiling it can reach, the baselines, early
prediction and the drivers at equal budgets. analysis.result.Study documents the numbers."""

from __future__ import annotations

from ncssl_tune.analysis.result import AnalysisResult, Study
from ncssl_tune.naming import fmt_number as g3

EARLY_COLUMNS = 8  # epochs shown in the early-prediction table (all of them in analysis.json)


def _rho(r: dict) -> str:
    if r.get("rho") is None:
        return f"– ({r.get('reason', 'no data')})"
    lo, hi = r["ci95"]
    return f"{g3(r['rho'])} [{g3(lo)}, {g3(hi)}]"


def _noise_line(st: Study) -> str:
    o = st["noise"]["objective"]
    if o.get("r") is None:
        return f"Objective test-retest: {o.get('reason', 'not measured')}."
    return (f"Objective test-retest reliability (Spearman of repeat 0 vs repeat 1 over {o['n_configs']} "
            f"configurations): r = {_rho({'rho': o['r'], 'ci95': o['ci95']})}; for the mean of {st['repeats']} "
            f"repeats (Spearman-Brown) {g3(o.get('r_mean'))}. Within-configuration SD of the objective: "
            f"{g3(o.get('within_sd'))}.")


def study_summary(result: AnalysisResult) -> list[str]:
    """Console lines: the study's headline first (the most reliable rows: every configuration, final epoch)."""
    st = result.get("study")
    if not st:
        return [("  (a search without repeats: no noise ceiling; set search.repeats and a qmc/random sampler for a "
                "study)")]
    s = st["scopes"]["all"]
    lines = [(f"study: {st['n_configs']} configurations x {st['repeats']} repeats, headline at the final epoch "
             f"{st['final_epoch']} over per-configuration means"), "  " + _noise_line(st)]
    rows = [r for r in s["table"] if r["rho"] is not None]
    for r in [r for r in rows if not r.get("baseline")][:3] + [r for r in rows if r.get("baseline")][:1]:
        sel = r["selection"] or {}
        lines.append(f"    {r['predictor']:<22}{' (baseline)' if r.get('baseline') else ''} rho {_rho(r)}, "
                     f"n = {r['n']}, ceiling {g3(r.get('ceiling'))}; pick regret {g3(sel.get('regret'))} "
                     f"(random {g3(sel.get('random_regret'))})")
    return lines


def _early_table(st: Study, names: list[str]) -> list[str]:
    epochs = sorted({p["epoch"] for n in names for p in st["early"].get(n, [])})
    if len(epochs) > EARLY_COLUMNS:  # evenly spread, first and last always shown
        step = (len(epochs) - 1) / (EARLY_COLUMNS - 1)
        epochs = sorted({epochs[round(i * step)] for i in range(EARLY_COLUMNS)})
    lines = ["| predictor | " + " | ".join(f"ρ @ {e}" for e in epochs) + " | regret @ first / last |",
             "|---|" + "---|" * (len(epochs) + 1)]
    for n in names:
        by = {p["epoch"]: p for p in st["early"].get(n, [])}
        cells = [g3(by[e]["rho"]) if e in by else "–" for e in epochs]
        first, last = by.get(epochs[0], {}), by.get(epochs[-1], {})
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {g3(first.get('regret'))} / {g3(last.get('regret'))} |")
    return lines


def study_markdown(result: AnalysisResult) -> list[str]:
    st = result["study"]
    obj = result["objective"]["metric"]
    lines = [f"## Study: {st['n_configs']} configurations × {st['repeats']} repeats, each to epoch {st['final_epoch']}",
             "", _noise_line(st), "",
             (f"Every configuration enters at every epoch: objective and predictors are averaged over its repeats. "
              f"{len(st['carried_trials'])} trials ended by the total-collapse stopper keep their last values at "
              f"later epochs (they stay collapsed; leaving them out would drop the worst configurations). Ceiling: "
              f"√(r_obj · r_pred) for the mean of {st['repeats']} repeats, the largest |ρ| seed noise allows. "
              f"Baselines (the training loss and its named terms) are what a label-free metric has to beat."), ""]
    for name, s in st["scopes"].items():
        lines += [f"### {name} ({s['n_trials']} configurations)", ""]
        if not s["table"]:
            lines += [f"No table: {s.get('reason', 'no data')}.", ""]
            continue
        lines += [(f"| rank ρ | predictor | kind | n | Spearman ρ [95% CI] | ceiling | repeat r | regret (random "
                  f"{g3((s['table'][0]['selection'] or {}).get('random_regret'))}) |"),
                  "|---|---|---|---|---|---|---|---|"]
        for r in s["table"]:
            rel = st["noise"]["predictors"].get(r["predictor"], {})
            lines.append(f"| {r['rank_rho']} | {r['predictor']} | {'baseline' if r.get('baseline') else 'label-free'}"
                         f" | {r['n']} | {_rho(r)} | {g3(r.get('ceiling'))} | {g3(rel.get('r'))} | "
                         f"{g3((r['selection'] or {}).get('regret'))} |")
        lines.append("")
    top = [r["predictor"] for r in st["scopes"]["all"]["table"] if r["rho"] is not None and not r.get("baseline")][:5]
    names = [*top, *st["baselines"], obj]
    lines += [f"### How early can you tell? ρ(predictor at epoch e, {obj} at epoch {st['final_epoch']})", "",
              (f"Regret: the final {obj} lost by picking, at epoch e, the configuration the predictor ranks first "
               f"(the row `{obj}` is the objective itself measured early: what a labelled early stop would cost)."),
              "", *_early_table(st, names), "",
              f"### Hyperparameters that drive collapse, at epoch {st['final_epoch']} (equal budgets)", "",
              "| param | kind | n | strength |", "|---|---|---|---|"]
    lines += [f"| {d['param']} | {d['kind']} | {d['n']} | {g3(d['strength'])} |" for d in st["drivers"]]
    return lines + [""]
