"""Collapse-metric overhead on 2 CPU cores: metrics time / epoch time at embedding width D = 128, 2048, 8192.

Epoch: a real VICReg epoch through the engine (`train(cfg, report)`): small_cnn, projector 512-512-D, procedural
textures (dataset `synthetic`) at 8x8 grayscale, the size of digits and so of the engine's CPU sweeps; n = 2600
images give 2080 training images (8 steps of 256), the smallest split that holds M = eval.eval_samples = 2048;
kNN and probe every epoch (the defaults). Metrics time is the engine's own `metrics_seconds`: collapse metrics of
z (M, D) and h (M, 128) plus entropy_cond with its forward passes. Per D, the median over the epochs after the
first (which pays one-off costs) of metrics_seconds / epoch_seconds. 3 epochs, 2 at D = 8192 (slow on CPU).
The ratio scales as 1 / epoch length, so the JSON also gives the epoch length that would meet the target
(20 x metrics time). Pure cost: `collapse_metrics` alone on a random (2048, D) tensor (median of repeats), and one
call split into its parts (spectrum, effective_rank, avg_corr, std_l2; and the Gram matmul and eigvalsh that
spectrum and effective_rank each do once) to show what dominates.
Target: metrics <= 5% of the epoch. Writes results/benchmarks/metrics.json; `--quick`: tiny data on
1 thread, for the test suite. About 2 minutes on an idle 2-core machine, much longer on a busy one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ncssl_tune.config import TrainConfig
from ncssl_tune.metrics import avg_corr, collapse_metrics, effective_rank, spectrum, std_l2
from ncssl_tune.train import train


def seconds(fn: Callable[[], object], repeats: int = 1) -> float:
    """Median wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def metric_parts(z: torch.Tensor) -> dict[str, float]:
    """Seconds of each part of one collapse_metrics(z) call; z: (M, D)."""
    x = z.double()
    m, d = x.shape
    gram = (lambda: x @ x.T) if m < d else (lambda: x.T @ x)  # (min(M, D), min(M, D)), as metrics.py forms it
    g = gram()
    return {"spectrum": seconds(lambda: spectrum(z)), "effective_rank": seconds(lambda: effective_rank(z)),
            "avg_corr": seconds(lambda: avg_corr(z)), "std_l2": seconds(lambda: std_l2(z)),
            "of_which_gram_matmul": seconds(gram), "of_which_eigvalsh": seconds(lambda: torch.linalg.eigvalsh(g))}


def engine_epochs(d: int, m: int, n: int, size: int, epochs: int, threads: int) -> list[dict]:
    """The per-epoch reports of a VICReg run with projector 512-512-d and eval_samples m."""
    cfg = TrainConfig.from_dict({
        "data": {"dataset": "synthetic", "synthetic": {"n": n, "size": size, "channels": 1 if size < 16 else 3}},
        "model": {"projector": f"512-512-{d}"}, "loss": {"method": "vicreg"},
        "train": {"epochs": epochs, "threads": threads}, "eval": {"eval_samples": m}})
    reports: list[dict] = []
    train(cfg, lambda r, s: reports.append(r))
    if reports[-1]["status"] == "diverged":
        raise RuntimeError(f"the D={d} run diverged: {reports[-1]['error']}")
    return reports


def width_row(d: int, m: int, n: int, size: int, epochs: int, repeats: int, threads: int) -> dict:
    """Engine epochs and pure metric cost at embedding width d."""
    z = torch.randn(m, d, generator=torch.Generator().manual_seed(0))  # (M, D)
    alone = seconds(lambda: collapse_metrics(z), repeats)
    parts = metric_parts(z)
    reports = engine_epochs(d, m, n, size, epochs, threads)
    steady = reports[1:] or reports

    def med(key: str) -> float:
        return statistics.median(r[key] for r in steady)

    epoch_s, metrics_s = med("epoch_seconds"), med("metrics_seconds")
    return {"epochs": len(reports), "epoch_seconds": epoch_s, "train_seconds": med("train_seconds"),
            "metrics_seconds": metrics_s, "metrics_over_epoch": metrics_s / epoch_s,
            "epoch_seconds_for_5pct": 20 * metrics_s, "collapse_metrics_alone_seconds": alone,
            "collapse_metrics_parts_seconds": parts, "final_effective_rank": reports[-1]["effective_rank"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny data and widths, for the test suite")
    p.add_argument("--epochs", type=int, default=3, help="epochs per width (2 at D >= 8192)")
    p.add_argument("--repeats", type=int, default=3, help="timed collapse_metrics calls per width (median)")
    p.add_argument("--size", type=int, default=8, help="image size of the synthetic data (< 16: grayscale)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/benchmarks/metrics.json")
    args = p.parse_args(argv)
    widths, m, n = ((8, 32), 64, 100) if args.quick else ((128, 2048, 8192), 2048, 2600)
    epochs = {d: 2 if args.quick or d >= 8192 else args.epochs for d in widths}
    repeats = 1 if args.quick else args.repeats
    # quick: 1 thread, because tiny ops on 2 threads crawl when the CI machine is busy (idle threads are descheduled)
    threads, threads_before = (1 if args.quick else args.threads), torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {threads} threads",
                 "torch": torch.__version__, "load_average_start": os.getloadavg()[0], "eval_samples": m,
                 "data": f"synthetic, n={n} ({int(0.8 * n)} train), {args.size}x{args.size}, "
                         f"{1 if args.size < 16 else 3} channel(s)", "model": "small_cnn, projector 512-512-D, vicreg",
                 "target": "metrics_seconds / epoch_seconds <= 5%"}
    collapse_metrics(torch.randn(m, 16))  # first LAPACK/BLAS calls pay one-off set-up
    rows = {}
    for d in widths:
        rows[d] = width_row(d, m, n, args.size, epochs[d], repeats, threads)
        torch.set_num_threads(threads)  # train() sets its own
        out[f"D={d}"] = rows[d]
        out[f"metrics_over_epoch_D{d}"] = rows[d]["metrics_over_epoch"]
    out["load_average_end"] = os.getloadavg()[0]
    print(f"M = {m} eval samples; VICReg epoch on {out['data']}; medians (target: metrics <= 5% of the epoch)")
    print(f"{'D':>6} {'epoch s':>8} {'train s':>8} {'metrics s':>9} {'metrics/epoch':>13} {'alone s':>8}  "
          f"parts of one collapse_metrics call (s)")
    for d, r in rows.items():
        parts = ", ".join(f"{k.removeprefix('of_which_')} {v:.2f}" for k, v in r["collapse_metrics_parts_seconds"].items())
        print(f"{d:6d} {r['epoch_seconds']:8.2f} {r['train_seconds']:8.2f} {r['metrics_seconds']:9.2f} "
              f"{r['metrics_over_epoch']:13.1%} {r['collapse_metrics_alone_seconds']:8.2f}  {parts}")
    torch.set_num_threads(threads_before)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
