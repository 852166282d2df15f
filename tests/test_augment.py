from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ncssl_tune.core.augment import AugmentConfig, TwoViewAugment, default_augment


@pytest.mark.parametrize("channels, size", [(1, 8), (3, 32)])
def test_two_views_shapes_range_and_difference(channels, size):
    aug = TwoViewAugment(default_augment(size, channels), size, channels)
    x = torch.rand(16, channels, size, size)
    v1, v2 = aug(x)
    assert v1.shape == v2.shape == x.shape
    for v in (v1, v2):
        assert v.min() >= 0 and v.max() <= 1
    assert not torch.allclose(v1, v2) and not torch.allclose(v1, x)
    assert aug.views(x, 3).shape == (3, 16, channels, size, size)


def test_augment_reproducible_under_manual_seed():
    aug = TwoViewAugment(default_augment(32, 3), 32, 3)
    x = torch.rand(8, 3, 32, 32)
    torch.manual_seed(7)
    a = aug(x)
    torch.manual_seed(7)
    b = aug(x)
    c = aug(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_augment_is_per_sample():
    aug = TwoViewAugment(default_augment(32, 3), 32, 3)
    v1, _ = aug(torch.rand(1, 3, 32, 32).expand(8, -1, -1, -1))
    assert not torch.allclose(v1[0], v1[1])


def test_chunked_cpu_calls_keep_shape_range_and_per_sample_randomness(monkeypatch):
    import ncssl_tune.core.augment

    aug = TwoViewAugment(default_augment(96, 3), 96, 3)
    x = torch.rand(1, 3, 96, 96).expand(4, -1, -1, -1)
    torch.manual_seed(5)
    whole = aug.views(x, 2)
    monkeypatch.setattr(ncssl_tune.core.augment, "CPU_CHUNK_FLOATS", 3 * 96 * 96 * 3)  # 3 images per call
    torch.manual_seed(5)
    v = aug.views(x, 2)  # 8 stacked images in chunks of 3, 3, 2; the second straddles the two views
    assert v.shape == (2, 4, 3, 96, 96) and v.min() >= 0 and v.max() <= 1
    flat = v.reshape(8, -1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))
    assert (v - whole).abs().max() < 1e-5  # parameters are drawn once per call, before the chunks


def crop_tol(size: int) -> float:
    """grid_sample takes [-1, 1] coordinates: the round trip from pixels moves a sample point by a few float32
    ulps of `size` pixels, which changes a value by at most that fraction of a neighbour difference (<= 1).
    A half-pixel error in the crop geometry is off by ~0.1 on noise."""
    return 4e-7 * size


# every random op off: what is left of the recipe is the crop
_OFF = {"flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0, "noise_std": 0.0}
_WHOLE = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}


@pytest.mark.parametrize("channels, size", [(1, 8), (3, 32), (3, 96)])
def test_all_strengths_zero_is_the_identity(channels, size):
    aug = TwoViewAugment(AugmentConfig(**_OFF, **_WHOLE, saturation=0.0, hue=0.0), size, channels)
    x = torch.rand(5, channels, size, size)
    v = aug.views(x, 3)
    assert (v - x).abs().max() < crop_tol(size)


def test_only_the_crop_when_every_other_op_is_off():
    aug = TwoViewAugment(AugmentConfig(**_OFF), 32, 3)
    x = torch.rand(64, 3, 32, 32)
    torch.manual_seed(0)
    y = aug(x)[0]
    torch.manual_seed(0)
    boxes = aug.draw(128, 32, 32)["boxes"][:64]  # the same draw: the first view is rows 0..63
    for i, (t, left, h, w) in enumerate(boxes.tolist()):
        ref = torch.nn.functional.interpolate(x[i:i + 1, :, t:t + h, left:left + w], size=(32, 32), mode="bilinear",
                                              align_corners=False)[0]
        assert (y[i] - ref).abs().max() < 1e-5
    assert (boxes[:, 2] * boxes[:, 3]).float().std() > 50  # the boxes do vary


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_flip_frequency(p):
    aug = TwoViewAugment(AugmentConfig(**(_OFF | {"flip_p": p}), **_WHOLE), 16, 3)
    x = torch.rand(1000, 3, 16, 16)
    torch.manual_seed(1)
    v = aug.views(x, 2).reshape(2000, 3, 16, 16)
    xx = x.repeat(2, 1, 1, 1)
    same = ((v - xx).abs().amax((1, 2, 3)) < 1e-5)
    flipped = ((v - xx.flip(-1)).abs().amax((1, 2, 3)) < 1e-5)
    assert bool((same ^ flipped).all())  # every view is the image or its mirror
    assert abs(flipped.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / 2000) + 1e-9


