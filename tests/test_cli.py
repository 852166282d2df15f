from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ncssl_tune.cli import main
from ncssl_tune.data import DATASETS

SPACE_FILES = sorted((Path(__file__).resolve().parent.parent / "search_spaces").glob("*.yaml"))

BASE = """\
data: {dataset: digits}
model: {projector: 64-64}
loss: {method: vicreg}
train: {epochs: 2, batch_size: 64, lr: 1.0e-3}
search: {num_samples: 3, algorithm: tpe}
resources: {cpu: 1, gpu: 0}
space:
  train.lr: {type: logfloat, low: 1.0e-4, high: 1.0e-2}
"""


def _space(*lines: str, search: str = "{num_samples: 3}") -> str:
    """A file with the digits base and the given `space:` entries."""
    return ("data: {dataset: digits}\nmodel: {projector: 64-64}\ntrain: {epochs: 2, batch_size: 64}\n"
            f"search: {search}\nspace:\n" + "".join(f"  {line}\n" for line in lines))


WMSE = "loss: {{method: wmse, wmse: {{w_size: {w}}}}}\nmodel: {{projector: {proj}}}\ntrain: {{batch_size: 256}}\n"
COND = "loss.vicreg.lam: {type: logfloat, low: 1, high: 100, when: {loss.method: %s}}"
METHODS = "loss.method: {type: categorical, values: [vicreg, barlow_twins]}"

