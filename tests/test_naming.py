"""Names and numbers for people: short unambiguous column names, rounding, MLflow run names."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ncssl_tune.naming import (
    RUN_NAME_MAX,
    fmt_number,
    mlflow_runs_view,
    run_name,
    short_names,
    trial_index,
    trial_label,
)
from ncssl_tune.spec import load_spec

SPACES = sorted(Path("search_spaces").glob("*.yaml"))


def test_short_names_keep_enough_of_the_key_to_be_unique():
    keys = ["loss.method", "loss.vicreg.lam", "loss.vicreg.gamma", "loss.barlow_twins.lam", "train.lr"]
    assert short_names(keys, taken=["method"]) == {
        "loss.method": "loss.method", "loss.vicreg.lam": "vicreg.lam", "loss.vicreg.gamma": "gamma",
        "loss.barlow_twins.lam": "barlow_twins.lam", "train.lr": "lr"}
    # a key that is the tail of another keeps its whole self; the other grows past it
    assert short_names(["a.b", "x.a.b"]) == {"a.b": "a.b", "x.a.b": "x.a.b"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_gets_distinct_column_names(path):
    keys = [p.key for p in load_spec(path).space]
    taken = ["trial", "method", "epoch", "eff_rank", "knn", "probe", "status"]
    names = short_names(keys, taken=taken)
    assert len(set(names.values())) == len(keys) and not set(names.values()) & set(taken)
    assert all(k.endswith(n) for k, n in names.items())


@pytest.mark.parametrize("value, text", [
    (0.9972222447395325, "0.997"), (0.000123456, "1.23e-04"), (12345.6, "12346"), (3.0e9, "3.00e+09"),
    (5, "5"), (0.0, "0"), (-0.25, "-0.25"), (math.nan, "nan"), ("vicreg", "vicreg"), (True, "True"),
])
def test_fmt_number_rounds_floats_only(value, text):
    assert fmt_number(value) == text


def test_run_name_reads_index_method_and_sampled_values():
    sampled = {"loss.method": "vicreg", "loss.vicreg.lam": 25.123456, "train.lr": 0.0031234}
    assert trial_index("3_loss.method=vicreg,loss.vicreg.lam=25.1") == 3
    assert run_name(3, "ab12cd34", "vicreg", sampled) == "#3 vicreg lam=25.1 lr=0.00312"
    assert run_name(trial_index(""), "ab12cd34", "vicreg", {}) == "ab12cd34 vicreg"
    # a mark goes after the number, where the runs table shows it
    assert run_name(9, "ab12cd34", "vicreg", sampled, "[collapsed]") == "#9 [collapsed] vicreg lam=25.1 lr=0.00312"
    assert trial_label(9, "ab12cd34") == "#9 (ab12cd34)" and trial_label(None, "ab12cd34") == "ab12cd34"
    long = run_name(1, "x", "vicreg", {f"k{i}": 0.123456 for i in range(40)})
    assert len(long) == RUN_NAME_MAX and long.endswith("…")


@pytest.mark.parametrize("mode, ascending", [("max", "false"), ("min", "true")])
def test_the_printed_mlflow_link_ranks_the_trials_by_the_objective(mode, ascending):
    """Sorted by a metric, MLflow's runs page lists the child runs flat instead of folded under the parent run
    (tools/check_mlflow_ui.py shows it); the Model training view is chosen in the link."""
    from urllib.parse import parse_qs, urlsplit

    view = urlsplit(mlflow_runs_view("7", "fewshot_acc", mode).removeprefix("#"))
    assert view.path == "/experiments/7/runs"
    assert parse_qs(view.query) == {"workflowType": ["machine_learning"], "orderByKey": ["metrics.`fewshot_acc`"],
                                    "orderByAsc": [ascending]}
