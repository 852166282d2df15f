"""What LiDAR of z costs where it can work: the label-free metrics of an epoch (`metrics_seconds`: collapse metrics
of z and h, entropy_cond and both LiDARs with the forward passes of their views) with the views of TrainConfig's
default (K = 2 views of M = 128 samples: a within-sample scatter of rank <= 128) against those of the study files
(K = 2 of M = 512: rank <= 512, full rank for z up to 512 wide), on the default workload (digits, 16-wide
small_cnn, VICReg) at projector widths 256 and 512. Each pair runs one after the other, alternating, and the
printed figure is the ratio of the medians over epochs (after the first) — measured side by side in one run.
Writes results/benchmarks/lidar.json; `--quick`: 2 epochs at width 64, for the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ncssl_tune.config import TrainConfig
from ncssl_tune.core.train import train

VIEWS = {"default (K=2, M=128)": {"cond_views": 2, "cond_samples": 128},
         "study (K=2, M=512)": {"cond_views": 2, "cond_samples": 512}}


def one_run(width: int, views: dict, epochs: int) -> dict:
    cfg = TrainConfig.from_dict({"data": {"dataset": "digits"}, "model": {"width": 16, "projector": f"{width}-{width}"},
                                 "train": {"epochs": epochs, "batch_size": 64, "threads": 1},
                                 "eval": {"probe_every": 0, **views}})
    reports: list[dict] = []
    train(cfg, lambda m, s: reports.append(m))
    steady = reports[1:] or reports
    return {k: statistics.median(r[k] for r in steady) for k in ("metrics_seconds", "epoch_seconds")} | {
        "lidar": reports[-1].get("lidar"), "lidar_h": reports[-1].get("lidar_h")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="2 epochs at width 64, for the test suite")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", default="results/benchmarks/lidar.json")
    args = p.parse_args(argv)
    epochs, widths = (2, [64]) if args.quick else (args.epochs, [256, 512])
    out: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, 1 thread",
                 "torch": torch.__version__, "epochs": epochs}
    print("label-free metrics per epoch (collapse metrics, entropy_cond, LiDAR of z and h with their views), "
          "medians after the first epoch; 1 thread")
    for width in widths:
        runs = {name: one_run(width, v, epochs) for name, v in VIEWS.items()}
        base, study = (runs[n] for n in VIEWS)
        ratio = study["metrics_seconds"] / base["metrics_seconds"]
        out[f"width_{width}"] = {**{n: r for n, r in runs.items()}, "metrics_ratio": ratio,
                                 "epoch_ratio": study["epoch_seconds"] / base["epoch_seconds"]}
        print(f"  z {width} wide: metrics {base['metrics_seconds']:.3f} s -> {study['metrics_seconds']:.3f} s "
              f"({ratio:.2f}x); epoch {base['epoch_seconds']:.2f} s -> {study['epoch_seconds']:.2f} s; "
              f"LiDAR of z {base['lidar']:.3g} -> {study['lidar']:.3g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