# (file text or None for "no file", extra argv, substrings the one stderr line must contain, file named?)
# "$EMPTY" in the text becomes an existing empty folder; "$FILE" in a substring becomes the file's path.
CASES = [
    pytest.param("data: {dataset: digits\n", [], ["not valid YAML", "line 2"], True, id="yaml-unclosed-flow"),
    pytest.param("data:\n\tdataset: digits\n", [], ["not valid YAML", "line 2, column 1"], True, id="yaml-tab"),
    pytest.param("- data\n- model\n", [], ["expected a mapping with keys", "space", "got list"], True,
                 id="top-level-list"),
    pytest.param("just a string\n", [], ["expected a mapping", "got str"], True, id="top-level-scalar"),
    pytest.param(BASE + "dataset: digits\n", [], ["dataset: unknown top-level key", "allowed: name, data"], True,
                 id="unknown-top-key"),
    pytest.param("data: {bogus: 1}\n", [], ["data.bogus: unknown key", "allowed keys in data", "dataset, root"],
                 True, id="unknown-key-data"),
    pytest.param("model: {bogus: 1}\n", [], ["model.bogus: unknown key", "backbone, projector"], True,
                 id="unknown-key-model"),
    pytest.param("loss: {bogus: 1}\n", [], ["loss.bogus: unknown key", "method, vicreg, barlow_twins"], True,
                 id="unknown-key-loss"),
    pytest.param("train: {bogus: 1}\n", [], ["train.bogus: unknown key", "epochs, batch_size, optimizer, lr"],
                 True, id="unknown-key-train"),
    pytest.param("eval: {bogus: 1}\n", [], ["eval.bogus: unknown key", "eval_samples"], True,
                 id="unknown-key-eval"),
    pytest.param("search: {bogus: 1}\n", [], ["search.bogus: unknown key", "metric, mode, num_samples"], True,
                 id="unknown-key-search"),
    pytest.param("search: {scheduler: {bogus: 1}}\n", [], ["search.scheduler.bogus: unknown key",
                 "name, grace_period, reduction_factor"], True, id="unknown-key-search-scheduler"),
    pytest.param("resources: {bogus: 1}\n", [], ["resources.bogus: unknown key", "cpu, gpu"], True,
                 id="unknown-key-resources"),
    pytest.param(_space("train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, bogus: 1}"), [],
                 ["space.train.lr.bogus: unknown key", "type, low, high, step, values, when"], True,
                 id="unknown-key-param"),
    pytest.param("train: {lr: fast}\n", [], ["train.lr: expected a number, got 'fast'"], True,
                 id="string-for-number"),
    pytest.param("train: {epochs: true}\n", [], ["train.epochs: expected an integer, got True"], True,
                 id="bool-for-int"),
    pytest.param("train: {batch_size: 64.5}\n", [], ["train.batch_size: expected an integer, got 64.5"], True,
                 id="float-for-int"),
    pytest.param("data: [digits]\n", [], ["data: expected a mapping, got ['digits']"], True,
                 id="list-for-mapping"),
    pytest.param("search: []\n", [], ["search: expected a mapping, got []"], True, id="empty-list-for-search"),
    pytest.param("resources: [1, 0]\n", [], ["resources: expected a mapping, got [1, 0]"], True,
                 id="list-for-resources"),
    pytest.param("space: [train.lr]\n", [], ["space: expected a mapping of dotted config keys"], True,
                 id="list-for-space"),
    pytest.param(_space("train.lr: [1.0e-4, 1.0e-2]"), [], ["space.train.lr: expected a mapping like"], True,
                 id="list-for-param"),
    pytest.param("name: ../elsewhere\n" + BASE, [], ["name: '../elsewhere' cannot name a folder"], True,
                 id="name-with-path"),
    pytest.param(_space("train.lr: {type: logfloat, low: 1.0e-2, high: 1.0e-4}"), [],
                 ["space.train.lr: empty or inverted range: low=0.01 must be < high=0.0001"], True,
                 id="inverted-range"),
    pytest.param(_space("train.lr: {type: float, low: 1.0e-3, high: 1.0e-3}"), [],
                 ["space.train.lr: empty or inverted range", "must be <"], True, id="empty-range"),
    pytest.param(_space("train.weight_decay: {type: logfloat, low: 0, high: 0.1}"), [],
                 ["space.train.weight_decay.low: a logfloat range needs low > 0, got 0"], True,
                 id="log-range-low-zero"),
    pytest.param(_space("train.epochs: {type: int, low: 1.5, high: 4}"), [],
                 ["space.train.epochs.low: an int needs whole numbers, got 1.5"], True, id="int-range-fraction"),
    pytest.param(_space("train.epochs: {type: int, low: 1, high: 9, step: 0.5}"), [],
                 ["space.train.epochs.step: an int range needs a whole step, got 0.5"], True,
                 id="int-range-fractional-step"),
    pytest.param(_space("train.lr: {type: logfloat, low: 1.0e-4, high: 1.0e-2, step: 1.0e-3}"), [],
                 ["space.train.lr.step", "cannot be combined with a log scale"], True, id="log-range-with-step"),
    pytest.param(_space("train.lr: {type: float, low: 1.0e-4}"), [],
                 ["space.train.lr.high: a float needs low and high"], True, id="range-missing-high"),
    pytest.param(_space("train.lr: {type: float, low: 1.0e-4, high: .inf}"), [],
                 ["space.train.lr.high: must be finite"], True, id="range-infinite"),
    pytest.param(_space("model.projector: {type: categorical, values: []}"), [],
                 ["space.model.projector.values: a categorical needs a non-empty list of values"], True,
                 id="categorical-empty"),
    pytest.param(_space("eval.probe_weight_decays: {type: categorical, values: [[0.0], [0.1]]}"), [],
                 ["space.eval.probe_weight_decays.values", "scalars", "[0.0]"], True, id="categorical-of-lists"),
    pytest.param(_space("train.lr: {type: uniform, low: 1.0e-4, high: 1.0e-2}"), [],
                 ["space.train.lr.type: got 'uniform'", "float, logfloat, int, logint, categorical"], True,
                 id="unknown-param-type"),
    pytest.param("loss: {method: byol}\n", [],
                 ["loss.method: unknown method 'byol'", "barlow_twins, invariance, simclr, vicreg, wmse"], True,
                 id="unknown-loss-method"),
    pytest.param("data: {dataset: mnist}\n", [], ["data.dataset: unknown dataset 'mnist'", "cifar10", "digits"],
                 True, id="unknown-dataset"),
    pytest.param("model: {backbone: vit}\n", [], ["model.backbone: unknown backbone 'vit'", "resnet18", "small_cnn"],
                 True, id="unknown-backbone"),
    pytest.param("train: {optimizer: sgd}\n", [], ["train.optimizer: got 'sgd'; choose from: adamw, lars"], True,
                 id="unknown-optimizer"),
    pytest.param("search: {scheduler: {name: hyperband}}\n", [],
                 ["search.scheduler.name: got 'hyperband'; choose from: asha, fifo"], True, id="unknown-scheduler"),
    pytest.param("search: {algorithm: cmaes}\n", [], ["search.algorithm: got 'cmaes'; choose from: tpe, random, grid"],
                 True, id="unknown-algorithm"),
    pytest.param("search: {metric: accuracy}\n", [],
                 ["search.metric: got 'accuracy'; choose from: probe_acc, knn_acc, effective_rank"], True,
                 id="unknown-objective"),
    pytest.param("search: {mode: maximize}\n", [], ["search.mode: got 'maximize'; choose from: max, min"], True,
                 id="unknown-mode"),
    pytest.param("loss: {method: vicreg, vicreg: {bogus: 1}}\n", [],
                 ["loss.vicreg.bogus: unknown parameter; allowed: lam, mu, nu, gamma"], True,
                 id="unknown-loss-hyperparameter"),
    pytest.param("loss: {vicreg: {lam: high}}\n", [], ["loss.vicreg.lam: expected a number, got 'high'"], True,
                 id="loss-hyperparameter-type"),
    pytest.param(_space("train.bogus: {type: float, low: 1, high: 2}"), [],
                 ["space.train.bogus", "train.bogus: unknown key; allowed keys in train"], True,
                 id="space-key-outside-config"),
    pytest.param(_space("search.seed: {type: int, low: 0, high: 3}"), [],
                 ["space.search.seed: swept keys are dotted config keys under data, model, loss, train, eval"],
                 True, id="space-key-outside-sections"),
    pytest.param(_space("train.lr: {type: float, low: -1.0e-3, high: 1.0e-2}"), [],
                 ["space.train.lr: value -0.001 is not valid for train.lr: must be > 0"], True,
                 id="space-negative-lr"),
    pytest.param(_space("model.projector: {type: categorical, values: [64-64, 64-x]}"), [],
                 ["space.model.projector: value '64-x' is not valid", "positive widths joined by '-'"], True,
                 id="space-bad-categorical-value"),
    pytest.param(WMSE.format(w=96, proj="64-32"), [],
                 ["loss.wmse.w_size: batch size 256 must be a multiple of w_size 96"], True,
                 id="wmse-w_size-not-dividing-batch"),
    pytest.param(WMSE.format(w=128, proj="256-128"), [],
                 ["loss.wmse.w_size: w_size 128 must be >= 2 x embedding width 128"], True,
                 id="wmse-w_size-below-2x-width"),
    pytest.param(WMSE.format(w=128, proj="64-16") + "space:\n  loss.wmse.w_size: {type: categorical, values: [64, 48]}\n",
                 [], ["space.loss.wmse.w_size: value 48", "must be a multiple of w_size 48"], True,
                 id="wmse-w_size-in-space"),
    pytest.param("loss: {method: wmse, wmse: {eps: 2.0}}\nmodel: {projector: 64-32}\n", [],
                 ["loss.wmse.eps: whitening shrinkage must be in [0, 1], got 2.0"], True, id="wmse-eps-above-1"),
    pytest.param("data: {augment: {flip: 0.5}}\n", [], ["data.augment: unknown key(s) ['flip']", "flip_p"], True,
                 id="unknown-augment-key"),
    pytest.param("data: {augment: {flip_p: 1.5}}\n", [], ["data.augment: flip_p must be a number in [0.0, 1.0]"],
                 True, id="augment-out-of-range"),
    pytest.param("data: {dataset: digits, synthetic: {n: 100}}\n", [],
                 ["data.synthetic: options of the synthetic generator, but data.dataset is 'digits'"], True,
                 id="synthetic-options-for-digits"),
    pytest.param("data: {dataset: synthetic, synthetic: {pixels: 5}}\n", [],
                 ["data.synthetic.pixels: unknown option; allowed: n, size, channels, classes, noise"], True,
                 id="unknown-synthetic-option"),
    pytest.param(None, [], ["$FILE: no such search-space file"], True, id="missing-file"),
    pytest.param("$DIR", [], ["$FILE: is a directory; expected a search-space YAML file"], True, id="directory"),
    pytest.param("data: {dataset: cifar10, root: $EMPTY}\nmodel: {backbone: resnet18}\n", [],
                 ["data.root: cifar10: missing", "cifar-10-batches-py", "To obtain it: download"], True,
                 id="dataset-root-empty"),
    pytest.param("data: {dataset: stl10}\n", [], ["data.root: stl10: no data root given", "To obtain it"], True,
                 id="dataset-root-unset"),
    pytest.param(BASE, ["--set", "train.lr"], ["--set 'train.lr': expected KEY=VALUE"], False, id="set-without-eq"),
    pytest.param(BASE, ["--set", "=5"], ["--set '=5': expected KEY=VALUE"], False, id="set-without-key"),
    pytest.param(BASE, ["--set", "train.bogus=1"], ["train.bogus: unknown key; allowed keys in train"], True,
                 id="set-unknown-key"),
    pytest.param(BASE, ["--set", "trian.lr=1"], ["trian.lr: unknown key; allowed top-level keys: name, data"],
                 True, id="set-unknown-section"),
    pytest.param(BASE, ["--set", "train.lr.peak=1"], ["train.lr.peak: 'lr' is a value, not a section"], True,
                 id="set-below-a-value"),
    pytest.param(BASE, ["--set", "train.epochs=many"], ["train.epochs: expected an integer, got 'many'"], True,
                 id="set-wrong-type"),
    pytest.param(BASE, ["--set", "train.lr=[1e-3"], ["--set 'train.lr=[1e-3': train.lr: value '[1e-3' is not "
                                                    "valid YAML"], False, id="set-invalid-yaml"),
    pytest.param(BASE, ["--set", "space.train.lr=1"],
                 ["space.train.lr: the search space cannot be changed with --set"], True, id="set-space"),
    pytest.param(BASE, ["--set", "resources.gpu=1.5"],
                 ["resources.gpu: above 1 must be a whole number of GPUs, got 1.5"], True, id="set-gpu-fraction"),
    pytest.param(BASE, ["--bogus"], ["unrecognized arguments: --bogus"], False, id="unknown-flag"),
    pytest.param(BASE, ["--num-samples", "0"], ["search.num_samples: must be >= 1, got 0"], True,
                 id="num-samples-zero"),
    pytest.param(BASE, ["--num-samples", "ten"], ["argument --num-samples: invalid int value: 'ten'"], False,
                 id="num-samples-not-int"),
    pytest.param(BASE, ["--epochs", "2.5"], ["argument --epochs: invalid int value: '2.5'"], False,
                 id="epochs-not-int"),
    pytest.param(BASE, ["--epochs", "0"], ["train.epochs: must be > 0, got 0"], True, id="epochs-zero"),
    pytest.param(BASE, ["--seed", "-1"], ["train.seed: must be >= 0, got -1"], True, id="seed-negative"),
    pytest.param(_space(METHODS, COND % "vicreg", search="{algorithm: grid}"), [],
                 ["space.loss.vicreg.lam.when: conditional parameters need algorithm tpe or random, not grid"],
                 True, id="when-with-grid"),
    pytest.param(_space(COND % "vicreg"), [],
                 ["space.loss.vicreg.lam.when.loss.method: a condition names a categorical key swept earlier"],
                 True, id="when-on-unswept-key"),
    pytest.param(_space(COND % "vicreg", METHODS), [],
                 ["space.loss.vicreg.lam.when.loss.method", "swept earlier in this file; swept so far: (none)"],
                 True, id="when-before-its-key"),
    pytest.param(_space(METHODS, COND % "wmse"), [],
                 ["space.loss.vicreg.lam.when.loss.method: 'wmse' is never sampled; choose from: vicreg, "
                  "barlow_twins"], True, id="when-value-never-sampled"),
    pytest.param("resources: {cpu: 0}\n", [], ["resources.cpu: must be > 0", "got 0"], True, id="cpu-zero"),
    pytest.param("resources: {gpu: -1}\n", [], ["resources.gpu: must be >= 0", "got -1"], True,
                 id="gpu-negative"),
    pytest.param("resources: {gpu: 1.5}\n", [], ["resources.gpu: above 1 must be a whole number of GPUs, got 1.5"],
                 True, id="gpu-fraction-above-1"),
    pytest.param("resources: {cpu: two}\n", [], ["resources.cpu: expected a number, got 'two'"], True,
                 id="cpu-not-a-number"),
]