def test_drawn_parameters_stay_in_the_configured_ranges():
    cfg = AugmentConfig(jitter_p=0.8, brightness=0.4, contrast=1.5, saturation=0.2, hue=0.1, blur_p=0.5)
    aug = TwoViewAugment(cfg, 32, 3)
    torch.manual_seed(2)
    p = aug.draw(20000, 32, 32)
    f = p["factors"]
    jittered = (f != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(1)
    assert abs(jittered.float().mean().item() - 0.8) < 0.015
    for j, (lo, hi) in enumerate([(0.6, 1.4), (0.0, 2.5), (0.8, 1.2), (-0.1, 0.1)]):  # contrast 1.5: [0, 2.5]
        col = f[jittered, j]
        assert col.min() >= lo and col.max() <= hi
        assert col.min() < lo + 0.01 * (hi - lo) and col.max() > hi - 0.01 * (hi - lo)  # the whole range is used
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(20000, 4))  # a permutation per image
    assert len({tuple(o) for o in p["order"].tolist()}) == 24
    sigma = p["sigma"]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.05) < 0.02
    for key, prob in (("flip", 0.5), ("blur", 0.5), ("gray", 0.2), ("solarize", 0.1)):
        assert abs(p[key].float().mean().item() - prob) < 0.015, key


def test_grayscale_and_solarize_when_always_applied():
    x = torch.rand(8, 3, 32, 32)
    gray = TwoViewAugment(AugmentConfig(**(_OFF | {"grayscale_p": 1.0}), **_WHOLE), 32, 3)(x)[0]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert (gray[:, :1] - TF.rgb_to_grayscale(x)).abs().max() < 1e-5
    sol = TwoViewAugment(AugmentConfig(**(_OFF | {"solarize_p": 1.0}), **_WHOLE), 32, 3)(x)[0]
    assert (sol - torch.where(x >= 0.5, 1 - x, x)).abs().max() < 1e-5


def test_noise_has_the_configured_std():
    aug = TwoViewAugment(AugmentConfig(**(_OFF | {"noise_std": 0.05}), **_WHOLE), 8, 1)
    x = torch.full((500, 1, 8, 8), 0.5)
    assert abs((aug(x)[0] - x).std().item() - 0.05) < 0.002


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_gives_the_cpu_result_under_the_same_seed():
    aug = TwoViewAugment(default_augment(96, 3), 96, 3)  # no pixel noise: every parameter comes from the CPU RNG
    x = torch.rand(64, 3, 96, 96)
    torch.manual_seed(3)
    cpu = aug.views(x, 2)
    torch.manual_seed(3)
    gpu = aug.views(x.cuda(), 2)
    assert gpu.is_cuda and (gpu.cpu() - cpu).abs().max() < 1e-4


def test_default_augment_per_image_size():
    digits, cifar, stl = default_augment(8, 1), default_augment(32, 3), default_augment(96, 3)
    assert digits.flip_p == 0 and digits.saturation == digits.hue == digits.grayscale_p == 0
    assert digits.crop_scale == (0.6, 1.0) and digits.noise_std > 0
    assert cifar.crop_scale == (0.2, 1.0) and cifar.flip_p == 0.5 and cifar.jitter_p == 0.8
    assert (cifar.brightness, cifar.contrast, cifar.saturation, cifar.hue) == (0.4, 0.4, 0.2, 0.1)
    assert cifar.grayscale_p == 0.2 and cifar.blur_p == 0 and cifar.solarize_p == 0.1
    assert stl.blur_p > 0
    assert default_augment(32, 1).grayscale_p == 0
    for cfg in (digits, cifar, stl):
        assert None not in dataclasses.asdict(cfg).values()
    assert default_augment(32, 3, {"flip_p": 0.0}).flip_p == 0.0


def test_none_fields_take_the_size_default():
    aug = TwoViewAugment(AugmentConfig(flip_p=0.0), 8, 1)
    assert aug.config == dataclasses.replace(default_augment(8, 1), flip_p=0.0)


@pytest.mark.parametrize("bad, match", [
    ({"flip_p": 1.5}, r"augment.flip_p must be a number in \[0.0, 1.0\]"),
    ({"solarize_p": -0.1}, "augment.solarize_p"),
    ({"hue": 0.6}, r"augment.hue must be a number in \[0.0, 0.5\]"),
    ({"crop_scale": (0.8, 0.2)}, "augment.crop_scale must be \\(low, high\\) with 0 < low <= high <= 1.0"),
    ({"crop_scale": [0.0, 1.0]}, "augment.crop_scale"),
    ({"crop_ratio": 1.0}, "augment.crop_ratio"),
    ({"brightness": "0.4"}, "augment.brightness"),
    ({"jitter": 0.8}, "unknown key.*allowed: crop_scale, crop_ratio, flip_p"),
])
def test_bad_augment_config(bad, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig.from_dict(bad)
    with pytest.raises(ValueError, match=match):
        default_augment(32, 3, bad)


def test_colour_ops_need_three_channels():
    with pytest.raises(ValueError, match="augment.saturation=0.2 needs 3 channels"):
        TwoViewAugment(AugmentConfig(saturation=0.2), 8, 1)
    with pytest.raises(ValueError, match="augment.flip_p"):
        dataclasses.replace(default_augment(8, 1), flip_p=2.0)
