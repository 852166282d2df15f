from __future__ import annotations

import dataclasses

import pytest
import torch

from ncssl_tune.augment import AugmentConfig, TwoViewAugment, default_augment


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
    import ncssl_tune.augment

    monkeypatch.setattr(ncssl_tune.augment, "CPU_CHUNK_FLOATS", 3 * 96 * 96 * 3)  # 3 images per call
    aug = TwoViewAugment(default_augment(96, 3), 96, 3)
    x = torch.rand(1, 3, 96, 96).expand(4, -1, -1, -1)
    v = aug.views(x, 2)  # 8 stacked images in chunks of 3, 3, 2
    assert v.shape == (2, 4, 3, 96, 96) and v.min() >= 0 and v.max() <= 1
    flat = v.reshape(8, -1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))


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
