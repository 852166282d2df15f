"""The analysis plots (matplotlib Figure without pyplot: Agg canvas, no global state)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from ncssl_tune.analysis.result import AnalysisResult, Driver, Scope
from ncssl_tune.analysis.stats import failed
from ncssl_tune.records.spectra import plot_spectra
from ncssl_tune.vocab import DIVERGED, ERROR, FINISHED, STOPPED
from ncssl_tune.vocab import PARAM_PREFIX as PARAM

MARKERS = {"none": "o", "dimensional": "^", "total": "X"}  # collapse class of z at the last epoch
STATUS_COLORS = {FINISHED: "tab:blue", STOPPED: "tab:orange", DIVERGED: "tab:red", ERROR: "tab:red"}


def _figure(nrows: int, ncols: int, width: float, height: float, sharey: bool = False):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)


def _log_if_wide(values: pd.Series) -> bool:
    v = values.dropna().astype(float)
    return bool(len(v) and v.min() > 0 and v.max() / v.min() >= 10)


def _scopes_with_tables(result: AnalysisResult, distinct: bool = False) -> list[tuple[str, Scope]]:
    """Scopes that have a table; with `distinct`, leaving out those whose table repeats an earlier one."""
    dup = result["same_as"] if distinct else {}
    return [(n, s) for n, s in result["scopes"].items() if s["table"] and n not in dup]


def log_subs(lo: float, hi: float) -> tuple[float, ...]:
    """Where a log axis from lo to hi gets labelled ticks, per decade: 1, 2, 5 over a wide range; every integer
    (and 1.5) within about a decade, where 1-2-5 leaves one or two labels (a range 1.5-5.5 read only "2" and "5")."""
    if lo > 0 and hi / lo < 12:
        return (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)
    if lo > 0 and hi / lo < 150:
        return (1.0, 2.0, 3.0, 5.0)
    return (1.0, 2.0, 5.0)


def _plain_log_ticks(axis) -> None:
    """Log-axis labels as 2, 20, 200 instead of 2×10⁰, 2×10¹, dense enough to read on a short range. Call it once
    the data are drawn: the ticks follow the axis's range."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    axis.set_major_locator(LogLocator(subs=log_subs(lo, hi)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def predictors(result: AnalysisResult, path: Path) -> None:
    """Per scope: oriented ρ with its 95% interval, and the regret of picking by each predictor against the
    expected regret of a random pick."""
    scopes = _scopes_with_tables(result, distinct=True)
    obj = result["objective"]["metric"]
    n_pred = max(len(s["table"]) for _, s in scopes)
    fig, axes = _figure(len(scopes), 2, 4.6, 0.9 + 0.24 * n_pred)
    for (name, s), (ax_r, ax_g) in zip(scopes, axes):
        rows = s["table"][::-1]  # best at the top
        y = np.arange(len(rows))
        labels = [f"{r['predictor']} ({'↑' if r['direction'] == 'max' else '↓'})" for r in rows]
        for i, r in enumerate(rows):
            if r["rho"] is not None:
                lo, hi = r["ci95"]
                ax_r.errorbar(r["rho"], i, xerr=[[r["rho"] - lo], [hi - r["rho"]]], fmt="o", color="k", ms=4,
                              capsize=2, lw=1)
        ax_r.axvline(0, color="gray", lw=0.8)
        ax_r.set(yticks=y, yticklabels=labels, xlim=(-1.05, 1.05), xlabel="Spearman ρ (oriented), 95% CI")
        ax_r.set_title(f"{name}: epoch {s['headline_epoch']}, n ≤ {max(r['n'] for r in rows)}", fontsize=9)
        regrets = [(r["selection"] or {}).get("regret", np.nan) for r in rows]
        ax_g.barh(y, regrets, color="tab:blue", alpha=0.7)
        for i, v in enumerate(regrets):  # a zero regret has no bar: say so
            if np.isfinite(v):
                ax_g.text(v, i, f" {v:.3g}", va="center", fontsize=6)
        rnd = next(((r["selection"] or {}).get("random_regret") for r in rows if r["selection"]), None)
        if rnd is not None:
            ax_g.axvline(rnd, color="tab:red", ls="--", lw=1)
            ax_g.set_title(f"regret; red dashes: expected regret of a random pick ({rnd:.3g})", fontsize=8)
        top = max([v for v in [*regrets, rnd or 0] if np.isfinite(v)], default=0)
        ax_g.set_xlim(0, 1.3 * top if top > 0 else 1)  # room for the value labels
        ax_g.set(yticks=y, yticklabels=[], xlabel=f"regret in {obj} of picking the best-scored trial")
        for ax in (ax_r, ax_g):
            ax.grid(alpha=0.3, axis="x")
            ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=110)