# validate takes only --set; the cases about run flags are covered by the run variant.
VALIDATE_CASES = [c for c in CASES if all(a == "--set" or not a.startswith("--") for a in c.values[1])]


def _check_rejected(tmp_path: Path, capsys, text: str | None, extra: list[str], expected: list[str],
                    names_file: bool, validate: bool) -> None:
    work = tmp_path / "work"
    (work / "empty").mkdir(parents=True)
    path = work / "space.yaml"
    if text == "$DIR":
        path.mkdir()
    elif text is not None:
        path.write_text(text.replace("$EMPTY", str(work / "empty")))
    results = tmp_path / "results"
    before = sorted(tmp_path.rglob("*"))
    argv = ["validate", str(path), *extra] if validate else [str(path), "--dry-run", "--results-dir", str(results),
                                                             *extra]

    status = main(argv)

    out, err = capsys.readouterr()
    assert status == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    line = lines[0]
    assert line.startswith("ncssl-sweep: error: ")
    assert "Traceback" not in out + err
    for want in expected:
        assert want.replace("$FILE", str(path)) in line
    assert (str(path) in line) is names_file
    assert sorted(tmp_path.rglob("*")) == before
    assert not results.exists()


@pytest.mark.parametrize("text, extra, expected, names_file", CASES)
def test_bad_input_run(tmp_path, capsys, text, extra, expected, names_file):
    _check_rejected(tmp_path, capsys, text, extra, expected, names_file, validate=False)


