"""Reliability: a diverging trial inside a sweep, and W-MSE whitening that cannot succeed."""

from __future__ import annotations

import pytest
import torch

from ncssl_tune.config import TrainConfig
from ncssl_tune.core.losses import WhiteningError, whiten
from ncssl_tune.core.train import train
from ncssl_tune.sweep.monitor import read_trials

SMALL = {"data": {"dataset": "synthetic", "synthetic": {"n": 400, "size": 8, "channels": 1, "classes": 4}},
         "model": {"projector": "64-32", "width": 16},
         "eval": {"cond_views": 0, "probe_every": 0, "eval_samples": 64, "probe_weight_decays": [0.0]},
         "train": {"epochs": 2, "batch_size": 128, "threads": 1}}

def small(method: str, **train_over) -> TrainConfig:
    return TrainConfig.from_dict({**SMALL, "loss": {"method": method}, "train": {**SMALL["train"], **train_over}})


def test_diverging_trial_does_not_stop_the_sweep_and_is_excluded_from_the_analysis(outcomes_sweep):
    """The session's outcomes sweep (helpers.OUTCOMES_SPACE): lr 1e8 diverges in its first epoch, the others go on
    (3e-3 finishes, 1e4 is stopped for collapse); the analysis leaves the diverged trial out."""
    from ncssl_tune.analysis import analyze, load_epochs, load_runs

    spec, uri, result = outcomes_sweep.spec, outcomes_sweep.uri, outcomes_sweep.result

    assert result.num_trials == 3 and result.errors == 0
    rows = read_trials(result.out_dir)
    diverged = {r["trial_id"] for r in rows if float(r["param.train.lr"]) >= 1e8}
    assert len(diverged) == 1 and len(rows) == 3
    status = {r["trial_id"]: r["status"] for r in rows}
    others = {float(r["param.train.lr"]): r["status"] for r in rows if r["trial_id"] not in diverged}
    for r in rows:
        if r["trial_id"] in diverged:
            assert r["status"] == "diverged" and "non-finite" in r["stop_reason"], r
    assert others == {3e-3: "finished", 1e4: "stopped"}  # the sweep went on past the divergence
    assert float(result.best_config["train.lr"]) < 1e8

    df = load_runs(spec.name, uri, parent_run_id=result.mlflow_parent_run_id)
    assert len(df) == 3
    for _, r in df.iterrows():
        expected = ("FAILED", "diverged") if r["trial_id"] in diverged else ("FINISHED", status[r["trial_id"]])
        assert (r["run_status"], r["status"]) == expected
    epochs = load_epochs(uri, list(df["run_id"]), ["probe_acc", "effective_rank"])
    analysis = analyze(df, epochs, df.attrs["objective"], df.attrs["mode"])
    assert analysis["n_trials"] == 3 and analysis["status_counts"]["diverged"] == len(diverged)
    assert analysis["excluded"]["diverged_or_failed"] == len(diverged)
    assert analysis["scopes"]["all"]["n_trials"] == 3 - len(diverged)  # the diverged one left out


def test_wmse_with_exploding_learning_rate_ends_as_diverged():
    reports = []
    last = train(small("wmse", lr=1.0e12), report=lambda m, s: reports.append((m, s)))
    assert last["status"] == "diverged" and last["collapse"] == "diverged"
    assert "Cholesky whitening" in last["error"] or "non-finite" in last["error"]
    assert [m["status"] for m, _ in reports][-1] == "diverged" and reports[-1][1] is None


@pytest.fixture
def cholesky_always_fails(monkeypatch):
    """torch.linalg.cholesky_ex reports failure for every matrix; the shrinkage of each attempt is recorded."""
    eps_seen: list[float] = []
    real = torch.linalg.cholesky_ex

    def failing(sigma, *args, **kwargs):
        eps_seen.append(float(sigma.detach()[0, 0]))  # cov is zero below, so sigma = eps * I
        chol, info = real(sigma, *args, **kwargs)
        return chol, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    return eps_seen


def test_whiten_retries_with_growing_shrinkage_before_raising(cholesky_always_fails):
    z = torch.ones(16, 4, dtype=torch.float64)  # zero covariance: sigma = eps * I at every attempt
    with pytest.raises(WhiteningError, match=r"failed after 6 retries \(last eps=0.1"):
        whiten(z, eps=0.0)
    assert cholesky_always_fails == pytest.approx([0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1])


def test_whitening_failure_inside_train_ends_as_diverged(cholesky_always_fails):
    reports = []
    last = train(small("wmse", lr=1.0e-3), report=lambda m, s: reports.append(m))
    assert last["status"] == "diverged" and last["epoch"] == 1
    assert "failed after 6 retries" in last["error"]
    assert [m["status"] for m in reports] == ["diverged"]
    assert len(cholesky_always_fails) >= 7  # eps 0, 1e-6, ..., 0.1 for the first sub-batch
