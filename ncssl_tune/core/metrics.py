"""Collapse metrics: pure functions on embedding matrices ``z: (M, D)`` (M samples, D dims).

Names and definitions: docs/definitions.md, and docs/metrics.md for LiDAR and α-ReQ (sources, conventions).
Everything is computed in float64 on the input's device.
Spectra come from the singular values of the (M, D) data matrix, obtained as eigenvalues of the
smaller Gram matrix (M×M when M < D, else D×D), so no D×D matrix is formed when M < D and the cost
is O(M·D·min(M, D)) — what matters when D = 8192 and M = 2048. When z is the output of a linear layer of
P < min(M, D) inputs (:class:`LinearHead`, an expander projector), :func:`collapse_metrics` works on a (P, D)
matrix with the same column Gram matrix as the centred z instead, and every decomposition is (P+1)×(P+1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ncssl_tune.core.linalg import LinearHead, all_finite, centred_low_rank, gram_spectra, low_rank_route

METRIC_NAMES: tuple[str, ...] = ("effective_rank", "effective_rank_frac", "entropy", "avg_corr", "std_l2",
                                  "alpha_req", "alpha_req_dev")
"""Scalar (float) keys of :func:`collapse_metrics`, before the suffix; ``entropy_cond`` and ``lidar`` are separate
(they need several augmented views of each sample)."""

_ENTROPY_EPS = 1e-4
_RANKME_EPS = 1e-7
LIDAR_DELTA = 1e-4  # ridge on Σ_w, as in the LiDAR paper and galilai-group/stable-pretraining
_CORR_BLOCK = 512  # columns per block of avg_corr's correlation matrix
_STD_SLAB = 256  # columns per slab of std_l2 (M = 2048 rows of float64: 4 MiB, in cache)


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
    return _entropy_rank(s, s.numel())


def _entropy_rank(values: Tensor, n: int) -> float:
    """exp(Shannon entropy) of p_k = v_k / Σv + 1e-7 over ``values: (k,)`` zero-padded to n entries (k <= n).

    RankMe's formula, shared by LiDAR. The 1e-7 is added after normalising, so all-zero values give ≈ 1, never
    n (adding it before, as stable-pretraining's LiDAR does, turns a fully collapsed spectrum into the maximum).
    """
    v = values.clamp_min(0)
    p = v / v.sum().clamp_min(torch.finfo(v.dtype).tiny) + _RANKME_EPS  # (k,)
    zeros = n - v.numel()  # each padded zero has p = 1e-7
    h = -(p * torch.log(p)).sum() - zeros * _RANKME_EPS * math.log(_RANKME_EPS)
    return float(torch.exp(h))


def lidar(views: Tensor, delta: float = LIDAR_DELTA) -> float:
    """LiDAR of ``views: (K, M, D)`` (K >= 2 augmented views of M >= 2 samples), between ≈ 1 and min(M - 1, D).

    Thilak et al., "LiDAR: Sensing Linear Probing Performance in Joint Embedding SSL Architectures", ICLR 2024:
    each sample is a surrogate class; with μ_i the mean of sample i's views and μ the mean of the μ_i,
    Σ_b = Σ_i (μ_i - μ)(μ_i - μ)ᵀ / (M - 1), Σ_w = Σ_ik (z_ik - μ_i)(z_ik - μ_i)ᵀ / (M(K - 1)) + δ·I,
    λ = eigenvalues of Σ_w^{-1/2} Σ_b Σ_w^{-1/2} (D of them), lidar = exp(-Σ p_k log p_k), p_k = λ_k/Σλ + 1e-7.
    Not scale invariant: δ is absolute, as in the paper.

    Every deviation lies in the span of the K·M centred rows, and outside it Σ_w = δ·I and Σ_b = 0 (eigenvalue
    0). So when K·M < D the problem is solved in an orthonormal basis of that span: O(D·(K·M)²) and no D×D
    matrix. Σ_w^{-1/2} Σ_b Σ_w^{-1/2} has the eigenvalues of L⁻¹ Σ_b L⁻ᵀ with
    Σ_w = L Lᵀ (Cholesky): both are similar to Σ_w⁻¹ Σ_b.
    """
    if views.ndim != 3 or views.shape[0] < 2 or views.shape[1] < 2:
        raise ValueError(f"views must have shape (K, M, D) with K >= 2, M >= 2, got {tuple(views.shape)}")
    v = views.detach().to(torch.float64)
    k, m, d = v.shape
    x = v - v.mean(dim=(0, 1))  # (K, M, D); Σ_b and Σ_w ignore a shift, the span needs it
    if k * m < d:
        # Rows in the orthonormal basis V of their span: X = U S Vᵀ gives X V = U S, from the Gram matrix
        # X Xᵀ = U S² Uᵀ. Directions with S = 0 get zero coordinates, which is exact (they are part of the
        # complement). Cheaper than a QR of the (D, K·M) rows.
        s2, u = torch.linalg.eigh(x.reshape(k * m, d) @ x.reshape(k * m, d).T)  # (K*M,), (K*M, K*M)
        x = (u * s2.clamp_min(0).sqrt()).reshape(k, m, k * m)  # (K, M, r), r = K*M
    r = x.shape[-1]
    mu = x.mean(dim=0)  # (M, r) per-sample means
    between = mu - mu.mean(dim=0)  # (M, r)
    sb = between.T @ between / (m - 1)  # (r, r)
    within = (x - mu).reshape(k * m, r)  # (K*M, r)
    sw = within.T @ within / (m * (k - 1)) + delta * torch.eye(r, dtype=x.dtype, device=x.device)  # (r, r)
    chol = torch.linalg.cholesky(sw)  # (r, r) lower
    a = torch.linalg.solve_triangular(chol, sb, upper=False)  # L⁻¹ Σ_b
    a = torch.linalg.solve_triangular(chol, a.T, upper=False)  # L⁻¹ Σ_b L⁻ᵀ (Σ_b symmetric), (r, r)
    lam = torch.linalg.eigvalsh((a + a.T) / 2)  # (r,); symmetrised against roundoff
    return _entropy_rank(lam, d)


ALPHA_FIT_MIN_RANK = 2


def alpha_fit_ranks(m: int, d: int) -> tuple[int, int]:
    """1-based eigenvalue ranks (first, last) that :func:`alpha_req` fits for M samples of D dimensions.

    From rank 2 (the leading eigenvalue is no part of the power-law body: reptrix and Stringer et al. start at
    rank 11 on 2048 dims, which our 64-1024 dims cannot afford) to half of r = min(M - 1, D), the number of
    eigenvalues M centred samples can make nonzero: near r the sample spectrum bends down whatever the true one
    does (Marchenko-Pastur edge).
    """
    return ALPHA_FIT_MIN_RANK, min(m - 1, d) // 2


def alpha_req(eigvals: Tensor, m: int) -> float:
    """α-ReQ: the power-law decay exponent α of a covariance spectrum, λ_j ∝ j^(-α).

    Agrawal et al., "α-ReQ: Assessing Representation Quality in Self-Supervised Learning by measuring
    eigenspectrum decay", NeurIPS 2022. ``eigvals: (D,)``, descending, of the centred covariance of M samples
    (:func:`spectrum`). Weighted least squares of log p_j on log j over the ranks of :func:`alpha_fit_ranks`,
    weight 1/j (each octave of ranks counts about equally, as in reptrix and Stringer et al. 2019), with
    p_j = λ_j / Σλ + 1e-7: scale-free, and zero eigenvalues stay finite, as in RankMe. Flat spectra (isotropic
    data, and also an all-identical Z) give ≈ 0; a spectrum that drops to zero inside the range (rank-k
    collapse) gives a large α. NaN when the range holds fewer than 3 ranks (min(M - 1, D) < 8).
    """
    lam = eigvals.detach().to(torch.float64).flatten()
    lo, hi = alpha_fit_ranks(m, lam.numel())
    if hi - lo + 1 < 3:
        return math.nan
    p = lam.clamp_min(0) / lam.clamp_min(0).sum().clamp_min(torch.finfo(lam.dtype).tiny) + _RANKME_EPS
    j = torch.arange(lo, hi + 1, dtype=torch.float64, device=lam.device)  # (n,) 1-based ranks
    x, y, w = torch.log(j), torch.log(p[lo - 1:hi]), 1.0 / j
    xm, ym = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
    slope = (w * (x - xm) * (y - ym)).sum() / (w * (x - xm) ** 2).sum()
    return float(-slope)


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
    return _avg_abs_corr(x - x.mean(dim=0), x.shape[0], x.abs().amax(dim=0), max_dims, seed)


def _avg_abs_corr(rows: Tensor, m: int, col_max: Tensor, max_dims: int = 2048, seed: int = 0) -> float:
    """:func:`avg_corr` of the Z (M, D) whose centred column Gram matrix is ``rowsᵀ rows``, ``rows: (R, D)``.

    Correlations only need Z_cᵀ Z_c, so ``rows`` may be Z_c itself (R = M) or any matrix with the same
    Gram matrix (:func:`~ncssl_tune.core.linalg.centred_low_rank`, R = P); ``col_max: (D,)`` is max_i |z_ij|, for the test of a
    constant dimension.
    """
    d = rows.shape[1]
    if d > max_dims:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(d, generator=gen)[:max_dims].sort().values.to(rows.device)
        rows, col_max, d = rows[:, idx], col_max[idx], max_dims  # (R, max_dims), (max_dims,)
    if d < 2:
        return 0.0
    std = (rows.pow(2).sum(dim=0) / m).sqrt()  # (D,) std over the M samples
    constant = std <= 1e-9 * col_max
    # dividing a constant dimension by inf zeroes it instead of producing 0/0
    rs = rows / torch.where(constant, torch.full_like(std, math.inf), std)  # (R, D)
    # corr = rsᵀ rs / M (D, D) is symmetric: its blocks on and above the diagonal suffice (10 of 16 products at
    # D = 2048), each summed while it is in cache
    total, diag = rs.new_zeros(()), rs.new_zeros(())
    for i in range(0, d, _CORR_BLOCK):
        for j in range(i, d, _CORR_BLOCK):
            corr = rs[:, i:i + _CORR_BLOCK].T @ rs[:, j:j + _CORR_BLOCK] / m  # (b, b) block of corr
            total += corr.abs().sum() * (1 if i == j else 2)
            if i == j:
                diag += corr.diagonal().abs().sum()
    return float((total - diag) / (d * (d - 1)))


def std_l2(z: Tensor) -> float:
    """Mean over dimensions of the std (over samples) of row-l2-normalised ``z: (M, D)``, M >= 2.

    ≈ 0 at total collapse, ≈ 1/√D for isotropic embeddings (Chen & He, "Exploring Simple Siamese
    Representation Learning", CVPR 2021, Sec. 4.1). std is the unbiased (1/(M-1)) estimate, two-pass (mean, then
    squared deviations), in float64 as ``F.normalize(z).std(dim=0)``; a (M, 256) slab of columns at a time, so each
    pass runs in cache: 3-4x faster than on the whole (M, D) float64 copy at D = 8192.
    """
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < 1:
        raise ValueError(f"std_l2 needs z of shape (M, D) with at least 2 samples, got {tuple(z.shape)}")
    x = z.detach()
    m, d = x.shape
    cols = [slice(j, j + _STD_SLAB) for j in range(0, d, _STD_SLAB)]
    sq = sum(x[:, c].to(torch.float64).square().sum(dim=1) for c in cols)  # (M,) squared row norms
    norm = sq.sqrt().clamp_min(1e-12)[:, None]  # (M, 1); F.normalize's eps
    total = 0.0
    for c in cols:
        u = x[:, c].to(torch.float64) / norm  # (M, slab) normalised rows
        u -= u.mean(dim=0)
        total += float(u.square_().sum(dim=0).div_(m - 1).sqrt_().sum())
    return total / d


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
    z: Tensor, thresholds: CollapseThresholds = CollapseThresholds(), suffix: str = "",
    head: LinearHead | None = None,
) -> dict[str, float | str | list[float]]:
    """All collapse metrics of ``z: (M, D)``, M >= 2, keys with ``suffix`` appended.

    Returns python floats for :data:`METRIC_NAMES`, the string ``collapse`` and ``spectrum``
    (list of D floats, descending), so the dict can be reported and logged as is.
    Raises ValueError if z is not finite (a diverged model has no meaningful collapse state).

    The same values as :func:`spectrum`, :func:`effective_rank`, :func:`avg_corr` and :func:`std_l2` on z, with
    one Gram matrix for the centred and the uncentred spectrum (:func:`~ncssl_tune.core.linalg.gram_spectra`). With ``head``, the layer
    that made z, and P < min(M, D), the spectra and correlations come from the (P, D) matrix of
    :func:`~ncssl_tune.core.linalg.centred_low_rank` instead of z (M, D): the (P+1)² decompositions cost ~1/60 of two 2048² ones.
    """
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"z must have shape (M, D) with M, D >= 1, got {tuple(z.shape)}")
    x = z.detach()  # (M, D) in its own dtype: the low-rank route needs no float64 copy of it
    m, d = x.shape
    if m < 2:
        raise ValueError(f"collapse metrics need at least 2 samples, got M={m}")
    if not all_finite(x):
        raise ValueError(f"z{suffix} of shape {tuple(x.shape)} contains non-finite values")
    col_max = x.abs().amax(dim=0).to(torch.float64)  # (D,)
    if head is not None:
        head.check(m, d)
    if head is not None and low_rank_route(head.a.shape[1], m, d):
        rows, mean = centred_low_rank(head)  # (P, D), (D,)
    else:
        x64 = x.to(torch.float64)
        mean = x64.mean(dim=0)  # (D,)
        rows = x64 - mean  # (M, D)
    sq_centred, sq = gram_spectra(rows, mean, m)
    spec = sq_centred[:d] / m  # (min(R, D),)
    if spec.numel() < d:
        spec = torch.cat([spec, spec.new_zeros(d - spec.numel())])  # (D,): C has rank < R
    n = min(m, d)
    er = _entropy_rank(sq[:n].sqrt(), n)
    out: dict[str, float | str | list[float]] = {
        "effective_rank": er,
        "effective_rank_frac": er / n,
        "entropy": gaussian_entropy(spec, d),
        "avg_corr": _avg_abs_corr(rows, m, col_max),
        "std_l2": std_l2(x),
        "alpha_req": alpha_req(spec, m),
    }
    # α is not monotone in quality (≈ 1 is what Agrawal et al. associate with good probes): the distance from 1
    # is the quantity with a direction (lower is better), for objectives and predictor rankings
    out["alpha_req_dev"] = abs(out["alpha_req"] - 1.0)
    out["collapse"] = classify_collapse(out["std_l2"], out["effective_rank_frac"], d, thresholds)
    out["spectrum"] = spec.cpu().tolist()
    return {k + suffix: v for k, v in out.items()}
