from __future__ import annotations

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ncssl_tune.analysis import analyze, load_epochs, load_runs, run_analysis
from ncssl_tune.analysis.report import markdown, summary_lines
from ncssl_tune.analysis.stats import equal_budget, selection, spearman, spectrum_picks
from ncssl_tune.analysis.study import scopes
from ncssl_tune.records.spectra import write_spectra_csv
from ncssl_tune.records.store import TrackingError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- statistics

def test_spearman_interval_and_p_come_from_one_fisher_z():
    rng = np.random.default_rng(0)
    for n in (4, 5, 9, 30):
        for _ in range(40):
            x = rng.normal(size=n)
            y = 0.8 * x + rng.normal(size=n)
            s = spearman(x, y)
            rho = stats.spearmanr(x, y).statistic
            assert s["rho"] == pytest.approx(rho)
            if abs(rho) < 1 - 1e-9:  # |rho| = 1: see the next test
                z, se = math.atanh(rho), math.sqrt((1 + rho ** 2 / 2) / (n - 3))
                ci = [math.tanh(z - 1.959964 * se), math.tanh(z + 1.959964 * se)]
                assert s["ci95"] == pytest.approx(ci, abs=1e-6)
                assert s["p"] == pytest.approx(2 * stats.norm.sf(abs(z) / se))
            assert (s["p"] < 0.05) == (not s["ci95"][0] <= 0 <= s["ci95"][1])  # never disagree
            assert ("warning" in s) == (n < 8)


