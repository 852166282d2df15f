"""The study statistics (analysis/repeats.py) on constructed cases whose answers are known by hand, and against
scipy where scipy has the statistic."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ncssl_tune.analysis.repeats import (
    carry_forward,
    ceiling,
    config_means,
    early_prediction,
    kendall_tau,
    retest,
    spearman_brown,
)


def _study(values: dict[tuple[str, int], dict[int, dict[str, float]]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """{(config_id, repeat): {epoch: {metric: value}}} -> (epochs, runs) frames as the analysis loads them."""
    runs, rows = [], []
    for (cid, rep), by_epoch in values.items():
        rid = f"{cid}-{rep}"
        runs.append({"run_id": rid, "config_id": cid, "repeat": rep, "stop_reason": ""})
        rows += [{"run_id": rid, "epoch": e, **m} for e, m in by_epoch.items()]
    return pd.DataFrame(rows), pd.DataFrame(runs)


def test_spearman_brown_at_known_points():
    assert spearman_brown(0.5, 2) == pytest.approx(2 / 3)
    assert spearman_brown(1.0, 4) == pytest.approx(1.0)
    assert spearman_brown(0.0, 3) == 0.0
    assert spearman_brown(0.6, 1) == pytest.approx(0.6)


def test_ceiling_is_the_geometric_mean_of_the_reliabilities():
    assert ceiling(0.81, 0.64) == pytest.approx(0.72)
    assert ceiling(1.0, 1.0) == 1.0
    assert ceiling(None, 0.5) is None and ceiling(-0.2, 0.9) is None


@pytest.mark.parametrize("flip", [False, True])
def test_retest_of_a_perfect_and_a_reversed_repeat(flip):
    # repeat 1 = repeat 0 + d: the order is kept (or reversed); two values d apart have SD d/√2
    d, base = 0.01, np.linspace(0.5, 0.9, 10)
    second = base[::-1] + d if flip else base + d
    values = {(f"c{i}", 0): {3: {"acc": base[i]}} for i in range(10)}
    values |= {(f"c{i}", 1): {3: {"acc": second[i]}} for i in range(10)}
    epochs, runs = _study(values)
    r = retest(epochs, runs, "acc", 3)
    assert r["n_configs"] == 10 and r["repeats"] == 2
    assert r["r"] == pytest.approx(-1.0 if flip else 1.0)
    if not flip:
        assert r["r_mean"] == pytest.approx(1.0)
        assert r["within_sd"] == pytest.approx(d / math.sqrt(2))


def test_retest_matches_scipy_on_noisy_repeats():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=40)
    a, b = truth + rng.normal(scale=0.7, size=40), truth + rng.normal(scale=0.7, size=40)
    values = {(f"c{i}", 0): {20: {"acc": a[i]}} for i in range(40)} | {(f"c{i}", 1): {20: {"acc": b[i]}} for i in range(40)}
    r = retest(*_study(values), "acc", 20)
    expected = stats.spearmanr(a, b).statistic
    assert r["r"] == pytest.approx(expected)
    assert r["r_mean"] == pytest.approx(2 * expected / (1 + expected))
    assert r["within_sd"] == pytest.approx(math.sqrt(np.mean([np.var([x, y], ddof=1) for x, y in zip(a, b)])))


def test_retest_without_repeats_says_so():
    epochs, runs = _study({(f"c{i}", 0): {1: {"acc": float(i)}} for i in range(6)})
    assert retest(epochs, runs, "acc", 1)["reason"] == "no configuration was trained twice"


def test_config_means_average_the_repeats_measured_at_each_epoch():
    epochs, runs = _study({("a", 0): {1: {"acc": 0.2}, 2: {"acc": 0.4}}, ("a", 1): {1: {"acc": 0.6}},
                           ("b", 0): {1: {"acc": 0.1}}, ("b", 1): {1: {"acc": 0.3}}})
    m = config_means(epochs, runs, ["acc"]).set_index(["run_id", "epoch"])
    assert m.loc[("a", 1), "acc"] == pytest.approx(0.4) and m.loc[("a", 1), "n_repeats"] == 2
    assert m.loc[("a", 2), "acc"] == pytest.approx(0.4) and m.loc[("a", 2), "n_repeats"] == 1
    assert m.loc[("b", 1), "acc"] == pytest.approx(0.2)


def test_only_total_collapse_stops_are_carried_to_the_final_epoch():
    epochs, runs = _study({("a", 0): {1: {"acc": 0.5}, 2: {"acc": 0.3}}, ("b", 0): {1: {"acc": 0.7}},
                           ("c", 0): {e: {"acc": 0.9} for e in range(1, 5)}})
    runs["stop_reason"] = ["collapse_total (epoch 2)", "asha", ""]
    out = carry_forward(epochs, runs, until=4)
    a = out[out["run_id"] == "a-0"].set_index("epoch")
    assert list(a.index) == [1, 2, 3, 4] and list(a["acc"]) == [0.5, 0.3, 0.3, 0.3]
    assert list(a["carried"]) == [False, False, True, True]
    assert list(out[out["run_id"] == "b-0"]["epoch"]) == [1]  # ASHA's stop: its future is unknown
    assert len(out) == len(epochs) + 2


def test_early_prediction_of_a_predictor_that_orders_the_final_objective_at_epoch_1():
    rng = np.random.default_rng(1)
    final = rng.uniform(0.5, 0.9, 12)
    rows = []
    for i in range(12):
        rows += [{"run_id": f"c{i}", "epoch": 1, "rank": 10 * final[i], "corr": rng.uniform(), "acc": 0.5},
                 {"run_id": f"c{i}", "epoch": 2, "rank": 10 * final[i], "corr": rng.uniform(), "acc": final[i]}]
    out = early_prediction(pd.DataFrame(rows), {"rank": "max", "corr": "min"}, "acc", "max", final_epoch=2)
    assert out["rank"][0]["epoch"] == 1 and out["rank"][0]["rho"] == pytest.approx(1.0)
    assert out["rank"][0]["regret"] == 0.0
    assert out["rank"][0]["random_regret"] == pytest.approx(final.max() - final.mean())
    assert out["acc"][-1]["rho"] == pytest.approx(1.0)  # the objective itself at the final epoch
    assert out["acc"][0]["rho"] is None  # constant at epoch 1: no statistic
    corr1 = [r for r in rows if r["epoch"] == 1]
    expected = stats.spearmanr([-r["corr"] for r in corr1], final).statistic
    assert out["corr"][0]["rho"] == pytest.approx(expected)


def test_kendall_tau_against_scipy():
    a = ["p1", "p2", "p3", "p4", "p5", "p6"]
    b = ["p2", "p1", "p3", "p6", "p5", "p4"]
    assert kendall_tau(a, a) == 1.0 and kendall_tau(a, a[::-1]) == -1.0
    expected = stats.kendalltau([a.index(x) for x in a], [b.index(x) for x in a]).statistic
    assert kendall_tau(a, b) == pytest.approx(expected)
    assert kendall_tau(a, ["p1"]) is None


def test_analyze_a_constructed_study_end_to_end():
    """12 configurations × 2 repeats, 3 epochs. The objective is a config's quality plus seed noise; effective_rank
    tracks quality exactly (its repeats agree perfectly), avg_corr is pure noise; one configuration collapses
    totally at epoch 2 and is stopped there; loss falls with quality."""
    from ncssl_tune.analysis import analyze

    rng = np.random.default_rng(3)
    quality = np.linspace(0.5, 0.9, 12)
    runs, rows = [], []
    for c in range(12):
        for r in range(2):
            rid = f"c{c}r{r}"
            stopped = c == 0
            runs.append({"run_id": rid, "trial_id": rid, "config_id": f"c{c}", "param.train.seed": 1000 * r,
                         "param.loss.vicreg.lam": float(c), "method": "vicreg", "status": "stopped" if stopped
                         else "finished", "run_status": "FINISHED", "collapse": "total" if stopped else "none",
                         "stop_reason": "collapse_total (epoch 2)" if stopped else "", "epoch": 2 if stopped else 3})
            for e in (1, 2) if stopped else (1, 2, 3):
                acc = quality[c] * e / 3 + rng.normal(scale=0.01)
                rows.append({"run_id": rid, "epoch": e, "fewshot_acc": acc, "effective_rank": 10 * quality[c] * e,
                             "avg_corr": rng.uniform(), "loss": 1 - quality[c] + 0.05 * rng.normal()})
    runs_df = pd.DataFrame(runs)
    runs_df["effective_rank"] = runs_df["config_id"].map(lambda c: 30 * quality[int(c[1:])])
    res = analyze(runs_df, pd.DataFrame(rows), "fewshot_acc", "max")
    st = res["study"]
    assert (st["n_configs"], st["repeats"], st["n_trials"], st["final_epoch"]) == (12, 2, 24, 3)
    assert st["carried_trials"] == ["c0r0", "c0r1"] and st["baselines"] == {"loss": "min"}
    head = st["scopes"]["all"]
    assert head["headline_epoch"] == 3 and head["n_trials"] == 12  # every configuration, carried ones included
    table = {r["predictor"]: r for r in head["table"]}
    assert table["effective_rank"]["rho"] == pytest.approx(1.0) and table["effective_rank"]["n"] == 12
    assert table["loss"]["baseline"] and not table["effective_rank"]["baseline"]
    noise = st["noise"]
    assert noise["predictors"]["effective_rank"]["r"] == pytest.approx(1.0)
    assert noise["objective"]["n_configs"] == 12 and noise["objective"]["r"] > 0.9
    assert noise["predictors"]["effective_rank"]["ceiling"] == pytest.approx(math.sqrt(noise["objective"]["r_mean"]))
    assert abs(noise["predictors"]["avg_corr"]["r"]) < 0.7  # independent draws per repeat
    early = st["early"]["effective_rank"]
    assert [p["epoch"] for p in early] == [1, 2, 3] and early[0]["rho"] == pytest.approx(1.0)
    assert early[0]["regret"] == 0.0
    assert [d["param"] for d in st["drivers"]] == ["loss.vicreg.lam"]  # the seed is not a driver
    assert res["drivers_epochs"] == [2, 3]  # the search view mixes the collapsed trials' epoch 2 with epoch 3


def test_a_search_without_repeats_has_no_study_section():
    from ncssl_tune.analysis import analyze

    runs = pd.DataFrame({"run_id": [f"r{i}" for i in range(6)], "config_id": [f"c{i}" for i in range(6)],
                         "epoch": 2})
    epochs = pd.DataFrame([{"run_id": f"r{i}", "epoch": e, "knn_acc": 0.1 * i, "lidar": float(i)}
                           for i in range(6) for e in (1, 2)])
    assert "study" not in analyze(runs, epochs, "knn_acc", "max")


def test_the_study_report_leads_with_the_study_and_draws_early_prediction(tmp_path):
    from ncssl_tune.analysis import analyze, summary_lines, write_report

    rng = np.random.default_rng(4)
    runs, rows = [], []
    for c in range(10):
        for r in range(2):
            rid = f"c{c}r{r}"
            runs.append({"run_id": rid, "trial_id": rid, "config_id": f"c{c}", "param.train.seed": r, "epoch": 2,
                         "method": "vicreg", "status": "finished", "run_status": "FINISHED", "collapse": "none",
                         "knn_acc": 2.0 * c})
            rows += [{"run_id": rid, "epoch": e, "knn_acc": c * e + rng.normal(), "lidar": c + rng.normal(),
                      "loss": -c + rng.normal()} for e in (1, 2)]
    res = analyze(pd.DataFrame(runs), pd.DataFrame(rows), "knn_acc", "max")
    lines = summary_lines(res)
    assert lines[0].startswith("study: 10 configurations x 2 repeats")
    assert any("(baseline)" in line for line in lines)
    files = {p.name for p in write_report(res, pd.DataFrame(runs), pd.DataFrame(rows), tmp_path)}
    assert "early_prediction.png" in files
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Study: 10 configurations × 2 repeats") < md.index("## The same trials one by one")
    assert "| loss | baseline |" in md and "| lidar | label-free |" in md


def test_lidar_is_flagged_where_its_views_cannot_fill_the_width_of_z():
    from ncssl_tune.analysis.study import lidar_rank

    runs = pd.DataFrame({"param.model.projector": ["64-64", "256-256-256", "1024-1024-1024"],
                         "param.eval.cond_samples": [128, 128, 512], "param.eval.cond_views": [2, 2, 3]})
    # M(K-1) = 128, 128, 1024 against D = 64, 256, 1024: only the middle one is short
    assert lidar_rank(runs) == {"trials": 3, "rank_deficient": 1, "widths": [256], "views_dof": [128, 1024]}
    assert lidar_rank(runs.drop(columns=["param.eval.cond_views"])) is None


def test_replication_of_two_constructed_analyses():
    from ncssl_tune.analysis.replication import replication, replication_markdown

    def result(order: list[str], rhos: list[float]) -> dict:
        table = [{"predictor": p, "rho": r, "ci95": [r - 0.1, r + 0.1], "n": 40, "ceiling": 0.9,
                  "baseline": p == "loss"} for p, r in zip(order, rhos)]
        return {"study": {"scopes": {"all": {"headline_epoch": 20, "table": table}},
                          "noise": {"objective": {"r": 0.8, "n_configs": 40, "r_mean": 0.89, "within_sd": 0.01}}}}

    a = result(["rank_h", "lidar", "loss", "avg_corr"], [0.9, 0.5, 0.4, 0.1])
    b = result(["rank_h", "avg_corr", "lidar", "loss"], [0.8, 0.4, 0.3, 0.2])
    rep = replication(a, b)
    # label-free rankings (rank_h, lidar, avg_corr) vs (rank_h, avg_corr, lidar): one discordant pair of three
    assert rep["kendall_tau"] == pytest.approx(1 / 3) and rep["n_ranked"] == 3
    assert rep["same_top"] and rep["top"] == ["rank_h", "rank_h"]
    md = replication_markdown(rep)
    assert "| rank_h | label-free | 0.9 [0.8, 1] | 0.9 | 0.8 [0.7, 0.9] | 0.9 |" in md
    assert "| loss | baseline |" in md and "objective test-retest r = 0.8 over 40 configurations" in md


def test_replicate_command_prints_the_table_and_refuses_a_bad_file(tmp_path, capsys):
    import json

    from ncssl_tune.cli import main

    table = [{"predictor": p, "rho": r, "ci95": [r - 0.1, r + 0.1], "n": 40} for p, r in (("a", 0.8), ("b", 0.2))]
    for name in ("one", "two"):
        (tmp_path / name / "analysis").mkdir(parents=True)
        (tmp_path / name / "analysis" / "analysis.json").write_text(json.dumps(
            {"scopes": {"all": {"headline_epoch": 9, "table": table}}}))
    files = [str(tmp_path / n / "analysis" / "analysis.json") for n in ("one", "two")]
    assert main(["replicate", *files]) == 0
    out = capsys.readouterr().out
    assert "Kendall τ" in out and "**1**" in out and "| ρ one [95% CI] |" in out
    assert main(["replicate", *files, "--scope", "healthy"]) == 2
    assert "--scope 'healthy' not in this analysis; choose from: all" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert main(["replicate", files[0], str(tmp_path / "bad.json")]) == 2


def test_a_study_recorded_in_mlflow_is_analysed_as_one(tmp_path):
    """A constructed MLflow sweep as the tracker records a study: child runs tagged config_id, param train.seed,
    the loss among the metrics, the random-init reference over 3 initialisations on the parent. run_analysis finds
    the study, averages repeats, carries a collapse-stopped trial and predicts early."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from ncssl_tune.analysis import run_analysis

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("study", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = c.create_run(exp, tags={"run_kind": "sweep", "objective": "fewshot_acc (max)"}).info.run_id
    c.log_param(parent, "search.metric", "fewshot_acc")
    c.log_batch(parent, metrics=[Metric(f"reference_random_init{k}_fewshot_acc", v, 0, 0) for k, v in
                                 (("", 0.6), ("_sd", 0.03), ("_0", 0.57), ("_1", 0.6), ("_2", 0.63))])
    for cfg in range(8):
        for rep in range(2):
            stopped = cfg == 0
            run = c.create_run(exp, tags={"mlflow.parentRunId": parent, "ray_trial_id": f"c{cfg}r{rep}",
                                          "config_id": f"c{cfg}", "method": "vicreg",
                                          "status": "stopped" if stopped else "finished",
                                          "stop_reason": "collapse_total (epoch 2)" if stopped else "",
                                          "collapse": "total" if stopped else "none"})
            rid = run.info.run_id
            c.log_param(rid, "train.seed", str(1000 * rep))
            c.log_param(rid, "loss.vicreg.mu", str(5.0 * cfg))
            epochs = (1, 2) if stopped else (1, 2, 3, 4)
            c.log_batch(rid, metrics=[Metric(k, v, 0, e) for e in epochs for k, v in {
                "fewshot_acc": 0.5 + 0.05 * cfg * e / 4 + 0.001 * rep, "effective_rank": 10.0 + cfg,
                "avg_corr": float((cfg * 7 + rep * 3) % 5), "loss": 2.0 - 0.1 * cfg, "epoch": e}.items()])
            c.set_terminated(rid, "FINISHED")
    res = run_analysis("study", uri, tmp_path / "out", log_to_parent=False)
    st = res["study"]
    assert (st["n_configs"], st["repeats"], st["final_epoch"]) == (8, 2, 4)
    assert sorted(st["carried_trials"]) == ["c0r0", "c0r1"]
    table = {r["predictor"]: r for r in st["scopes"]["all"]["table"]}
    assert table["effective_rank"]["rho"] == pytest.approx(1.0) and table["effective_rank"]["n"] == 8
    assert table["loss"]["baseline"] and table["loss"]["rho"] == pytest.approx(1.0)  # lower loss, better config
    assert st["noise"]["objective"]["r"] == pytest.approx(1.0)  # repeat 1 = repeat 0 + 0.001
    assert [p["epoch"] for p in st["early"]["effective_rank"]] == [1, 2, 3, 4]
    assert all(p["rho"] == pytest.approx(1.0) for p in st["early"]["effective_rank"])
    assert res["reference"]["random_init"] == pytest.approx(0.6)
    assert res["reference_sd"] == {"random_init": pytest.approx(0.03), "inits": 3}
    assert (tmp_path / "out" / "early_prediction.png").is_file()
