"""GPU smoke test: a 4-trial CIFAR-10-shaped sweep (32x32 RGB synthetic data, ResNet-18) packed on one GPU.

Four trials share the GPU (resources.gpu = 0.25, all four at once) and the node's one copy of the data, in bf16
autocast with channels-last tensors (train.amp, model.channels_last: both on by default on CUDA). Prints and records images/s per trial (of its last
epoch) and in total (their sum: the four run together), with the GPU's name and the sweep's wall time, in
results/benchmarks/gpu_smoke.json. Where no GPU is visible it says so and exits 0 (the CPU path is covered by
the test suite).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from ncssl_tune.spec import load_spec
from ncssl_tune.sweep.monitor import read_trials
from ncssl_tune.sweep.runner import run_sweep

SETS = ["data.dataset=synthetic", "data.synthetic={n: 20000, size: 32, channels: 3, classes: 10}",
        "model.backbone=resnet18", "model.projector=2048-2048-2048", "train.batch_size=512",
        "train.optimizer=lars", "train.lr=0.3", "train.warmup_epochs=1", "eval.knn_every=1",
        "eval.probe_every=0", "resources.gpu=0.25", "resources.cpu=1", "search.max_concurrent=4",
        "search.scheduler.name=fifo", "train.amp=true", "model.channels_last=true",
        "data.storage=shared"]  # the four trials read one copy of the data (docs/data.md)
TRIALS = 4


def timed_sweep(spec) -> tuple[float, list[dict]]:
    """Run the sweep in a throwaway results folder; returns (wall seconds, trials.csv rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_sweep(spec, tmp, monitor_interval_s=30.0)
        return time.perf_counter() - start, read_trials(result.out_dir)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="accepted for symmetry with the other benchmarks")
    p.add_argument("--out", default="results/benchmarks/gpu_smoke.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible; nothing to measure (exit 0)")
        return {"gpu": None}
    spec = load_spec(Path(__file__).resolve().parent.parent / "search_spaces/cifar10_vicreg.yaml",
                     [*SETS, "data.root=null"], num_samples=TRIALS, epochs=args.epochs, name="gpu-smoke")
    wall, rows = timed_sweep(spec)
    trials = [{"trial_id": r["trial_id"], "status": r["status"], "images_per_s": float(r["images_per_s"]),
               "effective_rank": float(r["effective_rank"])} for r in rows]
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "trials_packed": TRIALS,
           "gpu_per_trial": 0.25, "precision": "bf16 autocast, channels-last", "epochs": args.epochs,
           "wall_seconds": wall, "trials": trials,
           "images_per_s_total": sum(t["images_per_s"] for t in trials)}
    for t in trials:
        print(f"trial {t['trial_id']}: {t['images_per_s']:.0f} images/s, status {t['status']}")
    print(f"{len(trials)} trials on one GPU: {out['images_per_s_total']:.0f} images/s in total, {wall:.0f} s wall")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
