"""The plot logic that can mislead a reader: which epoch a spectrum is from, which statuses the legend names,
what colours the collapse map, where a log axis is labelled (analysis/plots.py)."""

from __future__ import annotations

import pandas as pd

from ncssl_tune.analysis.plots import log_subs, map_colour, present_statuses, spectrum_label


def _row(status: str, epoch: int = 9) -> pd.Series:
    return pd.Series({"trial_id": "t1", "status": status, "epoch": epoch, "knn_acc": 0.812, "effective_rank": 3.21})


def test_the_spectra_legend_names_the_epoch_a_stopped_trial_stopped_at():
    assert spectrum_label("best", _row("stopped"), "knn_acc", 9) == (
        "best: t1 (stopped at epoch 9; knn_acc 0.812, RankMe 3.21)")
    assert spectrum_label("worst", _row("finished", 20), "knn_acc", 20).startswith("worst: t1 (epoch 20;")
    assert "(epoch ?;" in spectrum_label("median", _row("stopped"), "knn_acc", None)  # unknown: not invented


def test_the_status_legend_names_only_statuses_some_drawn_trial_has():
    runs = pd.DataFrame({"run_id": ["a", "b", "c", "d"], "status": ["finished", "stopped", "diverged", "finished"]})
    assert present_statuses(runs, {"a", "d"}) == ["finished"]
    assert present_statuses(runs, {"a", "b"}) == ["finished", "stopped"]
    assert present_statuses(runs, {"c", "b", "a"}) == ["finished", "stopped", "diverged"]
    assert present_statuses(runs.assign(status=["interrupted"] * 4), {"a"}) == ["interrupted"]
    assert present_statuses(runs, set()) == []


def test_the_collapse_map_never_colours_by_its_own_y_axis():
    assert map_colour("effective_rank", "knn_acc") == "knn_acc"
    assert map_colour("param.train.lr", "knn_acc") == "effective_rank"


def test_a_short_log_axis_gets_more_labelled_ticks():
    assert log_subs(1.5, 5.5) == (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)
    assert log_subs(1.0, 60.0) == (1.0, 2.0, 3.0, 5.0)
    assert log_subs(1.0, 500.0) == (1.0, 2.0, 5.0)


def test_histories_and_collapse_map_draw(tmp_path):
    """Both plots render from a small frame with a stopped trial, a categorical and a numeric driver (colour: the objective)."""
    from ncssl_tune.analysis.plots import collapse_map, histories

    runs = pd.DataFrame({"run_id": list("abc"), "status": ["finished", "stopped", "finished"], "run_status": "FINISHED",
                         "collapse": ["none", "total", "none"], "effective_rank": [40.0, 1.1, 20.0],
                         "knn_acc": [0.8, 0.3, 0.7], "param.train.lr": [1e-3, 1e-2, 3e-3],
                         "param.model.norm": ["batch", "none", "batch"]})
    epochs = pd.DataFrame({"run_id": list("aabbcc"), "epoch": [1, 2, 1, 2, 1, 2],
                           "effective_rank": [30, 40, 2, 1.1, 10, 20.0], "effective_rank_h": [4, 5, 1.5, 1.2, 3, 4.0]})
    histories(runs, epochs, tmp_path / "h.png")
    drivers = [{"param": "model.norm", "kind": "categorical", "n": 3, "strength": 0.9},
               {"param": "train.lr", "kind": "numeric", "n": 3, "strength": 0.5}]
    collapse_map(runs, drivers, "knn_acc", tmp_path / "m.png")
    assert (tmp_path / "h.png").stat().st_size > 1000 and (tmp_path / "m.png").stat().st_size > 1000
