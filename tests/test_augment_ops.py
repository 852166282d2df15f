"""The batched ops against torchvision's per-image functional ops (an independent implementation) and end points."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from ncssl_tune.core import augment_ops as ops

# Float32 tolerance: every op here computes the same formula as torchvision in a different order (a fused blend,
# a separable blur, HSV without the HSV image), so results differ by rounding only: a few ulps of values in
# [0, 1], < 1e-5. A wrong formula (half-pixel shift, wrong weight, wrong order) is off by > 1e-2.
TOL = 1e-5
# resized_crop samples through grid_sample's [-1, 1] coordinates: the round trip from pixel coordinates moves a
# sample point by a few float32 ulps of the size (~1e-5 px at 40 px), which moves a value by that fraction of a
# neighbour difference (<= 1); a half-pixel error in the crop geometry is off by ~0.1 on noise.
CROP_TOL = 2e-5


@pytest.mark.parametrize("size", [32, 40])
def test_resized_crop_matches_interpolate_and_torchvision_on_fixed_boxes(size):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32)
    boxes = torch.tensor([[3, 5, 20, 17], [0, 0, 32, 32], [10, 2, 7, 30], [31, 31, 1, 1], [0, 16, 32, 16],
                          [12, 0, 9, 9]])  # (top, left, h, w): inner, whole, thin, one pixel, edge-touching
    flip = torch.tensor([False, True, False, True, True, False])
    y = ops.resized_crop(x, boxes, flip, size)
    assert y.shape == (6, 3, size, size)
    for i, (t, left, h, w) in enumerate(boxes.tolist()):
        crop = x[i:i + 1, :, t:t + h, left:left + w]
        ref = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
        tv = TF.resized_crop(x[i], t, left, h, w, [size, size], antialias=True)  # upsampling: antialias is moot
        if flip[i]:
            ref, tv = ref.flip(-1), tv.flip(-1)
        assert (y[i] - ref).abs().max() < CROP_TOL, i
        assert (y[i] - tv).abs().max() < CROP_TOL, i


def test_whole_image_box_without_flip_is_the_identity():
    x = torch.rand(4, 3, 16, 16)
    y = ops.resized_crop(x, torch.tensor([[0, 0, 16, 16]] * 4), torch.zeros(4, dtype=torch.bool), 16)
    assert (y - x).abs().max() < CROP_TOL


def test_crop_boxes_follow_torchvision_get_params():
    n, s = 20000, 96
    torch.manual_seed(1)
    b = ops.sample_crop_boxes(n, s, s, (0.2, 0.5), (3 / 4, 4 / 3), torch.rand(n, 22)).double()
    top, left, h, w = b.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= s).all() and (left + w <= s).all()
    # no attempt is rejected in this range (w <= sqrt(0.5 * 4/3) * 96 < 96): the area fraction is uniform on
    # [0.2, 0.5] and the log aspect ratio uniform on [log 3/4, log 4/3], up to rounding w and h to whole pixels
    area, log_ratio = h * w / s**2, torch.log(w / h)
    slack = 2 * 0.5 / (math.sqrt(0.2) * s)  # relative error of rounding both sides of the smallest box
    assert area.min() > 0.2 * (1 - slack) and area.max() < 0.5 * (1 + slack)
    assert log_ratio.abs().max() < math.log(4 / 3) + 2 * slack
    sd_mean = 0.3 / math.sqrt(12 * n)  # standard error of the mean of U(0.2, 0.5)
    assert abs(area.mean() - 0.35) < 5 * sd_mean + 1e-3  # + the rounding bias
    assert abs(area.quantile(0.25) - 0.275) < 0.01 and abs(area.quantile(0.75) - 0.425) < 0.01
    assert abs(log_ratio.mean()) < 0.01 and abs(log_ratio.quantile(0.9) - 0.8 * math.log(4 / 3)) < 0.02
    # offsets uniform over the valid positions: both ends reached, mean position in the middle
    rel = top / (s - h).clamp(min=1)
    assert (top == 0).any() and (top == s - h).any() and abs(rel.mean() - 0.5) < 0.02


def test_crop_boxes_fall_back_to_the_clamped_centre_crop():
    # an aspect ratio of 2..3 never fits an area >= 0.9 of a square: torchvision's fallback, the whole width
    # at the nearest allowed ratio (2), centred
    b = ops.sample_crop_boxes(50, 32, 32, (0.9, 1.0), (2.0, 3.0), torch.rand(50, 22))
    assert (b == torch.tensor([8, 0, 16, 32])).all()


def test_grayscale_is_torchvision_luma():
    x = torch.rand(5, 3, 8, 8)
    ref = torch.stack([TF.rgb_to_grayscale(im) for im in x])
    assert (ops.grayscale(x) - ref).abs().max() < TOL


def test_hue_matches_torchvision_including_gray_pixels_and_ties():
    torch.manual_seed(2)
    x = torch.rand(12, 3, 16, 16)
    x[:, :, :4] = x[:, :1, :4]  # gray pixels
    x[:, 1, 4:8] = x[:, 0, 4:8]  # red == green
    x[:, 2, 8:10] = x[:, 1, 8:10]  # green == blue
    shift = torch.cat([torch.tensor([-0.5, 0.5, 0.0]), torch.rand(9) - 0.5])
    ref = torch.stack([TF.adjust_hue(im, float(s)) for im, s in zip(x, shift, strict=True)])
    assert (ops.adjust_hue(x, shift) - ref).abs().max() < TOL


def test_colour_jitter_is_torchvision_in_each_images_order():
    torch.manual_seed(3)
    n = 48
    x = torch.rand(n, 3, 12, 12)
    factors = torch.cat([0.5 + torch.rand(n, 3), 0.2 * torch.rand(n, 1) - 0.1], 1)  # factors > 1 hit the clamp
    factors[:4] = torch.tensor([1.0, 1.0, 1.0, 0.0])  # not jittered
    order = torch.rand(n, 4).argsort(1)
    assert len({tuple(o) for o in order.tolist()}) > 12  # many different orders in one batch
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    refs = []
    for im, f, o in zip(x, factors.tolist(), order.tolist(), strict=True):
        for j in o:
            im = fns[j](im, f[j])
        refs.append(im)
    y = ops.colour_jitter(x.clone(), factors, order)
    assert (y - torch.stack(refs)).abs().max() < TOL
    assert torch.equal(y[:4], x[:4])


def test_colour_jitter_on_one_channel():
    x = torch.rand(6, 1, 8, 8)
    factors = torch.tensor([[1.3, 0.7, 1.0, 0.0]] * 6)
    order = torch.tensor([[1, 0, 2, 3]] * 6)
    ref = torch.stack([TF.adjust_brightness(TF.adjust_contrast(im, 0.7), 1.3) for im in x])
    assert (ops.colour_jitter(x.clone(), factors, order) - ref).abs().max() < TOL


@pytest.mark.parametrize("size", [3, 9])
def test_blur_matches_torchvision_per_image_sigma(size):
    torch.manual_seed(4)
    x = torch.rand(6, 3, 20, 20)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.8])
    ref = torch.stack([TF.gaussian_blur(im, [size, size], [float(s)] * 2) for im, s in zip(x, sigma, strict=True)])
    assert (ops.gaussian_blur(x, sigma, size) - ref).abs().max() < TOL


def test_blur_keeps_a_constant_image_and_the_mean():
    sigma = torch.tensor([0.1, 1.0, 2.0])
    c = torch.full((3, 3, 96, 96), 0.37)
    assert (ops.gaussian_blur(c, sigma, 9) - 0.37).abs().max() < TOL
    x = torch.rand(3, 3, 96, 96)
    y = ops.gaussian_blur(x, sigma, 9)
    # reflect padding re-weights the 4-pixel border, so the mean moves by ~1e-4 on noise; a kernel summing to
    # 1.01 would move it by 5e-3
    assert (y.mean((1, 2, 3)) - x.mean((1, 2, 3))).abs().max() < 1e-3
    assert y[2].std() < 0.5 * x[2].std()  # sigma 2 averages ~50 pixels of noise


def test_solarize_inverts_exactly_the_pixels_from_one_half():
    x = torch.tensor([0.0, 0.2, 0.4999, 0.5, 0.7, 1.0]).view(1, 1, 1, 6)
    assert torch.equal(ops.solarize_(x.clone()), torch.tensor([0.0, 0.2, 0.4999, 0.5, 0.3, 0.0]).view(1, 1, 1, 6))
    y = torch.rand(4, 3, 8, 8)
    assert torch.equal(ops.solarize_(y.clone()), TF.solarize(y, 0.5))
