"""The sweep engine end to end through real Ray Tune and Optuna on the embedded digits."""

from __future__ import annotations

import pickle

import optuna
import pytest
from helpers import DIGITS_SWEEP, space_without
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from ncssl_tune.spec import CollapseStopConfig, load_spec
from ncssl_tune.sweep.monitor import CollapseStopper, collapse_stop_reason, read_trials
from ncssl_tune.sweep.runner import SweepError, optuna_storage, run_sweep
from ncssl_tune.sweep.searcher import OptunaSearcher
from ncssl_tune.sweep.space import DefineByRun
from ncssl_tune.sweep.trainable import next_streak


def study(out_dir, name):
    return optuna.load_study(study_name=name, storage=optuna_storage(out_dir))


@pytest.fixture(scope="module")
def finished_sweep(ray_session, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    # BatchNorm kept on: without it some trials would collapse and be stopped, which another test covers.
    # ASHA with no rung before the last epoch: it stops no trial early, but stops each at max_t (its last result
    # then reaches the searcher's on_trial_complete only), as in a default sweep.
    space = space_without(tmp_path_factory.mktemp("space"), "model.norm")
    spec = load_spec(space, [*DIGITS_SWEEP, "search.scheduler.name=asha", "search.scheduler.grace_period=3"],
                     num_samples=4, epochs=3, name="e2e")
    result = run_sweep(spec, results, monitor_interval_s=1e9)
    return spec, results, result


def test_sweep_runs_every_trial_and_writes_trials_csv(finished_sweep):
    spec, _, result = finished_sweep
    assert result.num_trials == 4 and result.errors == 0
    rows = read_trials(result.out_dir)
    assert len(rows) == 4
    assert len({r["trial_id"] for r in rows}) == 4
    for r in rows:
        assert r["status"] == "finished" and r["epoch"] == "3"
        for key in ("effective_rank", "effective_rank_h", "fewshot_acc", "knn_acc", "probe_acc", "collapse"):
            assert r[key] != "", key
        for p in spec.space:
            assert r[f"param.{p.key}"] != "", p.key
    metric = spec.search.metric  # the best trial is the best on the sweep's objective (fewshot_acc here)
    assert result.best_metrics[metric] == max(float(r[metric]) for r in rows)


def test_sweep_study_records_completed_trials_with_intermediate_values(finished_sweep):
    spec, _, result = finished_sweep
    trials = study(result.out_dir, spec.name).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert all(sorted(t.intermediate_values) == [1, 2, 3] for t in trials)  # the last epoch included
    assert study(result.out_dir, spec.name).metric_names == [spec.search.metric]


def test_one_identity_per_trial_in_trials_csv_the_study_and_the_best_trial(finished_sweep):
    """Number and Ray id of each trial agree between trials.csv, the Optuna trial's user attributes (through real
    Ray: the number comes from the experiment tag of the trial's last result) and the sweep's best trial."""
    spec, _, result = finished_sweep
    rows = read_trials(result.out_dir)
    assert [r["trial_number"] for r in rows] == ["1", "2", "3", "4"]
    attrs = {t.user_attrs["ray_trial_id"]: t.user_attrs for t in study(result.out_dir, spec.name).trials}
    assert {r["trial_id"]: int(r["trial_number"]) for r in rows} == {k: a["trial_number"] for k, a in attrs.items()}
    assert all((a["status"], a["stop_reason"]) == ("finished", "") for a in attrs.values())
    best = next(r for r in rows if r["trial_id"] == result.best_metrics["trial_id"])
    assert result.best_metrics["experiment_tag"].split("_")[0] == best["trial_number"]


def test_resume_of_a_finished_sweep_starts_no_new_trial(finished_sweep):
    spec, results, first = finished_sweep
    before = read_trials(first.out_dir)
    again = run_sweep(spec, results, resume=True, monitor_interval_s=1e9)
    assert again.num_trials == 4
    assert read_trials(first.out_dir) == before
    assert len(study(first.out_dir, spec.name).trials) == 4


def test_existing_sweep_needs_resume_and_missing_sweep_cannot_resume(finished_sweep, tmp_path):
    spec, results, _ = finished_sweep
    with pytest.raises(SweepError, match="--resume"):
        run_sweep(spec, results)
    with pytest.raises(SweepError, match="no sweep to resume"):
        run_sweep(spec, tmp_path, resume=True)


def test_collapse_stopper_ends_invariance_trials_and_optuna_sees_them_pruned(ray_session, tmp_path):
    spec = load_spec(space_without(tmp_path, "model.norm"),
                     [*DIGITS_SWEEP, "loss.method=invariance", "model.norm=none", "search.scheduler.name=fifo",
                      "search.collapse_stop.min_epoch=2", "search.algorithm=random"],
                     num_samples=2, epochs=5, name="control")
    result = run_sweep(spec, tmp_path, monitor_interval_s=1e9)
    rows = read_trials(result.out_dir)
    assert len(rows) == 2
    for r in rows:
        assert r["status"] == "stopped"
        assert r["stop_reason"].startswith("collapse_total")
        assert int(r["epoch"]) == 2  # of 5
    trials = study(result.out_dir, spec.name).trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all(sorted(t.intermediate_values) == [1, 2] for t in trials)


def _searcher(cls, tmp_path):
    spec = load_spec("search_spaces/vicreg.yaml")
    s = cls(DefineByRun(spec.space, spec.base), metric="probe_acc", mode="max",
            sampler=optuna.samplers.RandomSampler(seed=0), storage=optuna_storage(tmp_path), study_name="s")
    s.suggest("t1")
    for epoch in (1, 2):
        s.on_trial_result("t1", {"probe_acc": 0.5 + 0.1 * epoch, "training_iteration": epoch, "status": "running"})
    s.on_trial_complete("t1", {"probe_acc": 0.7, "training_iteration": 2, "status": "running", "epoch": 2})
    s.suggest("t2")
    s.on_trial_result("t2", {"probe_acc": float("nan"), "training_iteration": 1, "status": "diverged"})
    s.on_trial_complete("t2", {"probe_acc": float("nan"), "training_iteration": 1, "status": "diverged"})
    return optuna.load_study(study_name="s", storage=optuna_storage(tmp_path)).trials


def test_ray_optuna_search_records_early_stops_as_complete(tmp_path):
    """The upstream behaviour the engine corrects: a stopped trial enters TPE as a finished one."""
    trials = _searcher(OptunaSearch, tmp_path)
    assert trials[0].state == TrialState.COMPLETE and trials[0].value == pytest.approx(0.7)


def test_pruning_search_tells_stopped_trials_pruned_and_diverged_failed(tmp_path):
    trials = _searcher(OptunaSearcher, tmp_path)
    assert trials[0].state == TrialState.PRUNED
    assert trials[0].intermediate_values == {1: pytest.approx(0.6), 2: pytest.approx(0.7)}
    assert trials[1].state == TrialState.FAIL


@pytest.mark.parametrize(
    ("cfg", "states", "stop_at"),
    [
        (CollapseStopConfig(total_patience=1, min_epoch=2), ["total", "total", "total"], 2),
        (CollapseStopConfig(total_patience=2, min_epoch=1), ["total", "none", "total", "total"], 4),
        (CollapseStopConfig(total=False), ["total"] * 4, None),
        (CollapseStopConfig(dimensional=True, dimensional_patience=2, min_epoch=1),
         ["dimensional", "dimensional", "none"], 2),
        (CollapseStopConfig(), ["dimensional"] * 4, None),
    ],
)
def test_collapse_stopper_rules(cfg, states, stop_at):
    """The trial counts its streak (next_streak, as run_trial does); the stopper and the reason read one result."""
    stopper = CollapseStopper(cfg)
    stopped, streak, reasons = None, ("none", 0), []
    for epoch, state in enumerate(states, start=1):
        streak = next_streak(streak, state)
        result = {"epoch": epoch, "collapse": state, "collapse_streak": streak[1], "status": "running"}
        reasons.append(collapse_stop_reason(cfg, result))
        if stopper("t", result):
            stopped = epoch
            break
    assert stopped == stop_at
    assert reasons[:-1] == [None] * (len(reasons) - 1)
    assert reasons[-1] == (None if stop_at is None else f"collapse_{states[stop_at - 1]} (epoch {stop_at})")


def test_a_used_up_grid_does_not_crash_the_searcher():
    """GridSampler stops the study when its grid is used up, which raises outside study.optimize."""
    spec = load_spec("search_spaces/vicreg.yaml", ["search.algorithm=grid"])
    grid = {p.key: [p.values[0]] if p.values else [p.low] for p in spec.space}
    s = OptunaSearcher(DefineByRun(spec.space, spec.base), metric="probe_acc", mode="max",
                       sampler=optuna.samplers.GridSampler(grid, seed=0))
    s.suggest("t1")
    s.on_trial_complete("t1", {"probe_acc": 0.9, "training_iteration": 1, "status": "finished"})
    s.on_trial_complete("t1", {"probe_acc": 0.9, "training_iteration": 1, "status": "finished"})
    assert [t.state for t in s.study.trials] == [TrialState.COMPLETE]


def test_an_errored_trial_run_again_continues_as_a_new_optuna_trial_with_its_parameters(tmp_path):
    """Ray runs an errored trial again under its id (resume_errored) or as a new trial with its config
    (restart_errored, as the sweep resumes); a finished trial rerun from its checkpoint (after a driver kill)
    brings nothing new."""
    spec = load_spec("search_spaces/vicreg.yaml")
    s = OptunaSearcher(DefineByRun(spec.space, spec.base), metric="probe_acc", mode="max", max_concurrent=2,
                       sampler=optuna.samplers.RandomSampler(seed=0), state_path=tmp_path / "state.pkl")
    params = {t: s.suggest(t) for t in ("t1", "t2")}
    assert s.suggest("t3") is None  # two running: the searcher holds the third back itself
    s.on_trial_complete("t1", {"probe_acc": 0.5, "training_iteration": 1, "status": "running"}, error=True)
    s.on_trial_complete("t2", {"probe_acc": 0.8, "training_iteration": 2, "status": "finished"})
    s.on_trial_result("t2", {"probe_acc": 0.9, "training_iteration": 2, "status": "running"})  # rerun: ignored
    s.on_trial_result("t1", {"probe_acc": 0.6, "training_iteration": 2, "status": "running"})  # resumed
    s.on_trial_complete("t1", {"probe_acc": 0.7, "training_iteration": 3, "status": "finished"})
    params["t3"] = s.suggest("t3")
    s.on_trial_complete("t3", {"probe_acc": 0.1, "training_iteration": 1, "status": "running"}, error=True)
    flat = {f"config/{k}": v for k, v in params["t3"].items()}  # as Ray hands results to searchers
    s.on_trial_result("t9", {"probe_acc": 0.4, "training_iteration": 1, "status": "running", **flat})
    s.on_trial_complete("t9", {"probe_acc": 0.45, "training_iteration": 2, "status": "finished",
                               "config": params["t3"]})
    s.on_trial_result("t8", {"probe_acc": 0.4, "training_iteration": 1, **flat})  # t3 is continued once only
    trials = s.study.trials
    states = [t.state for t in trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL,
                      TrialState.COMPLETE]
    assert trials[0].params == trials[2].params == params["t1"] and trials[1].params == params["t2"]
    assert trials[3].params == trials[4].params == params["t3"] and params["t3"] != params["t1"]
    # its completing result is its one intermediate value; the rerun's result is ignored
    assert trials[1].value == pytest.approx(0.8) and trials[1].intermediate_values == {2: pytest.approx(0.8)}
    assert trials[2].value == pytest.approx(0.7) and trials[2].intermediate_values == {2: pytest.approx(0.6), 3: pytest.approx(0.7)}
    assert trials[4].value == pytest.approx(0.45) and trials[4].intermediate_values == {1: pytest.approx(0.4), 2: pytest.approx(0.45)}


def test_gpus_the_cluster_lacks_fail_at_once(ray_session):
    from ncssl_tune.sweep.runner import check_resources

    with pytest.raises(SweepError, match=r"gpu=1.*0 GPU.*resources.gpu"):
        check_resources(load_spec("search_spaces/vicreg.yaml", ["resources.gpu=1"]))
    check_resources(load_spec("search_spaces/vicreg.yaml"))  # 1 cpu per trial fits the 2-cpu test cluster


class Count(Stopper):
    """Answers `answer` and counts the questions; stops the sweep after two."""

    def __init__(self, answer: bool):
        self.answer, self.calls = answer, 0

    def __call__(self, trial_id, result):
        self.calls += 1
        return self.answer

    def stop_all(self):
        return self.calls >= 2


def test_live_stopper_asks_every_registered_stopper_even_after_a_yes():
    from ncssl_tune.sweep import live

    yes, no = Count(True), Count(False)
    stand_in = live.LiveStopper("k", [Count(False)])
    live.register("k", [], [yes, no])
    try:
        both = pickle.loads(pickle.dumps(stand_in))  # as Ray brings it back on resume
        assert both("t", {}) is True and (yes.calls, no.calls) == (1, 1)  # Ray's CombinedStopper would skip `no`
        assert not both.stop_all()
        assert both("t", {}) is True and both.stop_all()
    finally:
        live.unregister("k")
    # Nothing registered (a Tuner run by Ray Client in a remote actor): the stoppers it was built with answer.
    assert both("t", {}) is False and both.own[0].calls == 1 and yes.calls == 2


def test_a_restored_searcher_does_not_propose_the_same_parameters_again(tmp_path):
    """The sampler's random state is part of the searcher's state: restored from the seed instead, the resumed
    sweep would sample the first trials' parameters again."""
    spec = load_spec("search_spaces/vicreg.yaml")

    def searcher():
        return OptunaSearcher(DefineByRun(spec.space, spec.base), metric="probe_acc", mode="max",
                              sampler=optuna.samplers.RandomSampler(seed=0), storage=optuna_storage(tmp_path),
                              study_name="s", state_path=tmp_path / "state.pkl")

    first = searcher()
    proposed = [first.suggest("t1")]
    first.on_trial_complete("t1", {"probe_acc": 0.5, "training_iteration": 1, "status": "finished"})
    assert searcher().suggest("x") == proposed[0]  # the same seed, not restored: the same proposal
    resumed = searcher()
    resumed.restore(str(tmp_path / "unused.pkl"))  # the state file is newer than any snapshot of Ray's
    assert resumed.suggest("t2") not in proposed
