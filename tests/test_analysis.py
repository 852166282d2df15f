from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ncssl_tune.analysis import (
    ROW_STATS,
    analyze,
    correlate,
    load_runs,
    map_params,
    spectrum_picks,
    swept_params,
    write_report,
)
from ncssl_tune.mlflow_store import TrackingError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def frame(rank, probe, method="vicreg", status="finished", **params) -> pd.DataFrame:
    n = len(rank)
    df = pd.DataFrame({"run_id": [f"r{i}" for i in range(n)], "trial_id": [f"t{i}" for i in range(n)],
                       "method": method, "status": status, "run_status": "FINISHED",
                       "effective_rank": rank, "effective_rank_h": np.asarray(rank, float) * 2, "probe_acc": probe,
                       "collapse": "none", **{f"param.{k}": v for k, v in params.items()}})
    df.loc[df["status"] == "diverged", "run_status"] = "FAILED"
    df.loc[df["status"] == "stopped", "run_status"] = "KILLED"
    return df


def overall(result, rank="effective_rank"):
    return result["correlations"][rank]["overall"]


def test_monotone_increasing_gives_one():
    x = np.arange(1.0, 11.0)
    res = analyze(frame(x, x ** 3 / 1000))
    c = overall(res)
    assert c["n"] == 10
    assert c["spearman"]["r"] == pytest.approx(1.0) and c["kendall"]["r"] == pytest.approx(1.0)
    assert c["spearman"]["p"] < 1e-6 and 0.8 < c["pearson"]["r"] < 1.0
    assert c["spearman"]["ci95"] == pytest.approx([1.0, 1.0])  # every resample is monotone too


def test_monotone_decreasing_gives_minus_one():
    x = np.arange(1.0, 11.0)
    c = overall(analyze(frame(x, -np.log(x))))
    assert c["spearman"]["r"] == pytest.approx(-1.0) and c["kendall"]["r"] == pytest.approx(-1.0)
    assert c["pearson"]["r"] < -0.9 and c["pearson"]["ci95"][1] < -0.8


def test_independent_gives_small_insignificant_rho():
    rng = np.random.default_rng(3)
    c = overall(analyze(frame(rng.normal(size=200), rng.normal(size=200)), n_boot=500))
    for name in ("spearman", "kendall", "pearson"):
        assert abs(c[name]["r"]) < 0.15 and c[name]["p"] > 0.05
        lo, hi = c[name]["ci95"]
        assert lo < 0 < hi


@pytest.mark.parametrize("n", [12, 230])  # Kendall switches to a per-row loop past 200
@pytest.mark.parametrize("name", ["spearman", "kendall", "pearson"])
def test_bootstrap_statistics_match_scipy_with_ties(name, n):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(6, n)).astype(float)  # many ties
    y = x + rng.integers(0, 3, size=(6, n))
    point = {"spearman": stats.spearmanr, "kendall": stats.kendalltau, "pearson": stats.pearsonr}[name]
    expected = [point(a, b).statistic for a, b in zip(x, y)]
    np.testing.assert_allclose(ROW_STATS[name](x, y), expected, atol=1e-12)


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=30), rng.normal(size=30)
    assert correlate(x, y, seed=5) == correlate(x, y, seed=5)
    assert correlate(x, y, seed=5)["spearman"]["ci95"] != correlate(x, y, seed=6)["spearman"]["ci95"]


def test_small_samples_get_exact_p_values():
    c = correlate([1.0, 2.0, 3.0], [0.3, 0.2, 0.1])
    assert c["spearman"]["r"] == pytest.approx(-1.0)
    assert c["spearman"]["p"] == pytest.approx(1 / 3) and c["kendall"]["p"] == pytest.approx(1 / 3)  # 2 of 3! orders
    x = np.arange(8.0)
    y = x.copy()
    y[[0, 1]] = y[[1, 0]]
    # as close to the identity: itself and the 7 adjacent swaps, in both tails
    assert correlate(x, y)["spearman"]["p"] == pytest.approx(2 * 8 / math.factorial(8))


def test_too_few_or_constant_values_give_null_with_reason():
    c = correlate([1.0, 2.0], [0.1, 0.2])
    assert c["spearman"] is None and "at least 3" in c["reason"]
    c = correlate([1.0, 1.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4])
    assert c["pearson"] is None and "constant" in c["reason"]


def test_diverged_failed_and_nan_rows_are_excluded_and_counted():
    x = np.arange(1.0, 9.0)
    df = frame(x, x / 10, status=["finished"] * 5 + ["diverged", "error", "stopped"])
    df.loc[0, "probe_acc"] = math.nan
    df.loc[1, "effective_rank_h"] = math.nan
    # Diverged trials keep stale metrics from their last good epoch: a perfect anti-correlation if included.
    df.loc[5, ["effective_rank", "probe_acc"]] = [100.0, 0.0]
    res = analyze(df)
    assert res["n_trials"] == 8 and res["excluded"]["diverged_or_failed"] == 2
    assert res["excluded"]["nan"] == {"effective_rank": 1, "effective_rank_h": 2}
    assert overall(res)["n"] == 5 and overall(res, "effective_rank_h")["n"] == 4
    assert overall(res)["spearman"]["r"] == pytest.approx(1.0)
    assert res["status_counts"] == {"finished": 5, "diverged": 1, "error": 1, "stopped": 1}


