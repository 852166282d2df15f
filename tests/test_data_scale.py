"""Data at scale: images kept as uint8 until a batch needs floats, one shared copy per Ray node, and image folders
streamed from disk when they are larger than the memory cap. Each way of holding the data must train exactly the
same trial as loading it whole."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ncssl_tune.config import ConfigError, TrainConfig
from ncssl_tune.core.data import (
    SHARE_MIN_BYTES,
    DataShape,
    ImageData,
    as_float,
    choose_storage,
    data_shape,
    load_data,
    load_dataset,
)
from ncssl_tune.core.imagefolder import StreamedImages
from ncssl_tune.core.train import reference_scores, train


def make_imagefolder(root, classes: int = 3, train: int = 12, test: int = 4, size: int = 20, seed: int = 0):
    """JPEGs of `classes` colours with noise, `train`/`test` per class, under root/train and root/test."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([80 * c % 256, 255 - 60 * c % 256, 40 * c % 256])
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def _cfg(**data) -> TrainConfig:
    return TrainConfig.from_dict({
        "data": data, "model": {"projector": "32-32", "width": 16},
        "train": {"epochs": 2, "batch_size": 16, "threads": 1},
        "eval": {"eval_samples": 24, "cond_samples": 8, "fewshot_k": 2}})


def _history(cfg: TrainConfig, data: ImageData | None = None) -> list[dict]:
    out = []
    train(cfg, lambda m, s: out.append({k: v for k, v in m.items() if not k.endswith(("seconds", "_per_s"))}),
          data=data)
    return out


def test_uint8_images_become_floats_per_batch_exactly_as_at_load():
    """A uint8 dataset trains the same trial as the same images converted to float32 when loaded (as every
    dataset was before): the per-batch conversion is the same arithmetic."""
    cfg = _cfg(dataset="synthetic", synthetic={"n": 120, "size": 12})
    data = load_dataset("synthetic", synthetic={"n": 120, "size": 12})
    assert data.train_x.dtype == torch.uint8 and data.test_x.dtype == torch.uint8
    floats = ImageData(as_float(data.train_x.clone()), data.train_y, as_float(data.test_x.clone()), data.test_y,
                       data.num_classes, data.name)
    assert floats.train_x.dtype == torch.float32 and float(floats.train_x.max()) <= 1.0
    assert _history(cfg, data) == _history(cfg, floats)


def test_digits_stay_float32_with_their_17_levels():
    data = load_dataset("digits")
    assert data.train_x.dtype == torch.float32
    assert torch.equal(torch.unique(data.train_x * 16), torch.arange(17, dtype=torch.float32))


def test_a_resized_uint8_dataset_stays_uint8_and_within_half_a_level_of_a_float_resize():
    from ncssl_tune.core.data import _resize

    full = load_dataset("synthetic", synthetic={"n": 100, "size": 16}).train_x
    small = _resize(full, 8, chunk=7)  # chunks that do not divide N
    assert small.dtype == torch.uint8 and small.shape == (len(full), 3, 8, 8)
    floats = torch.nn.functional.interpolate(as_float(full), size=(8, 8), mode="bilinear", antialias=True)
    assert float((as_float(small) - floats.clamp(0, 1)).abs().max()) <= 0.5 / 255 + 1e-6
    assert _resize(as_float(full), 8).dtype == torch.float32  # float data (digits) stays float


def test_a_streamed_imagefolder_trains_the_same_trial_as_one_loaded_whole(tmp_path):
    root = make_imagefolder(tmp_path / "folder")
    private = _cfg(dataset="imagefolder", root=str(root), image_size=16, storage="private")
    stream = private.with_overrides({"data.storage": "stream", "data.workers": 2})
    loaded, streamed = load_data(private.data, "private"), load_data(stream.data, "stream", workers=2)
    assert isinstance(streamed.train_x, StreamedImages) and loaded.train_x.dtype == torch.uint8
    assert streamed.train_x.shape == loaded.train_x.shape == (36, 3, 16, 16)
    idx = torch.tensor([5, 0, 35, 7])
    assert torch.equal(streamed.train_x[idx], loaded.train_x[idx])
    assert [x.shape[0] for x in streamed.train_x.prefetch([slice(0, 16), slice(16, 32), slice(32, 36)])] == [16, 16, 4]
    assert torch.equal(streamed.test_y, loaded.test_y) and streamed.classes == loaded.classes
    history = _history(private)
    assert len(history) == 2 and history == _history(stream)
    # the references of a streamed dataset score the encoder, not raw pixels (no (N, C*H*W) matrix)
    assert set(reference_scores(stream, inits=2)) == {"random_init", "random_init_sd", "random_init_0",
                                                      "random_init_1"}


