from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest

from ncssl_tune.spec import SpecError, SweepSpec, load_spec
from ncssl_tune.sweep.space import DefineByRun

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
SPACE_FILES = sorted(SPACES.glob("*.yaml"))
COMPARE = next(p for p in SPACE_FILES if p.name == "compare.yaml")
VICREG = next(p for p in SPACE_FILES if p.name == "vicreg.yaml")


@pytest.mark.parametrize("path", SPACE_FILES, ids=[p.name for p in SPACE_FILES])
def test_every_space_loads_and_its_end_points_are_valid_configs(path):
    spec = load_spec(path)

    assert isinstance(spec, SweepSpec) and len(spec.space) > 0
    for p in spec.space:
        for value in p.endpoints():
            cfg = spec.train_config({**p.when, p.key: value})
            assert cfg.get(p.key) == value
            assert all(cfg.get(k) == v for k, v in p.when.items())


@pytest.mark.parametrize("item, key, value, type_", [
    pytest.param("train.lr=1e-3", "train.lr", 1e-3, float, id="float-exponent-without-dot"),
    pytest.param("train.lr=0.001", "train.lr", 1e-3, float, id="float"),
    pytest.param("train.lr=1", "train.lr", 1.0, float, id="int-for-float"),
    pytest.param("model.projector=64-64", "model.projector", "64-64", str, id="projector-string"),
    pytest.param("model.projector=''", "model.projector", "", str, id="empty-projector"),
    pytest.param("train.epochs=5", "train.epochs", 5, int, id="int"),
    pytest.param("train.amp=false", "train.amp", False, bool, id="bool"),
    pytest.param("data.image_size=null", "data.image_size", None, type(None), id="null"),
    pytest.param("eval.probe_weight_decays=[0, 1e-3]", "eval.probe_weight_decays", [0, 1e-3], list,
                 id="list"),
    pytest.param("loss.vicreg.gamma=0.5", "loss.vicreg.gamma", 0.5, float, id="loss-hyperparameter"),
    pytest.param("loss.vicreg.lam=10", "loss.vicreg.lam", 10.0, float, id="loss-int-for-float"),
    pytest.param("train.device = cpu", "train.device", "cpu", str, id="spaces-around-eq"),
])
def test_set_overrides_are_typed(item, key, value, type_):
    cfg = load_spec(VICREG, [item]).train_config()
    got = cfg.get(key)
    assert type(got) is type_ and got == value


