"""Two-view augmentation of whole batches on the training device, with per-sample random parameters.

Defaults depend on the image size: digits (8x8, grayscale), CIFAR-like (32x32 RGB) and 96+ px. Each image gets
what torchvision's per-image transforms would give it (RandomResizedCrop's box rule and bilinear resize, ColorJitter
in a random order of its own, rgb_to_grayscale, gaussian_blur, solarize): the ops in augment_ops.py are checked
against torchvision's functional ops in tests/test_augment_ops.py.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ncssl_tune.config import AugmentConfig
from ncssl_tune.core import augment_ops as ops

__all__ = ["AugmentConfig", "TwoViewAugment", "default_augment"]  # AugmentConfig is declared with the config

CPU_CHUNK_FLOATS = 2**20  # 4 MB of float32 output per chunk on CPU: 37 images at 96 px, 1024 at 32 px


def default_augment(image_size: int, channels: int, overrides: AugmentConfig | dict | None = None) -> AugmentConfig:
    """The recipe for this image size with every field set, then the fields `overrides` sets (a mapping is
    checked as in AugmentConfig.from_dict).

    < 16 px (digits): crop 0.6..1, no flip, jitter 0.8 of brightness/contrast 0.4, pixel noise 0.05.
    16..95 px: the SimCLR/VICReg CIFAR recipe: crop 0.2..1, flip 0.5, jitter 0.8 of 0.4/0.4/0.2/0.1,
    grayscale 0.2, solarize 0.1, no blur. >= 96 px: the same plus blur with p 0.5.
    Saturation, hue and grayscale are 0 unless channels == 3.
    """
    rgb = channels == 3
    if image_size < 16:
        cfg = {"crop_scale": (0.6, 1.0), "flip_p": 0.0, "saturation": 0.0, "hue": 0.0, "grayscale_p": 0.0,
               "solarize_p": 0.0, "noise_std": 0.05}
    else:
        cfg = {"crop_scale": (0.2, 1.0), "flip_p": 0.5, "saturation": 0.2 * rgb, "hue": 0.1 * rgb,
               "grayscale_p": 0.2 * rgb, "solarize_p": 0.1, "noise_std": 0.0}
    cfg |= {"crop_ratio": (3 / 4, 4 / 3), "jitter_p": 0.8, "brightness": 0.4, "contrast": 0.4,
            "blur_p": 0.5 if image_size >= 96 else 0.0}
    if not isinstance(overrides, AugmentConfig):
        overrides = AugmentConfig.from_dict(overrides or {})
    given = dataclasses.asdict(overrides)
    return AugmentConfig(**cfg | {k: v for k, v in given.items() if v is not None})


class TwoViewAugment(nn.Module):
    """Random augmentation of whole batches with per-sample parameters, on the input's device.

    The recipe, in torchvision's order: random resized crop, horizontal flip, colour jitter (a random order of
    the four per image), grayscale, Gaussian blur, solarize, pixel noise. All per-image parameters of a call are
    drawn at once from torch's global CPU RNG (the pixel noise from the input device's), so torch.manual_seed
    makes it reproducible and the same seed gives the same crops, factors and choices on CPU and GPU.
    """

    def __init__(self, config: AugmentConfig, image_size: int, channels: int):
        super().__init__()
        c = default_augment(image_size, channels, config)
        for key in ("saturation", "hue", "grayscale_p"):
            if channels != 3 and getattr(c, key):
                raise ValueError(f"augment.{key}={getattr(c, key)} needs 3 channels but images have "
                                 f"{channels}; set it to 0")
        self.config, self.image_size = c, image_size
        self.blur_size = int(0.1 * image_size) | 1  # odd kernel, ~10% of the image as in SimCLR
        # factor ranges of torchvision's ColorJitter: [max(0, 1 - s), 1 + s] for the first three, [-h, h] for hue
        lo = [max(0.0, 1 - s) for s in (c.brightness, c.contrast, c.saturation)] + [-c.hue]
        hi = [1 + s for s in (c.brightness, c.contrast, c.saturation)] + [c.hue]
        self.jitter_lo, self.jitter_span = torch.tensor(lo), torch.tensor(hi) - torch.tensor(lo)

    def draw(self, n: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """Every random parameter for n images, on CPU, from one draw of the global RNG.

        boxes (n, 4) int (top, left, h, w); flip, gray, blur, solarize (n,) bool; factors (n, 4) (brightness,
        contrast, saturation, hue; neutral 1, 1, 1, 0 where jitter is not applied); order (n, 4) the jitter
        order per image; sigma (n,) of the blur.
        """
        c = self.config
        u = torch.rand(n, 36)  # 22 crop, flip, jitter gate, 4 factors, 4 order keys, gray, blur gate, sigma, solarize
        jitter = u[:, 23] < c.jitter_p
        factors = self.jitter_lo + self.jitter_span * u[:, 24:28]  # (n, 4)
        factors = torch.where(jitter[:, None], factors, torch.tensor([1.0, 1.0, 1.0, 0.0]))
        return {"boxes": ops.sample_crop_boxes(n, height, width, c.crop_scale, c.crop_ratio, u[:, :22]),
                "flip": u[:, 22] < c.flip_p, "factors": factors, "order": u[:, 28:32].argsort(1),
                "gray": u[:, 32] < c.grayscale_p, "blur": u[:, 33] < c.blur_p, "sigma": 0.1 + 1.9 * u[:, 34],
                "solarize": u[:, 35] < c.solarize_p}

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """x: (N, C, H, W) in [0, 1], p: draw(N, H, W) (on CPU) -> (N, C, S, S) in [0, 1]."""
        c, dev = self.config, x.device
        # where-to-apply subsets are found on CPU: no device sync on a GPU
        pick = {k: p[k].nonzero().squeeze(1).to(dev) for k in ("gray", "blur", "solarize") if p[k].any()}
        y = ops.resized_crop(x, p["boxes"].to(dev), p["flip"].to(dev), self.image_size)
        if p["factors"].ne(torch.tensor([1.0, 1.0, 1.0, 0.0])).any():
            ops.colour_jitter(y, p["factors"], p["order"])
        if "gray" in pick:
            i = pick["gray"]
            y[i] = ops.grayscale(y[i])
        if "blur" in pick and self.blur_size > 1:
            i = pick["blur"]
            y[i] = ops.gaussian_blur(y[i], p["sigma"][p["blur"]].to(dev), self.blur_size)
        if "solarize" in pick:
            i = pick["solarize"]
            y[i] = ops.solarize_(y[i])
        if c.noise_std:
            y.add_(torch.randn_like(y), alpha=c.noise_std)
        return y.clamp_(0, 1)

    def views(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """x: (N, C, H, W) in [0, 1] -> (k, N, C, S, S): k independent augmentations of every image."""
        n, ch, h, w = x.shape
        p = self.draw(k * n, h, w)  # view j of image i is row j * n + i
        out = torch.empty(k * n, ch, self.image_size, self.image_size, device=x.device)
        # On CPU the pipeline runs on chunks of <= CPU_CHUNK_FLOATS output floats, start to end: every op's
        # temporaries then stay in the cache (benchmarks/bench_augment.py).
        step = k * n if x.is_cuda else max(1, CPU_CHUNK_FLOATS // out[0].numel())
        for s in range(0, k * n, step):
            e = min(s + step, k * n)
            src = x[s % n:(e - 1) % n + 1] if s // n == (e - 1) // n else x[torch.arange(s, e, device=x.device) % n]
            out[s:e] = self.apply(src, {key: v[s:e] for key, v in p.items()})
        return out.view(k, n, ch, self.image_size, self.image_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) in [0, 1] -> two views, each (N, C, S, S) in [0, 1]."""
        v = self.views(x, 2)  # (2, N, C, S, S)
        return v[0], v[1]