def test_spearman_with_ties_matches_scipy():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, size=40).astype(float)
    y = x + rng.integers(0, 3, size=40)
    assert spearman(x, y)["rho"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_small_n_is_honest():
    # the case: rho = 0.949 on 4 trials must not come with an interval far from 0
    s = spearman([1, 2, 3, 4], [1, 2, 4, 3.0])
    assert s["rho"] == pytest.approx(0.8) and s["p"] > 0.05 and s["ci95"][0] < 0 and "warning" in s
    perfect = spearman([1, 2, 3, 4], [10, 20, 30, 40.0])
    assert perfect["rho"] == 1.0 and perfect["ci95"][1] == 1.0 and perfect["p"] > 0.05 and perfect["ci95"][0] < 0
    assert spearman([1, 2, 3], [1, 2, 3.0])["rho"] is None
    assert "constant" in spearman([1, 1, 1, 1.0], [1, 2, 3, 4.0])["reason"]


def test_selection_regret_and_random_pick():
    s = selection([3, 1, 3, 0.0], [0.7, 0.9, 0.8, 0.6], np.array(["a", "b", "c", "d"]), "max", "max")
    assert (s["selected_trial"], s["n_tied"], s["best_trial"]) == ("a", 2, "b")
    assert s["regret"] == pytest.approx(0.15) and s["random_regret"] == pytest.approx((0.2 + 0 + 0.1 + 0.3) / 4)
    s = selection([3, 1, 2, 0.0], [5.0, 1.0, 2.0, 3.0], np.array(["a", "b", "c", "d"]), "min", "min")
    assert (s["selected_trial"], s["regret"]) == ("d", 2.0)  # lowest predictor, objective 3 vs best 1


def epoch_frame(values: dict[str, dict[int, dict[str, float]]]) -> pd.DataFrame:
    return pd.DataFrame([{"run_id": r, "epoch": e, **m} for r, eps in values.items() for e, m in eps.items()])


def test_equal_budget_uses_only_fresh_probes():
    objective = "probe_acc"
    runs = pd.DataFrame({"run_id": [f"r{i}" for i in range(6)], "trial_id": [f"t{i}" for i in range(6)]})
    values = {f"r{i}": {e: {objective: 0.5 + 0.01 * i, "probe_epoch": e, "lidar": float(i)} for e in (1, 2)}
              for i in range(6)}
    values["r0"][2]["probe_epoch"] = 1  # carried from epoch 1: epoch 2 has only 5 fresh trials
    out = equal_budget(epoch_frame(values), runs, {"lidar": "max"}, objective, "max")
    assert out["qualifying_epochs"] == [1] and out["headline_epoch"] == 1 and out["epochs"] == {1: 6, 2: 5}
    assert out["table"][0]["rho"] == 1.0 and out["table"][0]["n"] == 6
    # kNN, the few-labels probe and label-free metrics are never carried: probe_epoch does not concern them
    for other in ("fewshot_acc", "knn_acc", "lidar_h"):
        out = equal_budget(epoch_frame(values).rename(columns={objective: other}), runs, {"lidar": "max"}, other,
                           "max")
        assert out["qualifying_epochs"] == [1, 2]


# --- a sweep written to a real MLflow store, whose answer is known

N_OK = 8


def _acc(i: int, e: int) -> float:
    return 0.5 + 0.04 * i + 0.001 * e


def _trial_metrics(i: int, e: int) -> dict[str, float]:
    """Trial i at epoch e: lidar agrees with the objective, effective_rank disagrees, avg_corr (read lower =
    better) agrees, probe_acc (not the objective here) is reversed; all known exactly."""
    return {"knn_acc": _acc(i, e), "probe_acc": 1 - _acc(i, e), "probe_epoch": e, "lidar": i + e / 100,
            "effective_rank": 50.0 - i, "avg_corr": -float(i), "epoch": e}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("known", artifact_location=(tmp / "artifacts").as_uri())
    parent = c.create_run(exp, tags={"run_kind": "sweep", "objective": "knn_acc (max)"}).info.run_id
    for k, v in {"search.metric": "knn_acc", "search.mode": "null", "reference_random_init": "0.3"}.items():
        c.log_param(parent, k, v)
    c.log_metric(parent, "reference_pixels_knn_acc", 0.4)  # the objective's own one wins over a plain one
    c.log_metric(parent, "reference_pixels", 0.9)
    # t0..t5 reach epoch 9, t6, t7 stop at 3 (ASHA), t8 diverges at 4 with a huge lidar (must be excluded);
    # t0, t1 end totally collapsed: the healthy scope has t2..t7, of which only 4 reach epoch 9.
    last = {0: 10, 1: 10, 2: 10, 3: 9, 4: 9, 5: 9, 6: 3, 7: 3, 8: 4}
    for i, n_ep in last.items():
        status = "diverged" if i == 8 else "finished" if n_ep == 10 else "stopped"
        run = c.create_run(exp, tags={"mlflow.parentRunId": parent, "ray_trial_id": f"t{i}", "method": "vicreg",
                                      "status": status, "collapse": "total" if i < 2 else "none"})
        rid = run.info.run_id
        c.log_param(rid, "loss.vicreg.mu", str(10.0 * i))
        c.log_param(rid, "model.norm", "none" if i < 2 else "batch")
        metrics = []
        for e in range(1, n_ep + 1):
            m = _trial_metrics(i, e) if i < 8 else {**_trial_metrics(0, e), "lidar": 1e6}
            if e == 10:
                m["lidar"] = -m["lidar"]  # only 3 trials reach epoch 10: it must not be the headline
            metrics += [Metric(k, v, 0, e) for k, v in m.items()]
        c.log_batch(rid, metrics=metrics)
        if i in (0, 2, 3, 5):  # final spectra of some trials only
            write_spectra_csv(tmp / "spectrum.csv", {7: ([4.0, 2.0, 1.0 / (i + 1)], [1.0, 0.5])})
            c.log_artifact(rid, str(tmp / "spectrum.csv"))
        c.set_terminated(rid, "FAILED" if i == 8 else "FINISHED")
    return uri


def test_known_sweep_end_to_end(store, tmp_path):
    result = run_analysis("known", store, tmp_path, log_to_parent=True)
    assert result["objective"] == {"metric": "knn_acc", "mode": "max"}  # read from the parent run, not assumed
    assert result["reference"] == {"random_init": 0.3, "pixels": 0.4}
    assert result["excluded"]["diverged_or_failed"] == 1
    assert set(result["scopes"]) == {"all", "healthy"}  # one method: no per-method copy of "all"
    assert set(result["predictors"]) == {"lidar", "effective_rank", "avg_corr"}  # probe_acc is no predictor

    every = result["scopes"]["all"]
    assert every["n_trials"] == N_OK and every["qualifying_epochs"] == list(range(1, 10))
    assert every["headline_epoch"] == 9  # epoch 10: only 3 trials
    table = {r["predictor"]: r for r in every["table"]}
    assert table["lidar"]["rho"] == 1.0 and table["lidar"]["n"] == 6
    assert table["avg_corr"]["rho"] == 1.0  # lower is better, so oriented it agrees
    assert table["effective_rank"]["rho"] == -1.0
    assert table["effective_rank"]["rank_rho"] == 3 and table["effective_rank"]["rank_regret"] == 3
    assert table["lidar"]["rank_rho"] == table["avg_corr"]["rank_rho"] == 1  # tied: competition ranks
    assert table["lidar"]["selection"]["regret"] == 0.0 and table["lidar"]["selection"]["selected_trial"] == "t5"
    assert table["effective_rank"]["selection"]["selected_trial"] == "t0"
    assert table["effective_rank"]["selection"]["regret"] == pytest.approx(_acc(5, 9) - _acc(0, 9))
    assert table["lidar"]["selection"]["random_regret"] == pytest.approx(0.04 * 2.5)
    assert all(c["n"] == (8 if c["epoch"] <= 3 else 6) for c in every["curves"]["lidar"])

    healthy = result["scopes"]["healthy"]
    assert healthy["n_trials"] == 6 and healthy["headline_epoch"] == 3
    assert {r["predictor"]: r["n"] for r in healthy["table"]} == {"lidar": 6, "effective_rank": 6, "avg_corr": 6}
    assert result["drivers"][0]["param"] in ("loss.vicreg.mu", "model.norm")
    assert result["optuna"] == {"complete": 3, "trials": 9}  # t0..t2 finished; stopped ones are PRUNED in Optuna

    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"analysis.json", "report.md", "report.html", "predictors.png", "rho_over_epochs.png",
                     "rank_vs_objective.png", "rank_over_epochs.png", "collapse_map.png", "spectra.png"}
    for name in files - {"analysis.json", "report.md", "report.html"}:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "analysis.json").read_text()) == result
    md = (tmp_path / "report.md").read_text()
    assert "Headline epoch **9**" in md and "Headline epoch **3**" in md and "Warning" in md  # n = 6 < 8
    assert "| 1 | lidar | higher | 6 | 1 [" in md and "Reference scores: random_init 0.3, pixels 0.4." in md
    assert "(not enough data for this plot)" not in md
    assert "importance is computed on the study's 3 COMPLETE trials of 9" in md and "all 8 trials" in md
    page = (tmp_path / "report.html").read_text()
    # every plot report.md links is embedded in report.html, so MLflow's viewer shows it without the folder
    assert page.count('src="data:image/png;base64,') == len(files - {"analysis.json", "report.md", "report.html"})
    assert "<th>Spearman ρ [95% CI]</th>" in page and "<strong>9</strong>" in page

    from mlflow import MlflowClient
    logged = {a.path for a in MlflowClient(store).list_artifacts(load_runs("known", store).attrs["parent_run_id"],
                                                                 "analysis")}
    assert logged == {f"analysis/{f}" for f in files}


