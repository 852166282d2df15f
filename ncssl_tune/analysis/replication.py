"""Does a study's answer replicate? Two analyses of the same study file run with different sampler and training
seeds (two analysis.json files): per predictor ρ in each run with its interval and noise ceiling, Kendall's τ
between the two predictor rankings, and whether the top predictor is the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ncssl_tune.analysis.repeats import kendall_tau
from ncssl_tune.naming import fmt_number as g3


def _headline(result: dict, scope: str) -> tuple[dict, list[dict]]:
    """(the study or search scope, its table) of one analysis: a study's scope when it has one."""
    s = (result.get("study") or result)["scopes"][scope]
    return s, s["table"]


def replication(first: dict, second: dict, scope: str = "all") -> dict[str, Any]:
    """Compare the headline tables of two analyses (analysis.json contents) of the same design."""
    (s1, t1), (s2, t2) = _headline(first, scope), _headline(second, scope)
    rank1 = [r["predictor"] for r in t1 if r["rho"] is not None and not r.get("baseline")]
    rank2 = [r["predictor"] for r in t2 if r["rho"] is not None and not r.get("baseline")]
    by1, by2 = {r["predictor"]: r for r in t1}, {r["predictor"]: r for r in t2}
    rows = [{"predictor": p, "baseline": bool(by1[p].get("baseline")),
             "run1": {k: by1[p].get(k) for k in ("rho", "ci95", "n", "ceiling")},
             "run2": {k: by2.get(p, {}).get(k) for k in ("rho", "ci95", "n", "ceiling")}}
            for p in by1]

    def noise(r: dict) -> dict | None:
        return (r.get("study") or {}).get("noise", {}).get("objective")

    return {"scope": scope, "epochs": [s1["headline_epoch"], s2["headline_epoch"]],
            "kendall_tau": kendall_tau(rank1, rank2), "n_ranked": len([p for p in rank1 if p in rank2]),
            "top": [rank1[0] if rank1 else None, rank2[0] if rank2 else None],
            "same_top": bool(rank1 and rank2 and rank1[0] == rank2[0]),
            "objective_noise": [noise(first), noise(second)], "rows": rows}


def _cell(r: dict) -> str:
    if r.get("rho") is None:
        return "–"
    lo, hi = r["ci95"]
    return f"{g3(r['rho'])} [{g3(lo)}, {g3(hi)}]"


def replication_markdown(rep: dict[str, Any], names: tuple[str, str] = ("run 1", "run 2")) -> str:
    a, b = names
    lines = [(f"Scope `{rep['scope']}`, headline epochs {rep['epochs'][0]} and {rep['epochs'][1]}. Kendall τ between "
             f"the two rankings of the label-free predictors: **{g3(rep['kendall_tau'])}** ({rep['n_ranked']} "
             f"ranked in both); top predictor {rep['top'][0]} / {rep['top'][1]} "
             f"({'the same' if rep['same_top'] else 'different'})."), ""]
    for name, o in zip(names, rep["objective_noise"]):
        if o and o.get("r") is not None:
            lines.append(f"- {name}: objective test-retest r = {g3(o['r'])} over {o['n_configs']} configurations "
                         f"(mean of repeats {g3(o.get('r_mean'))}), within-configuration SD {g3(o.get('within_sd'))}")
    lines += ["", f"| predictor | kind | ρ {a} [95% CI] | ceiling {a} | ρ {b} [95% CI] | ceiling {b} |",
              "|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {r['predictor']} | {'baseline' if r['baseline'] else 'label-free'} | {_cell(r['run1'])} | "
                     f"{g3(r['run1'].get('ceiling'))} | {_cell(r['run2'])} | {g3(r['run2'].get('ceiling'))} |")
    return "\n".join(lines) + "\n"


def compare_files(first: str | Path, second: str | Path, scope: str = "all") -> str:
    """The replication table of two analysis.json files, as markdown."""
    a, b = (json.loads(Path(p).read_text()) for p in (first, second))
    return replication_markdown(replication(a, b, scope), (Path(first).parent.parent.name or "run 1",
                                                           Path(second).parent.parent.name or "run 2"))
