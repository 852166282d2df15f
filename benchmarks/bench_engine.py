"""Engine overhead on 2 CPU cores: one trial through the whole engine vs bare `train()` (target >= 0.95).

Engine: `run_sweep` with one trial (empty search space, FIFO, no collapse stop): Ray Tune's function
trainable, a checkpoint every epoch, the MLflow tracker writing to SQLite. Bare: `train()` on the TrainConfig
that trial builds (checked equal), same thread count, in a fresh Python process as the trial's worker is (a
long-lived benchmark process trained ~5% slower here). Runs alternate (bare, engine, ...) so a busy machine's
drift hits both; ratios are engine / bare per pair, then the median over pairs, for
(a) training images/s per epoch (train()'s own images_per_s, median over the epochs after the first);
(b) images trained / trial wall. Engine: the driver's on_trial_start to the last result's arrival (Ray's
    time_total_s is shown too; it omits the time the trial sits blocked in tune.report until the driver asks
    for the next result). Bare: the train() call, timed in its process. Worker start-up is in neither, but in
(c) where run_sweep's wall goes, as information: Ray start (when none runs) and MLflow setup, the trial's
    worker start-up (a fresh process per trial), the trial, its final MLflow artifacts, teardown.
Writes results/benchmarks/engine.json. `--quick`: 1 epoch, 1 thread, small eval, one pair (the test suite).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
import yaml
from ray.tune import Callback

from ncssl_tune.config import TrainConfig
from ncssl_tune.records.store import default_tracking_uri
from ncssl_tune.spec import load_spec
from ncssl_tune.sweep.runner import run_sweep
from ncssl_tune.sweep.trainable import build_config

TARGET = 0.95
KEEP = ("images_per_s", "train_seconds", "epoch_seconds")
med = statistics.median
# The bare run: a fresh interpreter reads the config as JSON, trains, and prints one JSON line of per-epoch
# metrics with their report times (seconds since train() was called).
BARE = f'''import json, sys, time
from ncssl_tune.config import TrainConfig
from ncssl_tune.core.train import train
cfg, out = TrainConfig.from_dict(json.loads(sys.stdin.read())), []
start = time.perf_counter()
train(cfg, lambda m, s: out.append({{"t": time.perf_counter() - start, **{{k: m[k] for k in {KEEP}}}}}))
print(json.dumps(out))'''


class Timeline(Callback):
    """Driver clock of the trial; it comes after the engine's callbacks, so each stamp follows their work."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.results: list[dict] = []

    def setup(self, **info):
        self.t["setup"] = time.perf_counter()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.t["start"] = time.perf_counter()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.results.append({"t": time.perf_counter(), **{k: result[k] for k in (*KEEP, "time_total_s")}})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.t["complete"] = time.perf_counter()


def make_spec(tmp: Path, epochs: int, threads: int, quick: bool):
    # device and threads are written out so that the trial's build_config adds nothing the bare run lacks.
    small = {"eval_samples": 128, "cond_views": 0, "probe_every": 0, "probe_weight_decays": [1e-4]}
    raw = {"name": "engine", "data": {"dataset": "digits"}, "loss": {"method": "vicreg"},
           "model": {"backbone": "small_cnn", "projector": "256-256-256"},
           "train": {"epochs": epochs, "threads": threads, "device": "cpu"}, "eval": small if quick else {},
           "resources": {"cpu": threads, "gpu": 0}, "space": {},
           "search": {"metric": "probe_acc", "num_samples": 1, "algorithm": "random", "max_concurrent": 1,
                      "scheduler": {"name": "fifo"}, "collapse_stop": {"total": False}}}
    (tmp / "engine.yaml").write_text(yaml.safe_dump(raw))
    spec = load_spec(tmp / "engine.yaml")
    cfg = spec.train_config()
    assert cfg == build_config(spec.base, {}, spec.resources.cpu, spec.resources.gpu), "trial config differs"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg, "the config does not survive JSON"
    return spec, cfg


def summary(results: list[dict], start: float) -> dict:
    ts = [start] + [r["t"] for r in results]
    steady = results[1:] or results  # the first epoch pays one-off costs (data, allocator warm-up)
    walls = [b - a for a, b in itertools.pairwise(ts[1:])] or [ts[1] - ts[0]]
    return {"images_per_s": [r["images_per_s"] for r in results], "trial_s": ts[-1] - start,
            "images": sum(r["images_per_s"] * r["train_seconds"] for r in results),
            "ips_median": med(r["images_per_s"] for r in steady), "epoch_wall_median": med(walls),
            # wall between epochs beyond train()'s own epoch_seconds: report, checkpoint, driver round trip
            "between_epochs_s": med(walls) - med(r["epoch_seconds"] for r in steady)}