def test_auto_streams_above_the_cap_shares_what_is_worth_a_copy_and_gives_each_trial_the_rest(tmp_path):
    root = make_imagefolder(tmp_path / "folder", train=4, test=2)
    cfg = _cfg(dataset="imagefolder", root=str(root), image_size=16).data
    small = data_shape(cfg)
    assert (small.train, small.test, small.nbytes) == (12, 6, 18 * 3 * 16 * 16)
    big = DataShape(train=200_000, test=0, channels=3, size=32, itemsize=1)  # 614 MB, more than SHARE_MIN_BYTES
    assert big.nbytes > SHARE_MIN_BYTES
    assert choose_storage(cfg, big, cap_bytes=big.nbytes, shared=True)[0] == "shared"
    assert choose_storage(cfg, big, cap_bytes=big.nbytes - 1, shared=True)[0] == "stream"
    assert choose_storage(cfg, big, cap_bytes=big.nbytes, shared=False)[0] == "private"  # no Ray node to share on
    assert choose_storage(cfg, small, cap_bytes=1e12, shared=True)[0] == "private"  # not worth a copy process
    assert choose_storage(cfg, None, cap_bytes=1e12, shared=True)[0] == "private"  # size unknown
    capped = _cfg(dataset="imagefolder", root=str(root), image_size=16, memory_cap_gb=1e-6).data
    storage, why = choose_storage(capped, small, cap_bytes=1e12, shared=True)
    assert storage == "stream" and "memory_cap_gb" in why
    # a dataset that cannot stream is held in memory whatever its size
    digits = _cfg(memory_cap_gb=1e-9).data
    assert choose_storage(digits, big, cap_bytes=0, shared=True)[0] == "shared"
    assert choose_storage(_cfg(storage="private").data, big, cap_bytes=1e12, shared=True) == ("private",
                                                                                              "data.storage")


def test_stream_is_refused_for_a_dataset_that_is_not_an_image_folder():
    with pytest.raises(ConfigError, match="data.storage.*only imagefolder.*allowed: auto, shared, private"):
        _cfg(dataset="digits", storage="stream")
    with pytest.raises(ConfigError, match="data.storage"):
        _cfg(storage="disk")


@pytest.mark.usefixtures("ray_session")
def test_trials_on_one_node_read_one_shared_copy():
    """Two workers on the node get the same object of the store (one copy), as read-only views (zero-copy), and a
    trial on it trains exactly as on a private copy."""
    import ray

    from ncssl_tune.sweep.node_data import node_data, start_registry

    # 600 images of 3x16x16: above the 100 KB under which Ray keeps an object in the process instead of the store
    cfg = _cfg(dataset="synthetic", synthetic={"n": 600, "size": 16})

    @ray.remote(num_cpus=0)
    def held(registry):
        from ncssl_tune.sweep.node_data import node_data as get

        data = get(registry, cfg.data)
        copy = ray.get(registry.copy_on.remote(ray.get_runtime_context().get_node_id(), cfg.data))
        [ref] = ray.get(copy.ref_.remote())
        store = ray.get(ref)["train_x"]  # the store's memory, mapped into this worker
        return (ref.hex(), store.flags.writeable, data.train_x.data_ptr() == store.ctypes.data,
                int(data.train_x.sum()))

    registry = start_registry()
    try:
        a, b = ray.get([held.remote(registry), held.remote(registry)])
        assert a[0] == b[0]  # the same object: one copy on the node
        assert a[1:3] == (False, True)  # the trial's tensor is the store's read-only memory itself, not a copy
        shared = node_data(registry, cfg.data)
        assert a[3] == int(shared.train_x.sum())
        assert _history(cfg, shared) == _history(cfg)
        # Every sweep starts a registry beside its first trials: its process imports neither torch nor the
        # loaders (the node copies do), which would take ~2 s of CPU from the trials starting with it.
        assert ray.get(registry.__ray_call__.remote(lambda _: "torch" in sys.modules)) is False
    finally:
        ray.kill(registry)