@pytest.mark.parametrize("text, extra, expected, names_file", VALIDATE_CASES)
def test_bad_input_validate(tmp_path, capsys, text, extra, expected, names_file):
    _check_rejected(tmp_path, capsys, text, extra, expected, names_file, validate=True)


def test_validate_needs_at_least_one_file(capsys):
    assert main(["validate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ncssl-sweep: error: ") and "required: spaces" in err and len(err.splitlines()) == 1


def _needs_disk(path: Path) -> bool:
    dataset = ((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("dataset", "digits")
    return bool(DATASETS[dataset].expected)


@pytest.mark.parametrize("path", SPACE_FILES, ids=[p.name for p in SPACE_FILES])
def test_validate_every_shipped_space(path, capsys):
    status = main(["validate", str(path)])
    out, err = capsys.readouterr()
    if _needs_disk(path):
        assert status == 2
        assert len(err.splitlines()) == 1
        assert err.startswith(f"ncssl-sweep: error: {path}: data.root: ")
        assert "To obtain it:" in err and "download" in err
    else:
        assert (status, err) == (0, "")
        assert out.startswith(f"{path}: ok (")


def test_shipped_spaces_include_both_kinds():
    kinds = {_needs_disk(p) for p in SPACE_FILES}
    assert kinds == {True, False}


def test_dry_run_prints_space_and_budget_and_writes_nothing(tmp_path, capsys):
    vicreg = next(p for p in SPACE_FILES if p.name == "vicreg.yaml")
    results = tmp_path / "results"
    argv = [str(vicreg), "--dry-run", "--results-dir", str(results), "--num-samples", "5", "--epochs", "3",
            "--set", "resources.cpu=0.5"]

    assert main(argv) == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert "budget: 5 trials x 3 epochs = at most 15 trial-epochs" in out
    assert "0.5 cpu + 0 gpu per trial" in out
    for key in ("loss.vicreg.lam: logfloat [1.0, 100.0]", "train.lr: logfloat [0.0005, 0.01]",
                "model.projector: one of ['64-64', '256-256-256', '1024-1024-1024']"):
        assert key in out
    assert not results.exists() and not list(tmp_path.iterdir())


def test_dry_run_grid_budget_is_the_grid_size(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(_space("model.projector: {type: categorical, values: [64-64, 128-128]}",
                           "train.lr: {type: logfloat, low: 1.0e-4, high: 1.0e-2}",
                           search="{algorithm: grid, num_samples: 100}"))

    assert main([str(path), "--dry-run", "--results-dir", str(tmp_path / "results")]) == 0

    out = capsys.readouterr().out
    assert "budget: 6 trials x 2 epochs = at most 12 trial-epochs" in out  # 2 projectors x 3 lr points
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_dry_run_shows_conditions(tmp_path, capsys):
    compare = next(p for p in SPACE_FILES if p.name == "compare.yaml")
    assert main([str(compare), "--dry-run", "--results-dir", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "loss.vicreg.gamma: float [0.05, 2.0] when loss.method=vicreg" in out
    assert "budget: 16 trials x 10 epochs" in out
    assert not list(tmp_path.iterdir())
