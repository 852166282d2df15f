"""Two-view augmentation of whole batches on the training device, with per-sample random parameters (kornia).

Defaults depend on the image size: digits (8x8, grayscale), CIFAR-like (32x32 RGB) and 96+ px.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import kornia.augmentation as K
import torch
from torch import nn

CPU_CHUNK_FLOATS = 2**22  # 16 MB of float32 per augmentation call on CPU: 32 px batches stay whole

_PROBS = ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")
_RANGES = {"brightness": (0.0, math.inf), "contrast": (0.0, math.inf), "saturation": (0.0, math.inf),
           "hue": (0.0, 0.5), "noise_std": (0.0, 1.0)} | {p: (0.0, 1.0) for p in _PROBS}


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class AugmentConfig:
    """Augmentation strengths; None means "the default for this image size" (see default_augment)."""

    crop_scale: tuple[float, float] | None = None  # area fraction kept by the random resized crop
    crop_ratio: tuple[float, float] | None = None  # aspect-ratio range of the crop
    flip_p: float | None = None  # horizontal flip; 0 for digits, which are not mirror-invariant
    jitter_p: float | None = None  # probability of colour jitter
    brightness: float | None = None  # factor drawn from [1 - b, 1 + b]
    contrast: float | None = None  # same form as brightness
    saturation: float | None = None  # same form; needs 3 channels
    hue: float | None = None  # shift drawn from [-h, h], h <= 0.5; needs 3 channels
    grayscale_p: float | None = None  # hides colour so it cannot carry the whole signal; needs 3 channels
    blur_p: float | None = None  # Gaussian blur, sigma 0.1..2, kernel ~10% of the image
    solarize_p: float | None = None  # invert pixels above 0.5
    noise_std: float | None = None  # additive Gaussian pixel noise, always applied when > 0

    def __post_init__(self) -> None:
        for key in ("crop_scale", "crop_ratio"):
            v, hi = getattr(self, key), 1.0 if key == "crop_scale" else math.inf
            if v is None:
                continue
            if (not isinstance(v, (tuple, list)) or len(v) != 2 or not all(_is_num(a) for a in v)
                    or not 0 < v[0] <= v[1] <= hi):
                raise ValueError(f"augment.{key} must be (low, high) with 0 < low <= high <= {hi}, got {v!r}")
            setattr(self, key, (float(v[0]), float(v[1])))  # YAML gives lists
        for key, (lo, hi) in _RANGES.items():
            v = getattr(self, key)
            if v is not None and (not _is_num(v) or not lo <= v <= hi):
                raise ValueError(f"augment.{key} must be a number in [{lo}, {hi}], got {v!r}")

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        """Build from a config mapping; unknown keys are errors that list the allowed ones."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"augment: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
        return cls(**d)


def default_augment(image_size: int, channels: int, overrides: dict | None = None) -> AugmentConfig:
    """The recipe for this image size with every field set, then `overrides` (checked as in from_dict).

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
    given = dataclasses.asdict(AugmentConfig.from_dict(overrides or {}))
    return AugmentConfig(**cfg | {k: v for k, v in given.items() if v is not None})


class TwoViewAugment(nn.Module):
    """Random augmentation of whole batches with per-sample parameters (kornia) on the input's device.

    Randomness comes from torch's global RNG, so torch.manual_seed makes it reproducible.
    """

    def __init__(self, config: AugmentConfig, image_size: int, channels: int):
        super().__init__()
        c = default_augment(image_size, channels, {k: v for k, v in dataclasses.asdict(config).items()
                                                   if v is not None})
        for key in ("saturation", "hue", "grayscale_p"):
            if channels != 3 and getattr(c, key):
                raise ValueError(f"augment.{key}={getattr(c, key)} needs 3 channels but images have "
                                 f"{channels}; set it to 0")
        self.config = c
        # cropping_mode="resample" crops with one batched warp; kornia's default "slice" loops over images.
        ops: list[nn.Module] = [K.RandomResizedCrop((image_size, image_size), scale=c.crop_scale,
                                                    ratio=c.crop_ratio, cropping_mode="resample")]
        if c.flip_p:
            ops.append(K.RandomHorizontalFlip(p=c.flip_p))
        if c.jitter_p and (c.brightness or c.contrast or c.saturation or c.hue):
            ops.append(K.ColorJitter(c.brightness, c.contrast, c.saturation, c.hue, p=c.jitter_p))
        if c.grayscale_p:
            ops.append(K.RandomGrayscale(p=c.grayscale_p))
        if c.blur_p:
            k = int(0.1 * image_size) | 1  # odd kernel, ~10% of the image as in SimCLR
            ops.append(K.RandomGaussianBlur((k, k), (0.1, 2.0), p=c.blur_p))
        if c.solarize_p:
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=c.solarize_p))  # threshold = 0.5
        if c.noise_std:
            ops.append(K.RandomGaussianNoise(std=c.noise_std, p=1.0))
        self.ops = nn.Sequential(*ops)

    def views(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """x: (N, C, H, W) in [0, 1] -> (k, N, C, H, W): k independent augmentations of every image."""
        # One pipeline call on k stacked copies: kornia's per-call overhead dominates on small images. On CPU,
        # large images go in chunks of <= CPU_CHUNK_FLOATS: each op makes full-size temporaries, and a chunk that
        # stays in cache is ~2x faster at 96 px than one 256-image call (benchmarks/bench_augment.py).
        stacked = x.repeat(k, 1, 1, 1)  # (k * N, C, H, W)
        step = stacked.shape[0] if x.is_cuda else max(1, CPU_CHUNK_FLOATS // x[0].numel())
        out = torch.cat([self.ops(part) for part in stacked.split(step)]).clamp_(0, 1)
        return out.reshape(k, *x.shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) in [0, 1] -> two views, each (N, C, H, W) in [0, 1]."""
        v = self.views(x, 2)  # (2, N, C, H, W)
        return v[0], v[1]