def rho_over_epochs(result: AnalysisResult, path: Path) -> None:
    """Oriented ρ per predictor at every epoch enough trials reached; z solid, h dashed, one colour per metric."""
    from matplotlib.ticker import MaxNLocator

    scopes = _scopes_with_tables(result)
    fig, axes = _figure(len(scopes), 2, 5.0, 3.4, sharey=True)
    bases = sorted({p.removesuffix("_h") for _, s in scopes for p in s["curves"]})
    colors = dict(zip(bases, [f"C{i}" for i in range(10)] + ["k", "tab:olive", "tab:cyan"]))
    for (name, s), row in zip(scopes, axes):
        rhos = {p: [c["rho"] for c in curve] for p, curve in s["curves"].items()}
        for ax, rep in zip(row, ("z", "h")):
            for p, curve in s["curves"].items():
                if p.endswith("_h") != (rep == "h"):
                    continue
                base = p.removesuffix("_h")
                twin = p.replace("effective_rank", "effective_rank_frac")
                if "_frac" in p and rhos[p] == rhos.get(p.replace("_frac", "")):
                    continue  # same ranks as effective_rank (one embedding width): one line, labelled for both
                label = f"{p} (= _frac)" if twin != p and rhos.get(twin) == rhos[p] else p
                pts = [(c["epoch"], c["rho"]) for c in curve if c["rho"] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker=".", lw=1.2, color=colors[base], label=label)
            ax.axhline(0, color="gray", lw=0.8)
            ax.set(ylim=(-1.05, 1.05), xlabel="epoch", ylabel="Spearman ρ (oriented)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ns = ", ".join(f"{e}: {s['epochs'].get(str(e), s['epochs'].get(e))}" for e in s["qualifying_epochs"])
            # Two lines, wrapped: a one-line title with the per-epoch counts runs into its neighbour's.
            ax.set_title(textwrap.fill(f"{name}, metrics of {rep}; trials per epoch {ns}", 60), fontsize=8)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # a sweep may log no metric of h (or of z)
                ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=110)