def test_per_method_split():
    x = np.arange(1.0, 7.0)
    df = pd.concat([frame(x, x / 10, method="vicreg"), frame(x, -x / 10, method="barlow_twins"),
                    frame([1.0, 2.0], [0.3, 0.4], method="wmse")], ignore_index=True)
    per = analyze(df)["correlations"]["effective_rank"]["per_method"]
    assert per["vicreg"]["spearman"]["r"] == pytest.approx(1.0)
    assert per["barlow_twins"]["spearman"]["r"] == pytest.approx(-1.0)
    assert per["wmse"]["spearman"] is None and per["wmse"]["n"] == 2 and "at least 3" in per["wmse"]["reason"]


def test_label_free_selection_regret():
    df = frame([5.0, 40.0, 20.0, 60.0, 1.0], [0.70, 0.90, 0.95, 0.80, 0.10],
               status=["finished"] * 4 + ["diverged"])
    df.loc[4, "effective_rank"] = 1000.0  # diverged: never selected
    sel = analyze(df)["selection"]["effective_rank"]
    assert (sel["selected_trial"], sel["best_trial"]) == ("t3", "t2")
    assert sel["selected_probe_acc"] == pytest.approx(0.80) and sel["best_probe_acc"] == pytest.approx(0.95)
    assert sel["regret"] == pytest.approx(0.15)


def test_empty_frame_gives_nulls():
    res = analyze(frame([], []))
    assert res["n_trials"] == 0 and res["selection"]["effective_rank"] is None
    assert overall(res)["spearman"] is None


def test_drivers_rank_swept_params_by_strength():
    rng = np.random.default_rng(0)
    n = 24
    mu = np.linspace(0.0, 50.0, n)
    noise = rng.permutation(n).astype(float)
    rank = mu + 0.1 * rng.normal(size=n)
    df = frame(rank, rank / 100, mu=mu, noise=noise, projector=["64-64", "256-256"] * (n // 2), threads=1)
    drivers = analyze(df)["drivers"]
    assert drivers[0]["param"] == "mu"
    assert {d["param"] for d in drivers} == {"mu", "noise", "projector"}  # threads does not vary
    mu_d = drivers[0]
    assert mu_d["kind"] == "numeric" and mu_d["effective_rank"]["rho"] == pytest.approx(1.0)
    proj = next(d for d in drivers if d["param"] == "projector")
    assert proj["kind"] == "categorical" and set(proj["values"]) == {"64-64", "256-256"}
    assert proj["values"]["64-64"]["n"] == 12
    assert proj["values"]["64-64"]["effective_rank"] == pytest.approx(df["effective_rank"][::2].mean())
    assert 0 <= proj["strength"] <= 1


def test_swept_and_map_params():
    df = frame([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], a=[1, 2, 3], b=[0.1, 0.1, 0.2], c=["x", "y", "x"], d=5)
    assert swept_params(df) == ["param.a", "param.b", "param.c"]
    assert map_params(df) == ["param.a", "param.b"]


def test_write_report_files(tmp_path):
    rng = np.random.default_rng(0)
    n = 12
    lam, mu = np.geomspace(1, 100, n), rng.uniform(0, 50, n)
    rank = 1 + mu
    probe = 0.5 + rank / 200 + 0.01 * rng.normal(size=n)
    df = frame(rank, probe, method=["vicreg", "barlow_twins"] * (n // 2),
               status=["finished"] * 10 + ["stopped", "diverged"], **{"loss.lam": lam, "loss.mu": mu})
    result = analyze(df)
    spectra = {r: {"z": list(np.geomspace(1, 1e-6, 32)), "h": list(np.geomspace(2, 1e-4, 16)) + [0.0]}
               for r in df["run_id"][:10]}
    histories = {"effective_rank": {r: [(1, 2.0), (2, float(v))] for r, v in zip(df["run_id"], rank)},
                 "effective_rank_h": {r: [(1, 3.0), (2, 4.0)] for r in df["run_id"]}}
    files = write_report(result, df, tmp_path, spectra, histories)
    names = {"analysis.json", "report.md", "rank_vs_probe.png", "spectra.png", "rank_over_epochs.png",
             "collapse_map.png"}
    assert {f.name for f in files} == names == {p.name for p in tmp_path.iterdir()}
    for name in names - {"analysis.json", "report.md"}:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert json.loads((tmp_path / "analysis.json").read_text()) == result
    md = (tmp_path / "report.md").read_text()
    sp = overall(result)["spearman"]
    assert f"{sp['r']:.3f} [{sp['ci95'][0]:.3f}, {sp['ci95'][1]:.3f}]" in md
    sel = result["selection"]["effective_rank"]
    assert f"{sel['regret']:.4f}" in md and sel["selected_trial"] in md
    assert "loss.mu" in md and "1 diverged or failed" in md
    for name in names - {"analysis.json", "report.md"}:
        assert f"({name})" in md
    picks = spectrum_picks(df, set(spectra))
    assert picks["best"]["probe_acc"] == df["probe_acc"][:10].max()
    assert picks["worst"]["probe_acc"] == df["probe_acc"][:10].min()


def test_write_report_without_spectra_histories_or_map(tmp_path):
    df = frame([1.0, 2.0, 3.0, 4.0], [0.4, 0.3, 0.2, 0.1])
    files = write_report(analyze(df), df, tmp_path)
    assert {f.name for f in files} == {"analysis.json", "report.md", "rank_vs_probe.png"}
    md = (tmp_path / "report.md").read_text()
    assert md.count("(not enough data for this plot)") == 3


def test_load_runs_needs_an_existing_store(tmp_path):
    with pytest.raises(TrackingError, match="no MLflow database"):
        load_runs("vicreg", f"sqlite:///{tmp_path}/mlflow.db")
    assert not (tmp_path / "mlflow.db").exists()
