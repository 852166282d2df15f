"""The linear algebra behind :func:`ncssl_tune.core.metrics.collapse_metrics`: both spectra of z from one Gram matrix,
and the low-rank route for z = a Wᵀ + b made by a linear layer of P < min(M, D) inputs.

Every function here returns, to round-off, what the literal definitions in docs/definitions.md give on z; only the
shapes of the matrices that are decomposed change. Derivations and measured precision: docs/metrics.md, "How the
eval-subset metrics are computed". Everything in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of every tensor is finite.

    A sum is non-finite whenever an entry is (inf and NaN propagate) and costs a tenth of an isfinite mask; the
    mask decides only then, as a finite sum may also overflow.
    """
    return all(math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all()) for t in tensors)


@dataclass(frozen=True)
class LinearHead:
    """The last layer of the projector when it is an ``nn.Linear``: z = a Wᵀ + b.

    ``a: (M, P)`` its input for the M samples of z, ``weight: (D, P)``, ``bias: (D,)`` or None. Given to
    ``collapse_metrics``, it lets every decomposition be (P+1)×(P+1) instead of min(M, D)² when
    P < min(M, D) (an expander: P = 512 to D = 8192).
    """

    a: Tensor
    weight: Tensor
    bias: Tensor | None = None

    def check(self, m: int, d: int) -> None:
        """ValueError unless a Wᵀ + b has the shape (M, D) of z and a and W are finite."""
        a, w, b = self.a, self.weight, self.bias
        p = a.shape[-1]
        if a.ndim != 2 or a.shape[0] != m or tuple(w.shape) != (d, p) or (b is not None and tuple(b.shape) != (d,)):
            raise ValueError(f"LinearHead does not produce z of shape {(m, d)}: a {tuple(a.shape)}, weight "
                             f"{tuple(w.shape)}, bias {None if b is None else tuple(b.shape)} (expected a (M, P), "
                             "weight (D, P), bias (D,) or None)")
        if not all_finite(a.detach(), w.detach()):
            raise ValueError("LinearHead: a or weight contains non-finite values")


def low_rank_route(p: int, m: int, d: int) -> bool:
    """Whether ``collapse_metrics`` takes the (P, D) route for M samples of z = a Wᵀ + b, a: (M, P), z: (M, D).

    Only when P < min(M, D): otherwise the direct route's decompositions are no larger.
    """
    return p < min(m, d)


def centred_low_rank(head: LinearHead) -> tuple[Tensor, Tensor]:
    """(rows (P, D), mean (D,)) of z = a Wᵀ + b with rowsᵀ rows = Z_cᵀ Z_c, Z_c the centred z (M, D); P < M.

    Z_c = a_c Wᵀ (a_c = a - 1 āᵀ; the bias cancels) and z̄ = W ā + b. With a_c = Q R (Q orthonormal columns),
    Z_cᵀ Z_c = W Rᵀ Qᵀ Q R Wᵀ = (R Wᵀ)ᵀ (R Wᵀ). Householder QR is backward stable (R is exact for a_c + δ,
    |δ| ≲ 1e-16·|a_c|), so R Wᵀ carries ~1e-16·|a||W| of round-off per entry where the float32 forward rounded
    z itself by ~6e-8·|a||W|: the spectra are those of the exact a Wᵀ + b, as precise as the direct route.
    """
    a = head.a.detach().to(torch.float64)  # (M, P)
    w = head.weight.detach().to(a.device, torch.float64)  # (D, P)
    a_mean = a.mean(dim=0)  # (P,)
    r = torch.linalg.qr(a - a_mean, mode="r").R  # (P, P) as P < M
    mean = w @ a_mean  # (D,)
    if head.bias is not None:
        mean = mean + head.bias.detach().to(a.device, torch.float64)
    return r @ w.T, mean  # (P, D), (D,)


def gram_spectra(rows: Tensor, mean: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(σ² of Z_c, σ² of Z), each descending, from one Gram matrix; ``rows: (R, D)`` with rowsᵀ rows = Z_cᵀ Z_c.

    Z = Z_c + 1 z̄ᵀ and 1ᵀ Z_c = 0 give ZᵀZ = Z_cᵀ Z_c + M z̄ z̄ᵀ = [rows; √M z̄ᵀ]ᵀ [rows; √M z̄ᵀ]: the
    uncentred Gram matrix is the centred one with terms added (a border row and column when R < D), never
    subtracted, so each keeps the precision of a Gram matrix formed on its own (errors ~1e-16·σ_max²).
    R values (centred) and R + 1 (uncentred) when R < D, else D and D.
    """
    r, d = rows.shape
    if r < d:
        g = rows @ rows.T  # (R, R)
        side = math.sqrt(m) * (rows @ mean)  # (R,)
        corner = (m * mean.dot(mean)).reshape(1)
        gu = torch.cat([torch.cat([g, side[:, None]], dim=1), torch.cat([side, corner])[None]])  # (R+1, R+1)
    else:
        g = rows.T @ rows  # (D, D)
        gu = g + m * torch.outer(mean, mean)  # (D, D)
    # roundoff can make the zero eigenvalues of a PSD matrix slightly negative
    return torch.linalg.eigvalsh(g).flip(0).clamp_min(0), torch.linalg.eigvalsh(gu).flip(0).clamp_min(0)