def test_spectra_are_fetched_for_the_distinct_picks_only(store):
    from ncssl_tune.analysis.load import fetch_spectra

    df = load_runs("known", store)
    spectra = fetch_spectra(store, df[df["status"] != "diverged"], "knn_acc", "max")
    by_trial = dict(zip(df["run_id"], df["trial_id"]))
    # t0..t7 finished or stopped; with a spectrum: t5, t3, t2, t0 by final knn_acc: best t5, median (index 2) t2,
    # worst t0, which is also the collapsed one
    assert sorted(by_trial[r] for r in spectra) == ["t0", "t2", "t5"]
    assert spectra[df[df["trial_id"] == "t2"]["run_id"].item()]["z"] == pytest.approx([4.0, 2.0, 1 / 3])


def test_summary_lines_are_rounded(store):
    df = load_runs("known", store)
    epochs = load_epochs(store, list(df["run_id"]), ["knn_acc", "lidar", "effective_rank", "avg_corr"])
    lines = summary_lines(analyze(df, epochs, "knn_acc", "max"))
    assert lines[0].startswith("objective knn_acc (max)")
    assert any("lidar" in s and "p = " in s for s in lines) and any("WARNING only 6 trials" in s for s in lines)
    assert not any(len(t) > 6 and t.replace(".", "").isdigit() for s in lines for t in s.split())  # <= 3 digits


def test_several_methods_get_their_own_scopes():
    ok = pd.DataFrame({"method": ["vicreg", "wmse", "vicreg"], "collapse": ["none", "none", "total"]})
    assert list(scopes(ok)) == ["all", "healthy", "method=vicreg", "method=wmse"]


def test_spectrum_picks_are_distinct_and_show_a_collapsed_trial():
    runs = pd.DataFrame({"run_id": list("abcdef"), "trial_id": list("abcdef"), "status": "finished",
                         "run_status": "FINISHED", "knn_acc": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
                         "collapse": ["none"] * 4 + ["total", "none"]})
    picks = spectrum_picks(runs, "knn_acc", "max", set("abcdef"))
    assert {k: v["run_id"] for k, v in picks.items()} == {"best": "a", "median": "d", "worst": "f",
                                                          "collapsed (total)": "e"}
    assert [v["run_id"] for v in spectrum_picks(runs, "knn_acc", "max", {"a", "b"}).values()] == ["a", "b"]
    assert [v["run_id"] for v in spectrum_picks(runs, "knn_acc", "min", {"a"}).values()] == ["a"]