def rank_vs_objective(result: AnalysisResult, runs: pd.DataFrame, epochs: pd.DataFrame, path: Path) -> None:
    """Effective rank of z and h against the objective at the headline epoch of scope `all`, one marker per
    collapse class, one colour per method; the reference scores (random-init encoder, raw pixels) as lines."""
    obj, head = result["objective"]["metric"], result["scopes"]["all"]["headline_epoch"]
    e = epochs[epochs["epoch"] == head].merge(runs[["run_id", "method", "collapse"]], on="run_id")
    e = e[e["run_id"].isin(runs[~failed(runs)]["run_id"])]
    table = result["scopes"]["all"]["table"]
    rows = {r["predictor"]: r for r in table}
    # RankMe, the tool's first predictor, next to the winner of the table (or RankMe of h when RankMe won)
    ranked = [table[0]["predictor"]] if table and table[0]["rho"] is not None else []
    shown = [p for p in dict.fromkeys(["effective_rank", *ranked, "effective_rank_h", *rows])
             if p in e and e[p].notna().any()][:2]
    fig, axes = _figure(1, len(shown), 5.0, 3.9, sharey=True)
    methods = sorted(e["method"].astype(str).unique())
    for ax, p in zip(axes[0], shown):
        if p in e:
            for mi, m in enumerate(methods):
                for cls, marker in MARKERS.items():
                    g = e[(e["method"].astype(str) == m) & (e["collapse"] == cls)]
                    ax.scatter(g[p], g[obj], s=30, marker=marker, color=f"C{mi}", alpha=0.8, edgecolors="k",
                               linewidths=0.3, label=f"{m or '?'}, collapse {cls}" if len(g) else None)
            if _log_if_wide(e[p]):
                ax.set_xscale("log")
        sd = (result.get("reference_sd") or {}).get("random_init")
        for (name, v), ls in zip((result.get("reference") or {}).items(), (":", "-.")):
            if v is not None:
                spread = f" ± {sd:.2g}, {result['reference_sd']['inits']} inits" if sd and name == "random_init" else ""
                ax.axhline(v, color="gray", ls=ls, lw=1, label=f"reference: {name.replace('_', ' ')} ({v:.3g}{spread})")
                if spread:  # the band one SD wide each side: where another initialisation would land
                    ax.axhspan(v - sd, v + sd, color="gray", alpha=0.15, lw=0)
        r = rows.get(p) or {}
        rho = f"{r['rho']:.3g}" if r.get("rho") is not None else "–"
        rank = f"#{r['rank_rho']} of {len(table)}, " if r.get("rank_rho") else ""
        ax.set_title(f"{p} at epoch {head}: {rank}oriented ρ {rho} (n={r.get('n', 0)})", fontsize=9)
        ax.set(xlabel=f"{p} at epoch {head}", ylabel=f"{obj} at epoch {head}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)


def spectrum_label(label: str, row: pd.Series, objective: str, epoch: int | None) -> str:
    """A legend entry that says which epoch the spectrum is from: a trial stopped early (ASHA, the collapse
    stopper) has its spectrum from the epoch it stopped at, not from the sweep's last epoch."""
    when = ("epoch ?" if epoch is None else f"epoch {epoch}" if row.get("status") == FINISHED
            else f"stopped at epoch {epoch}")
    return (f"{label}: {row['trial_id']} ({when}; {objective} {row[objective]:.3g}, "
            f"RankMe {row['effective_rank']:.3g})")


def spectra(picks: dict[str, pd.Series], spectra_: dict[str, dict], objective: str, path: Path) -> None:
    """The covariance spectra of z and h of the picked trials, each at its own last measured epoch (legend)."""
    fig, axes = _figure(1, 2, 5.6, 3.9)
    for ax, (rep, name) in zip(axes[0], (("z", "z (projector)"), ("h", "h (representation)"))):
        curves = {}
        for label, row in picks.items():
            s = spectra_[row["run_id"]]
            epoch = s.get("epoch") or (int(row["epoch"]) if pd.notna(row.get("epoch")) else None)
            curves[spectrum_label(label, row, objective, epoch)] = s.get(rep, [])
        plot_spectra(ax, curves, legend=False)
        ax.set_title(f"spectrum of {name} at each trial's last epoch", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, title=f"trial (epoch of this spectrum; its last {objective})", title_fontsize=7)
    fig.savefig(path, dpi=110)


def present_statuses(runs: pd.DataFrame, run_ids: set[str]) -> list[str]:
    """The statuses of the trials drawn, in STATUS_COLORS's order then any other: one legend entry each, so the
    legend never names a status (diverged, say) that no trial has."""
    found = set(runs.loc[runs["run_id"].isin(run_ids), "status"].astype(str))
    return [s for s in STATUS_COLORS if s in found] + sorted(found - set(STATUS_COLORS))


def histories(runs: pd.DataFrame, epochs: pd.DataFrame, path: Path) -> None:
    """Effective rank of z and of h of every trial over its epochs, coloured by how the trial ended."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(1, 2, 5.0, 3.8)
    status = dict(zip(runs["run_id"], runs["status"]))
    for ax, (p, rep) in zip(axes[0], (("effective_rank", "z (projector)"), ("effective_rank_h", "h (representation)"))):
        drawn: set[str] = set()
        if p in epochs:
            for run_id, g in epochs[epochs[p].notna()].groupby("run_id"):
                ax.plot(g["epoch"], g[p], color=STATUS_COLORS.get(status.get(run_id, ""), "tab:gray"), alpha=0.6,
                        lw=1, marker=".")
                drawn.add(run_id)
        for st in present_statuses(runs, drawn):
            n = sum(status.get(r) == st for r in drawn)
            ax.plot([], [], color=STATUS_COLORS.get(st, "tab:gray"), label=f"{st} ({n})")
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", ylabel=f"{p} (RankMe, log scale)")
        ax.set_title(f"effective rank of {rep}, one line per trial", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        if drawn:
            ax.legend(fontsize=7, title="how the trial ended", title_fontsize=7)
    fig.suptitle("Effective rank over epochs", fontsize=10)
    fig.savefig(path, dpi=110)


def map_drivers(drivers: list[Driver]) -> list[Driver]:
    """The two strongest drivers of collapse (numeric or categorical) that vary, as the collapse map's dimensions."""
    return [d for d in drivers if d["strength"] > 0][:2]


def map_colour(y: str, objective: str) -> str:
    """The column the collapse map colours by: the final effective rank, unless that is already the y axis (one
    numeric driver), where the objective is: a colour repeating the y position says nothing new."""
    return objective if y == "effective_rank" else "effective_rank"


def collapse_map(runs: pd.DataFrame, drivers: list[Driver], objective: str, path: Path) -> None:
    """The two strongest drivers: numeric ones are axes, a categorical one splits the map into panels (two
    categoricals: panels by the first, x by the second). With one numeric axis the other is the final effective
    rank. Colour: map_colour (final effective rank, log when wide, or the final objective); marker: collapse
    class; diverged or failed trials: red x."""
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.lines import Line2D

    num = [PARAM + d["param"] for d in drivers if d["kind"] == "numeric"]
    cat = [PARAM + d["param"] for d in drivers if d["kind"] == "categorical"]
    df = runs.copy()
    facet = cat[0] if cat else None
    panels = sorted(df[facet].dropna().astype(str).unique()) if facet else [None]
    if len(num) == 2:
        x, y = num
    elif num:
        x, y = num[0], "effective_rank"
    else:
        x, y = cat[1], "effective_rank"
    colour = map_colour(y, objective)
    colour_label = "final effective_rank (z)" if colour == "effective_rank" else f"final {objective}"
    fig, axes = _figure(1, len(panels), 4.4, 3.8, sharey=True)
    if x not in cat:  # the same numeric x range in every panel, so panels compare
        lo, hi = df[x].astype(float).min(), df[x].astype(float).max()
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
    cv = df[colour].astype(float) if colour in df else pd.Series(np.nan, index=df.index)
    finite = cv[np.isfinite(cv) & ~failed(df)]
    norm = None
    if colour == "effective_rank" and len(finite) and finite.min() > 0 and _log_if_wide(finite):  # ≈ 1 to hundreds
        norm = LogNorm(finite.min(), finite.max())
    elif len(finite):
        norm = Normalize(finite.min(), max(finite.max(), finite.min() + 1e-9))
    categories = sorted(df[x].dropna().astype(str).unique()) if x in cat else None
    sc = None
    for ax, value in zip(axes[0], panels):
        d = df if facet is None else df[df[facet].astype(str) == value]
        bad = failed(d)
        xs = (lambda s: s.astype(str).map({c: i for i, c in enumerate(categories)})) if categories else (
            lambda s: s.astype(float))
        for cls, marker in MARKERS.items():
            g = d[~bad & (d["collapse"] == cls)]
            if len(g):
                sc = ax.scatter(xs(g[x]), g[y].astype(float), c=cv[g.index], cmap="viridis", norm=norm,
                                marker=marker, s=45, edgecolors="k", linewidths=0.3)
        if bad.any():
            ax.scatter(xs(d[bad][x]), d[bad][y].astype(float), marker="x", c="tab:red")
        if categories:
            ax.set_xticks(range(len(categories)), categories, fontsize=7)
        elif _log_if_wide(df[x]):
            ax.set_xscale("log")
            ax.set_xlim(lo / 1.2, hi * 1.2)
            _plain_log_ticks(ax.xaxis)
        else:
            ax.set_xlim(lo - pad, hi + pad)
        if _log_if_wide(df[y]):
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
        ax.set_xlabel(x.removeprefix(PARAM))
        ax.set_ylabel(y.removeprefix(PARAM) if y != "effective_rank" else "final effective_rank (z)")
        ax.set_title(f"{facet.removeprefix(PARAM)} = {value}" if facet else "collapse map", fontsize=9)
        ax.grid(alpha=0.3)
        # grey legend markers: a point's colour is the colour bar's, not its class's
        handles = [Line2D([], [], ls="", marker=MARKERS[cls], color="gray", markeredgecolor="k", markersize=6,
                          label=f"collapse {cls}") for cls in MARKERS if (~failed(d) & (d["collapse"] == cls)).any()]
        handles += [Line2D([], [], ls="", marker="x", color="tab:red", label="diverged / failed")] if bad.any() else []
        if handles:
            ax.legend(handles=handles, fontsize=6, title="z's collapse class (marker)", title_fontsize=6)
    if sc is not None:
        bar = fig.colorbar(sc, ax=list(axes[0]), label=f"{colour_label} (colour)")
        if isinstance(norm, LogNorm):
            _plain_log_ticks(bar.ax.yaxis)
    shown = [c.removeprefix(PARAM) for c in (facet, x) if c]
    fig.suptitle(f"Collapse map: {'final effective rank (z)' if y == 'effective_rank' else y.removeprefix(PARAM)}"
                 f" by {' and '.join(shown)}, coloured by {colour_label}", fontsize=10)
    fig.savefig(path, dpi=110)


def early_prediction(result: AnalysisResult, path: Path) -> None:
    """How early can you tell: ρ of each predictor at epoch e with the objective at the final epoch (left) and the
    regret of picking by it at e (right), over a study's configurations; baselines dashed grey, the objective
    measured early black, the best label-free metrics in colour, each with its noise ceiling as a dotted level."""
    from matplotlib.ticker import MaxNLocator

    st = result["study"]
    obj, final = result["objective"]["metric"], st["final_epoch"]
    table = st["scopes"]["all"]["table"]
    top = [r["predictor"] for r in table if r["rho"] is not None and not r.get("baseline")][:5]
    if not top:  # too few configurations for a headline table: the label-free metrics in their own order
        top = [p for p in st["early"] if p not in st["baselines"] and p != obj][:5]
    dashes = ["--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1))]
    fig, axes = _figure(1, 2, 5.2, 3.6)
    for name in [*top, *st["baselines"], obj]:
        pts = [p for p in st["early"].get(name, []) if p["rho"] is not None]
        if not pts:
            continue
        base = list(st["baselines"]).index(name) if name in st["baselines"] else 0
        style = ({"color": "k", "lw": 2.0} if name == obj else
                 {"color": "gray", "ls": dashes[base % len(dashes)], "lw": 1.0} if name in st["baselines"]
                 else {"color": f"C{top.index(name)}", "lw": 1.4})
        label = f"{name} (objective, measured early)" if name == obj else (
            f"{name} (baseline)" if name in st["baselines"] else name)
        axes[0][0].plot([p["epoch"] for p in pts], [p["rho"] for p in pts], marker=".", label=label, **style)
        axes[0][1].plot([p["epoch"] for p in pts], [p["regret"] for p in pts], marker=".", **style)
        ceiling = st["noise"]["predictors"].get(name, {}).get("ceiling")
        if ceiling is not None and name in top:
            axes[0][0].axhline(ceiling, color=style["color"], ls=":", lw=0.8)
    rand = next((p["random_regret"] for p in st["early"].get(obj, []) if p["random_regret"] is not None), None)
    if rand is not None:
        axes[0][1].axhline(rand, color="tab:red", lw=0.8, label="random pick")
        axes[0][1].legend(fontsize=7)
    axes[0][0].axhline(0, color="gray", lw=0.6)
    axes[0][0].set(ylim=(-1.05, 1.05), xlabel="epoch e", ylabel=f"ρ(value at e, {obj} at epoch {final})",
                   title=f"{st['n_configs']} configurations × {st['repeats']} repeats (dotted: noise ceilings)")
    axes[0][1].set(xlabel="epoch e", ylabel=f"{obj} lost by picking at e", title="regret of an early pick")
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(9)
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.savefig(path, dpi=110)
