"""Correlation study over a sweep's MLflow runs: does the label-free effective rank (RankMe) of z and of h predict
linear-probe accuracy, what would choosing a trial by it cost, and which hyperparameters push trials into collapse.

`run_analysis` = `load_runs` (one row per trial child run) -> `analyze` (numbers, JSON-safe dict) ->
`write_report` (analysis.json, report.md, PNG plots) -> artifacts of the sweep's parent run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ncssl_tune.mlflow_store import TrackingError, check_tracking_uri, sqlite_path
from ncssl_tune.schema import PARENT_TAG, SPECTRUM_CSV, TAG_KIND, TAG_REASON, TAG_STATUS, TAG_TRIAL
from ncssl_tune.spectra import plot_spectra, read_spectrum_csv

RANKS = ("effective_rank", "effective_rank_h")  # label-free predictors, of z and of h
TARGET = "probe_acc"
FAILED = ("diverged", "error")  # their last metrics are stale or missing: excluded, and counted
MIN_N = 3
PARAM = "param."  # column prefix of hyperparameters (as in trials.csv)


# --- loading

def _client(tracking_uri: str):
    from mlflow import MlflowClient

    # One progress bar per downloaded spectrum would bury the summary the CLI prints.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(tracking_uri)


def load_runs(experiment: str, tracking_uri: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per trial child run of the sweep's parent run (default: the experiment's latest sweep run):
    run_id, trial_id, method, status, stop_reason, collapse, collapse_h, run_status, final metrics by name,
    params as `param.<dotted key>` (numeric where every value parses). df.attrs["parent_run_id"] names the parent.
    Raises TrackingError when the store or the experiment is not there."""
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
        rows.append({"run_id": r.info.run_id, "trial_id": t.get(TAG_TRIAL, ""), "method": t.get("method", ""),
                     "status": t.get(TAG_STATUS, ""), "stop_reason": t.get(TAG_REASON, ""),
                     "collapse": t.get("collapse", ""), "collapse_h": t.get("collapse_h", ""),
                     "run_status": r.info.status, **r.data.metrics,
                     **{PARAM + k: v for k, v in r.data.params.items()}})
    df = pd.DataFrame(rows, columns=None if rows else ["run_id", "trial_id", "method", "status", "run_status"])
    for col in [c for c in df.columns if c.startswith(PARAM)]:
        raw = df[col].where(df[col] != "null")
        num = pd.to_numeric(raw, errors="coerce")
        if num.notna().sum() == raw.notna().sum():
            df[col] = num
    df = df.sort_values("trial_id", ignore_index=True)
    df.attrs.update(parent_run_id=parent_run_id, experiment=experiment)
    return df


# --- statistics

