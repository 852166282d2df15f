"""Datasets: the registry, the loaders, what a dataset will weigh in memory, and a cheap check of the files on disk.

A dataset that fits is loaded whole into an `ImageData`, so the training loop is a plain index-and-slice. Images
stay as the files give them, uint8 (CIFAR-10's 60,000 images: 0.18 GB, a quarter of float32), and become floats
in [0, 1] one batch at a time on the device (`as_float`); the embedded digits are float32 (their 17 grey levels
are not bytes). An imagefolder too large for memory is read from disk batch by batch instead (core/stream.py).
On a Ray node one copy serves all of its trials (sweep/node_data.py). STL-10's 100k unlabelled images are not
loaded.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ncssl_tune.core.data_errors import DatasetError, DatasetMissing, content_error


@dataclass
class ImageData:
    """A labelled image dataset in memory; labels serve evaluation only, never the SSL loss."""

    train_x: torch.Tensor  # (N, C, H, W) uint8 (0..255) or float32 in [0, 1]; or StreamedImages (stream.py)
    train_y: torch.Tensor  # (N,) int64 in [0, num_classes)
    test_x: torch.Tensor  # (M, C, H, W), as train_x
    test_y: torch.Tensor  # (M,) int64
    num_classes: int
    name: str
    classes: tuple[str, ...] = ()  # class names where the files give them (imagefolder), for messages

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]


@dataclass(frozen=True)
class DataSource:
    """How to load one dataset and, for a dataset on disk, what must be under root and how to get it."""

    load: Callable[..., ImageData]  # load(root=, seed=, test_fraction=, image_size=, synthetic=)
    expected: str = ""  # the layout under root, for messages; empty: the dataset needs no root
    required: tuple[str, ...] = ()  # paths relative to root that check_dataset verifies
    obtain: str = ""  # how to get the files onto a machine
    shape: Callable[..., DataShape] | None = None  # shape(root=, test_fraction=, image_size=, synthetic=); None: unknown
    # until loaded (a plugin may not say)
    stream: Callable[..., ImageData] | None = None  # stream(root=, image_size=, workers=): images read when indexed;
    # None: the dataset is always loaded whole


def as_float(x: torch.Tensor) -> torch.Tensor:
    """A batch of images as float32 in [0, 1]: uint8 divided by 255 (where the batch is, e.g. on the GPU), float
    as it is. The same arithmetic as converting the whole dataset at load, so results do not depend on where."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def index_batches(n: int, batch: int) -> list[slice]:
    """Consecutive slices of at most `batch` of range(n)."""
    return [slice(i, i + batch) for i in range(0, n, batch)]


def batches(x, chunks) -> Iterator[torch.Tensor]:
    """x[c] for each chunk c (a slice or an index tensor), in order; streamed images decode ahead (stream.py)."""
    if isinstance(x, torch.Tensor):
        return (x[c] for c in chunks)
    return x.prefetch(chunks)


def _finish(name: str, xtr, ytr, xte, yte, num_classes: int, image_size: int | None,
            classes: tuple[str, ...] = ()) -> ImageData:
    """uint8 or float (N, C, H, W) arrays -> ImageData, uint8 kept as uint8, resized if image_size differs."""
    xs = []
    for x in (torch.as_tensor(xtr), torch.as_tensor(xte)):
        x = x if x.dtype == torch.uint8 else x.float()
        xs.append(_resize(x, image_size) if image_size and image_size != x.shape[-1] else x)
    ys = [torch.as_tensor(np.asarray(y), dtype=torch.int64) for y in (ytr, yte)]
    return ImageData(xs[0], ys[0], xs[1], ys[1], num_classes, name, tuple(classes))


