"""Self-supervised losses on two views: pure functions plus the ``LOSSES`` registry.

Every loss takes the embeddings of two augmented views, ``z1: (N, D)`` and ``z2: (N, D)``, and
returns ``dict[str, Tensor]``: ``"loss"`` (the scalar to minimise) and its named scalar terms, so
the trainer can log each one. Hyperparameters are keyword-only and default to the papers' values;
the config layer validates user keys against these keyword names, so they are part of the API.

Each loss is its method's whole (symmetrised) loss as it reads when both branches are the same network. When
the branches differ (a predictor, a stop-gradient or an EMA target, ``model.*``), the trainer takes the loss on
(p1, t2) and (p2, t1), online output of one view against the target of the other, and averages the two
(``core/mechanisms.py``); for a loss symmetric in its views that average is the method's own symmetrisation.

Losses are computed in at least float32 with autocast disabled: the variance, covariance and
whitening terms lose their meaning in bf16 (8 mantissa bits), and the trainer may run the
network under bf16 autocast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[..., dict[str, Tensor]]

_WHITEN_MAX_EPS = 0.1


class WhiteningError(RuntimeError):
    """W-MSE whitening failed even with the largest shrinkage; the trial has diverged."""


def off_diagonal(m: Tensor) -> Tensor:
    """Flattened off-diagonal elements of a square matrix ``m: (D, D)`` -> ``(D*(D-1),)``.

    Same trick as facebookresearch/barlowtwins ``main.py``: dropping the last element and viewing
    the rest as ``(D-1, D+1)`` puts every diagonal element in column 0.
    """
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"off_diagonal needs a square matrix, got shape {tuple(m.shape)}")
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()  # (D*(D-1),)


def _check_views(z1: Tensor, z2: Tensor, min_batch: int = 1) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must both have shape (N, D) and match, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] < min_batch:
        raise ValueError(f"this loss needs a batch of at least {min_batch}, got N={z1.shape[0]}")


def _full_precision(fn: LossFn) -> LossFn:
    """Run ``fn`` with autocast off and z1, z2 upcast to float32 (float64 is kept as is)."""

    @functools.wraps(fn)
    def wrapper(z1: Tensor, z2: Tensor, **kwargs) -> dict[str, Tensor]:
        if z1.dtype != torch.float64:
            z1 = z1.float()
        if z2.dtype != torch.float64:
            z2 = z2.float()
        with torch.autocast(device_type=z1.device.type, enabled=False):
            return fn(z1, z2, **kwargs)

    return wrapper


@_full_precision
def vicreg_loss(
    z1: Tensor, z2: Tensor, *, lam: float = 25.0, mu: float = 25.0, nu: float = 1.0, gamma: float = 1.0
) -> dict[str, Tensor]:
    """VICReg: variance-invariance-covariance regularisation.

    Bardes, Ponce, LeCun, "VICReg", ICLR 2022; reference code facebookresearch/vicreg
    ``main_vicreg.py``. ``z1, z2: (N, D)``, N >= 2.

    loss = lam * mean((z1-z2)^2) + mu * [relu(gamma - std) averaged over dims, halved per view]
           + nu * [sum of squared off-diagonal covariances / D, summed over both views]
    """
    _check_views(z1, z2, min_batch=2)
    n, d = z1.shape
    loss_inv = F.mse_loss(z1, z2)

    x = z1 - z1.mean(dim=0)
    y = z2 - z2.mean(dim=0)
    # the 1e-4 keeps the gradient of sqrt finite when a dimension has collapsed
    std_x = torch.sqrt(x.var(dim=0) + 1e-4)  # (D,)
    std_y = torch.sqrt(y.var(dim=0) + 1e-4)  # (D,)
    loss_var = F.relu(gamma - std_x).mean() / 2 + F.relu(gamma - std_y).mean() / 2

    cov_x = x.T @ x / (n - 1)  # (D, D)
    cov_y = y.T @ y / (n - 1)  # (D, D)
    loss_cov = off_diagonal(cov_x).pow(2).sum() / d + off_diagonal(cov_y).pow(2).sum() / d

    loss = lam * loss_inv + mu * loss_var + nu * loss_cov
    return {"loss": loss, "loss_inv": loss_inv, "loss_var": loss_var, "loss_cov": loss_cov}


@_full_precision
def barlow_twins_loss(
    z1: Tensor, z2: Tensor, *, lam: float = 0.0051, scale: float = 1.0
) -> dict[str, Tensor]:
    """Barlow Twins: drive the cross-correlation matrix of the two views to the identity.

    Zbontar et al., "Barlow Twins", ICML 2021; reference code facebookresearch/barlowtwins
    ``main.py``. ``z1, z2: (N, D)``, N >= 2. Each view is standardised along the batch as by
    ``BatchNorm1d(affine=False)`` in training mode (biased variance, eps=1e-5), then
    C = z1ᵀ z2 / N and loss = scale * (Σ_i (1 - C_ii)² + lam * Σ_{i≠j} C_ij²).
    """
    _check_views(z1, z2, min_batch=2)
    n = z1.shape[0]
    a = F.batch_norm(z1, None, None, training=True, eps=1e-5)  # (N, D)
    b = F.batch_norm(z2, None, None, training=True, eps=1e-5)  # (N, D)
    c = a.T @ b / n  # (D, D)
    loss_on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    loss_off_diag = off_diagonal(c).pow(2).sum()
    loss = scale * (loss_on_diag + lam * loss_off_diag)
    return {"loss": loss, "loss_on_diag": loss_on_diag, "loss_off_diag": loss_off_diag}


def whiten(z: Tensor, eps: float = 0.0) -> tuple[Tensor, int]:
    """Whiten ``z: (n, D)`` by Cholesky: returns ``(ẑ: (n, D), retries)`` with Cov(ẑ) = I.

    As ``Whitening2d`` in htdt/self-supervised (Ermolov et al., "Whitening for Self-Supervised
    Representation Learning", ICML 2021): Σ = (1-eps)·Cov + eps·I with Cov using 1/(n-1),
    Σ = L Lᵀ, ẑ = (z - mean) L⁻ᵀ. When the Cholesky factorisation fails (Σ not positive
    definite, or non-finite) the shrinkage is raised to max(10·eps, 1e-6), ... up to 0.1 and the
    attempt repeated; ``retries`` counts those repeats. Raises ``WhiteningError`` if even
    eps = 0.1 fails (e.g. NaN embeddings).
    """
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"whiten needs z of shape (n, D) with n >= 2, got {tuple(z.shape)}")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"whitening eps must be in [0, 1], got {eps}")
    n, d = z.shape
    zc = z - z.mean(dim=0)  # (n, D)
    cov = zc.T @ zc / (n - 1)  # (D, D)
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    retries = 0
    while True:
        sigma = (1 - eps) * cov + eps * eye  # (D, D)
        chol, info = torch.linalg.cholesky_ex(sigma)  # (D, D) lower
        if int(info) == 0 and bool(torch.isfinite(chol).all()):
            break
        if eps >= _WHITEN_MAX_EPS:
            raise WhiteningError(
                f"Cholesky whitening of a ({n}, {d}) sub-batch failed after {retries} retries "
                f"(last eps={eps:g}, max {_WHITEN_MAX_EPS}); embeddings are degenerate or non-finite"
            )
        eps = min(max(10 * eps, 1e-6), _WHITEN_MAX_EPS)
        retries += 1
    # ẑᵀ = L⁻¹ zcᵀ, i.e. ẑ = zc L⁻ᵀ, without forming the inverse
    zw = torch.linalg.solve_triangular(chol, zc.T, upper=False).T  # (n, D)
    return zw, retries


@_full_precision
def wmse_loss(
    z1: Tensor, z2: Tensor, *, w_size: int = 128, w_iter: int = 1, eps: float = 0.0
) -> dict[str, Tensor]:
    """W-MSE: MSE between l2-normalised embeddings after whitening each view.

    Ermolov et al., "Whitening for Self-Supervised Representation Learning", ICML 2021;
    reference code htdt/self-supervised ``methods/wmse.py``. ``z1, z2: (N, D)``.

    ``w_iter`` times, a random permutation of the batch (torch's global RNG, so seed it for
    reproducibility) is split into sub-batches of ``w_size``; each view of each sub-batch is
    whitened separately (:func:`whiten`) and loss = mean over pairs of (2 - 2·cos(ẑ1, ẑ2)),
    averaged over the iterations. Requires N % w_size == 0 and w_size >= 2·D so each
    sub-batch covariance can be full rank. ``whitening_retries`` counts Cholesky retries.
    """
    _check_views(z1, z2)
    n, d = z1.shape
    if w_size < 2 * d or n % w_size != 0:
        allowed = [w for w in range(2 * d, n + 1) if n % w == 0]
        raise ValueError(
            f"wmse needs w_size >= 2*D and N % w_size == 0, got w_size={w_size}, D={d}, N={n}; "
            f"allowed w_size for this N and D: {allowed or 'none (increase N or reduce D)'}"
        )
    if w_iter < 1:
        raise ValueError(f"wmse needs w_iter >= 1, got w_iter={w_iter}")
    loss = z1.new_zeros(())
    retries = 0
    for _ in range(w_iter):
        perm = torch.randperm(n, device=z1.device).view(-1, w_size)  # (N / w_size, w_size)
        w1 = torch.empty_like(z1)
        w2 = torch.empty_like(z2)
        for idx in perm:
            w1[idx], r1 = whiten(z1[idx], eps)
            w2[idx], r2 = whiten(z2[idx], eps)
            retries += r1 + r2
        cos = F.cosine_similarity(w1, w2, dim=1)  # (N,)
        loss = loss + (2 - 2 * cos).mean()
    loss = loss / w_iter
    return {"loss": loss, "whitening_retries": z1.new_tensor(float(retries))}


@_full_precision
def simclr_loss(z1: Tensor, z2: Tensor, *, temperature: float = 0.1) -> dict[str, Tensor]:
    """SimCLR's NT-Xent (InfoNCE) over the 2N embeddings of both views, cosine similarity.

    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
    ICML 2020; reference code google-research/simclr ``objective.py``. ``z1, z2: (N, D)``,
    N >= 2. For each of the 2N samples the positive is its other view and the 2N-2 remaining
    samples are negatives; the cross-entropy is averaged over all 2N anchors.
    """
    _check_views(z1, z2, min_batch=2)
    if temperature <= 0:
        raise ValueError(f"simclr temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    logits = z @ z.T / temperature  # (2N, 2N)
    # a sample is not its own negative
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # (2N,)
    loss = F.cross_entropy(logits, targets)
    return {"loss": loss}


@_full_precision
def invariance_loss(z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
    """MSE between the two views alone: the negative control that must collapse totally.

    Without a variance, decorrelation or contrastive term any constant map is a global minimum
    (the failure mode motivating Bardes et al. 2022 and Zbontar et al. 2021). ``z1, z2: (N, D)``.
    """
    _check_views(z1, z2)
    loss_inv = F.mse_loss(z1, z2)
    return {"loss": loss_inv, "loss_inv": loss_inv}


@_full_precision
def simsiam_loss(z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
    """SimSiam's negative cosine similarity, symmetrised: −½·cos(z1, z2) − ½·cos(z2, z1), averaged over the batch.

    Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021; reference code
    facebookresearch/simsiam ``main_simsiam.py`` (``nn.CosineSimilarity(dim=1)``). ``z1, z2: (N, D)``.
    The predictor and the stop-gradient are the model's (``model.predictor``, ``model.stop_grad``): with them the
    trainer takes this loss on (p1, sg(z2)) and (p2, sg(z1)) and averages, which is SimSiam's
    −½·cos(p1, sg(z2)) − ½·cos(p2, sg(z1)) (core/mechanisms.py). ``cos_sim`` is the mean cosine similarity.
    """
    _check_views(z1, z2)
    cos = F.cosine_similarity(z1, z2, dim=1)  # (N,)
    # cos is symmetric, so −½·cos(z1, z2) − ½·cos(z2, z1) is −cos(z1, z2)
    return {"loss": -cos.mean(), "cos_sim": cos.mean()}


@_full_precision
def byol_loss(z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
    """BYOL's regression loss 2 − 2·cos, summed over the two directions as BYOL's L + L̃, averaged over the batch.

    Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020; reference code google-deepmind/deepmind-research
    ``byol/byol_experiment.py`` (``regression_loss`` in ``byol/utils/helpers.py``: the squared distance of the
    l2-normalised vectors, which is 2 − 2·cos). ``z1, z2: (N, D)``. The predictor and the EMA target are the
    model's: the trainer takes this loss on (p1, sg(ξ-z2)) and (p2, sg(ξ-z1)) and averages, which is BYOL's
    mean of (2 − 2·cos(p1, z'2)) + (2 − 2·cos(p2, z'1)) (core/mechanisms.py). ``cos_sim`` is the mean cosine.
    """
    _check_views(z1, z2)
    cos = (F.normalize(z1, dim=1) * F.normalize(z2, dim=1)).sum(dim=1)  # (N,)
    # 2 − 2·cos is symmetric, so ℓ(z1, z2) + ℓ(z2, z1) = 2·ℓ(z1, z2)
    return {"loss": 2 * (2 - 2 * cos).mean(), "cos_sim": cos.mean()}


LOSSES: dict[str, LossFn] = {
    "vicreg": vicreg_loss,
    "barlow_twins": barlow_twins_loss,
    "wmse": wmse_loss,
    "simclr": simclr_loss,
    "invariance": invariance_loss,
    "simsiam": simsiam_loss,
    "byol": byol_loss,
}
