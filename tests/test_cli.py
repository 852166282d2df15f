from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ncssl_tune.cli import main
from ncssl_tune.core.data import DATASETS
from ncssl_tune.spec import load_spec

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


def _space(*entries: str, search: str = "{num_samples: 3}") -> str:
    """A digits file whose `space:` holds `entries`, one per line."""
    return ("data: {dataset: digits}\nmodel: {projector: 64-64}\ntrain: {epochs: 2, batch_size: 64}\n"
            f"search: {search}\nspace:\n" + "".join(f"  {e}\n" for e in entries))


def _wmse(w_size: int, projector: str) -> str:
    return f"loss: {{method: wmse, wmse: {{w_size: {w_size}}}}}\nmodel: {{projector: {projector}}}\n" \
           "train: {batch_size: 256}\n"


def case(id_: str, text: str | None, *expected: str, args: tuple[str, ...] = (), names_file: bool = True):
    """text: the file (None: no file, "$DIR": a folder in its place; "$EMPTY" becomes an empty folder);
    expected: substrings of the one stderr line ("$FILE" becomes the file's path); args: extra argv."""
    return pytest.param(text, list(args), list(expected), names_file, id=id_)


LAM_WHEN = "loss.vicreg.lam: {type: logfloat, low: 1, high: 100, when: {loss.method: %s}}"
METHODS = "loss.method: {type: categorical, values: [vicreg, barlow_twins]}"