def test_markdown_without_any_qualifying_epoch():
    runs = pd.DataFrame({"run_id": ["a", "b"], "trial_id": ["a", "b"], "status": "finished",
                         "run_status": "FINISHED", "collapse": "none"})
    res = analyze(runs, epoch_frame({"a": {1: {"knn_acc": 0.5, "lidar": 1.0}}}), "knn_acc", "max")
    assert res["scopes"]["all"]["headline_epoch"] is None
    assert "no epoch was reached by 6 trials (at most 1)" in markdown(res, {})


def test_load_runs_needs_an_existing_store(tmp_path):
    with pytest.raises(TrackingError, match="no MLflow database"):
        load_runs("vicreg", f"sqlite:///{tmp_path}/mlflow.db")
    assert not (tmp_path / "mlflow.db").exists()


def test_analysis_imports_neither_ray_nor_optuna():
    import subprocess


    code = "import sys, ncssl_tune.analysis; print([m for m in ('ray', 'optuna', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_scope_with_the_same_trials_is_not_printed_twice():
    ids = [f"r{i}" for i in range(8)]
    runs = pd.DataFrame({"run_id": ids, "trial_id": ids, "status": "stopped", "run_status": "FINISHED",
                         "method": "vicreg", "collapse": ["total"] * 2 + ["none"] * 6})
    # the two collapsed trials stop after epoch 1: at epoch 2 "all" and "healthy" hold the same 6 trials
    values = {r: {e: {"knn_acc": 0.1 * i, "lidar": float(i)} for e in ((1,) if i < 2 else (1, 2))}
              for i, r in enumerate(ids)}
    res = analyze(runs, epoch_frame(values), "knn_acc", "max")
    assert res["scopes"]["all"]["headline_trials"] == res["scopes"]["healthy"]["headline_trials"] == ids[2:]
    md = markdown(res, {})
    assert md.count("| rank ρ |") == 1 and "the same 6 trials as in `all`: the table is the one above" in md
    assert any("the same trials as all" in s for s in summary_lines(res))


# --- the sweep's answer on its parent run (analysis/parent.py)

def test_parent_summary_names_the_best_trial_and_the_headline():
    from ncssl_tune.analysis.parent import parent_summary

    runs = pd.DataFrame({"trial_id": ["aa", "bb", "cc"], "trial_number": ["1", "2", "3"],
                         "status": ["finished", "diverged", "stopped"], "run_status": ["FINISHED", "FAILED", "FINISHED"],
                         "fewshot_acc": [0.5, 0.9, 0.7]})
    row = {"predictor": "effective_rank_h", "rho": 0.8123, "ci95": [0.41, 0.95], "n": 12, "p": 0.001}
    result = {"objective": {"metric": "fewshot_acc", "mode": "max"}, "reference": {"random_init": 0.3, "pixels": 0.6},
              "scopes": {"all": {"table": [{"predictor": "lidar", "rho": None}, row]}}}

    metrics, tags = parent_summary(result, runs)

    assert metrics == {"best_fewshot_acc": 0.7}  # the diverged trial's 0.9 is stale: not the best
    assert tags["best_trial"] == "#3 (cc)"
    assert (tags["headline_predictor"], tags["headline_rho"]) == ("effective_rank_h", "0.812")
    note = tags["mlflow.note.content"]
    for part in ("fewshot_acc (max)", "#3 (cc), fewshot_acc = 0.7", "random-init 0.3, pixels 0.6",
                 "effective_rank_h, Spearman ρ = 0.812 [0.41, 0.95] (n = 12)", "analysis/report.html"):
        assert part in note, (part, note)
    # a study leads with its per-configuration ranking, where the training loss is a baseline, not a predictor
    study = {"scopes": {"all": {"table": [{"predictor": "loss", "rho": 0.9, "baseline": True}, row]}}}
    assert parent_summary({**result, "study": study}, runs)[1]["headline_predictor"] == "effective_rank_h"


def test_optuna_counts_trials_as_the_searcher_tells_them():
    """A finished trial is COMPLETE; with repeats an Optuna trial is a configuration, COMPLETE only when every
    repeat finished (sweep/searcher.py)."""
    from ncssl_tune.analysis.study import optuna_counts

    single = pd.DataFrame({"status": ["finished", "stopped", "diverged", "finished"]})
    assert optuna_counts(single) == {"complete": 2, "trials": 4}
    repeats = pd.DataFrame({"config_id": ["a", "a", "b", "b", "c", "c"],
                            "status": ["finished", "finished", "finished", "stopped", "stopped", "stopped"]})
    assert optuna_counts(repeats) == {"complete": 1, "trials": 3}
