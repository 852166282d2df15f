"""An example plugin for ncssl-tune (docs/plugins.md): a loss, a backbone and a dataset."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncssl_tune.core.data import DataSource, ImageData, load_dataset
from ncssl_tune.core.plugins import Range


def align_uniform_loss(
    z1: Tensor,
    z2: Tensor,
    *,
    alpha: Annotated[float, Range(gt=0)] = 2.0,
    t: Annotated[float, Range(gt=0)] = 2.0,
    weight: Annotated[float, Range(ge=0)] = 1.0,
) -> dict[str, Tensor]:
    """Alignment and uniformity on the hypersphere (Wang & Isola, ICML 2020; reference code
    SsnL/align_uniform). ``z1, z2: (N, D)``.

    loss_align = mean ||ẑ1 − ẑ2||^alpha over the pairs; loss_uniform = log mean exp(−t·||ẑi − ẑj||²) over the
    distinct pairs of one view, averaged over both views; loss = loss_align + weight · loss_uniform.
    """
    x, y = F.normalize(z1, dim=1), F.normalize(z2, dim=1)  # (N, D) each
    align = (x - y).norm(dim=1).pow(alpha).mean()
    uniform = (uniformity(x, t) + uniformity(y, t)) / 2
    return {"loss": align + weight * uniform, "loss_align": align, "loss_uniform": uniform}


def uniformity(x: Tensor, t: float) -> Tensor:
    """log of the mean Gaussian potential over the N(N−1)/2 distinct pairs of rows of x: (N, D)."""
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


class MLPBackbone(nn.Module):
    """Flatten, one hidden layer: (N, C, H, W) -> (N, out_dim)."""

    def __init__(self, in_channels: int, image_size: int, out_dim: int = 64):
        super().__init__()
        self.out_dim = out_dim  # the width F of h, read by ncssl-tune to size the projector
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 256),
                                 nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (N, out_dim)


def mlp_backbone(in_channels: int, image_size: int) -> nn.Module:
    return MLPBackbone(in_channels, image_size)


def _load_digits_inverted(*, root, seed, test_fraction, image_size, synthetic) -> ImageData:
    """The embedded digits with their intensities inverted (1 − x): a dataset needs only to return ImageData."""
    d = load_dataset("digits", seed=seed, test_fraction=test_fraction, image_size=image_size)
    return ImageData(1 - d.train_x, d.train_y, 1 - d.test_x, d.test_y, d.num_classes, "digits_inverted")


DIGITS_INVERTED = DataSource(_load_digits_inverted)  # no files, so no `expected` layout under data.root