def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair; x, y: (B, n) -> (B,), NaN where a row is constant."""
    xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    den = np.sqrt((xc ** 2).sum(1) * (yc ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(1) / den, np.nan)


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall tau-b of each row pair: sum sign(dx)sign(dy) / sqrt(sum sign(dx)^2 sum sign(dy)^2) over pairs."""
    n = x.shape[1]
    if n > 200:  # past here the O(n^2) pair tensors cost more than scipy's O(n log n) per row
        return np.array([stats.kendalltau(a, b).statistic for a, b in zip(x, y)], dtype=float)
    out = np.empty(x.shape[0])
    step = max(1, 4_000_000 // (n * n))  # keeps the (b, n, n) sign tensors near 32 MB
    for i in range(0, x.shape[0], step):
        sx = np.sign(x[i:i + step, :, None] - x[i:i + step, None, :])  # (b, n, n)
        sy = np.sign(y[i:i + step, :, None] - y[i:i + step, None, :])
        den = np.sqrt((sx ** 2).sum((1, 2)) * (sy ** 2).sum((1, 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i:i + step] = np.where(den > 0, (sx * sy).sum((1, 2)) / den, np.nan)
    return out


ROW_STATS = {
    "spearman": lambda x, y: _pearson_rows(stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)),
    "kendall": _kendall_rows,
    "pearson": _pearson_rows,
}
EXACT_N = 8  # up to here Spearman's p is the exact permutation p (8! = 40320 orderings)


def spearman(x, y) -> tuple[float, float]:
    """rho and two-sided p; for n <= EXACT_N the p of the exact permutation test, since scipy's t approximation
    says p = 0 for three perfectly ordered points (the exact answer is 1/3)."""
    res = stats.spearmanr(x, y)
    if len(x) > EXACT_N:
        return float(res.statistic), float(res.pvalue)
    exact = stats.pearsonr(stats.rankdata(x), stats.rankdata(y),
                           method=stats.PermutationMethod(n_resamples=math.factorial(EXACT_N)))
    return float(res.statistic), float(exact.pvalue)


POINT_STATS = {"spearman": spearman, "kendall": lambda x, y: tuple(stats.kendalltau(x, y)),
               "pearson": lambda x, y: tuple(stats.pearsonr(x, y))}


def correlate(x, y, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Spearman, Kendall (tau-b) and Pearson between x and y with p-values and percentile-bootstrap 95% intervals
    (seeded; resamples that are constant in x or y are dropped and counted). Needs n >= 3 and varying x, y."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    out: dict[str, Any] = {"n": len(x)}
    reason = None
    if len(x) < MIN_N:
        reason = f"needs at least {MIN_N} trials, got {len(x)}"
    elif np.ptp(x) == 0 or np.ptp(y) == 0:
        reason = f"{'x' if np.ptp(x) == 0 else 'y'} is constant across the {len(x)} trials"
    if reason:
        return {**out, **{k: None for k in POINT_STATS}, "reason": reason}
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))  # (B, n)
    for name, fn in POINT_STATS.items():
        r, p = fn(x, y)
        boot = ROW_STATS[name](x[idx], y[idx])
        boot = boot[np.isfinite(boot)]
        ci = [float(v) for v in np.percentile(boot, [2.5, 97.5])] if len(boot) else None
        out[name] = {"r": float(r), "p": float(p), "ci95": ci, "n_boot": len(boot)}
    return out


def _normalize(df: pd.DataFrame) -> pd.DataFrame:
    """The columns analyze and the plots rely on, added when absent (e.g. a hand-made frame)."""
    df = df.copy()
    for col in ("run_id", "trial_id", "method", "status", "run_status", "collapse"):
        if col not in df:
            df[col] = df.index.astype(str) if col in ("run_id", "trial_id") else ""
    for col in (*RANKS, TARGET):
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
    return df


def _failed(df: pd.DataFrame) -> pd.Series:
    return df["status"].isin(FAILED) | (df["run_status"] == "FAILED")


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name].astype(float)


def usable(df: pd.DataFrame, rank: str) -> pd.DataFrame:
    """Trials that neither diverged nor failed and have a finite `rank` and probe_acc."""
    ok = ~_failed(df) & np.isfinite(_col(df, rank)) & np.isfinite(_col(df, TARGET))
    return df[ok]


def swept_params(df: pd.DataFrame) -> list[str]:
    """Param columns whose values vary across the trials (the sampled hyperparameters)."""
    return [c for c in df.columns if c.startswith(PARAM) and df[c].dropna().astype(str).nunique() > 1]


def _driver(df: pd.DataFrame, col: str, n_boot: int) -> dict[str, Any]:
    d = df[df[col].notna()]
    out: dict[str, Any] = {"param": col[len(PARAM):], "n": len(d)}
    if pd.api.types.is_numeric_dtype(d[col]):
        out["kind"] = "numeric"
        for metric in (RANKS[0], RANKS[1], TARGET):
            m = d[np.isfinite(_col(d, metric))]
            if len(m) < MIN_N or m[col].nunique() < 2 or np.ptp(_col(m, metric)) == 0:
                out[metric] = None
                continue
            rho, p = spearman(m[col].astype(float), _col(m, metric))
            out[metric] = {"rho": rho, "p": p, "n": len(m)}
        out["strength"] = abs(out[RANKS[0]]["rho"]) if out[RANKS[0]] else 0.0
        return out
    out["kind"] = "categorical"
    groups = d.groupby(d[col].astype(str))
    out["values"] = {str(v): {"n": len(g), **{m: _mean(_col(g, m)) for m in (*RANKS, TARGET)}}
                     for v, g in groups}
    er = _col(d, RANKS[0])
    total = float(((er - er.mean()) ** 2).sum())
    between = float(sum(len(g) * (_col(g, RANKS[0]).mean() - er.mean()) ** 2 for _, g in groups))
    out["strength"] = math.sqrt(between / total) if total > 0 else 0.0  # correlation ratio eta, in [0, 1]
    samples = [_col(g, RANKS[0]).dropna() for _, g in groups]
    try:
        out["kruskal_p"] = float(stats.kruskal(*samples).pvalue) if len(samples) > 1 else None
    except ValueError:  # all values identical
        out["kruskal_p"] = None
    return out


