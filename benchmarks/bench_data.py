"""How trials hold their data, measured side by side in one run on this machine.

1. Host memory of one Ray node running 1 and then 2 concurrent trials on a CIFAR-sized synthetic set (50,000 +
   10,000 images of 3x32x32), for each way a trial can hold it: a private float32 copy (how every trial held its
   data before), a private uint8 copy (data.storage private) and the node's shared copy (shared). Each trial is a
   Ray actor that gets its data exactly as run_trial does, builds the training run (model, optimizer, data on the
   device) and trains a few steps, then holds while the node's memory is read. Memory is the machine's used memory
   (MemTotal - MemAvailable, which counts the object store's shared memory) above what it was before the trials
   started: the peak, and the level once every trial holds. Run it on an otherwise idle machine.
2. Training images/s of the streaming path vs the in-memory path on a generated image folder of >= 20,000 small
   JPEGs, and the seconds each spends before its first step (listing vs decoding every file).

Writes results/benchmarks/data.json. `--quick` runs a small set (what the test suite runs, so the script never rots).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from ncssl_tune.config import TrainConfig
from ncssl_tune.core.data import as_float, format_bytes, load_data
from ncssl_tune.core.train import _Run, train
from ncssl_tune.sweep.node_data import node_data, start_registry

MODES = ("private_float32", "private", "shared")
STEPS = 5  # training steps each trial takes before it holds: the optimizer's state and the activations exist


def used_bytes() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kb = {k: int(v.split()[0]) for k, v in info.items() if k in ("MemTotal", "MemAvailable")}
    return (kb["MemTotal"] - kb["MemAvailable"]) * 1024


@ray.remote(num_cpus=1)
class _Trial:
    """One trial's process: its data (as `mode` holds it), model, optimizer and a few steps."""

    def hold(self, cfg: TrainConfig, mode: str, registry) -> int:
        torch.set_num_threads(1)
        if mode == "shared":
            data = node_data(registry, cfg.data)
        else:
            data = load_data(cfg.data, "private")
            if mode == "private_float32":  # what _finish returned before images stayed uint8
                data.train_x, data.test_x = as_float(data.train_x), as_float(data.test_x)
        self.run = _Run(cfg, data)
        r = self.run
        for b in range(min(STEPS, r.steps_per_epoch)):
            x = as_float(r.train_x[b * r.batch:(b + 1) * r.batch])
            terms = r.step_loss(*r.augment(x))
            r.opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            r.opt.step()
        return r.train_x.shape[0]


