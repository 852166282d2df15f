"""One identity per trial: the Optuna trial of each Ray trial names it (Ray trial id, its number, its MLflow run)
and tells how it ended, in user attributes that optuna-dashboard shows (the searcher driven without Ray, as Ray
calls it: the last result is the trial's, flattened, with Ray's experiment tag)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from ncssl_tune.spec import CollapseStopConfig, load_spec
from ncssl_tune.sweep.runner import optuna_storage
from ncssl_tune.sweep.searcher import OptunaSearcher
from ncssl_tune.sweep.space import DefineByRun


def searcher(tmp_path, **kwargs) -> OptunaSearcher:
    spec = load_spec("search_spaces/vicreg.yaml")
    return OptunaSearcher(DefineByRun(spec.space, spec.base), metric="probe_acc", mode="max",
                          sampler=optuna.samplers.RandomSampler(seed=0), storage=optuna_storage(tmp_path),
                          study_name="s", collapse_stop=CollapseStopConfig(min_epoch=1, total_patience=1),
                          scheduler="asha", **kwargs)


def last(number: int, epoch: int, status: str, collapse: str = "none", **extra) -> dict:
    return {"probe_acc": 0.5, "training_iteration": epoch, "epoch": epoch, "status": status, "collapse": collapse,
            "collapse_streak": epoch, "experiment_tag": f"{number}_loss.vicreg.lam=1", "trial_id": f"ray{number}",
            "mlflow_run_id": f"run{number}", **extra}


def test_each_optuna_trial_names_its_ray_trial_number_and_mlflow_run_and_how_it_ended(tmp_path):
    s = searcher(tmp_path)
    for n in (1, 2, 3, 4, 5):
        s.suggest(f"ray{n}")
    s.on_trial_complete("ray1", last(1, 3, "finished"))
    s.on_trial_complete("ray2", last(2, 2, "running"))  # stopped by ASHA
    s.on_trial_complete("ray3", last(3, 1, "running", "total"))  # stopped by the collapse stopper
    s.on_trial_complete("ray4", last(4, 2, "diverged", error="non-finite loss"))
    s.on_trial_complete("ray5", None, error=True)
    trials = optuna.load_study(study_name="s", storage=optuna_storage(tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED,
                                         TrialState.FAIL, TrialState.FAIL]
    attrs = [t.user_attrs for t in trials]
    assert attrs[0] == {"ray_trial_id": "ray1", "trial_number": 1, "mlflow_run_id": "run1", "collapse": "none",
                        "status": "finished", "stop_reason": ""}
    assert (attrs[1]["status"], attrs[1]["stop_reason"]) == ("stopped", "asha")
    assert (attrs[2]["stop_reason"], attrs[2]["collapse"]) == ("collapse_total (epoch 1)", "total")
    assert (attrs[3]["status"], attrs[3]["stop_reason"]) == ("diverged", "non-finite loss")
    # an errored trial has no last result: its id and how it ended, nothing made up
    assert attrs[4] == {"ray_trial_id": "ray5", "status": "error", "stop_reason": "error"}
    assert [a["trial_number"] for a in attrs[:4]] == [1, 2, 3, 4]


def test_repeats_of_one_configuration_keep_their_attributes_apart(tmp_path):
    s = searcher(tmp_path, repeats=2)
    s.suggest("ray1")
    s.suggest("ray2")
    s.on_trial_complete("ray1", last(1, 3, "finished"))
    s.on_trial_complete("ray2", last(2, 3, "running", "total"))
    (trial,) = optuna.load_study(study_name="s", storage=optuna_storage(tmp_path)).trials
    a = trial.user_attrs
    assert (a["repeat0.ray_trial_id"], a["repeat0.trial_number"], a["repeat0.status"]) == ("ray1", 1, "finished")
    assert (a["repeat1.ray_trial_id"], a["repeat1.mlflow_run_id"], a["repeat1.stop_reason"]) == (
        "ray2", "run2", "collapse_total (epoch 3)")


def test_the_study_names_its_metric_and_holds_every_epoch_as_mlflow_does(tmp_path):
    """Driven as Ray drives it under ASHA: the result on which a trial is stopped (ASHA's at max_t for a trial
    that ran to its last epoch, the collapse stopper's for a pruned one) reaches on_trial_complete only. The
    intermediate values sit at the trials' epochs (MLflow's step), not Ray's training_iteration."""
    s = searcher(tmp_path)
    s.suggest("ray1")
    s.suggest("ray2")
    for epoch in (1, 2):
        s.on_trial_result("ray1", last(1, epoch, "running", training_iteration=epoch + 10))
        s.on_trial_result("ray2", last(2, epoch, "running", training_iteration=epoch + 10))
    s.on_trial_complete("ray1", last(1, 3, "finished", training_iteration=13))
    s.on_trial_complete("ray2", last(2, 3, "running", "total", training_iteration=13))
    study = optuna.load_study(study_name="s", storage=optuna_storage(tmp_path))
    assert study.metric_names == ["probe_acc"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert [sorted(t.intermediate_values) for t in study.trials] == [[1, 2, 3], [1, 2, 3]]
