from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ncssl_tune.core.data import (
    DATASETS,
    DatasetError,
    _digits_arrays,
    _split,
    as_float,
    check_dataset,
    load_dataset,
)

DISK = [name for name, src in DATASETS.items() if src.expected]
SMALL_SYNTH = {"n": 120, "size": 12, "channels": 3, "classes": 4}


def test_digits_shapes_range_labels():
    d = load_dataset("digits")
    assert d.train_x.shape == (1437, 1, 8, 8) and d.test_x.shape == (360, 1, 8, 8)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.train_x.min() == 0 and d.train_x.max() == 1
    assert (d.channels, d.image_size, d.num_classes, d.name) == (1, 8, 10, "digits")
    assert set(d.train_y.tolist()) == set(d.test_y.tolist()) == set(range(10))


def test_digits_split_is_stratified():
    d = load_dataset("digits", test_fraction=0.3)
    all_y = torch.cat([d.train_y, d.test_y])
    expected = all_y.bincount().float() * 0.3
    assert (d.test_y.bincount().float() - expected).abs().max() <= 1
    assert len(d.test_y) == math.ceil(len(all_y) * 0.3)  # sklearn rounds the test share up


def test_digits_split_depends_only_on_seed():
    a, b, c = load_dataset("digits", seed=1), load_dataset("digits", seed=1), load_dataset("digits", seed=2)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    # Same images overall, only the partition moves.
    assert torch.isclose(torch.cat([a.train_x, a.test_x]).sum(), torch.cat([c.train_x, c.test_x]).sum())


def test_digits_read_without_sklearn_datasets_equal_load_digits():
    from sklearn.datasets import load_digits

    data, target = _digits_arrays()
    ref = load_digits()
    assert np.array_equal(data, ref.data) and np.array_equal(target, ref.target)


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("fraction", [0.2, 0.3, 0.5])
def test_split_equals_sklearn_train_test_split(seed, fraction):
    """The written-out split gives scikit-learn's indices exactly (the study's numbers depend on the split)."""
    from sklearn.model_selection import train_test_split

    rng = np.random.RandomState(seed + 100)
    labels = {"digits": _digits_arrays()[1],
              "imbalanced": np.repeat(np.arange(5), [3, 11, 40, 7, 29]),  # remainders tie: rng breaks them
              "shuffled": rng.randint(0, 7, size=203)}
    for name, y in labels.items():
        want = train_test_split(np.arange(len(y)), test_size=fraction, stratify=y, random_state=seed)
        got = _split(y, seed, fraction)
        assert all(np.array_equal(g, w) for g, w in zip(got, want)), (name, seed, fraction)
    with pytest.raises(ValueError, match="each class needs a sample on both sides"):
        _split(np.array([0, 0, 1, 1, 2]), 0, 0.4)


def test_digits_resized():
    d = load_dataset("digits", image_size=16)
    assert d.train_x.shape[1:] == (1, 16, 16) and 0 <= d.train_x.min() and d.train_x.max() <= 1


def test_synthetic_shapes_balance_determinism():
    a = load_dataset("synthetic", synthetic=SMALL_SYNTH, seed=3, test_fraction=0.25)
    assert a.train_x.shape == (90, 3, 12, 12) and a.test_x.shape == (30, 3, 12, 12)
    assert a.num_classes == 4 and a.name == "synthetic"
    assert a.train_x.dtype == torch.uint8 and int(a.train_x.max()) > 200  # images as files hold them, 0..255
    assert torch.cat([a.train_y, a.test_y]).bincount().tolist() == [30] * 4
    b = load_dataset("synthetic", synthetic=SMALL_SYNTH, seed=3, test_fraction=0.25)
    c = load_dataset("synthetic", synthetic=SMALL_SYNTH, seed=4, test_fraction=0.25)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)


def test_synthetic_options_and_image_size():
    d = load_dataset("synthetic", synthetic={"n": 40, "channels": 1, "classes": 2}, image_size=8)
    assert d.train_x.shape[1:] == (1, 8, 8) and d.num_classes == 2
    with pytest.raises(ValueError, match="conflicts"):
        load_dataset("synthetic", synthetic={"size": 16}, image_size=8)


@pytest.mark.parametrize("opts, match", [
    ({"colour": 1}, "allowed: n, size, channels, classes, noise"),
    ({"n": 0}, "n must be a positive integer"),
    ({"n": 10, "classes": 10}, "at least"),
    ({"noise": 2.0}, r"noise must be in \[0, 1\]"),
])
def test_synthetic_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("synthetic", synthetic=opts)


def test_synthetic_classes_are_separable_by_translation_invariant_features():
    from sklearn.linear_model import LogisticRegression

    d = load_dataset("synthetic", synthetic={"n": 400, "size": 16, "classes": 4})
    # Fourier magnitudes ignore the per-sample shift: if classes are real textures, they separate them.
    def feats(x):
        return torch.fft.rfft2(as_float(x).mean(1)).abs().flatten(1).log1p().numpy()

    clf = LogisticRegression(max_iter=2000).fit(feats(d.train_x), d.train_y.numpy())
    assert clf.score(feats(d.test_x), d.test_y.numpy()) > 0.9