def _mean(s: pd.Series) -> float | None:
    s = s[np.isfinite(s)]
    return float(s.mean()) if len(s) else None


def _regret(u: pd.DataFrame, rank: str) -> dict[str, Any] | None:
    if u.empty:
        return None
    sel, best = u.loc[_col(u, rank).idxmax()], u.loc[_col(u, TARGET).idxmax()]
    return {"selected_trial": sel["trial_id"], "selected_rank": float(sel[rank]),
            "selected_probe_acc": float(sel[TARGET]), "best_trial": best["trial_id"],
            "best_probe_acc": float(best[TARGET]), "regret": float(best[TARGET] - sel[TARGET])}


def analyze(df: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Correlations of final effective rank (z and h) with probe_acc, overall and per method; label-free
    selection regret; hyperparameters ranked by how strongly they move the effective rank."""
    df = _normalize(df)
    failed = _failed(df)
    ok = df[~failed]
    result: dict[str, Any] = {
        "n_trials": len(df),
        "status_counts": {str(k): int(v) for k, v in df["status"].value_counts().items()},
        "collapse_counts": {str(k): int(v) for k, v in ok["collapse"].value_counts().items() if k},
        "excluded": {"diverged_or_failed": int(failed.sum()), "nan": {}},
        "correlations": {}, "selection": {},
    }
    for rank in RANKS:
        u = usable(df, rank)
        result["excluded"]["nan"][rank] = len(ok) - len(u)
        per_method = {str(m): correlate(g[rank], g[TARGET], n_boot, seed) for m, g in u.groupby("method")}
        result["correlations"][rank] = {"overall": correlate(u[rank], u[TARGET], n_boot, seed),
                                        "per_method": per_method}
        result["selection"][rank] = _regret(u, rank)
    drivers = [_driver(ok, c, n_boot) for c in swept_params(ok)]
    result["drivers"] = sorted(drivers, key=lambda d: -d["strength"])
    return _json_safe(result)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# --- report

def spectrum_picks(df: pd.DataFrame, available: set[str] | None = None) -> dict[str, pd.Series]:
    """Best, median and worst trial by probe_acc among usable finished trials (with a spectrum in `available`)."""
    u = usable(df, RANKS[0])
    u = u[u["status"] == "finished"]
    if available is not None:
        u = u[u["run_id"].isin(available)]
    if u.empty:
        return {}
    u = u.sort_values(TARGET, ascending=False, ignore_index=True)
    return {"best": u.iloc[0], "median": u.iloc[len(u) // 2], "worst": u.iloc[-1]}


def _fmt(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _stat_cell(s: dict | None) -> str:
    if not s:
        return "–"
    ci = f" [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if s.get("ci95") else ""
    return f"{s['r']:.3f}{ci} (p={s['p']:.2g})"


def _figure(ncols: int = 1, width: float = 5.0):
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global state

    fig = Figure(figsize=(width * ncols, 3.8), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _plot_rank_vs_probe(df: pd.DataFrame, result: dict, path: Path) -> None:
    fig, axes = _figure(2)
    for ax, rank in zip(axes, RANKS):
        u = usable(df, rank)
        for method, g in u.groupby("method"):
            ax.scatter(g[rank], g[TARGET], s=22, label=method or "?", alpha=0.8)
        if len(u) >= 2 and np.ptp(u[rank]) > 0:
            slope, icpt = np.polyfit(u[rank].astype(float), u[TARGET].astype(float), 1)
            xs = np.linspace(u[rank].min(), u[rank].max(), 50)
            ax.plot(xs, slope * xs + icpt, "k--", lw=1, label=f"least squares (slope {slope:.3g})")
        sp = (result["correlations"][rank]["overall"] or {}).get("spearman")
        ax.set_title(f"{rank}: Spearman {_fmt(sp['r']) if sp else '–'} (n={len(u)})", fontsize=9)
        ax.set_xlabel(f"final {rank}")
        ax.set_ylabel("probe_acc")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def _plot_spectra(picks: dict[str, pd.Series], spectra: dict[str, dict], path: Path) -> None:
    fig, axes = _figure(2)
    for ax, (rep, name) in zip(axes, (("z", "z (projector)"), ("h", "h (representation)"))):
        plot_spectra(ax, {f"{label} {row['trial_id']} (probe {row[TARGET]:.3f}, rank {row[RANKS[0]]:.1f})":
                          spectra[row["run_id"]].get(rep, []) for label, row in picks.items()})
        ax.set_title(f"final spectrum of {name}", fontsize=9)
    fig.savefig(path, dpi=110)


def _plot_histories(df: pd.DataFrame, histories: dict[str, dict[str, list]], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(2)
    colors = {"finished": "tab:blue", "stopped": "tab:orange", "diverged": "tab:red", "error": "tab:red"}
    status = dict(zip(df["run_id"], df["status"]))
    for ax, rank in zip(axes, RANKS):
        for run_id, points in histories.get(rank, {}).items():
            if points:
                st = status.get(run_id, "")
                ax.plot(*zip(*points), color=colors.get(st, "tab:gray"), alpha=0.6, lw=1, marker=".")
        for st, color in colors.items():
            if st != "error":
                ax.plot([], [], color=color, label=st)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(rank)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def _plot_collapse_map(df: pd.DataFrame, params: list[str], path: Path) -> None:
    fig, (ax,) = _figure(1, 5.5)
    px, py = params
    failed = _failed(df)
    ok = df[~failed & df[px].notna() & df[py].notna()]
    sc = ax.scatter(ok[px], ok[py], c=_col(ok, RANKS[0]), cmap="viridis", s=40, edgecolors="k", linewidths=0.3)
    fig.colorbar(sc, ax=ax, label="final effective_rank")
    bad = df[failed]
    if len(bad):
        ax.scatter(bad[px], bad[py], marker="x", c="tab:red", label="diverged / failed")
        ax.legend(fontsize=7)
    for p, set_scale in ((px, ax.set_xscale), (py, ax.set_yscale)):
        v = df[p].dropna()
        if len(v) and v.min() > 0 and v.max() / v.min() >= 10:
            set_scale("log")
    ax.set_xlabel(px[len(PARAM):])
    ax.set_ylabel(py[len(PARAM):])
    ax.set_title("collapse map", fontsize=9)
    fig.savefig(path, dpi=110)


def map_params(df: pd.DataFrame) -> list[str]:
    """The two numeric swept params with the most distinct values (the collapse map's axes)."""
    numeric = [c for c in swept_params(df) if pd.api.types.is_numeric_dtype(df[c])]
    return sorted(numeric, key=lambda c: -df[c].nunique())[:2]


def write_report(result: dict, df: pd.DataFrame, out_dir: str | Path, spectra: dict[str, dict] | None = None,
                 histories: dict[str, dict[str, list]] | None = None) -> list[Path]:
    """analysis.json, report.md and the plots; spectra: run_id -> {"z": [...], "h": [...]}, histories:
    metric -> run_id -> [(epoch, value)]. Plots whose data is missing are skipped and report.md says so."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "analysis.json"]
    files[0].write_text(json.dumps(result, indent=2, allow_nan=False))
    df = _normalize(df)
    axes = map_params(df)
    picks = spectrum_picks(df, set(spectra or {}))
    plots: dict[str, str | None] = {}  # title -> file, None when there was not enough data
    for title, name, fn, args, ready in [
        ("Effective rank vs probe accuracy", "rank_vs_probe.png", _plot_rank_vs_probe, (df, result), True),
        ("Spectra of the best, median and worst trials", "spectra.png", _plot_spectra, (picks, spectra), picks),
        ("Effective rank over epochs", "rank_over_epochs.png", _plot_histories, (df, histories), histories),
        (f"Collapse map ({', '.join(a[len(PARAM):] for a in axes) or 'needs two numeric swept params'})",
         "collapse_map.png", _plot_collapse_map, (df, axes), len(axes) == 2),
    ]:
        plots[title] = name if ready else None
        if ready:
            fn(*args, out / name)
            files.append(out / name)
    (out / "report.md").write_text(_markdown(result, df, plots))
    files.append(out / "report.md")
    return files


def _markdown(result: dict, df: pd.DataFrame, plots: dict[str, str | None]) -> str:
    ex = result["excluded"]
    lines = [f"# Collapse analysis: {df.attrs.get('experiment', 'sweep')}", "",
             f"Parent run `{df.attrs.get('parent_run_id', '?')}`. {result['n_trials']} trials "
             f"({', '.join(f'{v} {k}' for k, v in result['status_counts'].items()) or 'none'}); excluded: "
             f"{ex['diverged_or_failed']} diverged or failed, "
             + ", ".join(f"{v} with NaN {k}" for k, v in ex["nan"].items()) + ".",
             "Collapse class of z at the last epoch: "
             + (", ".join(f"{k} {v}" for k, v in result["collapse_counts"].items()) or "–") + ".", "",
             "## Does the effective rank predict probe accuracy?", "",
             "| predictor | scope | n | Spearman ρ [95% CI] | Kendall τ [95% CI] | Pearson r [95% CI] |",
             "|---|---|---|---|---|---|"]
    for rank, c in result["correlations"].items():
        for scope, s in [("all", c["overall"]), *c["per_method"].items()]:
            cells = [_stat_cell(s.get(k)) for k in ("spearman", "kendall", "pearson")]
            note = f" ({s['reason']})" if s.get("reason") else ""
            lines.append(f"| {rank} | {scope}{note} | {s['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Label-free selection", "",
              "Pick the trial with the highest effective rank; regret = best probe_acc − its probe_acc.", "",
              "| predictor | selected trial | its probe_acc | best trial | best probe_acc | regret |",
              "|---|---|---|---|---|---|"]
    for rank, s in result["selection"].items():
        lines.append(f"| {rank} | – | – | – | – | – |" if not s else
                     f"| {rank} | {s['selected_trial']} | {s['selected_probe_acc']:.4f} | {s['best_trial']} | "
                     f"{s['best_probe_acc']:.4f} | {s['regret']:.4f} |")
    lines += ["", "## Which hyperparameters drive collapse", "",
              ("Numeric: Spearman ρ with the final value; categorical: correlation ratio η with effective_rank "
               "and per-value means."), "",
              "| param | kind | n | strength | effective_rank | effective_rank_h | probe_acc |",
              "|---|---|---|---|---|---|---|"]
    for d in result["drivers"]:
        if d["kind"] == "numeric":
            cells = [f"ρ={d[m]['rho']:.3f} (p={d[m]['p']:.2g})" if d[m] else "–" for m in (*RANKS, TARGET)]
        else:
            cells = ["; ".join(f"{v}: {_fmt(s[m])}" for v, s in d["values"].items()) for m in (*RANKS, TARGET)]
        lines.append(f"| {d['param']} | {d['kind']} | {d['n']} | {d['strength']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""]
    for title, name in plots.items():
        lines += [f"### {title}", "", f"![{title}]({name})" if name else "(not enough data for this plot)", ""]
    return "\n".join(lines)


# --- everything, from MLflow back to MLflow

def fetch_spectra(tracking_uri: str, run_ids: list[str]) -> dict[str, dict]:
    from mlflow.exceptions import MlflowException


    c, out = _client(tracking_uri), {}
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in run_ids:
            try:
                out[run_id] = read_spectrum_csv(c.download_artifacts(run_id, SPECTRUM_CSV, Path(tmp) / run_id))
            except (MlflowException, OSError):
                pass  # a trial without a final spectrum (stopped early) is simply not plotted
    return out


def fetch_histories(tracking_uri: str, run_ids: list[str], metrics=RANKS) -> dict[str, dict[str, list]]:
    c = _client(tracking_uri)
    return {m: {r: sorted((h.step, h.value) for h in c.get_metric_history(r, m)) for r in run_ids} for m in metrics}


def run_analysis(experiment: str, tracking_uri: str, out_dir: str | Path, log_to_parent: bool = True,
                 parent_run_id: str | None = None) -> dict:
    """load_runs -> analyze -> write_report into out_dir; every file also becomes an artifact (folder
    `analysis/`) of the sweep's parent run."""
    df = load_runs(experiment, tracking_uri, parent_run_id)
    result = analyze(df)
    result.update(experiment=experiment, parent_run_id=df.attrs["parent_run_id"])
    picks = spectrum_picks(df)
    spectra = fetch_spectra(tracking_uri, list(dict.fromkeys(r["run_id"] for r in picks.values())))
    histories = fetch_histories(tracking_uri, list(df["run_id"]))
    files = write_report(result, df, out_dir, spectra, histories)
    if log_to_parent:
        c = _client(tracking_uri)
        for f in files:
            c.log_artifact(df.attrs["parent_run_id"], str(f), "analysis")
    return result