def memory(cfg: TrainConfig, mode: str, trials: int, settle_s: float) -> dict:
    """Used memory above the idle level while `trials` trials hold their data as `mode` says."""
    time.sleep(settle_s)  # what the previous measurement freed is given back
    base = used_bytes()
    samples, done = [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(used_bytes() - base)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    registry = start_registry() if mode == "shared" else None
    actors = [_Trial.remote() for _ in range(trials)]
    start = time.perf_counter()
    ray.get([a.hold.remote(cfg, mode, registry) for a in actors])
    ready_s = time.perf_counter() - start
    time.sleep(1.0)
    holding = used_bytes() - base
    done.set()
    sampler.join()
    for a in actors:
        ray.kill(a)
    if registry is not None:
        ray.kill(registry)
    out = {"mode": mode, "trials": trials, "peak_bytes": max(samples + [holding]), "holding_bytes": holding,
           "seconds_to_ready": ready_s}
    print(f"  {mode} x{trials}: holding {format_bytes(holding)}, peak {format_bytes(out['peak_bytes'])}, ready in "
          f"{ready_s:.1f} s", flush=True)  # as it goes: a full run takes ~10 minutes
    return out


def make_folder(root: Path, train: int, test: int, size: int = 32, classes: int = 10) -> Path:
    """train + test JPEGs of size x size in `classes` class folders (noisy colour fields)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for i in range(n):
            c = i % classes
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([25 * c, 255 - 25 * c, 128])
            pixels = np.clip(base + rng.normal(0, 50, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def throughput(root: Path, storage: str, threads: int, workers: int) -> dict:
    """One 1-epoch training run on the folder held as `storage`: seconds before the first step, images/s."""
    cfg = TrainConfig.from_dict({
        "data": {"dataset": "imagefolder", "root": str(root), "image_size": 32, "storage": storage,
                 "workers": workers},
        "train": {"epochs": 1, "threads": threads, "batch_size": 256},
        "eval": {"eval_samples": 512, "knn_every": 0, "probe_every": 0, "fewshot_k": 0, "cond_views": 0}})
    reports: list[dict] = []
    start = time.perf_counter()
    first: list[float] = []
    # images/s counts training steps only (train_seconds): the final epoch's kNN and probe are not part of it
    train(cfg, lambda m, s: reports.append(m) or first.append(time.perf_counter()))
    wall = time.perf_counter() - start
    setup = wall - sum(r["epoch_seconds"] for r in reports) - (time.perf_counter() - first[-1])
    out = {"storage": storage, "images_per_s": statistics.median(r["images_per_s"] for r in reports),
           "seconds_before_training": setup, "wall_seconds": wall}
    print(f"  {storage}: {out['images_per_s']:.0f} images/s, {setup:.1f} s before training", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="a small set, for the test suite")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/benchmarks/data.json")
    args = p.parse_args(argv)
    n, images, settle, repeats = (1200, 600, 0.5, 1) if args.quick else (60000, 20000, 3.0, 2)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = TrainConfig.from_dict({
            "data": {"dataset": "synthetic", "synthetic": {"n": n, "size": 32}, "test_fraction": 1 / 6},
            "model": {"projector": "512-512-512"}, "train": {"batch_size": 256, "threads": 1}})
        # interleaved repeats, medians: the machine's used memory moves by tens of MB on its own
        runs = [memory(cfg, mode, k, settle) for _ in range(repeats) for mode in MODES for k in (1, 2)]
        mem = [{"mode": mode, "trials": k, "repeats": repeats,
                **{key: statistics.median(r[key] for r in runs if (r["mode"], r["trials"]) == (mode, k))
                   for key in ("peak_bytes", "holding_bytes", "seconds_to_ready")}}
               for mode in MODES for k in (1, 2)]
    finally:
        if started:
            ray.shutdown()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = make_folder(Path(tmp), images, images // 10)
        made_s = time.perf_counter() - start
        speed = [throughput(root, s, args.threads, args.threads) for s in ("private", "stream")]
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {args.threads} threads",
           "torch": torch.__version__, "synthetic_images": n, "memory": mem,
           "folder_images": images + images // 10, "folder_seconds_to_write": made_s, "throughput": speed}
    by = {(m["mode"], m["trials"]): m for m in mem}
    out["extra_trial_bytes"] = {mode: by[mode, 2]["holding_bytes"] - by[mode, 1]["holding_bytes"] for mode in MODES}
    out["stream_over_memory_images_per_s"] = speed[1]["images_per_s"] / speed[0]["images_per_s"]
    print(f"host memory above idle, {n:,} synthetic 3x32x32 images ({format_bytes(n * 3 * 32 * 32)} as uint8), "
          f"small_cnn, {STEPS} steps a trial, then held (median of {repeats}):")
    print(f"  {'mode':16} {'1 trial':>10} {'2 trials':>10} {'peak (2)':>10} {'2nd trial adds':>15}")
    for mode in MODES:
        one, two = by[mode, 1], by[mode, 2]
        print(f"  {mode:16} {format_bytes(one['holding_bytes']):>10} {format_bytes(two['holding_bytes']):>10} "
              f"{format_bytes(two['peak_bytes']):>10} {format_bytes(out['extra_trial_bytes'][mode]):>15}")
    print(f"image folder of {out['folder_images']:,} 32x32 JPEGs (written in {made_s:.0f} s), small_cnn, "
          f"{args.threads} threads, {args.threads} decoding threads:")
    for s in speed:
        print(f"  {s['storage']:8} {s['images_per_s']:8.0f} images/s training, {s['seconds_before_training']:5.1f} s "
              f"before the first step")
    print(f"  stream / memory images/s: {out['stream_over_memory_images_per_s']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
