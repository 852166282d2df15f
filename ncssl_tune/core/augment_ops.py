"""Batched augmentation ops with per-sample parameters: torchvision's formulas, vectorised over the batch.

Each op takes a float batch ``x: (N, C, H, W)`` and per-sample parameters as tensors on x's device, and works
in place where it can (the caller owns x): on CPU the batch is a cache-sized chunk, and a temporary the size of
the batch would leave the cache. Random parameters are drawn elsewhere (augment.py), so every op here is
deterministic and tested against torchvision's per-image functional ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


def sample_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                      u: torch.Tensor) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for n images at once -> (n, 4) int64 boxes (top, left, h, w).

    u: (n, 22) uniforms in [0, 1): 10 attempts of (area, log-ratio) and the two offsets. As in torchvision,
    the first attempt whose rounded box fits is kept; if none of the 10 fits, the centre crop of the whole
    image with its aspect ratio clamped into `ratio`.
    """
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0:20:2])  # (n, 10)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, 1:20:2])  # (n, 10)
    w = torch.sqrt(area * aspect).round().long()
    h = torch.sqrt(area / aspect).round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, 10)
    first = fits.long().argmax(1, keepdim=True)  # index of the first fitting attempt (0 when none fits)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)  # (n,)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    none_fits = ~fits.any(1)
    w, h = w.masked_fill(none_fits, fw), h.masked_fill(none_fits, fh)
    top = (u[:, 20] * (height - h + 1)).long().clamp_(max=height - h)  # randint(0, H - h + 1)
    left = (u[:, 21] * (width - w + 1)).long().clamp_(max=width - w)
    top = torch.where(none_fits, (height - h) // 2, top)
    left = torch.where(none_fits, (width - w) // 2, left)
    return torch.stack((top, left, h, w), 1)


def _source_coords(start: torch.Tensor, length: torch.Tensor, size_in: int, size_out: int) -> torch.Tensor:
    """(n, size_out): grid_sample's normalised coordinate of each output pixel when the span [start, start +
    length) of a size_in axis is resized to size_out pixels as F.interpolate(align_corners=False) does it.

    start, length: (n,) int. The source coordinate is clamped into the span, as interpolate clamps into its input,
    so no pixel outside the crop leaks in at its edges.
    """
    i = torch.arange(size_out, device=start.device, dtype=torch.float32) + 0.5  # (size_out,)
    lf = length.float()[:, None]  # (n, 1)
    src = (i * lf / size_out - 0.5).clamp_(min=0).minimum(lf - 1) + start[:, None]  # (n, size_out), pixels
    return src.mul_(2 / size_in).add_(1 / size_in - 1)  # pixel p -> (2p + 1) / size - 1 (align_corners=False)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box, resize it bilinearly to size x size, mirror it where flip is True.

    x: (N, C, H, W); boxes: (N, 4) int (top, left, h, w); flip: (N,) bool -> (N, C, size, size).
    One grid_sample call, one pass over the output: the crop, the resize and the flip are all in the sampling
    grid, which is separable (row coordinates by column coordinates). Equal to F.interpolate(x[..., t:t+h,
    l:l+w], size, mode="bilinear", align_corners=False), torchvision's resized_crop when it upsamples (a crop of
    at most the whole image always does), then the flip.
    """
    n, _, hgt, wid = x.shape
    gy = _source_coords(boxes[:, 0], boxes[:, 2], hgt, size)  # (N, S)
    gx = _source_coords(boxes[:, 1], boxes[:, 3], wid, size)  # (N, S)
    gx = torch.where(flip[:, None], gx.flip(1), gx)  # a flipped image reads its columns right to left
    grid = torch.stack((gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)), 3)  # (N, S, S, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, 1, H, W) luma; a 1-channel image is its own gray."""
    if x.shape[1] == 1:
        return x.clone()
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze_(1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x: (N, 3, H, W) in [0, 1], shift: (N,) in [-0.5, 0.5] -> (N, 3, H, W): hue rotated by shift turns.

    torchvision's adjust_hue (RGB -> HSV, h += shift mod 1, back) without building the HSV image. With
    V = max, V*S = max - min = delta and q = 6h in [0, 6), channel n (R, G, B: c = 3, 5, 1) is
    V - delta * clamp(2 - d, 0, 1), d = the distance from q to c around the circle of length 6 = 3 - ||q - c| - 3|.
    Branches are float masks (comparisons written into float tensors, lerp by them): torch.where and bool
    casts are ~15x slower per element than arithmetic on CPU.
    """
    r, g, b = x.unbind(1)  # (N, H, W) each
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    delta = torch.minimum(r, g)
    torch.minimum(delta, b, out=delta)
    torch.sub(maxc, delta, out=delta)
    is_r = torch.ge(r, maxc, out=torch.empty_like(maxc))  # 1.0 where red is the max (red wins ties, as there)
    is_g = torch.ge(g, maxc, out=torch.empty_like(maxc))
    # delta * 6h = g - b | b - r + 2 delta | r - g + 4 delta for a red | green | blue max
    h6 = torch.lerp((r - g).add_(delta, alpha=4), (b - r).add_(delta, alpha=2), is_g)
    h6 = torch.lerp(h6, g - b, is_r)
    h6.div_(delta + 1e-30)  # in [-1, 5); a gray pixel (delta 0) comes back as max whatever its hue
    h6.add_((6 * shift + 1).view(-1, 1, 1))  # in [-3, 9): + 1 moves the circle's origin (c + 1 below)
    h6.sub_(torch.floor(h6 * (1 / 6)).mul_(6))  # mod 6 (torch.remainder is ~5x slower)
    d = h6[:, None] - torch.tensor([4.0, 6.0, 2.0], device=x.device).view(1, 3, 1, 1)  # (N, 3, H, W), c + 1
    d.abs_().sub_(3).abs_().clamp_(1, 2).sub_(1)  # clamp(2 - (3 - ||q - c| - 3|), 0, 1)
    return torch.addcmul(maxc[:, None], d, delta[:, None], value=-1)


def colour_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision ColorJitter on each image with its own factors and order, in place; returns x.

    x: (N, C, H, W) in [0, 1]; factors: (N, 4) brightness, contrast, saturation (1 = unchanged) and hue shift
    (0 = unchanged); order: (N, 4) a permutation of 0..3 per image (0 brightness, 1 contrast, 2 saturation,
    3 hue); factors and order may stay on CPU. Brightness, contrast and saturation are each a blend
    x <- f x + (1 - f) t toward black, the image's mean gray, or its gray, clamped to [0, 1] as torchvision
    does; so step j applies to every image whichever of the three its order puts there, in one pass.
    """
    n, dev = x.shape[0], x.device
    # per step j (columns), on the parameters' device (CPU: no GPU sync for the decisions)
    f = torch.where(order < 3, factors.gather(1, order.clamp(max=2)), 1.0)  # (N, 4) blend factor
    to_gray = torch.where(order == 2, 1 - f, 0.0)  # weight of the gray image (saturation)
    to_mean = torch.where(order == 1, 1 - f, 0.0)  # weight of the mean gray (contrast)
    hue = (order == 3) & (factors[:, 3:] != 0)  # (N, 4)
    scale, blend, any_hue = (f != 1).any(0).tolist(), ((to_gray != 0) | (to_mean != 0)).any(0).tolist(), hue.any(0).tolist()
    f, to_gray, to_mean = (t.to(dev).view(n, 4, 1, 1, 1) for t in (f, to_gray, to_mean))  # (N, 4, 1, 1, 1)
    for j in range(4):
        if blend[j]:
            gray = grayscale(x)  # (N, 1, H, W)
            mean = gray.mean((1, 2, 3), keepdim=True).mul_(to_mean[:, j])  # before gray is scaled in place
            target = gray.mul_(to_gray[:, j]).add_(mean)
            torch.addcmul(target, x, f[:, j], out=x).clamp_(0, 1)
        elif scale[j]:
            x.mul_(f[:, j]).clamp_(0, 1)
        if any_hue[j]:
            i = hue[:, j].nonzero().squeeze(1)
            x[i.to(dev)] = adjust_hue(x[i.to(dev)], factors[i, 3].to(dev))
    return x


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """sigma: (N,) -> (N, size) normalised 1-D Gaussian kernels on torchvision's grid (-(size-1)/2 .. (size-1)/2)."""
    half = (size - 1) / 2
    t = torch.linspace(-half, half, size, device=sigma.device)  # (size,)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)  # (N, size)
    return k / k.sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's gaussian_blur with a per-image sigma and reflect padding: (N, C, H, W) -> (N, C, H, W).

    Separable: two sums of `size` shifted copies weighted per image (N, C are batch dims of the multiply-adds),
    cheaper than a grouped convolution with per-image kernels for the 3..9-tap kernels used here.
    """
    if size == 1:
        return x
    n, _, h, w = x.shape
    k = gaussian_kernels(sigma, size).view(n, size, 1, 1, 1)  # (N, size, 1, 1, 1)
    r = size // 2
    p = F.pad(x, (r, r, r, r), mode="reflect")  # (N, C, H+2r, W+2r)
    rows = p[:, :, 0:h] * k[:, 0]  # (N, C, H, W+2r)
    for t in range(1, size):
        rows.addcmul_(p[:, :, t:t + h], k[:, t])
    out = rows[..., 0:w] * k[:, 0]  # (N, C, H, W)
    for t in range(1, size):
        out.addcmul_(rows[..., t:t + w], k[:, t])
    return out


def solarize_(x: torch.Tensor) -> torch.Tensor:
    """Invert the pixels >= 0.5 in place (torchvision's solarize with threshold 0.5); returns x: (N, C, H, W)."""
    return torch.where(x >= 0.5, 1 - x, x, out=x)
