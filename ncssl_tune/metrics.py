"""Collapse metrics: pure functions on embedding matrices ``z: (M, D)`` (M samples, D dims).

Names and definitions: docs/definitions.md. Everything is computed in float64 on the input's device.
Spectra come from the singular values of the (M, D) data matrix, obtained as eigenvalues of the
smaller Gram matrix (M×M when M < D, else D×D), so no D×D matrix is formed when M < D and the cost
is O(M·D·min(M, D)) — what matters when D = 8192 and M = 2048.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

METRIC_NAMES: tuple[str, ...] = ("effective_rank", "effective_rank_frac", "entropy", "avg_corr", "std_l2")
"""Scalar (float) keys of :func:`collapse_metrics`, before the suffix; ``entropy_cond`` is separate."""

_ENTROPY_EPS = 1e-4
_RANKME_EPS = 1e-7


def _as_matrix(z: Tensor, name: str = "z") -> Tensor:
    if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"{name} must have shape (M, D) with M, D >= 1, got {tuple(z.shape)}")
    return z.detach().to(torch.float64)


def _squared_singular_values(x: Tensor) -> Tensor:
    """σ² of ``x: (R, D)``, descending, shape (min(R, D),).

    From the eigenvalues of the smaller Gram matrix: in float64 the errors (~1e-16·σ_max² on σ²,
    so ≲ 1e-8·σ_max on σ) stay below the 1e-4 entropy floor and the 1e-7 RankMe floor, and this
    is ~10× faster than ``svdvals`` on CPU for a (2048, 8192) matrix (1.4 s vs 14 s).
    """
    r, d = x.shape
    gram = x @ x.T if r < d else x.T @ x  # (min(R, D), min(R, D))
    # roundoff can make the zero eigenvalues of a PSD matrix slightly negative
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def _spectrum_from_rows(x: Tensor, denom: float, d: int) -> Tensor:
    """Eigenvalues of xᵀx / denom, descending, zero-padded to length d; ``x: (R, D)``."""
    # xᵀx = V S² Vᵀ, so its nonzero eigenvalues are the squared singular values of x
    eig = _squared_singular_values(x) / denom  # (min(R, D),)
    if eig.numel() < d:
        eig = torch.cat([eig, eig.new_zeros(d - eig.numel())])  # (D,)
    return eig


def spectrum(z: Tensor) -> Tensor:
    """Eigenvalues of C = (1/M) Σ_i (z_i - z̄)(z_i - z̄)ᵀ, descending: ``z: (M, D)`` -> ``(D,)``.

    Computed as σ²/M from the singular values σ of the centred (M, D) matrix; when M < D the
    D - M missing eigenvalues (exactly zero: C has rank < M) are zero-padded.
    """
    x = _as_matrix(z)
    m, d = x.shape
    return _spectrum_from_rows(x - x.mean(dim=0), m, d)


def effective_rank(z: Tensor) -> float:
    """RankMe effective rank of ``z: (M, D)``, between ≈ 1 and min(M, D).

    Garrido et al., "RankMe: Assessing the Downstream Performance of Pretrained Self-Supervised
    Representations by Their Rank", ICML 2023: σ = singular values of Z (not centred),
    p_k = σ_k / Σσ + 1e-7, rank = exp(-Σ p_k log p_k). A constant Z (including all zeros) has a
    single nonzero σ (or none) and gives ≈ 1.
    """
    s = _squared_singular_values(_as_matrix(z)).sqrt()  # (min(M, D),)
    # clamp: an all-zero Z would divide 0 by 0; with it every p_k = 1e-7 and the rank is ≈ 1
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + _RANKME_EPS
    return float(torch.exp(-(p * torch.log(p)).sum()))


def gaussian_entropy(eigvals: Tensor, d: int) -> float:
    """Entropy per dimension (nats) of a Gaussian with covariance eigenvalues ``eigvals: (k,)``.

    ½·log det(2πe(C + 1e-4·I)) / d = ½·Σ_k log(2πe(λ_k + 1e-4)) / d, with the d - k eigenvalues
    not given taken as zero. The 1e-4 floor keeps collapsed directions finite (-4.6 nats each
    instead of -∞), as in the seed's information-bottleneck estimate.
    """
    lam = eigvals.detach().to(torch.float64).flatten()
    if lam.numel() > d:
        raise ValueError(f"got {lam.numel()} eigenvalues for d={d} dimensions")
    two_pi_e = 2 * math.pi * math.e
    total = torch.log(two_pi_e * (lam.clamp_min(0) + _ENTROPY_EPS)).sum()
    total = total + (d - lam.numel()) * math.log(two_pi_e * _ENTROPY_EPS)
    return float(0.5 * total / d)


def entropy_cond(views: Tensor) -> float:
    """Gaussian estimate of H(Z|X), nats per dimension, from ``views: (K, M, D)``, K >= 2.

    views[k, i] is the embedding of the k-th augmentation of sample i. Within-sample covariance
    C_w = 1/(M(K-1)) Σ_i Σ_k (z_ik - z̄_i)(z_ik - z̄_i)ᵀ, then :func:`gaussian_entropy`. The
    eigenvalues come from the singular values of the stacked (K·M, D) deviations, so no D×D
    matrix is formed when K·M < D.
    """
    if views.ndim != 3 or views.shape[0] < 2 or views.shape[1] < 1:
        raise ValueError(f"views must have shape (K, M, D) with K >= 2, M >= 1, got {tuple(views.shape)}")
    v = views.detach().to(torch.float64)
    k, m, d = v.shape
    dev = (v - v.mean(dim=0, keepdim=True)).reshape(k * m, d)  # (K*M, D)
    return gaussian_entropy(_spectrum_from_rows(dev, m * (k - 1), d), d)


def avg_corr(z: Tensor, *, max_dims: int = 2048, seed: int = 0) -> float:
    """Mean |corr_ij| over pairs i ≠ j of dimensions of ``z: (M, D)``; 0 = decorrelated, 1 = redundant.

    A dimension whose std is zero (numerically: below 1e-9 of its largest |value|) has an undefined
    correlation; it counts as 0 so a constant Z gives 0, not NaN (total collapse is reported by
    ``std_l2`` instead). When D > ``max_dims`` the mean is estimated on a fixed random subset of
    ``max_dims`` dimensions (drawn from a generator seeded with ``seed``, so identical across
    calls and epochs): the full D×D product at D = 8192 is too costly on CPU every epoch.
    """
    x = _as_matrix(z)
    m, d = x.shape
    if d > max_dims:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(d, generator=gen)[:max_dims].sort().values
        x = x[:, idx.to(x.device)]  # (M, max_dims)
        d = max_dims
    if d < 2:
        return 0.0
    xc = x - x.mean(dim=0)
    std = xc.pow(2).mean(dim=0).sqrt()  # (D,)
    constant = std <= 1e-9 * x.abs().amax(dim=0)
    # dividing a constant dimension by inf zeroes it instead of producing 0/0
    xs = xc / torch.where(constant, torch.full_like(std, math.inf), std)  # (M, D)
    corr = xs.T @ xs / m  # (D, D)
    off = corr.abs().sum() - corr.diagonal().abs().sum()
    return float(off / (d * (d - 1)))


def std_l2(z: Tensor) -> float:
    """Mean over dimensions of the std (over samples) of row-l2-normalised ``z: (M, D)``, M >= 2.

    ≈ 0 at total collapse, ≈ 1/√D for isotropic embeddings (Chen & He, "Exploring Simple Siamese
    Representation Learning", CVPR 2021, Sec. 4.1). std is the unbiased (1/(M-1)) estimate.
    """
    x = _as_matrix(z)
    if x.shape[0] < 2:
        raise ValueError(f"std_l2 needs at least 2 samples, got M={x.shape[0]}")
    return float(F.normalize(x, dim=1).std(dim=0).mean())


@dataclass(frozen=True)
class CollapseThresholds:
    """When :func:`classify_collapse` calls an embedding collapsed.

    total_std: "total" when std_l2·√D < total_std. For unit vectors u_i, Σ_j Var_j = 1 - |ū|²
        = 1 - (mean pairwise cosine similarity), so std_l2·√D ≈ sqrt(1 - mean cosine) (an upper
        bound, reached when the spread is even over dimensions). 0.05 thus means a mean cosine
        similarity above ≈ 0.9975: all embeddings point the same way. Healthy isotropic
        embeddings give ≈ 1 and low-rank ones in general position ≈ 0.8, a wide margin.
    dim_rank_frac: "dimensional" when effective_rank / min(M, D) < dim_rank_frac. Isotropic data
        gives ≈ 0.8-1; 0.05 flags only severe collapse (fewer than 1 in 20 usable directions).
        Milder partial collapse of projector outputs is normal even for healthy runs (Jing et al.,
        "Understanding Dimensional Collapse in Contrastive SSL", ICLR 2022) and stays "none";
        read effective_rank_frac itself for degrees.
    """

    total_std: float = 0.05
    dim_rank_frac: float = 0.05


def classify_collapse(
    std_l2: float, effective_rank_frac: float, d: int, thresholds: CollapseThresholds = CollapseThresholds()
) -> str:
    """Collapse state: "total", "dimensional" or "none" (see :class:`CollapseThresholds`).

    Total collapse is checked first: a constant Z also has effective rank ≈ 1. ``d`` is D, the
    embedding width; non-finite inputs are a ValueError rather than a silent "none".
    """
    if not (math.isfinite(std_l2) and math.isfinite(effective_rank_frac)):
        raise ValueError(
            f"cannot classify collapse from non-finite metrics: std_l2={std_l2}, "
            f"effective_rank_frac={effective_rank_frac}"
        )
    if std_l2 * math.sqrt(d) < thresholds.total_std:
        return "total"
    if effective_rank_frac < thresholds.dim_rank_frac:
        return "dimensional"
    return "none"


def collapse_metrics(
    z: Tensor, thresholds: CollapseThresholds = CollapseThresholds(), suffix: str = ""
) -> dict[str, float | str | list[float]]:
    """All collapse metrics of ``z: (M, D)``, M >= 2, keys with ``suffix`` appended.

    Returns python floats for :data:`METRIC_NAMES`, the string ``collapse`` and ``spectrum``
    (list of D floats, descending), so the dict can be reported and logged as is.
    Raises ValueError if z is not finite (a diverged model has no meaningful collapse state).
    """
    x = _as_matrix(z)
    m, d = x.shape
    if m < 2:
        raise ValueError(f"collapse metrics need at least 2 samples, got M={m}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"z{suffix} of shape {tuple(x.shape)} contains non-finite values")
    spec = spectrum(x)
    er = effective_rank(x)
    out: dict[str, float | str | list[float]] = {
        "effective_rank": er,
        "effective_rank_frac": er / min(m, d),
        "entropy": gaussian_entropy(spec, d),
        "avg_corr": avg_corr(x),
        "std_l2": std_l2(x),
    }
    out["collapse"] = classify_collapse(out["std_l2"], out["effective_rank_frac"], d, thresholds)
    out["spectrum"] = spec.cpu().tolist()
    return {k + suffix: v for k, v in out.items()}
