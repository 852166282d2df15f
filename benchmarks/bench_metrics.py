"""Collapse-metric overhead on 2 CPU cores: metrics time / epoch time at embedding width D = 128, 2048, 8192.

Epoch: a real VICReg epoch through the engine (`train(cfg, report)`): small_cnn, projector 512-512-D, procedural
textures (dataset `synthetic`) at 8x8 grayscale, the size of digits and so of the engine's CPU sweeps; n = 2600
images give 2080 training images (8 steps of 256), the smallest split that holds M = eval.eval_samples = 2048;
kNN and probe every epoch (the defaults). Metrics time is the engine's own `metrics_seconds`: collapse metrics of
z (M, D) and h (M, 128) plus entropy_cond and both LiDARs with the forward passes of their views. Per D, the median
over the epochs after the first (which pays one-off costs) of metrics_seconds / epoch_seconds, printed next to
metrics_seconds itself (the ratio also moves with the epoch's other parts). 3 epochs, 2 at D = 8192 (slow on CPU).
At D = 2048 and 8192 the projector's last layer (512 -> D) is narrower than min(M, D), so the engine takes the
low-rank route (metrics.LinearHead); at D = 128 the direct one.
Pure cost, on z = relu(a) Wᵀ from random a (M, 512) and W (D, 512) (medians of repeats): `collapse_metrics` on the
low-rank route and on the direct route side by side, the route's parts (QR and R Wᵀ; the shared Gram matrix and
its two eigvalsh; avg_corr; std_l2), and LiDAR and entropy_cond on K x Mc = 2 x 128 views.
Targets (issue 15): metrics <= 10% of the epoch at D = 2048, <= 5% at D = 8192 (and at D = 128).
Writes results/benchmarks/metrics.json; `--quick`: tiny data (hidden width 16, so D = 32 takes the route) on
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
from ncssl_tune.core import linalg as metrics_linalg
from ncssl_tune.core import metrics
from ncssl_tune.core.metrics import LinearHead, collapse_metrics, entropy_cond, lidar, std_l2
from ncssl_tune.core.train import train

TARGETS = {128: 0.05, 2048: 0.10, 8192: 0.05}  # metrics_seconds / epoch_seconds; issue 15


def seconds(fn: Callable[[], object], repeats: int = 1) -> float:
    """Median wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pure_costs(m: int, p: int, d: int, repeats: int) -> dict[str, float | None]:
    """Seconds of collapse_metrics on both routes and of the route's parts; z = relu(a) Wᵀ: (M, D), a: (M, P)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, p, generator=g).relu()  # (M, P)
    w = torch.randn(d, p, generator=g) / p**0.5  # (D, P)
    z = a @ w.T  # (M, D)
    head = LinearHead(a, w)
    rows, mean = metrics_linalg.centred_low_rank(head)  # (P, D), (D,)
    col_max = z.abs().amax(dim=0).double()
    views = torch.randn(2, 128, d, generator=g)  # (K, Mc, D)
    out = {"route": seconds(lambda: collapse_metrics(z, head=head), repeats) if metrics.low_rank_route(p, m, d)
           else None,
           "direct": seconds(lambda: collapse_metrics(z), repeats),
           "route_qr_and_rows": seconds(lambda: metrics_linalg.centred_low_rank(head), repeats),
           "route_gram_and_eigvalsh": seconds(lambda: metrics_linalg.gram_spectra(rows, mean, m), repeats),
           "route_avg_corr": seconds(lambda: metrics._avg_abs_corr(rows, m, col_max), repeats),
           "std_l2": seconds(lambda: std_l2(z), repeats),
           "lidar_2x128_views": seconds(lambda: lidar(views), repeats),
           "entropy_cond_2x128_views": seconds(lambda: entropy_cond(views), repeats)}
    return out


def engine_epochs(d: int, m: int, n: int, size: int, epochs: int, threads: int, hidden: int) -> list[dict]:
    """The per-epoch reports of a VICReg run with projector hidden-hidden-d and eval_samples m."""
    cfg = TrainConfig.from_dict({
        "data": {"dataset": "synthetic", "synthetic": {"n": n, "size": size, "channels": 1 if size < 16 else 3}},
        "model": {"projector": f"{hidden}-{hidden}-{d}"}, "loss": {"method": "vicreg"},
        "train": {"epochs": epochs, "threads": threads}, "eval": {"eval_samples": m}})
    reports: list[dict] = []
    train(cfg, lambda r, s: reports.append(r))
    if reports[-1]["status"] == "diverged":
        raise RuntimeError(f"the D={d} run diverged: {reports[-1]['error']}")
    return reports


def width_row(d: int, m: int, n: int, size: int, epochs: int, repeats: int, threads: int, hidden: int) -> dict:
    """Engine epochs and pure metric cost at embedding width d."""
    alone = pure_costs(m, hidden, d, repeats)
    reports = engine_epochs(d, m, n, size, epochs, threads, hidden)
    steady = reports[1:] or reports

    def med(key: str) -> float:
        return statistics.median(r[key] for r in steady)

    epoch_s, metrics_s = med("epoch_seconds"), med("metrics_seconds")
    target = TARGETS.get(d, 0.05)
    return {"epochs": len(reports), "route": "low-rank" if metrics.low_rank_route(hidden, m, d) else "direct",
            "epoch_seconds": epoch_s, "train_seconds": med("train_seconds"), "metrics_seconds": metrics_s,
            "metrics_over_epoch": metrics_s / epoch_s, "target": target,
            "epoch_seconds_for_target": metrics_s / target, "alone_seconds": alone,
            "final_effective_rank": reports[-1]["effective_rank"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny data and widths, for the test suite")
    p.add_argument("--epochs", type=int, default=3, help="epochs per width (2 at D >= 8192)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per pure cost (median)")
    p.add_argument("--size", type=int, default=8, help="image size of the synthetic data (< 16: grayscale)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/benchmarks/metrics.json")
    args = p.parse_args(argv)
    widths, m, n, hidden = ((8, 32), 64, 100, 16) if args.quick else ((128, 2048, 8192), 2048, 2600, 512)
    epochs = {d: 2 if args.quick or d >= 8192 else args.epochs for d in widths}
    repeats = 1 if args.quick else args.repeats
    # quick: 1 thread, because tiny ops on 2 threads crawl when the CI machine is busy (idle threads are descheduled)
    threads, threads_before = (1 if args.quick else args.threads), torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {threads} threads",
                 "torch": torch.__version__, "load_average_start": os.getloadavg()[0], "eval_samples": m,
                 "data": f"synthetic, n={n} ({int(0.8 * n)} train), {args.size}x{args.size}, "
                         f"{1 if args.size < 16 else 3} channel(s)",
                 "model": f"small_cnn, projector {hidden}-{hidden}-D, vicreg",
                 "target": "metrics_seconds / epoch_seconds <= 10% at D = 2048, <= 5% at D = 128 and 8192"}
    collapse_metrics(torch.randn(m, 16))  # first LAPACK/BLAS calls pay one-off set-up
    rows = {}
    for d in widths:
        rows[d] = width_row(d, m, n, args.size, epochs[d], repeats, threads, hidden)
        torch.set_num_threads(threads)  # train() sets its own
        out[f"D={d}"] = rows[d]
        out[f"metrics_over_epoch_D{d}"] = rows[d]["metrics_over_epoch"]
    out["load_average_end"] = os.getloadavg()[0]
    print(f"M = {m} eval samples; VICReg epoch on {out['data']}, projector {hidden}-{hidden}-D; medians")
    print(f"{'D':>6} {'route':>8} {'epoch s':>8} {'train s':>8} {'metrics s':>9} {'metrics/epoch':>13} {'target':>6}  "
          "collapse_metrics alone: route / direct s; parts of the route s")
    for d, r in rows.items():
        a = r["alone_seconds"]
        parts = ", ".join(f"{k} {v:.3f}" for k, v in a.items() if k not in ("route", "direct"))
        print(f"{d:6d} {r['route']:>8} {r['epoch_seconds']:8.2f} {r['train_seconds']:8.2f} {r['metrics_seconds']:9.3f} "
              f"{r['metrics_over_epoch']:13.1%} {r['target']:6.0%}  "
              f"{'-' if a['route'] is None else format(a['route'], '.3f')} / {a['direct']:.3f}; {parts}")
    print(f"load average {out['load_average_start']:.2f} at the start, {out['load_average_end']:.2f} at the end")
    torch.set_num_threads(threads_before)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
