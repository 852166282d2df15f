"""Core training speed on 2 CPU cores: a 20-epoch VICReg run on digits, and what the collapse metrics cost.

Prints, side by side in one run: wall time of the whole run and seconds per epoch split into training, collapse
metrics and the rest of the evaluation (kNN, few-labels and full probe), for TrainConfig's defaults (full probe
every epoch) and with the full probe every 10 epochs as the shipped spaces run it. Writes
results/benchmarks/train.json. `--quick` runs 2 epochs (what the test suite runs, so the script never rots).
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


def one_run(epochs: int, threads: int, evals: dict) -> dict:
    """Wall time and per-epoch medians of one VICReg run on TrainConfig's defaults plus `evals` (eval.* keys)."""
    cfg = TrainConfig.from_dict({"loss": {"method": "vicreg"}, "train": {"epochs": epochs, "threads": threads},
                                 "eval": evals})
    reports: list[dict] = []
    start = time.perf_counter()
    train(cfg, lambda m, s: reports.append(m))
    wall = time.perf_counter() - start

    # The first epoch pays one-off costs (allocator, first kernel calls): report the steady state as the median.
    def med(key: str) -> float:
        return statistics.median(r[key] for r in reports)

    epoch_s, train_s, metrics_s = med("epoch_seconds"), med("train_seconds"), med("metrics_seconds")
    return {"eval": evals, "wall_seconds": wall, "epoch_seconds_median": epoch_s, "train_seconds_median": train_s,
            "metrics_seconds_median": metrics_s, "downstream_seconds_median": epoch_s - train_s - metrics_s,
            "metrics_over_epoch": metrics_s / epoch_s, "images_per_s_median": med("images_per_s"),
            "final_effective_rank": reports[-1]["effective_rank"], "final_probe_acc": reports[-1]["probe_acc"],
            "final_fewshot_acc": reports[-1]["fewshot_acc"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="2 epochs, for the test suite")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/benchmarks/train.json")
    args = p.parse_args(argv)
    epochs = 2 if args.quick else args.epochs
    # TrainConfig's defaults (the headline), then the same with the full-label probe every 10 epochs as the shipped
    # spaces run it (the few-labels probe and kNN stay every epoch): how much of the epoch the full probe is.
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {args.threads} threads",
           "torch": torch.__version__, "epochs": epochs, **one_run(epochs, args.threads, {})}
    out["probe_every_10"] = one_run(epochs, args.threads, {"probe_every": 10})
    print(f"VICReg, digits, small_cnn (TrainConfig defaults), {epochs} epochs on {args.threads} threads "
          f"(target < 30 s for 20 epochs); per epoch medians")
    for name, r in (("defaults (probe every epoch)", out), ("probe every 10 epochs", out["probe_every_10"])):
        print(f"  {name:30} {r['wall_seconds']:5.1f} s wall; epoch {r['epoch_seconds_median']:.2f} s = train "
              f"{r['train_seconds_median']:.2f} + collapse metrics {r['metrics_seconds_median']:.2f} + kNN, "
              f"few-labels and full probe {r['downstream_seconds_median']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