def _resize(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size) of the same dtype (uint8 rounded to the nearest level, as an image
    library resizing the files would store them); chunked so a big dataset is not held twice at full size."""
    parts = []
    for i in range(0, len(x), chunk):
        part = F.interpolate(as_float(x[i:i + chunk]), size=(size, size), mode="bilinear", antialias=True)
        part = part.clamp_(0, 1)
        parts.append(part.mul_(255).round_().to(torch.uint8) if x.dtype == torch.uint8 else part)
    return torch.cat(parts)


def _split(y: np.ndarray, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train indices, test indices), fixed by seed: exactly scikit-learn's
    `train_test_split(np.arange(n), test_size=test_fraction, stratify=y, random_state=seed)`.

    Written out because importing sklearn.model_selection costs 1.5-4 s, paid by every trial worker that starts;
    tests/test_data.py checks the indices against scikit-learn's for several seeds, sizes and class balances.
    """
    n = len(y)  # a test_fraction outside (0, 1) leaves a side without samples: the error below
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    classes, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
    if counts.min() < 2 or n_train < len(classes) or n_test < len(classes):
        raise ValueError(f"cannot split {n} samples of {len(classes)} classes (smallest {counts.min()}) "
                         f"with test_fraction {test_fraction}: each class needs a sample on both sides")
    class_idx = np.split(np.argsort(y_idx, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train, test = [], []
    for i in range(len(classes)):
        perm = class_idx[i].take(rng.permutation(counts[i]), mode="clip")
        train.extend(perm[:n_i[i]])
        test.extend(perm[n_i[i]:n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Samples per class of `draws` stratified draws: floor of the proportional share, the rest to the largest
    remainders, ties broken by rng (scikit-learn's utils.extmath._approximate_mode, same draws from rng)."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (data (1797, 64) in 0..16, target (1797,)), read from its CSV without
    importing sklearn.datasets (~1.5-3 s); equal to `load_digits()` (tests/test_data.py)."""
    import gzip
    from importlib.util import find_spec

    spec = find_spec("sklearn")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise ImportError("the digits dataset ships with scikit-learn, which is not installed")
    with gzip.open(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz", "rt") as f:
        raw = np.loadtxt(f, delimiter=",")  # (1797, 65): 64 pixels, then the label
    return raw[:, :-1], raw[:, -1].astype(int)


def _load_digits(*, seed: int, test_fraction: float, image_size: int | None, **_) -> ImageData:
    data, target = _digits_arrays()  # bundled with scikit-learn: no download
    x = (data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # (1797, 1, 8, 8); pixels are 0..16
    tr, te = _split(target, seed, test_fraction)
    return _finish("digits", x[tr], target[tr], x[te], target[te], 10, image_size)


SYNTHETIC_DEFAULTS = {"n": 2000, "size": 32, "channels": 3, "classes": 10, "noise": 0.05}


def _load_synthetic(*, seed: int, test_fraction: float, image_size: int | None,
                    synthetic: dict | None, **_) -> ImageData:
    given = synthetic or {}
    unknown = sorted(set(given) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise ValueError(f"synthetic: unknown option(s) {unknown}; allowed: {', '.join(SYNTHETIC_DEFAULTS)}")
    if image_size is not None and given.get("size", image_size) != image_size:
        raise ValueError(f"synthetic: size={given['size']} conflicts with image_size={image_size}; give one")
    opts = SYNTHETIC_DEFAULTS | given | ({"size": image_size} if image_size else {})
    for k in ("n", "size", "channels", "classes"):
        if not isinstance(opts[k], int) or isinstance(opts[k], bool) or opts[k] < 1:
            raise ValueError(f"synthetic: {k} must be a positive integer, got {opts[k]!r}")
    if isinstance(opts["noise"], bool) or not isinstance(opts["noise"], (int, float)) or not 0 <= opts["noise"] <= 1:
        raise ValueError(f"synthetic: noise must be in [0, 1], got {opts['noise']!r}")
    if opts["n"] < 2 * opts["classes"]:
        raise ValueError(f"synthetic: n={opts['n']} must be at least 2 * classes = {2 * opts['classes']}")
    x, y = make_textures(**opts, seed=seed)
    tr, te = _split(y.numpy(), seed, test_fraction)
    return _finish("synthetic", x[tr], y[tr], x[te], y[te], opts["classes"], None)


def make_textures(n: int, size: int, channels: int, classes: int, noise: float, seed: int, chunk: int = 2048
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural texture classes: x (n, channels, size, size) uint8 (0..255), y (n,) balanced labels.

    A class is a sum of two coloured sine gratings with class-specific orientations and frequency ratio.
    Orientation and frequency ratio survive random crops and colour jitter, so SSL can learn the classes;
    each sample has its own phase (a shift), zoom, small rotation, colour gain and pixel noise, so a linear
    classifier on raw pixels does clearly worse than one on shift-invariant features. The images are drawn
    `chunk` at a time, so a CIFAR-sized set never holds more than a chunk in float32.
    """
    g = torch.Generator().manual_seed(seed)

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    theta1 = math.pi * (torch.arange(classes) + 0.3 * u(classes)) / classes  # orientations spread evenly
    theta = torch.stack([theta1, theta1 + math.pi * (0.25 + 0.5 * u(classes))], 1)  # (classes, 2)
    freq = torch.stack([torch.full((classes,), 2.0), 2.0 * (1.3 + 1.2 * u(classes))], 1)  # cycles/image
    colour = 0.2 + 0.8 * u(classes, 2, channels)  # (classes, 2, C)
    y = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]  # (n,)

    th = theta[y] + (u(n, 2) - 0.5) * (math.pi / (4 * classes))  # (n, 2); jitter below the class spacing
    f = freq[y] * (0.8 + 0.4 * u(n, 1))  # (n, 2); a zoom moves both frequencies, keeping their ratio
    phase = u(n, 2, 1, 1)
    col = colour[y] * (0.8 + 0.4 * u(n, 2, channels))  # (n, 2, C)
    gain, offset = 0.7 + 0.6 * u(n, 1, 1, 1), 0.1 * (u(n, 1, 1, 1) - 0.5)
    coord = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coord, coord, indexing="ij")  # (S, S)
    out = torch.empty((n, channels, size, size), dtype=torch.uint8)
    for i in range(0, n, chunk):
        c = slice(i, i + chunk)
        proj = th[c].cos()[..., None, None] * xx + th[c].sin()[..., None, None] * yy  # (c, 2, S, S)
        wave = 0.5 + 0.5 * torch.sin(2 * math.pi * (f[c][..., None, None] * proj + phase[c]))  # (c, 2, S, S)
        x = torch.einsum("nkhw,nkc->nchw", wave, col[c]) / 2  # (c, C, S, S)
        x = x * gain[c] + offset[c]
        x = x + noise * torch.randn(x.shape, generator=g)
        out[c] = x.clamp_(0, 1).mul_(255).round_()  # stored as image files would hold it
    return out, y


def _load_cifar(name: str, root: str, image_size: int | None) -> ImageData:
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    try:
        tr, te = cls(root, train=True, download=False), cls(root, train=False, download=False)
    except RuntimeError as e:  # torchvision's integrity check failed: its message names no file
        damaged = _damaged_cifar(cls, name, root)
        raise (damaged or e) from None
    # .data is (N, 32, 32, 3) uint8
    xtr, xte = (torch.from_numpy(d.data).permute(0, 3, 1, 2) for d in (tr, te))
    return _finish(name, xtr, tr.targets, xte, te.targets, len(tr.classes), image_size)


def _damaged_cifar(cls, name: str, root: str) -> DatasetError | None:
    """The first CIFAR file under root whose MD5 sum is not the official one, as a DatasetError (None: all match)."""
    from torchvision.datasets.utils import check_integrity

    for filename, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        rel = f"{cls.base_folder}/{filename}"
        if not check_integrity(os.path.join(root, rel), md5):
            return content_error(name, root, f"{rel} is truncated or corrupt (its MD5 sum is not the official "
                                 f"file's)", f"copy an intact {cls.base_folder} from another machine, or extract "
                                 f"{_CIFAR_ARCHIVES[name]} again")
    return None


def _load_stl10(*, root: str, image_size: int | None, **_) -> ImageData:
    # Read the binaries directly: torchvision's STL10 checksums the 2.7 GB unlabeled_X.bin on every load.
    base, arrays = os.path.join(root, "stl10_binary"), []
    for split in ("train", "test"):
        x = np.fromfile(os.path.join(base, f"{split}_X.bin"), dtype=np.uint8)
        y = np.fromfile(os.path.join(base, f"{split}_y.bin"), dtype=np.uint8).astype(np.int64)
        y = y - 1  # labels are 1..10 on disk
        if x.size != len(y) * 3 * 96 * 96:
            raise content_error("stl10", root, f"stl10_binary/{split}_X.bin holds {x.size} bytes, expected "
                                f"{len(y)} images of 3x96x96 (one per label in {split}_y.bin): it is truncated "
                                "or does not belong with the labels", "extract stl10_binary.tar.gz again")
        arrays += [torch.from_numpy(x.reshape(-1, 3, 96, 96)).transpose(2, 3), y]  # stored column-major
    return _finish("stl10", *arrays, 10, image_size)


def _load_imagefolder(*, root: str, image_size: int | None, **_) -> ImageData:
    from ncssl_tune.core.imagefolder import decode, list_images

    size, arrays = image_size or IMAGEFOLDER_SIZE, []
    splits, classes = list_images(root)
    # decoded on as many threads as this process computes with (a trial's CPUs)
    with ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="decode") as pool:
        for samples in splits:
            arrays += [decode(pool, [p for p, _ in samples], size, root), [c for _, c in samples]]
    return _finish("imagefolder", *arrays, len(classes), None, classes=classes)


def _stream_imagefolder(*, root: str, image_size: int | None, workers: int) -> ImageData:
    """The imagefolder as StreamedImages: the files are listed now and decoded when a batch is read."""
    from ncssl_tune.core.imagefolder import StreamedImages, list_images

    size = image_size or IMAGEFOLDER_SIZE
    splits, classes = list_images(root)
    xs = [StreamedImages([p for p, _ in samples], size, root, workers) for samples in splits]
    ys = [torch.tensor([c for _, c in samples], dtype=torch.int64) for samples in splits]
    return ImageData(xs[0], ys[0], xs[1], ys[1], len(classes), "imagefolder", classes)


IMAGEFOLDER_SIZE = 64  # pixels an imagefolder's images are resized to when data.image_size is not set


@dataclass(frozen=True)
class DataShape:
    """What a dataset will weigh in memory, known without reading its images."""

    train: int  # images
    test: int
    channels: int
    size: int  # pixels a side, after data.image_size
    itemsize: int  # bytes a value: 1 (uint8) or 4 (float32)

    @property
    def nbytes(self) -> int:
        return (self.train + self.test) * self.channels * self.size ** 2 * self.itemsize

    def describe(self) -> str:
        kind = "uint8" if self.itemsize == 1 else "float32"
        return (f"{self.train:,} + {self.test:,} images of {self.channels}x{self.size}x{self.size} {kind} = "
                f"{format_bytes(self.nbytes)}")


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError  # the loop always returns


def _split_sizes(n: int, test_fraction: float) -> tuple[int, int]:
    test = math.ceil(test_fraction * n)  # as _split
    return n - test, test


def _digits_shape(*, test_fraction: float, image_size: int | None, **_) -> DataShape:
    return DataShape(*_split_sizes(1797, test_fraction), 1, image_size or 8, 4)


def _synthetic_shape(*, test_fraction: float, image_size: int | None, synthetic: dict | None, **_) -> DataShape:
    o = SYNTHETIC_DEFAULTS | (synthetic or {})
    return DataShape(*_split_sizes(o["n"], test_fraction), o["channels"], image_size or o["size"], 1)


def _imagefolder_shape(*, root: str, image_size: int | None, **_) -> DataShape:
    from ncssl_tune.core.imagefolder import count_images

    return DataShape(*count_images(root), 3, image_size or IMAGEFOLDER_SIZE, 1)


def _fixed_shape(train: int, test: int, size: int) -> Callable[..., DataShape]:
    return lambda *, image_size, **_: DataShape(train, test, 3, image_size or size, 1)


def _network_hint(archive: str, url: str, cls: str) -> str:
    return (f"download {archive} from {url} and extract it into <root>, or run "
            f"`torchvision.datasets.{cls}(<root>, download=True)` on a machine with network access")


_CIFAR = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
DATASETS: dict[str, DataSource] = {
    "digits": DataSource(_load_digits, shape=_digits_shape),
    "synthetic": DataSource(_load_synthetic, shape=_synthetic_shape),
    "cifar10": DataSource(
        lambda root, image_size, **_: _load_cifar("cifar10", root, image_size),
        expected="<root>/cifar-10-batches-py (the python version of CIFAR-10: data_batch_1..5, test_batch, "
                 "batches.meta)",
        required=tuple(f"cifar-10-batches-py/{f}" for f in
                       [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
        obtain=_network_hint(_CIFAR_ARCHIVES["cifar10"], _CIFAR, "CIFAR10"), shape=_fixed_shape(50000, 10000, 32)),
    "cifar100": DataSource(
        lambda root, image_size, **_: _load_cifar("cifar100", root, image_size),
        expected="<root>/cifar-100-python (the python version of CIFAR-100: train, test, meta)",
        required=("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
        obtain=_network_hint(_CIFAR_ARCHIVES["cifar100"], _CIFAR, "CIFAR100"), shape=_fixed_shape(50000, 10000, 32)),
    "stl10": DataSource(
        _load_stl10,
        expected="<root>/stl10_binary with train_X.bin, train_y.bin, test_X.bin, test_y.bin",
        required=tuple(f"stl10_binary/{s}_{xy}.bin" for s in ("train", "test") for xy in ("X", "y")),
        obtain=_network_hint("stl10_binary.tar.gz", "https://cs.stanford.edu/~acoates/stl10/", "STL10"),
        shape=_fixed_shape(5000, 8000, 96)),
    "imagefolder": DataSource(
        _load_imagefolder,
        expected="<root>/train/<class>/<image> and <root>/test/<class>/<image> (or val/ instead of test/)",
        required=("train",),
        obtain="arrange the images one folder per class, the same class folders under train/ and test/",
        shape=_imagefolder_shape, stream=_stream_imagefolder),
}


def _source(name: str) -> DataSource:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")
    return DATASETS[name]


def _error(name: str, root: str | None, problem: str, short: str = "") -> DatasetMissing:
    """Files not where they should be: the message says what was expected and how to get it."""
    s = DATASETS[name]
    short = "set data.root" if root is None else short or problem
    return DatasetMissing(f"{name}: {problem}. Expected {s.expected} (root={root!r}). To obtain it: {s.obtain}.",
                          f"{short} ({name})")


# What reading damaged files raises, from open() to unpickling; PIL's errors are OSErrors and ValueErrors.
READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, pickle.UnpicklingError)


@contextlib.contextmanager
def _reading(name: str, root: str | None) -> Iterator[None]:
    """Turn any failure while reading the files of `name` into one DatasetError (a loader's own DatasetError,
    which names the file, passes as it is)."""
    try:
        yield
    except DatasetError:
        raise
    except READ_ERRORS as e:
        raise content_error(name, root, f"a file under the root is unreadable or corrupt ({type(e).__name__}: {e})",
                            "replace the damaged files with intact copies") from e


def check_dataset(name: str, root: str | None = None) -> None:
    """Cheaply check that `name` is known and, if it lives on disk, that root has the expected layout.

    Reads no image data, so the sweep can call it before starting anything. Raises ValueError for an
    unknown name, DatasetMissing for a missing root or missing files, DatasetError for a root that is a file.
    What is inside the files is checked by loading them (core/datasets_check.py).
    """
    s = _source(name)
    if not s.expected:
        return
    if root is None:
        raise _error(name, root, "no data root given (set data.root to the folder holding the files)")
    if os.path.exists(root) and not os.path.isdir(root):
        raise content_error(name, root, "the root is a file, not a folder",
                            f"set data.root to the folder laid out as {s.expected}")
    if not os.path.isdir(root):
        raise _error(name, root, f"the root folder {root} does not exist")
    absent = [p for p in s.required if not os.path.exists(os.path.join(root, p))]
    missing = [os.path.join(root, p) for p in absent]
    if missing:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        raise _error(name, root, f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""),
                     f"{root} lacks {absent[0]}{more}")
    from ncssl_tune.core.imagefolder import imagefolder_dirs

    if name == "imagefolder" and imagefolder_dirs(root) is None:
        raise _error(name, root, f"{root} has train/ but neither test/ nor val/")


def load_dataset(name: str, *, root: str | None = None, seed: int = 0, test_fraction: float = 0.2,
                 image_size: int | None = None, synthetic: dict | None = None, stream: bool = False,
                 workers: int = 1) -> ImageData:
    """Load DATASETS[name] whole into memory, or with stream its images as StreamedImages read from disk when
    indexed (decoded on `workers` threads; only datasets whose DataSource has `stream`).

    seed and test_fraction fix the stratified split of digits and synthetic (disk datasets keep their
    official split); image_size resizes (imagefolder defaults to 64 px); synthetic holds generator options
    (keys of SYNTHETIC_DEFAULTS) and is an error for any other dataset.
    """
    s = _source(name)
    if synthetic and name != "synthetic":
        raise ValueError(f"synthetic options were given but the dataset is {name!r}; remove them")
    if stream and s.stream is None:
        raise ValueError(f"{name} cannot be streamed from disk (only {', '.join(streamable())}); load it whole")
    check_dataset(name, root)
    # Every dataset on disk is read through one conversion, wherever it is loaded (the CLI's check, the reference
    # scores, a trial): damaged files are one DatasetError. Generators' own errors (bad options) stay as they are.
    with _reading(name, root) if s.expected else contextlib.nullcontext():
        if stream:
            return s.stream(root=root, image_size=image_size, workers=workers)
        return s.load(root=root, seed=seed, test_fraction=test_fraction, image_size=image_size,
                      synthetic=synthetic)


def streamable() -> list[str]:
    """The datasets that can be read from disk batch by batch."""
    return [name for name, s in DATASETS.items() if s.stream is not None]


def data_shape(d) -> DataShape | None:
    """What the dataset of d (a DataConfig) will weigh in memory, or None where its source does not say. Reads no
    image; an imagefolder's files are counted."""
    s = _source(d.dataset)
    if s.shape is None:
        return None
    try:
        return s.shape(root=d.root, test_fraction=d.test_fraction, image_size=d.image_size,
                       synthetic=d.synthetic or None)
    except (OSError, TypeError):  # files that must be counted are not on this machine (no root, no folder)
        return None


RAY_STORE_SHARE = 0.3  # Ray's default object store: 30% of a node's memory (ray.init's object_store_memory)
CAP_SHARE = 0.8  # auto streams a dataset larger than this share of the store that would hold it


def default_cap_bytes() -> float:
    """Without data.memory_cap_gb: CAP_SHARE of the object store Ray makes by default on this machine."""
    return CAP_SHARE * RAY_STORE_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_storage(d, shape: DataShape | None, cap_bytes: float, shared: bool) -> tuple[str, str]:
    """(how the dataset of d (a DataConfig) is held, why): "stream" (read from disk batch by batch), "shared" (one
    copy per node in Ray's object store) or "private" (each trial its own copy). d.storage "auto" streams a
    streamable dataset larger than d.memory_cap_gb (else cap_bytes); holds one of at least SHARE_MIN_BYTES in
    memory, shared where a Ray node can share it; and gives a smaller one, or one of unknown size, to each trial."""
    if d.storage != "auto":
        return d.storage, "data.storage"
    if shape is None:
        return "private", "auto: the dataset's size is unknown until it is loaded"
    cap = d.memory_cap_gb * 1e9 if d.memory_cap_gb is not None else cap_bytes
    cap_text = (f"data.memory_cap_gb {d.memory_cap_gb:g}" if d.memory_cap_gb is not None
                else f"{format_bytes(cap)}, {CAP_SHARE:.0%} of a node's object store")
    size = format_bytes(shape.nbytes)
    if _source(d.dataset).stream is not None and shape.nbytes > cap:
        return "stream", f"auto: {size} is more than the cap ({cap_text})"
    if shape.nbytes < SHARE_MIN_BYTES:
        return "private", f"auto: {size} is less than a node's copy process costs ({format_bytes(SHARE_MIN_BYTES)})"
    return ("shared" if shared else "private"), f"auto: {size} is within the cap ({cap_text})"


# Below this, auto gives each trial its own copy: a node's shared copy lives in a process of its own (~0.3 GB with
# torch imported, a few seconds to start on 2 cores), more than copies of a small dataset cost.
SHARE_MIN_BYTES = 64e6


def plan_storage(d) -> tuple[str, str, DataShape | None]:
    """(how a sweep's trials will hold the dataset of d (a DataConfig), why, its shape), as decided on this machine
    before Ray starts: auto's cap is d.memory_cap_gb or CAP_SHARE of the object store Ray makes here by default."""
    shape = data_shape(d)
    return (*choose_storage(d, shape, default_cap_bytes(), shared=True), shape)


def own_storage(d) -> str:
    """How one process alone holds the dataset of d (a DataConfig): "stream" or "private" ("auto" decided against
    this machine's cap; "shared" has no node copy to share outside a sweep and loads whole). Asks no Ray."""
    storage, _ = choose_storage(d, data_shape(d) if d.storage == "auto" else None, default_cap_bytes(), shared=False)
    return "private" if storage == "shared" else storage


def load_data(d, storage: str, workers: int = 1) -> ImageData:
    """The dataset of d (a DataConfig) held as `storage` ("stream", or in memory for "private"/"shared")."""
    return load_dataset(d.dataset, root=d.root, seed=d.seed, test_fraction=d.test_fraction,
                        image_size=d.image_size, synthetic=d.synthetic or None, stream=storage == "stream",
                        workers=workers)