CASES = [
    case("yaml-unclosed-flow", "data: {dataset: digits\n", "not valid YAML", "line 2"),
    case("yaml-tab", "data:\n\tdataset: digits\n", "not valid YAML at line 2, column 1"),
    case("top-level-list", "- data\n- model\n", "expected a mapping with keys", "space", "got list"),
    case("top-level-scalar", "just a string\n", "expected a mapping", "got str"),
    case("unknown-top-key", BASE + "dataset: digits\n",
         "dataset: unknown top-level key", "allowed: name, data"),
    case("unknown-key-data", "data: {bogus: 1}\n",
         "data.bogus: unknown key", "allowed keys in data: dataset"),
    case("unknown-key-model", "model: {bogus: 1}\n", "model.bogus: unknown key", "backbone, projector"),
    case("unknown-key-loss", "loss: {bogus: 1}\n", "loss.bogus: unknown key", "method, vicreg, barlow_twins"),
    case("unknown-key-train", "train: {bogus: 1}\n", "train.bogus: unknown key", "epochs, batch_size"),
    case("unknown-key-eval", "eval: {bogus: 1}\n", "eval.bogus: unknown key", "eval_samples"),
    case("unknown-key-search", "search: {bogus: 1}\n",
         "search.bogus: unknown key", "metric, mode, num_samples"),
    case("space-entry-without-type", "space:\n  train.lr: {low: 0.001, high: 0.01}\n",
         "space.train.lr.type: required; choose from: float, logfloat, int, logint, categorical"),
    case("collapse-stop-patience-below-1", "search:\n  collapse_stop: {total_patience: -1}\n",
         "search.collapse_stop.total_patience: must be >= 1, got -1"),
    case("repeats-with-tpe", "search: {repeats: 2}\n", "search.repeats: repeats need a non-adaptive sampler",
         "qmc, random or grid"),
    case("repeats-with-a-swept-seed", "search: {repeats: 2, algorithm: qmc}\nspace:\n"
         "  train.seed: {type: int, low: 0, high: 9}\n", "space.train.seed: search.repeats sets each repeat's"),
    case("unknown-algorithm", "search: {algorithm: cmaes}\n", "search.algorithm", "tpe, random, grid, qmc"),
    case("unknown-key-search-scheduler", "search: {scheduler: {bogus: 1}}\n",
         "search.scheduler.bogus: unknown key", "name, grace_period, reduction_factor"),
    case("unknown-key-resources", "resources: {bogus: 1}\n", "resources.bogus: unknown key", "cpu, gpu"),
    case("unknown-key-param", _space("train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, bogus: 1}"),
         "space.train.lr.bogus: unknown key", "type, low, high, step, values, when"),
    case("string-for-number", "train: {lr: fast}\n", "train.lr: expected a number, got 'fast'"),
    case("bool-for-int", "train: {epochs: true}\n", "train.epochs: expected an integer, got True"),
    case("float-for-int", "train: {batch_size: 64.5}\n", "train.batch_size: expected an integer, got 64.5"),
    case("list-for-mapping", "data: [digits]\n", "data: expected a mapping, got ['digits']"),
    case("empty-list-for-search", "search: []\n", "search: expected a mapping, got []"),
    case("list-for-resources", "resources: [1, 0]\n", "resources: expected a mapping, got [1, 0]"),
    case("list-for-space", "space: [train.lr]\n", "space: expected a mapping of dotted config keys"),
    case("list-for-param", _space("train.lr: [1.0e-4, 1.0e-2]"), "space.train.lr: expected a mapping like"),
    case("name-with-path", "name: ../elsewhere\n" + BASE, "name: '../elsewhere' cannot name a folder"),
    case("inverted-range", _space("train.lr: {type: logfloat, low: 1.0e-2, high: 1.0e-4}"),
         "space.train.lr: empty or inverted range: low=0.01 must be < high=0.0001"),
    case("empty-range", _space("train.lr: {type: float, low: 1.0e-3, high: 1.0e-3}"),
         "space.train.lr: empty or inverted range", "must be <"),
    case("log-range-low-zero", _space("train.weight_decay: {type: logfloat, low: 0, high: 0.1}"),
         "space.train.weight_decay.low: a logfloat range needs low > 0, got 0"),
    case("int-range-fraction", _space("train.epochs: {type: int, low: 1.5, high: 4}"),
         "space.train.epochs.low: an int needs whole numbers, got 1.5"),
    case("int-range-fractional-step", _space("train.epochs: {type: int, low: 1, high: 9, step: 0.5}"),
         "space.train.epochs.step: an int range needs a whole step, got 0.5"),
    case("log-range-with-step", _space("train.lr: {type: logfloat, low: 1.0e-4, high: 1.0e-2, step: 1.0e-3}"),
         "space.train.lr.step", "cannot be combined with a log scale"),
    case("range-missing-high", _space("train.lr: {type: float, low: 1.0e-4}"),
         "space.train.lr.high: a float needs low and high"),
    case("range-infinite", _space("train.lr: {type: float, low: 1.0e-4, high: .inf}"),
         "space.train.lr.high: must be finite"),
    case("categorical-empty", _space("model.projector: {type: categorical, values: []}"),
         "space.model.projector.values: a categorical needs a non-empty list of values"),
    case("categorical-of-lists",
         _space("eval.probe_weight_decays: {type: categorical, values: [[0.0], [0.1]]}"),
         "space.eval.probe_weight_decays.values", "scalars", "[0.0]"),
    case("unknown-param-type", _space("train.lr: {type: uniform, low: 1.0e-4, high: 1.0e-2}"),
         "space.train.lr.type: got 'uniform'", "float, logfloat, int, logint, categorical"),
    case("unknown-loss-method", "loss: {method: dino}\n",
         "loss.method: unknown method 'dino'", "barlow_twins, byol, invariance, simclr, simsiam, vicreg, wmse"),
    case("unknown-dataset", "data: {dataset: mnist}\n",
         "data.dataset: unknown dataset 'mnist'", "cifar10", "digits"),
    case("unknown-backbone", "model: {backbone: vit}\n", "model.backbone: unknown backbone 'vit'", "resnet18",
         "small_cnn"),
    case("unknown-optimizer", "train: {optimizer: sgd}\n",
         "train.optimizer: got 'sgd'; choose from: adamw, lars"),
    case("unknown-scheduler", "search: {scheduler: {name: hyperband}}\n",
         "search.scheduler.name: got 'hyperband'; choose from: asha, fifo"),
    case("unknown-algorithm", "search: {algorithm: cmaes}\n",
         "search.algorithm: got 'cmaes'; choose from: tpe, random, grid"),
    case("unknown-objective", "search: {metric: accuracy}\n",
         "search.metric: got 'accuracy'; choose from: fewshot_acc, probe_acc, knn_acc, effective_rank"),
    case("unknown-mode", "search: {mode: maximize}\n", "search.mode: got 'maximize'; choose from: max, min"),
    case("unknown-loss-hyperparameter", "loss: {method: vicreg, vicreg: {bogus: 1}}\n",
         "loss.vicreg.bogus: unknown parameter; allowed: lam, mu, nu, gamma"),
    case("loss-hyperparameter-type", "loss: {vicreg: {lam: high}}\n",
         "loss.vicreg.lam: expected a number, got 'high'"),
    # A mistyped key reads the same in a space entry, a file key and --set: unknown, and what is allowed.
    case("space-key-outside-config", _space("train.bogus: {type: float, low: 1, high: 2}"),
         "space.train.bogus: unknown key; allowed keys in train: epochs"),
    case("space-unknown-loss-hyperparameter", _space("loss.vicreg.lamda: {type: logfloat, low: 1, high: 100}"),
         "space.loss.vicreg.lamda: unknown parameter; allowed: lam, mu, nu, gamma"),
    case("space-key-outside-sections", _space("search.seed: {type: int, low: 0, high: 3}"),
         "space.search.seed: swept keys are dotted config keys under data, model, loss, train, eval"),
    case("space-negative-lr", _space("train.lr: {type: float, low: -1.0e-3, high: 1.0e-2}"),
         "space.train.lr: value -0.001 is not valid for train.lr: must be > 0"),
    case("space-bad-categorical-value", _space("model.projector: {type: categorical, values: [64-64, 64-x]}"),
         "space.model.projector: value '64-x' is not valid", "positive widths joined by '-'"),
    case("wmse-w_size-not-dividing-batch", _wmse(96, "64-32"),
         "loss.wmse.w_size: batch size 256 must be a multiple of w_size 96"),
    case("wmse-w_size-below-2x-width", _wmse(128, "256-128"),
         "loss.wmse.w_size: w_size 128 must be >= 2 x embedding width 128"),
    case("wmse-w_size-in-space",
         _wmse(128, "64-16") + "space:\n  loss.wmse.w_size: {type: categorical, values: [64, 48]}\n",
         "space.loss.wmse.w_size: value 48", "must be a multiple of w_size 48"),
    case("wmse-eps-above-1", "loss: {method: wmse, wmse: {eps: 2.0}}\nmodel: {projector: 64-32}\n",
         "loss.wmse.eps: whitening shrinkage must be in [0, 1], got 2.0"),
    case("unknown-augment-key", "data: {augment: {flip: 0.5}}\n",
         "data.augment: unknown key(s) ['flip']", "flip_p"),
    case("augment-out-of-range", "data: {augment: {flip_p: 1.5}}\n",
         "data.augment: flip_p must be a number in [0.0, 1.0]"),
    case("synthetic-options-for-digits", "data: {dataset: digits, synthetic: {n: 100}}\n",
         "data.synthetic: options of the synthetic generator, but data.dataset is 'digits'"),
    case("unknown-synthetic-option", "data: {dataset: synthetic, synthetic: {pixels: 5}}\n",
         "data.synthetic.pixels: unknown option; allowed: n, size, channels, classes, noise"),
    case("missing-file", None, "$FILE: no such search-space file"),
    case("directory", "$DIR", "$FILE: is a directory; expected a search-space YAML file"),
    case("set-without-eq", BASE, "--set 'train.lr': expected KEY=VALUE", args=("--set", "train.lr"),
         names_file=False),
    case("set-without-key", BASE, "--set '=5': expected KEY=VALUE", args=("--set", "=5"), names_file=False),
    case("set-unknown-key", BASE, "--set train.bogus=1: train.bogus: unknown key; allowed keys in train",
         args=("--set", "train.bogus=1"), names_file=False),
    case("set-unknown-loss-hyperparameter", BASE,
         "--set loss.vicreg.lamda=1.0: loss.vicreg.lamda: unknown parameter; allowed: lam, mu, nu, gamma",
         args=("--set", "loss.vicreg.lamda=1.0"), names_file=False),
    case("set-unknown-section", BASE, "--set trian.lr=1: trian.lr: unknown key; allowed top-level keys: name, data",
         args=("--set", "trian.lr=1"), names_file=False),
    case("set-below-a-value", BASE, "--set train.lr.peak=1: train.lr.peak: 'lr' is a value, not a section",
         args=("--set", "train.lr.peak=1"), names_file=False),
    case("set-wrong-type", BASE, "--set train.epochs=many: train.epochs: expected an integer, got 'many'",
         args=("--set", "train.epochs=many"), names_file=False),
    case("set-invalid-yaml", BASE, "--set 'train.lr=[1e-3': train.lr: value '[1e-3' is not valid YAML",
         args=("--set", "train.lr=[1e-3"), names_file=False),
    case("set-space", BASE, "--set space.train.lr=1: space.train.lr: the search space cannot be changed with --set",
         args=("--set", "space.train.lr=1"), names_file=False),
    case("set-gpu-fraction", BASE, "--set resources.gpu=1.5: resources.gpu: above 1 must be a whole number of GPUs",
         args=("--set", "resources.gpu=1.5"), names_file=False),
    case("unknown-flag", BASE, "unrecognized arguments: --bogus", args=("--bogus",), names_file=False),
    case("num-samples-zero", BASE, "--num-samples 0: search.num_samples: must be >= 1, got 0",
         args=("--num-samples", "0"), names_file=False),
    case("num-samples-not-int", BASE, "argument --num-samples: invalid int value: 'ten'",
         args=("--num-samples", "ten"), names_file=False),
    case("epochs-not-int", BASE, "argument --epochs: invalid int value: '2.5'", args=("--epochs", "2.5"),
         names_file=False),
    case("epochs-zero", BASE, "--epochs 0: train.epochs: must be > 0, got 0", args=("--epochs", "0"),
         names_file=False),
    case("seed-negative", BASE, "--seed -1: train.seed: must be >= 0, got -1", args=("--seed", "-1"),
         names_file=False),
    case("when-with-grid", _space(METHODS, LAM_WHEN % "vicreg", search="{algorithm: grid}"),
         "space.loss.vicreg.lam.when: conditional parameters need algorithm tpe or random, not grid"),
    case("when-on-unswept-key", _space(LAM_WHEN % "vicreg"),
         "space.loss.vicreg.lam.when.loss.method: a condition names a categorical key swept earlier"),
    case("when-before-its-key", _space(LAM_WHEN % "vicreg", METHODS),
         "space.loss.vicreg.lam.when.loss.method", "swept earlier in this file; swept so far: (none)"),
    case("when-value-never-sampled", _space(METHODS, LAM_WHEN % "wmse"),
         "space.loss.vicreg.lam.when.loss.method: 'wmse' is never sampled",
         "choose from: vicreg, barlow_twins"),
    case("cpu-zero", "resources: {cpu: 0}\n", "resources.cpu: must be > 0", "got 0"),
    case("gpu-negative", "resources: {gpu: -1}\n", "resources.gpu: must be >= 0", "got -1"),
    case("gpu-fraction-above-1", "resources: {gpu: 1.5}\n",
         "resources.gpu: above 1 must be a whole number of GPUs, got 1.5"),
    case("cpu-not-a-number", "resources: {cpu: two}\n", "resources.cpu: expected a number, got 'two'"),
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
    if validate:
        argv = ["validate", str(path), *extra]
    else:
        argv = [str(path), "--dry-run", "--results-dir", str(results), *extra]

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
    assert sorted(tmp_path.rglob("*")) == before  # no results folder, no mlflow.db, nothing at all
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
    assert (status, err) == (0, "") and len(out.splitlines()) == 1
    assert out.startswith(f"{path}: ok (")
    # a space on disk data says what is missing here and what to set, in short: the file itself is valid
    assert ("; data missing here: set data.root (" in out) is _needs_disk(path)
    assert len(out) < len(str(path)) + 100, out


def test_shipped_spaces_include_both_kinds():
    assert {_needs_disk(p) for p in SPACE_FILES} == {True, False}


def test_validate_reports_every_file_and_fails_if_any_failed(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: many}\n")
    good = [str(p) for p in SPACE_FILES]
    argv = ["validate", good[0], str(bad), str(tmp_path / "absent.yaml"), *good[1:]]

    status = main(argv)

    out, err = capsys.readouterr()
    assert status == 2
    assert [line.split(": ok (")[0] for line in out.splitlines()] == good  # each good file, in order
    assert err.splitlines() == [f"ncssl-sweep: error: {bad}: train.epochs: expected an integer, got 'many'",
                                f"ncssl-sweep: error: {tmp_path / 'absent.yaml'}: no such search-space file"]


MISSING_DATA = [  # (file, what --dry-run and a sweep say, what validate's short line says)
    pytest.param("data: {dataset: stl10}\n", "data.root: stl10: no data root given", "set data.root (stl10)",
                 id="root-unset"),
    pytest.param("data: {dataset: cifar10, root: $EMPTY}\nmodel: {backbone: resnet18}\n",
                 "data.root: cifar10: missing", "$EMPTY lacks cifar-10-batches-py/data_batch_1 and 6 more (cifar10)",
                 id="root-empty"),
]


def _missing_data_file(tmp_path: Path, text: str) -> Path:
    (tmp_path / "empty").mkdir()
    path = tmp_path / "space.yaml"
    path.write_text(BASE.replace("data: {dataset: digits}\n", text.replace("$EMPTY", str(tmp_path / "empty"))))
    return path


@pytest.mark.parametrize("text, problem, short", MISSING_DATA)
def test_missing_data_is_a_note_in_validate_and_dry_run(tmp_path, capsys, text, problem, short):
    path = _missing_data_file(tmp_path, text)
    before = sorted(tmp_path.rglob("*"))

    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    # one short line per file: what is missing and what to set; --dry-run below says how to get the data
    assert err == "" and out.startswith(f"{path}: ok (1 swept keys, 3 trials); data missing here: ")
    assert short.replace("$EMPTY", str(tmp_path / "empty")) in out and len(out.splitlines()) == 1
    assert "To obtain it:" not in out and len(out) < 120 + len(str(path)) + len(str(tmp_path)), out

    assert main([str(path), "--dry-run", "--results-dir", str(tmp_path / "results")]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "budget: 3 trials x 2 epochs = at most 6 trial-epochs" in out  # the budget is still shown
    note = out.splitlines()[-1]
    assert note.startswith("note: data missing on this machine; starting this sweep fails (exit status 2)")
    assert problem in note and "To obtain it:" in note
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("text, problem, short", MISSING_DATA)
def test_missing_data_is_an_error_when_the_sweep_starts(tmp_path, capsys, monkeypatch, text, problem, short):
    import ncssl_tune.sweep.runner

    def no_sweep(*args, **kwargs):
        raise AssertionError("run_sweep (and with it Ray) must not start without the data")

    monkeypatch.setattr(ncssl_tune.sweep.runner, "run_sweep", no_sweep)
    path = _missing_data_file(tmp_path, text)
    before = sorted(tmp_path.rglob("*"))

    status = main([str(path), "--results-dir", str(tmp_path / "results")])

    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.startswith(f"ncssl-sweep: error: {path}: {problem}") and len(err.splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_help_loads_nothing_heavy_and_lists_every_subcommand():
    import subprocess
    import sys

    code = ("import sys\nfrom ncssl_tune.cli import main\nstatus = main(['--help'])\n"
            "print(status, sorted(m for m in ('torch', 'ray', 'optuna', 'mlflow', 'pandas', 'matplotlib', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    usage, last = out.split("\n\n")[0], out.splitlines()[-1]
    assert last == "0 []"  # exit 0, and Ray, Optuna, torch, MLflow are loaded only by the command that uses them
    assert usage.startswith("usage: ncssl-sweep SPACE.yaml")
    for sub in ("ncssl-sweep validate SPACE.yaml", "ncssl-sweep analyze --experiment NAME"):
        assert sub in usage


def test_a_new_store_s_table_setup_is_not_printed(tmp_path):
    """MLflow announces at INFO, on the console, that it creates the tables of a new SQLite store (a sweep's first
    write, or `analyze` on an empty file); records.store filters those lines out."""
    import subprocess
    import sys

    (tmp_path / "mlflow.db").touch()  # an empty file: MLflow creates its tables there, then finds no experiment
    code = "import sys\nfrom ncssl_tune.cli import main\nsys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", code, "analyze", "--experiment", "absent", "--results-dir",
                          str(tmp_path)], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no MLflow experiment 'absent'" in run.stderr  # the store was opened
    assert (tmp_path / "mlflow.db").stat().st_size > 0  # and its tables created
    output = run.stdout + run.stderr
    assert "database tables" not in output and "INFO" not in output, output


def test_dry_run_prints_space_and_budget_and_writes_nothing(tmp_path, capsys):
    vicreg = next(p for p in SPACE_FILES if p.name == "vicreg.yaml")
    argv = [str(vicreg), "--dry-run", "--results-dir", str(tmp_path / "results"), "--num-samples", "5",
            "--epochs", "3", "--set", "resources.cpu=0.5"]

    assert main(argv) == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert "budget: 5 trials x 3 epochs = at most 15 trial-epochs" in out
    assert "0.5 cpu + 0 gpu per trial" in out
    for line in ("loss.vicreg.lam: logfloat [1.0, 100.0]", "train.lr: logfloat [0.0005, 0.01]",
                 "model.projector: one of ['64-64', '256-256-256', '1024-1024-1024']"):
        assert line in out
    assert not list(tmp_path.iterdir())


def test_dry_run_grid_budget_is_the_grid_size(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(_space("model.projector: {type: categorical, values: [64-64, 128-128]}",
                           "train.lr: {type: logfloat, low: 1.0e-4, high: 1.0e-2}",
                           search="{algorithm: grid, num_samples: 100}"))

    assert main([str(path), "--dry-run", "--results-dir", str(tmp_path / "results")]) == 0

    out = capsys.readouterr().out
    assert "budget: 6 trials x 2 epochs = at most 12 trial-epochs" in out  # 2 projectors x 3 lr points
    assert [p.name for p in tmp_path.iterdir()] == ["grid.yaml"]


def test_dry_run_shows_conditions(tmp_path, capsys):
    compare = next(p for p in SPACE_FILES if p.name == "compare.yaml")

    assert main([str(compare), "--dry-run", "--results-dir", str(tmp_path / "results")]) == 0

    out = capsys.readouterr().out
    assert "loss.vicreg.gamma: float [0.05, 2.0] when loss.method=vicreg" in out
    assert "budget: 16 trials x 20 epochs" in out
    assert not list(tmp_path.iterdir())


def test_set_on_a_swept_key_pins_it(tmp_path, capsys):
    vicreg = next(p for p in SPACE_FILES if p.name == "vicreg.yaml")

    assert main([str(vicreg), "--dry-run", "--results-dir", str(tmp_path), "--set", "loss.vicreg.lam=3"]) == 0

    out = capsys.readouterr().out
    assert "loss.vicreg.lam: pinned to 3 by --set (not swept)" in out
    assert "loss.vicreg.lam: logfloat" not in out and "train.lr: logfloat" in out
    spec = load_spec(vicreg, ["loss.vicreg.lam=3"])
    assert "loss.vicreg.lam" not in {p.key for p in spec.space} and spec.base.loss.vicreg.lam == 3


def test_pinning_a_condition_keeps_what_it_allows_and_drops_the_rest():
    compare = next(p for p in SPACE_FILES if p.name == "compare.yaml")
    spec = load_spec(compare, ["loss.method=vicreg"])
    assert {p.key: p.when for p in spec.space} == {"loss.vicreg.lam": {}, "loss.vicreg.gamma": {}, "train.lr": {}}
    assert spec.pinned == {"loss.method": "vicreg"} and spec.base.loss.method == "vicreg"
    assert set(spec.raw["space"]) == {"loss.vicreg.lam", "loss.vicreg.gamma", "train.lr"}  # as logged to MLflow


# --- bad tracking URIs on the real path (no --dry-run): rejected before Ray or any trial starts

def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


TRACKING_CASES = [
    pytest.param(lambda: "ftp://x", ["tracking URI 'ftp://x': unsupported scheme 'ftp'", "sqlite:///"],
                 id="tracking-uri-ftp"),
    pytest.param(lambda: f"http://127.0.0.1:{_closed_port()}",
                 ["MLflow tracking server http://127.0.0.1:", "is not reachable (connection refused)",
                  "mlflow server"], id="tracking-uri-closed-port"),
]


@pytest.mark.parametrize("make_uri, expected", TRACKING_CASES)
def test_bad_tracking_uri_is_rejected_before_anything_starts(tmp_path, capsys, monkeypatch, make_uri, expected):
    import time

    import ncssl_tune.sweep.runner

    def no_sweep(*args, **kwargs):
        raise AssertionError("run_sweep (and with it Ray) must not start for a bad tracking URI")

    monkeypatch.setattr(ncssl_tune.sweep.runner, "run_sweep", no_sweep)
    path = tmp_path / "space.yaml"
    path.write_text(BASE)
    results = tmp_path / "results"
    uri = make_uri()
    before = sorted(tmp_path.rglob("*"))
    start = time.monotonic()

    status = main([str(path), "--results-dir", str(results), "--tracking-uri", uri])

    assert time.monotonic() - start < 10
    out, err = capsys.readouterr()
    assert status == 2, (out, err)
    assert len(err.splitlines()) == 1 and err.startswith("ncssl-sweep: error: ") and "Traceback" not in out + err
    assert uri in err
    for want in expected:
        assert want in err
    assert sorted(tmp_path.rglob("*")) == before and not results.exists()  # no results folder, no mlflow.db


def test_register_reaches_the_sweep_and_the_best_encoder_is_printed(tmp_path, capsys, monkeypatch):
    import ncssl_tune.analysis
    import ncssl_tune.cli
    import ncssl_tune.sweep.runner
    from ncssl_tune.sweep.export import BestExport
    from ncssl_tune.sweep.runner import SweepResult

    seen = {}
    best = tmp_path / "results" / "space" / "best"

    def fake_sweep(spec, results_dir, **kwargs):
        seen.update(kwargs)
        return SweepResult(out_dir=best.parent, best_config=None, best_metrics=None, num_trials=1, errors=0,
                           best_export=BestExport(folder=best, trial_id="t1", epoch=3, scores={},
                                                  model_uri="models:/m-1", registered="mine version 1"))

    monkeypatch.setattr(ncssl_tune.sweep.runner, "run_sweep", fake_sweep)
    monkeypatch.setattr(ncssl_tune.analysis, "run_analysis", lambda *a, **k: {})
    monkeypatch.setattr(ncssl_tune.cli, "_print_analysis", lambda *a: None)
    path = tmp_path / "space.yaml"
    path.write_text(BASE)
    best.parent.mkdir(parents=True)  # run_sweep makes the sweep folder
    assert main([str(path), "--results-dir", str(tmp_path / "results"), "--register", "mine"]) == 0
    assert seen["register"] == "mine"
    # where the command's time went: every phase it saw, none negative, adding up to its total
    timings = json.loads((best.parent / "timings.json").read_text())
    assert set(timings["seconds"]) == {"start", "sweep_rest", "reporting", "analysis"}
    assert all(v >= 0 for v in timings["seconds"].values())
    assert sum(timings["seconds"].values()) == pytest.approx(timings["total"])
    out = capsys.readouterr().out
    assert (f"best encoder (trial t1, epoch 3): {best}; MLflow model models:/m-1, registered as mine version 1 "
            f"(how to load it: {best / 'README.md'})") in out


def test_the_command_leaves_what_is_alive_at_its_end_out_of_python_s_exit_collection(monkeypatch):
    import gc

    import ncssl_tune.cli

    monkeypatch.setattr(ncssl_tune.cli, "main", lambda: 3)
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as done:
            ncssl_tune.cli.entry()
        assert done.value.code == 3 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