def test_exponent_without_dot_in_a_file_is_a_float(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("train: {lr: 1e-3}\n"
                    "space:\n  train.weight_decay: {type: logfloat, low: 1e-6, high: 1e-2}\n")
    spec = load_spec(path)
    assert spec.train_config().train.lr == 1e-3
    assert (spec.space[0].low, spec.space[0].high) == (1e-6, 1e-2)


def test_flags_override_file_and_sets():
    spec = load_spec(VICREG, ["train.epochs=7", "search.seed=1"], num_samples=4, epochs=3, seed=9,
                     name="run-b")
    cfg = spec.train_config()
    assert (spec.name, spec.search.num_samples, spec.search.seed) == ("run-b", 4, 9)
    assert (cfg.train.epochs, cfg.train.seed) == (3, 9)
    assert spec.raw["train"]["epochs"] == 3


def test_empty_section_takes_defaults_and_set_fills_it(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("train:\nsearch:\nspace:\n")
    spec = load_spec(path, ["train.epochs=4"])
    assert spec.train_config().train.epochs == 4
    assert spec.search.num_samples == 12 and spec.space == []


def test_error_names_file_key_and_allowed_values(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("train: {optimizer: sgd}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: train.optimizer: got 'sgd'; choose from: adamw, lars"


def _sample(objective: DefineByRun, seed: int, n: int) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    params = []
    for _ in range(n):
        trial = study.ask()
        objective(trial)
        params.append(dict(trial.params))
        study.tell(trial, 0.0)
    return params


@pytest.fixture(autouse=True)
def _quiet_optuna():
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


def test_define_by_run_pickles():
    spec = load_spec(COMPARE)
    objective = DefineByRun(spec.space, spec.base)

    restored = pickle.loads(pickle.dumps(objective))

    assert isinstance(restored, DefineByRun)
    assert _sample(restored, seed=3, n=10) == _sample(objective, seed=3, n=10)


def test_define_by_run_samples_only_keys_whose_condition_holds():
    spec = load_spec(COMPARE)
    conditional = {p.key: p.when for p in spec.space if p.when}
    assert any(k.startswith("loss.vicreg.") for k in conditional)

    trials = _sample(DefineByRun(spec.space, spec.base), seed=0, n=40)

    methods = {t["loss.method"] for t in trials}
    assert "vicreg" in methods and methods - {"vicreg"}  # both branches were exercised
    for t in trials:
        vicreg_keys = {k for k in t if k.startswith("loss.vicreg.")}
        if t["loss.method"] == "vicreg":
            assert vicreg_keys == {k for k in conditional if k.startswith("loss.vicreg.")}
        else:
            assert not vicreg_keys
        for key, when in conditional.items():
            assert (key in t) == all(t[k] == v for k, v in when.items())
        assert "train.lr" in t  # unconditional keys are always sampled


def test_define_by_run_same_seed_same_params():
    spec = load_spec(COMPARE)
    objective = DefineByRun(spec.space, spec.base)
    first = _sample(objective, seed=11, n=12)
    assert _sample(objective, seed=11, n=12) == first
    assert _sample(objective, seed=12, n=12) != first


@pytest.mark.parametrize(
    ("sets", "ok"),
    [
        (["eval.probe_every=5", "search.metric=probe_acc"], False),  # rungs 3, 9: probe at 1, 5, 10
        (["eval.probe_every=3", "search.metric=probe_acc"], True),
        (["eval.probe_every=5", "search.metric=probe_acc", "search.scheduler.name=fifo"], True),  # no rungs
        (["eval.knn_every=2", "search.metric=knn_acc", "search.scheduler.grace_period=3"], False),
        (["eval.knn_every=2", "search.metric=fewshot_acc"], False),  # the few-labels probe runs with kNN
        (["eval.probe_every=5"], True),  # the shipped objective, fewshot_acc, does not wait for the full probe
        (["eval.probe_every=5", "search.metric=effective_rank"], True),  # measured every epoch
    ],
)
def test_asha_rungs_must_see_a_fresh_objective(sets, ok):
    if ok:
        load_spec(SPACES / "vicreg.yaml", sets, epochs=10)
    else:
        with pytest.raises(SpecError, match="ASHA compares"):
            load_spec(SPACES / "vicreg.yaml", sets, epochs=10)


NESTED_WHEN = """\
space:
  loss.method: {type: categorical, values: [vicreg, barlow_twins]}
  model.norm: {type: categorical, values: [batch, none], when: {loss.method: vicreg}}
  train.lr: {type: logfloat, low: 1.0e-3, high: 1.0e-2, when: {model.norm: batch}}
"""


def test_a_condition_on_a_key_not_sampled_uses_its_default(tmp_path):
    """model.norm is sampled only for vicreg; for barlow_twins it keeps its default, batch, so train.lr (when
    model.norm is batch) is sampled there too. The spec sets no model.norm: the default must count, not None."""
    path = tmp_path / "nested.yaml"
    path.write_text(NESTED_WHEN)
    spec = load_spec(path)
    assert spec.base.get("model.norm") == "batch"
    lr = spec.space[-1]
    assert lr.active({"loss.method": "barlow_twins"}, spec.base)
    assert not lr.active({"loss.method": "vicreg", "model.norm": "none"}, spec.base)
    trials = _sample(DefineByRun(spec.space, spec.base), seed=0, n=30)
    barlow = [t for t in trials if t["loss.method"] == "barlow_twins"]
    assert barlow and all("train.lr" in t and "model.norm" not in t for t in barlow)
    assert all(("train.lr" in t) == (t["model.norm"] == "batch") for t in trials if t["loss.method"] == "vicreg")