def _write_tree(root, split, classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / split / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize("test_dir", ["test", "val"])
def test_imagefolder(tmp_path, test_dir):
    _write_tree(tmp_path, "train")
    _write_tree(tmp_path, test_dir, per_class=2)
    check_dataset("imagefolder", str(tmp_path))
    d = load_dataset("imagefolder", root=str(tmp_path), image_size=8)
    assert d.train_x.shape == (6, 3, 8, 8) and d.test_x.shape == (4, 3, 8, 8)
    assert d.train_y.tolist() == [0, 0, 0, 1, 1, 1] and d.num_classes == 2
    assert d.train_x.dtype == torch.uint8
    assert load_dataset("imagefolder", root=str(tmp_path)).image_size == 64


def test_imagefolder_layout_errors(tmp_path):
    _write_tree(tmp_path, "train")
    with pytest.raises(DatasetError, match="neither test/ nor val/"):
        check_dataset("imagefolder", str(tmp_path))
    _write_tree(tmp_path, "test", classes=("cat", "cow"))
    with pytest.raises(DatasetError, match="class folders differ"):
        load_dataset("imagefolder", root=str(tmp_path))


def test_stl10_reads_column_major_binaries(tmp_path):
    base = tmp_path / "stl10_binary"
    base.mkdir()
    imgs = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    for split in ("train", "test"):
        imgs.transpose(2, 3).numpy().tofile(base / f"{split}_X.bin")  # STL-10 stores images column-major
        np.array([1, 10], dtype=np.uint8).tofile(base / f"{split}_y.bin")
    d = load_dataset("stl10", root=str(tmp_path))
    assert torch.equal(d.train_x, imgs) and d.train_y.tolist() == [0, 9]
    assert load_dataset("stl10", root=str(tmp_path), image_size=32).test_x.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("name", DISK)
def test_disk_dataset_without_root_says_how_to_get_it(name, tmp_path):
    with pytest.raises(DatasetError) as err:
        check_dataset(name, None)
    assert name in str(err.value) and "root" in str(err.value)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError) as err:
        load_dataset(name, root=missing)
    msg = str(err.value)
    assert msg.startswith(f"{name}:") and missing in msg and "To obtain it:" in msg
    assert DATASETS[name].obtain.split()[0] in msg


@pytest.mark.parametrize("name", DISK)
def test_disk_dataset_empty_root_names_expected_layout(name, tmp_path):
    with pytest.raises(DatasetError, match="missing") as err:
        check_dataset(name, str(tmp_path))
    assert DATASETS[name].required[0].split("/")[0] in str(err.value)


def test_cifar10_message_and_corrupt_files(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", root=str(tmp_path))
    msg = str(err.value)
    assert "cifar-10-batches-py" in msg and "torchvision.datasets.CIFAR10" in msg and "download=True" in msg
    for f in DATASETS["cifar10"].required:
        (tmp_path / f).parent.mkdir(exist_ok=True)
        (tmp_path / f).write_bytes(b"not a pickle")
    check_dataset("cifar10", str(tmp_path))  # layout is right; only reading finds the damage
    with pytest.raises(DatasetError, match="data_batch_1 is truncated or corrupt") as err:
        load_dataset("cifar10", root=str(tmp_path))
    assert "download=True" not in str(err.value)  # advice that needs internet does not fix a damaged file


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_arrays_become_nchw_floats(name, tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class FakeCifar:  # the real classes verify md5 sums, so real-looking files cannot be faked
        def __init__(self, root, train, download):
            assert not download
            n = 3 if train else 2
            self.data = np.arange(n * 32 * 32 * 3, dtype=np.uint8).reshape(n, 32, 32, 3)  # (N, H, W, C)
            self.targets, self.classes = list(range(n)), ["a", "b", "c"]

    monkeypatch.setattr(tvd, name.upper(), FakeCifar)
    for f in DATASETS[name].required:
        (tmp_path / f).parent.mkdir(exist_ok=True)
        (tmp_path / f).touch()
    d = load_dataset(name, root=str(tmp_path))
    raw = FakeCifar(None, True, False).data
    assert d.train_x.shape == (3, 3, 32, 32) and d.test_x.shape == (2, 3, 32, 32) and d.num_classes == 3
    assert torch.equal(d.train_x[1, 2], torch.from_numpy(raw[1, :, :, 2]))  # uint8 as in the files
    assert d.train_y.tolist() == [0, 1, 2]


@pytest.mark.parametrize("name", [n for n in DATASETS if n not in DISK])
def test_in_memory_datasets_need_no_root(name):
    check_dataset(name, None)


def test_unknown_dataset_and_misplaced_options():
    with pytest.raises(ValueError, match="choose from: digits, synthetic, cifar10"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="synthetic options"):
        load_dataset("digits", synthetic={"n": 10})

