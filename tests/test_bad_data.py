"""Bad data on disk gets what bad YAML gets: one line naming what to fix, exit status 2, nothing started or written.

Each case builds a small damaged dataset under tmp_path and runs it through the CLI three ways: `validate`,
--dry-run, and a sweep that would start Ray (run_sweep replaced by a function that fails if called).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

import ncssl_tune.sweep.runner
from ncssl_tune.cli import main
from ncssl_tune.core.data import DATASETS
from ncssl_tune.spec import load_spec

SPACE = """\
data: {DATA}
model: {projector: 32-32}
loss: {method: vicreg}
train: {epochs: 1, batch_size: 8}
search: {num_samples: 2, algorithm: random}
resources: {cpu: 1, gpu: 0}
space:
  train.lr: {type: logfloat, low: 1.0e-4, high: 1.0e-2}
"""


def _images(folder, n: int, size=(6, 6), mode: str = "RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"{i}.png")


def _imagefolder(root, train=("cat", "dog"), test=("cat", "dog"), per_class: int = 5):
    """A valid tree by default: per_class training images per class (eval.fewshot_k is 5), 2 test images."""
    for c in train:
        _images(root / "train" / c, per_class)
    for c in test:
        _images(root / "test" / c, 2)
    return root


def _refused(tmp_path, capsys, monkeypatch, data: str, *expected: str, sets: tuple[str, ...] = ()) -> None:
    """The space with `data:` = data is refused by validate, --dry-run and a sweep with one line that holds every
    expected string; nothing is written and run_sweep (Ray) is never called."""
    def no_sweep(*args, **kwargs):
        raise AssertionError("run_sweep (and with it Ray) must not start on bad data")

    monkeypatch.setattr(ncssl_tune.sweep.runner, "run_sweep", no_sweep)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.replace("{DATA}", data))
    results = tmp_path / "results"
    flags = [a for s in sets for a in ("--set", s)]
    before = sorted(tmp_path.rglob("*"))
    for argv in (["validate", str(space), *flags], [str(space), "--results-dir", str(results), "--dry-run", *flags],
                 [str(space), "--results-dir", str(results), *flags]):
        status = main(argv)
        out, err = capsys.readouterr()
        assert status == 2 and out == "", (argv, out, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"ncssl-sweep: error: {space}: data"), err
        for want in expected:
            assert want in err, (want, err)
        assert "download=True" not in err  # advice that needs internet does not fix data that is here
    assert sorted(tmp_path.rglob("*")) == before and not results.exists()


def test_imagefolder_file_that_is_not_an_image(tmp_path, capsys, monkeypatch):
    root = _imagefolder(tmp_path / "data")
    bad = root / "train" / "dog" / "notes.png"
    bad.write_text("shopping list, not a picture")
    _refused(tmp_path, capsys, monkeypatch, f"{{dataset: imagefolder, root: {root}}}",
             f"imagefolder (root {root}): cannot read {bad} as an image", "remove the file or replace it")


def test_imagefolder_truncated_image(tmp_path, capsys, monkeypatch):
    root = _imagefolder(tmp_path / "data")
    _images(root / "test" / "cat", 1, size=(64, 64))
    whole = (root / "test" / "cat" / "0.png").read_bytes()
    (root / "test" / "cat" / "0.png").write_bytes(whole[:len(whole) // 2])
    _refused(tmp_path, capsys, monkeypatch, f"{{dataset: imagefolder, root: {root}}}",
             f"cannot read {root / 'test' / 'cat' / '0.png'} as an image", "replace it with an intact image")


def test_imagefolder_class_only_in_test(tmp_path, capsys, monkeypatch):
    root = _imagefolder(tmp_path / "data", test=("cat", "cow", "dog"))
    _refused(tmp_path, capsys, monkeypatch, f"{{dataset: imagefolder, root: {root}}}",
             "the class folders differ (only in test/: cow)", "give train/ and the test split the same class folders")


def test_imagefolder_empty_class_folder(tmp_path, capsys, monkeypatch):
    root = _imagefolder(tmp_path / "data")
    (root / "train" / "emu").mkdir()
    (root / "test" / "emu").mkdir()
    _images(root / "test" / "emu", 2)
    _refused(tmp_path, capsys, monkeypatch, f"{{dataset: imagefolder, root: {root}}}",
             f"the class folder {root / 'train' / 'emu'} holds no images", "add images to it or remove the folder")


def test_imagefolder_single_class(tmp_path, capsys, monkeypatch):
    root = _imagefolder(tmp_path / "data", train=("cat",), test=("cat",))
    _refused(tmp_path, capsys, monkeypatch, f"{{dataset: imagefolder, root: {root}}}",
             "only 1 class ('cat');", "mean nothing with fewer than 2",
             "give the dataset at least 2 classes (one folder per class under every split)")


def test_synthetic_single_class(tmp_path, capsys, monkeypatch):
    _refused(tmp_path, capsys, monkeypatch, "{dataset: synthetic, synthetic: {n: 40, size: 8, classes: 1}}",
             "data: synthetic: only 1 class;", "at least 2 classes (data.synthetic.classes)")


def test_too_few_images_per_class_for_the_few_labels_probe(tmp_path, capsys, monkeypatch):
    root = _imagefolder(tmp_path / "data", per_class=3)
    _refused(tmp_path, capsys, monkeypatch, f"{{dataset: imagefolder, root: {root}}}",
             "class 'cat' has 3 training images, fewer than the few-labels probe draws per class "
             "(eval.fewshot_k=5)", "--set eval.fewshot_k=3")
    # the flag it names is the fix
    space = tmp_path / "space.yaml"
    assert main(["validate", str(space), "--set", "eval.fewshot_k=3"]) == 0


def test_root_is_a_file(tmp_path, capsys, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b not extracted")
    _refused(tmp_path, capsys, monkeypatch, f"{{dataset: cifar10, root: {archive}}}",
             f"data.root: cifar10 (root {archive}): the root is a file, not a folder",
             "set data.root to the folder laid out as <root>/cifar-10-batches-py")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_truncated_batch_files(tmp_path, capsys, monkeypatch, name):
    root = tmp_path / "data"
    whole = pickle.dumps({"data": np.zeros((10, 3072), np.uint8), "labels": list(range(10))})
    for f in DATASETS[name].required:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(whole[:len(whole) // 3])  # a copy that stopped part-way
    first = DATASETS[name].required[0]
    _refused(tmp_path, capsys, monkeypatch, f"{{dataset: {name}, root: {root}}}",
             f"data.root: {name} (root {root}): {first} is truncated or corrupt",
             f"extract {'cifar-10-python' if name == 'cifar10' else 'cifar-100-python'}.tar.gz again")


def test_stl10_truncated_images(tmp_path, capsys, monkeypatch):
    base = tmp_path / "data" / "stl10_binary"
    base.mkdir(parents=True)
    for split in ("train", "test"):
        np.zeros(2 * 3 * 96 * 96 - 100, np.uint8).tofile(base / f"{split}_X.bin")
        np.array([1, 2], np.uint8).tofile(base / f"{split}_y.bin")
    _refused(tmp_path, capsys, monkeypatch, f"{{dataset: stl10, root: {tmp_path / 'data'}}}",
             "stl10_binary/train_X.bin holds 55196 bytes, expected 2 images of 3x96x96", "extract stl10_binary")


def test_images_of_mixed_sizes_and_modes_simply_work(tmp_path, capsys):
    root = tmp_path / "data"
    for split, n in (("train", 5), ("test", 2)):
        _images(root / split / "grey", n, size=(5, 9), mode="L")
        _images(root / split / "palette", n, size=(12, 7), mode="P")
        _images(root / split / "alpha", n, size=(6, 6), mode="RGBA")
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.replace("{DATA}", f"{{dataset: imagefolder, root: {root}, image_size: 8}}"))
    assert main(["validate", str(space)]) == 0
    assert main([str(space), "--results-dir", str(tmp_path / "results"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "budget:" in out and not (tmp_path / "results").exists()


@pytest.mark.parametrize("sets, total, expected", [
    # the case: a CIFAR space moved to CPU on a 2-core machine is short of CPUs, and says so
    (["resources.gpu=0"], {"CPU": 2.0}, ("cpu=4 (resources.cpu) but the Ray cluster has 2 CPU; lower the request "
                                         "(e.g. --set resources.cpu=2)")),
    ([], {"CPU": 8.0}, ("gpu=0.25 (resources.gpu) but the Ray cluster has 0 GPU; lower the request "
                        "(e.g. --set resources.gpu=0 to run on CPU)")),
    ([], {"CPU": 2.0}, "(e.g. --set resources.cpu=2 and --set resources.gpu=0 to run on CPU)"),
])
def test_resource_errors_name_the_short_resource_and_its_flag(monkeypatch, sets, total, expected):
    from ncssl_tune.sweep.runner import SweepError, check_resources

    monkeypatch.setattr(ncssl_tune.sweep.runner.ray, "cluster_resources", lambda: total)
    spec = load_spec("search_spaces/cifar10_vicreg.yaml", sets)
    with pytest.raises(SweepError) as err:
        check_resources(spec)
    assert expected in str(err.value) and "\n" not in str(err.value)


def _bad_imagefolder_spec(tmp_path):
    root = _imagefolder(tmp_path / "data")
    (root / "train" / "dog" / "notes.png").write_text("not a picture")
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.replace("{DATA}", f"{{dataset: imagefolder, root: {root}}}"))
    return load_spec(str(space)), root / "train" / "dog" / "notes.png"


def test_reference_scores_on_bad_data_raise_the_data_error(tmp_path):
    """Where data is read after the CLI's check (the data changed, or another machine reads it), the same
    DatasetError comes out, and run_sweep turns it into a SweepError (exit status 2)."""
    from ncssl_tune.core.data import DatasetError
    from ncssl_tune.sweep.references import REFERENCE_FILE, reference_scores

    spec, bad = _bad_imagefolder_spec(tmp_path)
    with pytest.raises(DatasetError, match=f"cannot read {bad} as an image"):
        reference_scores(spec, tmp_path)
    assert not (tmp_path / REFERENCE_FILE).exists()


def test_reference_scores_from_a_worker_unwrap_its_data_error(tmp_path, monkeypatch):
    """Ray wraps a worker's exception in a RayTaskError whose text is the remote traceback: the DatasetError
    inside is raised instead. (No Ray is started: the remote task and ray.get are stand-ins.)"""
    import ray.exceptions

    from ncssl_tune.core.data import DatasetError
    from ncssl_tune.sweep import references

    inner = DatasetError("imagefolder (root /data): cannot read /data/train/dog/x.png as an image; remove it")

    class Task:
        def options(self, **_):
            return self

        def remote(self, cfg, registry):
            return "ref"

    def get(ref):
        raise ray.exceptions.RayTaskError("_reference_task", "Traceback ...\n  many lines", inner).as_instanceof_cause()

    monkeypatch.setattr(references, "_reference_task", Task())
    monkeypatch.setattr(references.ray, "get", get)
    spec, _ = _bad_imagefolder_spec(tmp_path)
    with pytest.raises(DatasetError) as err:
        references.reference_scores(spec, tmp_path, {"CPU": 1.0, "GPU": 0.0})
    assert err.value is inner


def test_a_trial_on_bad_data_fails_with_one_line(tmp_path, monkeypatch):
    """A trial whose node cannot read the data fails with the DatasetError, the node named, no chained cause."""
    import ray

    from ncssl_tune.core.data import DatasetError
    from ncssl_tune.sweep.trainable import run_trial

    # Deciding how to hold the data outside a Ray worker must neither start Ray nor ask it which node this is
    # (asking started a Ray in the test process once). Failing both calls checks it whether or not an earlier
    # test in this process started Ray.
    def forbidden(*args, **kwargs):
        raise AssertionError("a trial without a data registry asked Ray")

    before = ray.is_initialized()
    monkeypatch.setattr(ray, "init", forbidden)
    monkeypatch.setattr(ray, "nodes", forbidden)
    spec, bad = _bad_imagefolder_spec(tmp_path)
    with pytest.warns(UserWarning, match="get_checkpoint"), pytest.raises(DatasetError) as err:
        run_trial({}, base=spec.base, objective="fewshot_acc", cpus=1, gpus=0)
    assert str(err.value).startswith("on node ") and f"cannot read {bad} as an image" in str(err.value)
    assert "\n" not in str(err.value) and err.value.__cause__ is None and err.value.__suppress_context__
    assert ray.is_initialized() == before
