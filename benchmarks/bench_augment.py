"""Augmentation throughput on 2 CPU cores: the engine's batched two-view pipeline vs torchvision per sample.

Batched: ncssl_tune.core.augment.TwoViewAugment with the default recipe for the image size, built and called as
train.py does (shuffled 256-image float batches already in memory): per-image parameters drawn for the whole batch
at once, one grid_sample for crop + resize + flip, the other ops vectorised over cache-sized chunks. Torchvision: the usual SSL-library path, a
Dataset whose __getitem__ applies one transforms.v2 Compose twice (RandomResizedCrop, flip, RandomApply(ColorJitter),
RandomGrayscale, RandomApply(GaussianBlur) at >= 96 px, RandomSolarize: the same recipe and parameters), batched by
a DataLoader. Its input is float tensors or PIL images (what torchvision datasets return), with num_workers=0
(main process, 1 torch thread: per-image ops are too small to split, and a second thread made them ~10x slower on
a busy machine, 28 vs 314 images/s at 32 px) or 2 (one thread each: the same 2-core budget; the main process only
waits). The batched path runs with the engine's 2 threads and with 1, the better of them counting.
Images/s counts source images (two views each) over a pass of the data set after a warm-up pass; passes are
interleaved round-robin so a busy machine slows every configuration alike, and the median is reported.
Headline per image size: fastest batched / fastest torchvision configuration. Targets on CPU: >= 5x at 32 px,
>= 1.5x at 96 px (the larger the image, the more of the time is per-pixel work that both sides must do).
Writes results/benchmarks/augment.json; `--quick` uses a few tiny batches (what the test suite runs).
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
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ncssl_tune.core.augment import AugmentConfig, TwoViewAugment, default_augment

TARGETS = {32: 5, 96: 1.5}  # image size -> batched / best torchvision


def torchvision_compose(c: AugmentConfig, size: int, pil: bool) -> v2.Compose:
    """The engine's recipe `c` as torchvision v2 ops in the engine's order; returns float (C, H, W) in [0, 1]."""
    ops = [v2.RandomResizedCrop(size, scale=c.crop_scale, ratio=c.crop_ratio, antialias=True),
           v2.RandomHorizontalFlip(c.flip_p),
           v2.RandomApply([v2.ColorJitter(c.brightness, c.contrast, c.saturation, c.hue)], p=c.jitter_p),
           v2.RandomGrayscale(c.grayscale_p)]
    if c.blur_p:
        ops.append(v2.RandomApply([v2.GaussianBlur(int(0.1 * size) | 1, (0.1, 2.0))], p=c.blur_p))
    ops.append(v2.RandomSolarize(128 if pil else 0.5, p=c.solarize_p))  # PIL thresholds are in 0..255
    if pil:
        ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(ops)


class TwoViews(Dataset):
    def __init__(self, images: list | torch.Tensor, transform: v2.Compose):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        return self.transform(x), self.transform(x)


def configurations(size: int, n: int, batch: int) -> dict[str, tuple[int, Callable[[], None]]]:
    """name -> (torch threads in the main process, one pass over n random images)."""
    u8 = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = u8.float() / 255  # (N, 3, S, S), as train.py holds its data
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in u8]
    aug = TwoViewAugment(default_augment(size, 3), size, 3)

    def batched() -> None:
        perm = torch.randperm(n)
        for i in range(0, n, batch):
            aug(x[perm[i:i + batch]])

    def loader(data, workers: int) -> Callable[[], None]:
        dl = DataLoader(TwoViews(data, torchvision_compose(aug.config, size, pil=isinstance(data, list))),
                        batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0)

        def run() -> None:
            for _ in dl:
                pass
        return run

    return {"batched, 2 threads": (2, batched), "batched, 1 thread": (1, batched),
            "torchvision tensor, 0 workers, 1 thread": (1, loader(x, 0)),
            "torchvision PIL, 0 workers": (1, loader(pil, 0)),
            "torchvision tensor, 2 workers": (1, loader(x, 2)),  # the workers run 1 thread each; the main waits
            "torchvision PIL, 2 workers": (1, loader(pil, 2))}


def measure(configs: dict[str, tuple[int, Callable[[], None]]], repeats: int) -> dict[str, float]:
    """Median seconds per pass; one warm-up pass each (allocator, worker start-up), then round-robin."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(repeats + 1):
        for name, (threads, run) in configs.items():
            torch.set_num_threads(threads)
            start = time.perf_counter()
            run()
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="a few tiny batches, for the test suite")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per configuration (median reported)")
    p.add_argument("--batch", type=int, default=256, help="images per batch (train.batch_size's default)")
    p.add_argument("--out", default="results/benchmarks/augment.json")
    args = p.parse_args(argv)
    # images per pass: 4 batches at 32 px and 2 at 96 px are a steady state, and 2 workers get a batch each
    sizes, batch, repeats = ({32: 32, 96: 16}, 16, 1) if args.quick else ({32: 1024, 96: 512}, args.batch, args.repeats)
    threads_before = torch.get_num_threads()
    out: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus, <= 2 threads",
                 "torch": torch.__version__, "torchvision": torchvision.__version__,
                 "load_average_start": os.getloadavg()[0], "batch_size": batch, "repeats": repeats,
                 "target": {f"{s}px": f">= {t}x the fastest torchvision configuration" for s, t in TARGETS.items()}}
    for size, n in sizes.items():
        configs = configurations(size, n, batch)
        if args.quick:  # tiny ops on 2 threads crawl when the CI machine is busy; 1-thread runs cover the code
            configs = {k: v for k, v in configs.items() if v[0] == 1}
        ips = {name: n / s for name, s in measure(configs, repeats).items()}
        del configs  # ends the persistent DataLoader workers
        best_b = max((k for k in ips if k.startswith("batched")), key=ips.get)
        best_t = max((k for k in ips if k.startswith("torchvision")), key=ips.get)
        ratio = ips[best_b] / ips[best_t]
        out[f"{size}px"] = {"images": n, "images_per_s": ips, "best_batched": best_b, "best_torchvision": best_t}
        out[f"ratio_{size}px"] = ratio
        print(f"{size}x{size} RGB, {n} images, batch {batch}, images/s (two views each):")
        for name, v in ips.items():
            print(f"  {name:42s} {v:8.0f}")
        print(f"  batched / best torchvision = {ips[best_b]:.0f} / {ips[best_t]:.0f} = {ratio:.2f}x "
              f"(target >= {TARGETS[size]}x)")
    out["load_average_end"] = os.getloadavg()[0]
    torch.set_num_threads(threads_before)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