def test_a_sweep_streams_an_imagefolder_larger_than_its_memory_cap(tmp_path):
    """End to end through the CLI: --dry-run says the data will stream, the sweep trains through the streaming
    path (the trials record data.storage stream) and the references leave raw pixels out."""
    root = make_imagefolder(tmp_path / "folder")
    space = tmp_path / "space.yaml"
    space.write_text(f"""\
data: {{dataset: imagefolder, root: {root}, image_size: 16, memory_cap_gb: 1.0e-5}}
model: {{projector: 32-32, width: 16}}
loss: {{method: vicreg}}
train: {{epochs: 2, batch_size: 16}}
eval: {{eval_samples: 24, cond_samples: 8, fewshot_k: 2}}
search: {{num_samples: 2, algorithm: random, max_concurrent: 2}}
resources: {{cpu: 1, gpu: 0}}
space:
  train.lr: {{type: logfloat, low: 1.0e-3, high: 1.0e-2}}
""")
    cli = [sys.executable, "-m", "ncssl_tune.cli", str(space), "--results-dir", str(tmp_path / "results")]
    dry = subprocess.run([*cli, "--dry-run"], capture_output=True, text=True, timeout=120, check=False)
    assert dry.returncode == 0, dry.stderr
    line = next(x for x in dry.stdout.splitlines() if x.startswith("data:"))
    assert "36 + 12 images of 3x16x16 uint8" in line and "[stream: auto:" in line and "memory_cap_gb 1e-05" in line
    run = subprocess.run(cli, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "raw pixels not scored (streamed data)" in run.stdout
    results = list((tmp_path / "results").rglob("result.json"))
    assert len(results) == 2
    for path in results:
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2]
        resolved = next(r["resolved_config"] for r in rows if "resolved_config" in r)
        assert resolved["data.storage"] == "stream"
        assert np.isfinite(rows[-1]["knn_acc"])


def test_trials_of_a_sweep_on_the_node_s_shared_copy_train_as_train_does_alone(ray_session, tmp_path):
    """Through Ray Tune: two concurrent trials read the node's shared copy (data.storage shared, recorded as such)
    and each trains exactly the trial that train() trains on its own copy of the same configuration."""
    from helpers import DIGITS_SWEEP, space_without

    from ncssl_tune.spec import load_spec
    from ncssl_tune.sweep.runner import run_sweep

    spec = load_spec(space_without(tmp_path, "model.norm"), [*DIGITS_SWEEP, "data.storage=shared",
                     "search.algorithm=random"], num_samples=2, epochs=2, name="shared")
    run_sweep(spec, tmp_path / "results", monitor_interval_s=1e9, export=False)
    results = sorted((tmp_path / "results").rglob("result.json"))
    assert len(results) == 2
    for path in results:
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        resolved = next(r["resolved_config"] for r in rows if "resolved_config" in r)
        assert resolved["data.storage"] == "shared"
        alone = spec.base.with_overrides({**resolved, "data.storage": "private"})
        keys = ("loss", "knn_acc", "effective_rank", "fewshot_acc")
        assert [{k: r[k] for k in keys} for r in rows] == [{k: m[k] for k in keys} for m in _history(alone)]


@pytest.mark.usefixtures("ray_session")
def test_reference_scores_on_a_worker_reading_the_node_copy_equal_those_computed_here(tmp_path):
    """The two places a sweep computes its reference scores: this process, on its own copy (a Ray on this machine
    alone), and a Ray worker reading the node's shared copy (a cluster). Same base configuration, same scores."""
    from ncssl_tune.spec import load_spec
    from ncssl_tune.sweep.node_data import start_registry
    from ncssl_tune.sweep.references import compute_reference

    space = tmp_path / "space.yaml"
    space.write_text("""\
data: {dataset: synthetic, synthetic: {n: 600, size: 16}, storage: shared}
model: {projector: 32-32, width: 16}
loss: {method: vicreg}
train: {epochs: 1, batch_size: 16, threads: 1}
eval: {eval_samples: 24, cond_samples: 8, fewshot_k: 2}
search: {num_samples: 1, algorithm: random}
resources: {cpu: 1, gpu: 0}
space:
  train.lr: {type: logfloat, low: 1.0e-3, high: 1.0e-2}
""")
    spec = load_spec(str(space))
    here = compute_reference(spec)
    registry = start_registry()
    try:
        there = compute_reference(spec, {"CPU": 1.0, "GPU": 0.0}, registry)
    finally:
        import ray

        ray.kill(registry)
    assert {"random_init", "pixels"} <= set(here) and here["random_init"]["fewshot_acc"] > 0
    assert here == there
