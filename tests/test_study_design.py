"""The study design in the searcher: QMC proposals reproducible for a seed, repeats that share a configuration and
differ only in the training seed, and what Optuna is told about a repeated configuration."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from ncssl_tune.naming import config_id
from ncssl_tune.spec import load_spec
from ncssl_tune.sweep.runner import optuna_storage
from ncssl_tune.sweep.searcher import REPEAT_SEED_STEP, OptunaSearcher
from ncssl_tune.sweep.space import DefineByRun, make_sampler

SPACE = "search_spaces/vicreg.yaml"


def _searcher(overrides: list[str], repeats: int = 1, base_seed: int = 0) -> OptunaSearcher:
    spec = load_spec(SPACE, overrides)
    return OptunaSearcher(DefineByRun(spec.space, spec.base), metric="fewshot_acc", mode="max",
                          sampler=make_sampler(spec), repeats=repeats, base_seed=base_seed)


def _proposals(seed: int, n: int = 6) -> list[dict]:
    s = _searcher(["search.algorithm=qmc", f"search.seed={seed}"])
    out = []
    for i in range(n):
        out.append(s.suggest(f"t{i}"))
        s.on_trial_complete(f"t{i}", {"fewshot_acc": 0.5, "training_iteration": 1, "status": "finished"})
    return out


def test_qmc_proposals_are_reproducible_for_a_seed_and_differ_between_seeds():
    first, again, other = _proposals(3), _proposals(3), _proposals(4)
    assert first == again
    assert first != other
    assert len({config_id(p) for p in first}) == len(first)  # six distinct points


def test_qmc_points_spread_over_a_numeric_range():
    # the first trial is Optuna's random start; the next 8 are scrambled Sobol points, which put one point in
    # each eighth of every dimension (here the log range [1, 100] of lam and the range [0, 50] of mu)
    points = _proposals(0, n=9)[1:]
    assert sorted(int(math.log10(p["loss.vicreg.lam"]) / 2 * 8) for p in points) == list(range(8))
    assert sorted(int(p["loss.vicreg.mu"] / 50 * 8) for p in points) == list(range(8))


def test_repeats_share_the_configuration_and_differ_only_in_the_training_seed():
    s = _searcher(["search.algorithm=random"], repeats=2, base_seed=7)
    a, b, c = s.suggest("t1"), s.suggest("t2"), None
    assert a["train.seed"] == 7 and b["train.seed"] == 7 + REPEAT_SEED_STEP
    assert {k: v for k, v in a.items() if k != "train.seed"} == {k: v for k, v in b.items() if k != "train.seed"}
    assert config_id(a) == config_id(b)
    s.on_trial_complete("t1", {"fewshot_acc": 0.6, "training_iteration": 3, "status": "finished"})
    assert s.study.trials[0].state == TrialState.RUNNING  # told once both repeats ended
    s.on_trial_complete("t2", {"fewshot_acc": 0.8, "training_iteration": 3, "status": "finished"})
    c = s.suggest("t3")
    assert config_id(c) != config_id(a) and c["train.seed"] == 7
    done = s.study.trials[0]
    assert done.state == TrialState.COMPLETE and done.value == pytest.approx(0.7)
    assert len(s.study.trials) == 2  # one Optuna trial per configuration


@pytest.mark.parametrize(("second", "state"), [({"status": "running"}, TrialState.PRUNED),
                                               ({"status": "diverged"}, TrialState.FAIL)])
def test_a_repeat_stopped_early_or_diverged_decides_the_configuration(second, state):
    s = _searcher(["search.algorithm=random"], repeats=2)
    s.suggest("t1"), s.suggest("t2")
    s.on_trial_complete("t1", {"fewshot_acc": 0.6, "training_iteration": 3, "status": "finished"})
    s.on_trial_complete("t2", {"fewshot_acc": 0.5, "training_iteration": 2, **second})
    assert s.study.trials[0].state == state


def test_without_repeats_the_config_is_the_sampled_values_alone():
    s = _searcher(["search.algorithm=random"])
    assert "train.seed" not in s.suggest("t1")


def test_a_restored_searcher_keeps_the_repeats_it_still_owes(tmp_path):
    spec = load_spec(SPACE, ["search.algorithm=random"])

    def searcher():
        return OptunaSearcher(DefineByRun(spec.space, spec.base), metric="fewshot_acc", mode="max",
                              sampler=optuna.samplers.RandomSampler(seed=0), repeats=3,
                              storage=optuna_storage(tmp_path), study_name="s", state_path=tmp_path / "state.pkl")

    first = searcher()
    a = first.suggest("t1")
    resumed = searcher()
    resumed.restore(str(tmp_path / "unused.pkl"))
    b, c = resumed.suggest("t2"), resumed.suggest("t3")
    assert config_id(a) == config_id(b) == config_id(c)
    assert [x["train.seed"] for x in (a, b, c)] == [0, REPEAT_SEED_STEP, 2 * REPEAT_SEED_STEP]


@pytest.mark.parametrize("seed", range(8))
def test_tpe_start_up_trials_try_every_value_of_every_categorical_param(seed):
    """Independent random start-up draws left one of the default sweep's three projector widths out of all 12
    trials for 4 of 10 seeds (TPE does not go back to a value no trial had): every value is tried now, in the
    searcher as a sweep drives it, two trials at a time."""
    spec = load_spec(SPACE, [f"search.seed={seed}"])
    s = _searcher([f"search.seed={seed}"])
    seen: dict[str, list] = {p.key: [] for p in spec.space if p.type == "categorical"}
    running: list[str] = []
    for i in range(spec.search.num_samples):
        config = s.suggest(f"t{i}")
        for key, values in seen.items():
            values.append(config[key])
        running.append(f"t{i}")
        if len(running) == 2:  # two at a time: the first of them ends before the next is proposed
            done = running.pop(0)
            s.on_trial_complete(done, {"fewshot_acc": 0.5 + 0.01 * i, "training_iteration": 1, "status": "finished"})
    n = min(10, max(2, spec.search.num_samples // 3))  # make_sampler's start-up trials
    for p in spec.space:
        if p.type == "categorical":
            first = seen[p.key][:n]
            assert set(first) == set(p.values), (p.key, first)  # every value in the start-up trials ...
            counts = [first.count(v) for v in p.values]
            assert max(counts) - min(counts) <= 1, (p.key, first)  # ... each about as often


def test_the_tpe_sampler_pickles_with_the_searcher_state():
    import pickle

    sampler = make_sampler(load_spec(SPACE, ["search.seed=3"]))
    again = pickle.loads(pickle.dumps(sampler))
    assert type(again) is type(sampler) and again._startup == sampler._startup


def test_warming_the_sampler_imports_its_lazy_modules_and_leaves_the_sweeps_proposals_alone():
    """warm_sampler runs on run_sweep's start-up thread so that QMC's first relative sample does not import
    scipy.stats inside Tune's loop (where every trial waited for it). In a fresh interpreter that has what the
    driver imports: scipy.stats arrives with the warm-up, which prints nothing, and a sampler made afterwards
    proposes what one made without a warm-up proposes."""
    import subprocess
    import sys

    code = """
import sys
import ncssl_tune.sweep.runner
from ncssl_tune.spec import load_spec
from ncssl_tune.sweep.space import warm_sampler
assert "scipy.stats" not in sys.modules, "the driver imports scipy.stats already: nothing to warm"
warm_sampler(load_spec("search_spaces/study_vicreg.yaml"))
assert "scipy.stats" in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "study" not in done.stderr.lower()
    from ncssl_tune.sweep.space import warm_sampler

    before = _proposals(3)
    for path in ("search_spaces/vicreg.yaml", "search_spaces/study_vicreg.yaml", "search_spaces/compare.yaml"):
        warm_sampler(load_spec(path))
    warm_sampler(load_spec(SPACE, ["search.algorithm=grid"]))
    assert _proposals(3) == before