def run_bare(cfg) -> dict:
    proc = subprocess.run([sys.executable, "-c", BARE], input=json.dumps(cfg.to_dict()), capture_output=True,
                          text=True, check=True)
    return summary(json.loads(proc.stdout.strip().splitlines()[-1]), 0.0)


def run_engine(spec, results_dir: Path) -> dict:
    tl = Timeline()
    t0 = time.perf_counter()
    run_sweep(spec, results_dir, tracking_uri=default_tracking_uri(results_dir), extra_callbacks=[tl],
              monitor_interval_s=3600.0)
    end, t = time.perf_counter(), tl.t
    assert len(tl.results) == spec.train_config().train.epochs, f"{len(tl.results)} results for the epochs"
    out = summary(tl.results, t["start"])
    last = tl.results[-1]
    return {**out, "ray_time_total_s": last["time_total_s"], "phases_s": {
        "ray_start_and_mlflow_setup": t["setup"] - t0, "worker_start": t["start"] - t["setup"],
        "trial": out["trial_s"], "final_artifacts": t["complete"] - last["t"],
        "teardown": end - t["complete"]}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="1 epoch, 1 thread, one pair (test suite)")
    p.add_argument("--epochs", type=int, default=10)
    # 1 = the shipped spaces' resources.cpu. With 2 threads on 2 cores shared with other work, oversubscribed
    # OpenMP threads wait on each other and the runs mostly measure scheduling noise.
    p.add_argument("--threads", type=int, default=1, help="train.threads = resources.cpu")
    p.add_argument("--repeats", type=int, default=5, help="bare/engine pairs")
    p.add_argument("--out", default="results/benchmarks/engine.json")
    args = p.parse_args(argv)
    epochs, threads, repeats = (1, 1, 1) if args.quick else (args.epochs, args.threads, args.repeats)
    ray_was_up = ray.is_initialized()  # if not, each engine run starts its own, as the CLI does
    bare, engine = [], []
    with tempfile.TemporaryDirectory() as tmp:
        spec, cfg = make_spec(Path(tmp), epochs, threads, args.quick)
        for i in range(repeats):
            bare.append(run_bare(cfg))
            engine.append(run_engine(spec, Path(tmp) / f"engine{i}"))

    def ratio(fn) -> float:
        return med(fn(e) / fn(b) for e, b in zip(engine, bare))

    def both(key: str) -> dict:
        return {f"engine_{key}": med(r[key] for r in engine), f"bare_{key}": med(r[key] for r in bare)}

    out = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "torch": torch.__version__, "ray": ray.__version__, "load_average_1min": os.getloadavg()[0],
        "settings": {"config": cfg.to_dict(), "resources_cpu": threads, "repeats": repeats,
                     "quick": args.quick, "ray_already_running": ray_was_up, "tracking": "sqlite, temp dir"},
        **both("ips_median"), "images_per_s_ratio": ratio(lambda r: r["ips_median"]),
        "trial_throughput_ratio": ratio(lambda r: r["images"] / r["trial_s"]),
        "trial_throughput_ratio_ray_time_total":
            ratio(lambda r: r["images"] / r.get("ray_time_total_s", r["trial_s"])),
        **both("trial_s"), **both("epoch_wall_median"), **both("between_epochs_s"),
        "engine_phases_s_median": {k: med(r["phases_s"][k] for r in engine) for k in engine[0]["phases_s"]},
        "engine_runs": engine, "bare_runs": bare, "target": TARGET,
    }
    out["target_met"] = out["images_per_s_ratio"] >= TARGET and out["trial_throughput_ratio"] >= TARGET
    o = out
    print(f"VICReg, digits, small_cnn, {epochs} epochs, {threads} thread(s) = resources.cpu, {repeats} pairs,"
          f" load {o['load_average_1min']:.1f}. Engine / bare, median over pairs (target >= {TARGET}):")
    print(f"(a) training images/s per epoch {o['engine_ips_median']:.0f} / {o['bare_ips_median']:.0f}: "
          f"ratio {o['images_per_s_ratio']:.3f}")
    print(f"(b) trial wall {o['engine_trial_s']:.1f} s / {o['bare_trial_s']:.1f} s: throughput ratio "
          f"{o['trial_throughput_ratio']:.3f} (with Ray's time_total_s "
          f"{o['trial_throughput_ratio_ray_time_total']:.3f}); between epochs "
          f"{o['engine_between_epochs_s'] * 1e3:.0f} ms / {o['bare_between_epochs_s'] * 1e3:.0f} ms")
    print("(c) run_sweep wall: " + ", ".join(f"{k} {v:.1f} s" for k, v in o["engine_phases_s_median"].items())
          + (" (Ray was already running)" if ray_was_up else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
