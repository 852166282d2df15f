from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ncssl_tune.core import metrics
from ncssl_tune.core.metrics import (
    METRIC_NAMES,
    CollapseThresholds,
    avg_corr,
    classify_collapse,
    collapse_metrics,
    effective_rank,
    entropy_cond,
    gaussian_entropy,
    lidar,
    spectrum,
    std_l2,
)
from ncssl_tune.spec import SpecError, load_spec
from ncssl_tune.vocab import LABEL_FREE, OBJECTIVES

TWO_PI_E = 2 * math.pi * math.e


def gaussian(m: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed))


def low_rank(m: int, d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=g))  # (D, k) orthonormal columns
    return torch.randn(m, k, generator=g) @ basis.T  # (M, D), rank k


def np_cov(z: np.ndarray) -> np.ndarray:
    return np.cov(z, rowvar=False, bias=True).reshape(z.shape[1], z.shape[1])


def np_entropy(c: np.ndarray) -> float:
    d = c.shape[0]
    sign, logdet = np.linalg.slogdet(TWO_PI_E * (c + 1e-4 * np.eye(d)))
    assert sign > 0
    return 0.5 * logdet / d


def test_constant_embeddings_are_total_collapse():
    z = torch.tensor([[0.3, -1.2, 2.0, 0.7]]).repeat(64, 1)
    out = collapse_metrics(z)
    assert out["effective_rank"] == pytest.approx(1.0, abs=0.01)
    assert out["avg_corr"] == 0.0
    assert out["std_l2"] == pytest.approx(0.0, abs=1e-12)
    assert out["collapse"] == "total"
    assert effective_rank(torch.zeros(16, 8)) == pytest.approx(1.0, abs=0.01)


def test_isotropic_gaussian_is_not_collapsed():
    d = 16
    out = collapse_metrics(gaussian(2000, d))
    assert out["effective_rank"] >= 0.9 * d
    assert out["effective_rank_frac"] >= 0.9
    assert out["avg_corr"] < 0.05
    assert out["collapse"] == "none"


@pytest.mark.parametrize("k", [1, 3, 6])
def test_rank_k_data_has_effective_rank_k(k):
    assert effective_rank(low_rank(1000, 32, k)) == pytest.approx(k, rel=0.15)


def test_low_rank_general_position_is_dimensional_collapse():
    out = collapse_metrics(low_rank(500, 64, 2))
    assert out["std_l2"] * math.sqrt(64) > 0.3  # directions still spread: not total collapse
    assert out["collapse"] == "dimensional"


@pytest.mark.parametrize(
    "z",
    [
        gaussian(50, 12) * torch.linspace(0.1, 3.0, 12) + 0.5,
        gaussian(8, 12) - 1.0,
        low_rank(50, 12, 3) + 0.2,  # rank 4 with the mean: zero singular values must stay ≈ 0
    ],
)
def test_effective_rank_matches_numpy_rankme(z):
    s = np.linalg.svd(z.numpy().astype(np.float64), compute_uv=False)
    p = s / s.sum() + 1e-7
    # the Gram route leaves ~1e-8·σ_max on zero singular values: rel 1e-6, not 1e-10
    assert effective_rank(z) == pytest.approx(float(np.exp(-np.sum(p * np.log(p)))), rel=1e-6)


@pytest.mark.parametrize("m, d", [(40, 10), (6, 10), (10, 10)])
def test_spectrum_matches_eigvalsh_of_covariance(m, d):
    z = gaussian(m, d, seed=1) @ gaussian(d, d, seed=2) + 3.0
    expected = np.sort(np.linalg.eigvalsh(np_cov(z.numpy().astype(np.float64))))[::-1]
    got = spectrum(z)
    assert got.shape == (d,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-9)
    if m < d:
        assert (got[m:] == 0).all()  # padded, and centring removes one more direction
        assert got[m - 1].item() == pytest.approx(0.0, abs=1e-9)


@pytest.fixture
def eig_shapes(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of every torch.linalg.eigvalsh call made while the test runs."""
    shapes = []
    eigvalsh = torch.linalg.eigvalsh

    def recording_eigvalsh(x):
        shapes.append(tuple(x.shape))
        return eigvalsh(x)

    monkeypatch.setattr(torch.linalg, "eigvalsh", recording_eigvalsh)
    return shapes


def test_no_d_by_d_decomposition_when_m_below_d(monkeypatch, eig_shapes):
    shapes = eig_shapes

    def forbidden(*args, **kwargs):
        raise AssertionError("unexpected decomposition")

    for name in ("eigh", "eig", "eigvals", "svd", "svdvals"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    m, d = 8, 64
    collapse_metrics(gaussian(m, d))
    entropy_cond(gaussian(2 * m, d).view(2, m, d))
    # (M+1)²: the uncentred Gram matrix bordered by the mean (metrics_linalg.gram_spectra)
    assert shapes and all(s in {(m, m), (m + 1, m + 1), (2 * m, 2 * m)} for s in shapes)


@pytest.mark.parametrize("m, d", [(60, 8), (5, 8)])
def test_entropy_matches_slogdet(m, d):
    z = gaussian(m, d, seed=3) * torch.linspace(0.01, 2.0, d)
    expected = np_entropy(np_cov(z.numpy().astype(np.float64)))
    assert collapse_metrics(z)["entropy"] == pytest.approx(expected, rel=1e-9)
    assert gaussian_entropy(spectrum(z), d) == pytest.approx(expected, rel=1e-9)


def test_gaussian_entropy_pads_missing_eigenvalues_with_zero():
    eig = torch.tensor([3.0, 1.0, 0.5])
    padded = torch.cat([eig, torch.zeros(5)])
    assert gaussian_entropy(eig, 8) == pytest.approx(gaussian_entropy(padded, 8), rel=1e-12)
    assert gaussian_entropy(torch.zeros(0), 4) == pytest.approx(0.5 * math.log(TWO_PI_E * 1e-4))
    with pytest.raises(ValueError, match="3 eigenvalues for d=2"):
        gaussian_entropy(eig, 2)


@pytest.mark.parametrize("k, m, d", [(3, 20, 5), (2, 3, 10)])
def test_entropy_cond_matches_explicit_loop(k, m, d):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(m, d, generator=g, dtype=torch.float64)
    views = x + 0.3 * torch.randn(k, m, d, generator=g, dtype=torch.float64)  # (K, M, D)
    v = views.numpy()
    cw = np.zeros((d, d))
    for i in range(m):
        mean_i = sum(v[kk, i] for kk in range(k)) / k
        for kk in range(k):
            dev = v[kk, i] - mean_i
            cw += np.outer(dev, dev)
    cw /= m * (k - 1)
    assert entropy_cond(views) == pytest.approx(np_entropy(cw), rel=1e-9)


def test_entropy_cond_of_identical_views_is_the_floor():
    views = gaussian(10, 6).expand(3, 10, 6)
    assert entropy_cond(views) == pytest.approx(0.5 * math.log(TWO_PI_E * 1e-4), rel=1e-9)
    with pytest.raises(ValueError, match=r"\(1, 10, 6\)"):
        entropy_cond(views[:1])


def test_avg_corr_matches_numpy_corrcoef():
    g = gaussian(30, 6, seed=5)
    z = g + g[:, :1] * torch.arange(6.0)  # mixed correlations
    c = np.corrcoef(z.numpy().astype(np.float64), rowvar=False)
    expected = np.abs(c[~np.eye(6, dtype=bool)]).mean()
    assert avg_corr(z) == pytest.approx(expected, rel=1e-9)


def test_avg_corr_duplicated_vs_independent_columns():
    x = gaussian(500, 1)
    assert avg_corr(x.repeat(1, 8) + 1e-3 * gaussian(500, 8, seed=1)) > 0.99
    assert avg_corr(gaussian(4000, 8)) < 0.05


def test_avg_corr_constant_dimension_counts_as_zero():
    z = gaussian(100, 3).repeat(1, 2)  # columns (0, 3), (1, 4), (2, 5) duplicated
    z[:, 5] = 7.0
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(z.numpy().astype(np.float64), rowvar=False)  # NaN row/column for dim 5
    expected = np.nan_to_num(np.abs(c[~np.eye(6, dtype=bool)]), nan=0.0).mean()
    assert avg_corr(z) == pytest.approx(expected, rel=1e-9)
    assert avg_corr(torch.full((10, 4), 2.5)) == 0.0


def test_avg_corr_subsamples_wide_embeddings_deterministically():
    z = gaussian(200, 1).repeat(1, 64) + gaussian(200, 64, seed=1)  # all pairs corr ≈ 0.5
    full = avg_corr(z)
    sub = avg_corr(z, max_dims=16)
    assert sub == avg_corr(z, max_dims=16)  # fixed subset
    assert sub != full
    assert sub == pytest.approx(full, rel=0.1)


def test_std_l2():
    d = 32
    z = gaussian(4000, d)
    assert std_l2(z) == pytest.approx(1 / math.sqrt(d), rel=0.05)
    zn = z.numpy().astype(np.float64)
    zn = zn / np.sqrt((zn**2).sum(1, keepdims=True))
    assert std_l2(z) == pytest.approx(np.std(zn, axis=0, ddof=1).mean(), rel=1e-9)


@pytest.mark.parametrize(
    "std_l2_, rank_frac, d, thresholds, expected",
    [
        (0.0, 1 / 64, 64, CollapseThresholds(), "total"),
        (0.04 / 8, 0.5, 64, CollapseThresholds(), "total"),
        (0.06 / 8, 0.5, 64, CollapseThresholds(), "none"),
        (0.1, 0.04, 64, CollapseThresholds(), "dimensional"),
        (0.1, 0.06, 64, CollapseThresholds(), "none"),
        (0.1, 0.15, 64, CollapseThresholds(dim_rank_frac=0.2), "dimensional"),
        (0.1, 0.5, 64, CollapseThresholds(total_std=0.9), "total"),
    ],
)
def test_classify_collapse(std_l2_, rank_frac, d, thresholds, expected):
    assert classify_collapse(std_l2_, rank_frac, d, thresholds) == expected


def test_classify_collapse_rejects_nan():
    with pytest.raises(ValueError, match="std_l2=nan"):
        classify_collapse(float("nan"), 0.5, 8)


def test_collapse_metrics_keys_and_types():
    z = gaussian(20, 40)
    out = collapse_metrics(z, suffix="_h")
    assert set(out) == {n + "_h" for n in (*METRIC_NAMES, "collapse", "spectrum")}
    for name in METRIC_NAMES:
        assert type(out[name + "_h"]) is float
    assert out["effective_rank_frac_h"] == pytest.approx(out["effective_rank_h"] / 20)
    assert isinstance(out["spectrum_h"], list) and len(out["spectrum_h"]) == 40
    assert out["collapse_h"] in {"total", "dimensional", "none"}


def test_collapse_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        collapse_metrics(torch.full((4, 3), float("inf")))
    with pytest.raises(ValueError, match="M=1"):
        collapse_metrics(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        metrics.spectrum(torch.ones(4))


# --- LiDAR and α-ReQ

def np_lidar(views: torch.Tensor, delta: float = 1e-4) -> float:
    """The definition written out in D×D with scipy's generalized symmetric eigensolver: Σ_b v = λ Σ_w v."""
    v = views.numpy().astype(np.float64)
    k, m, d = v.shape
    mu = v.mean(axis=0)  # (M, D)
    b = mu - mu.mean(axis=0)
    w = (v - mu).reshape(k * m, d)
    lam = scipy.linalg.eigh(b.T @ b / (m - 1), w.T @ w / (m * (k - 1)) + delta * np.eye(d), eigvals_only=True)
    p = np.clip(lam, 0, None) / np.clip(lam, 0, None).sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def noisy_views(k: int, m: int, d: int, noise: float = 0.3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, m, d, generator=g) + noise * torch.randn(k, m, d, generator=g)  # (K, M, D)


@pytest.mark.parametrize("k, m, d", [(2, 50, 10), (3, 20, 100), (2, 64, 128), (4, 16, 300), (2, 128, 128)])
def test_lidar_matches_generalized_eigenproblem(k, m, d):
    # K·M < D takes the span shortcut, K·M >= D the direct D×D path
    views = noisy_views(k, m, d)
    assert lidar(views) == pytest.approx(np_lidar(views), rel=1e-9)


def test_lidar_of_rank_k_views_is_k_in_either_path():
    g = torch.Generator().manual_seed(1)
    for d in (8, 300):
        basis, _ = torch.linalg.qr(torch.randn(d, 5, generator=g))  # (D, 5)
        views = noisy_views(3, 400, 5) @ basis.T  # (3, 400, D): samples and augmentations in 5 dimensions
        assert lidar(views) == pytest.approx(np_lidar(views), rel=1e-8)
        assert 4.5 < lidar(views) < 5.0


def test_lidar_of_isotropic_views_is_near_d_and_of_collapse_near_one():
    assert lidar(noisy_views(4, 4000, 16)) > 0.97 * 16
    assert lidar(torch.full((2, 32, 64), 0.7)) == pytest.approx(1.0, abs=1e-3)  # every embedding the same
    # the same vector within each sample, samples different: Σ_b is degenerate in all but one direction
    assert lidar(torch.randn(32, 1) * torch.ones(2, 32, 64)) == pytest.approx(1.0, abs=1e-3)


def test_lidar_of_identical_views_is_the_rank_of_the_between_covariance():
    # Σ_w = δ·I exactly: the eigenvalues are those of Σ_b / δ, whose entropy rank does not depend on δ
    x = gaussian(400, 20) * torch.linspace(0.2, 2.0, 20)  # anisotropic samples
    views = x.expand(3, 400, 20)
    lam = np.linalg.eigvalsh(np.cov(x.numpy().astype(np.float64), rowvar=False))
    p = lam / lam.sum() + 1e-7
    assert lidar(views) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)


def test_lidar_rejects_bad_shapes():
    with pytest.raises(ValueError, match="K >= 2, M >= 2"):
        lidar(torch.ones(1, 8, 4))
    with pytest.raises(ValueError, match="K >= 2, M >= 2"):
        lidar(torch.ones(2, 1, 4))


def np_alpha(eigvals: np.ndarray, lo: int, hi: int) -> float:
    """Weighted least squares by numpy.polyfit: its weights multiply residuals, so sqrt(1/j) gives weight 1/j."""
    p = eigvals / eigvals.sum() + 1e-7
    j = np.arange(lo, hi + 1, dtype=np.float64)
    slope, _ = np.polyfit(np.log(j), np.log(p[lo - 1:hi]), 1, w=np.sqrt(1 / j))
    return float(-slope)


def test_alpha_fit_ranks():
    assert metrics.alpha_fit_ranks(512, 256) == (2, 128)
    assert metrics.alpha_fit_ranks(100, 1024) == (2, 49)  # r = M - 1 = 99


@pytest.mark.parametrize("a", [0.5, 1.0, 2.5])
def test_alpha_of_an_exact_power_law(a):
    lam = torch.arange(1, 257, dtype=torch.float64) ** -a
    assert metrics.alpha_req(lam, 10_000) == pytest.approx(np_alpha(lam.numpy(), 2, 128), rel=1e-9)
    assert metrics.alpha_req(lam, 10_000) == pytest.approx(a, abs=5e-3)  # the 1e-7 floor bends the tail a little
    assert metrics.alpha_req(7.0 * lam, 10_000) == pytest.approx(metrics.alpha_req(lam, 10_000), rel=1e-12)


def test_alpha_matches_polyfit_on_a_real_spectrum():
    z = gaussian(300, 64) * torch.linspace(0.1, 3.0, 64) ** 2
    lo, hi = metrics.alpha_fit_ranks(300, 64)
    assert metrics.alpha_req(spectrum(z), 300) == pytest.approx(np_alpha(spectrum(z).numpy(), lo, hi), rel=1e-9)


def test_alpha_end_points():
    assert abs(metrics.alpha_req(spectrum(gaussian(20_000, 32)), 20_000)) < 0.05  # isotropic: flat
    assert metrics.alpha_req(torch.zeros(64), 512) == pytest.approx(0.0, abs=1e-12)  # all identical: flat floor
    rank_k = metrics.alpha_req(spectrum(low_rank(512, 64, 8)), 512)  # zero past rank 8 inside ranks 2..32
    assert rank_k > 5
    assert math.isnan(metrics.alpha_req(spectrum(gaussian(100, 6)), 100))  # ranks 2..3: too few to fit
    out = collapse_metrics(low_rank(512, 64, 8))
    assert out["alpha_req"] == rank_k and out["alpha_req_dev"] == pytest.approx(rank_k - 1)


def test_every_label_free_objective_is_a_reported_metric():
    reported = set(collapse_metrics(gaussian(40, 16))) | set(collapse_metrics(gaussian(40, 16), suffix="_h"))
    reported |= {"lidar", "lidar_h", "entropy_cond"}  # train's evaluate adds these from the augmented views
    assert set(LABEL_FREE) <= reported
    assert set(LABEL_FREE) <= set(OBJECTIVES) and {LABEL_FREE[k] for k in LABEL_FREE} == {"max", "min"}


def test_a_views_objective_needs_views(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("search: {metric: lidar_h}\neval: {cond_views: 0}\nspace: {train.lr: {type: float, low: 0.001, "
                    "high: 0.01}}\n")
    with pytest.raises(SpecError, match="search.metric: lidar_h is measured on eval.cond_views"):
        load_spec(str(path))
    path.write_text(path.read_text().replace("cond_views: 0", "cond_views: 2"))
    assert load_spec(str(path)).mode == "max"


def test_lidar_needs_two_view_samples_in_the_config():
    from ncssl_tune.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="eval.cond_samples: needs at least 2 samples, got 1"):
        TrainConfig.from_dict({"eval": {"cond_samples": 1}})
    assert TrainConfig.from_dict({"eval": {"cond_samples": 1, "cond_views": 0}}).eval.cond_samples == 1


# --- the shared Gram matrix and the low-rank route (z = a Wᵀ + b through the projector's last nn.Linear)

def np_metrics(z: np.ndarray) -> dict[str, float]:
    """RankMe, the centred spectrum and avg_corr of a float64 z written out with numpy's SVD and corrcoef."""
    m, d = z.shape
    s = np.linalg.svd(z, compute_uv=False)
    with np.errstate(invalid="ignore"):  # an all-zero z: NaN, and the caller skips it
        p = s / s.sum() + 1e-7
    n = min(m, d)
    rank = float(np.exp(-(p * np.log(p)).sum() - (n - s.size) * 1e-7 * math.log(1e-7)))
    sc = np.linalg.svd(z - z.mean(axis=0), compute_uv=False)
    spec = np.zeros(d)
    spec[:sc.size] = sc**2 / m
    std = z.std(axis=0)
    keep = std > 1e-9 * np.abs(z).max(axis=0)
    c = np.zeros((d, d))
    c[np.ix_(keep, keep)] = np.corrcoef(z[:, keep], rowvar=False)
    return {"effective_rank": rank, "spectrum": spec, "avg_corr": np.abs(c[~np.eye(d, dtype=bool)]).mean()}


def head_of(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> tuple[torch.Tensor, metrics.LinearHead]:
    """z = a Wᵀ + b in float64 (the exact product the route describes) and its LinearHead."""
    z = a.double() @ w.double().T + (0 if b is None else b.double())
    return z, metrics.LinearHead(a, w, b)


def head_cases() -> dict[str, tuple[torch.Tensor, metrics.LinearHead]]:
    g = torch.Generator().manual_seed(7)
    m, p, d = 300, 24, 80

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    w, b = rnd(d, p), rnd(d)
    w_orth, _ = torch.linalg.qr(rnd(d, p))  # (D, P) orthonormal columns
    mean_a = 1e3 * rnd(p)
    return {
        "random relu, bias": head_of(rnd(m, p).relu(), w, b),
        "random, no bias": head_of(rnd(m, p), w),
        "isotropic": head_of(rnd(m, p), w_orth),
        "rank 1": head_of(rnd(m, 1) @ rnd(1, p), w),
        "rank 3 + bias": head_of(rnd(m, 3) @ rnd(3, p), w, b),
        "constant": head_of(mean_a.float().double().expand(m, p).clone(), w, b),  # float32 values, as a model's
        "all zero": head_of(torch.zeros(m, p, dtype=torch.float64), w),
        "1e-6 around a large mean": head_of(mean_a + 1e-6 * rnd(m, p), w, 1e3 * b),
        "float32 a and weight": head_of(rnd(m, p).float().relu(), w.float()),
    }


@pytest.mark.parametrize("name", list(head_cases()))
def test_low_rank_route_matches_numpy_and_the_direct_route(name):
    z, head = head_cases()[name]
    m, d = z.shape
    assert metrics.low_rank_route(head.a.shape[1], m, d)
    fast, direct, ref = collapse_metrics(z, head=head), collapse_metrics(z), np_metrics(z.numpy())
    lam1 = ref["spectrum"][0]
    # atol: numpy centres z itself in float64, which leaves ~(1e-16·|z|)² per direction, ~1e-8·λ1 at "1e-6 around a
    # large mean" (the exact spectrum is checked at the end points)
    atol = 1e-7 * lam1 + (1e-13 * z.abs().max().item()) ** 2
    for got in (fast["spectrum"], direct["spectrum"]):
        np.testing.assert_allclose(got, ref["spectrum"], rtol=1e-6, atol=atol)
    # the route gives exact zeros for the D - P - 1 null directions: RankMe closer to numpy's SVD than the direct
    # route, whose Gram matrix leaves ~1e-8·σ_max on each zero σ (3e-6 relative at rank 1)
    if name != "all zero":  # numpy divides 0 by 0
        assert fast["effective_rank"] == pytest.approx(ref["effective_rank"], rel=1e-7)
    assert fast["effective_rank"] == pytest.approx(direct["effective_rank"], rel=1e-5)
    assert fast["avg_corr"] == pytest.approx(ref["avg_corr"], rel=1e-8, abs=1e-12)
    for key in ("std_l2", "effective_rank_frac", "entropy", "alpha_req"):  # α: the direct route's noise, ~1e-9
        assert fast[key] == pytest.approx(direct[key], rel=1e-5, abs=1e-8), key
    assert fast["collapse"] == direct["collapse"]


def test_low_rank_route_at_the_end_points():
    cases = head_cases()
    for name in ("constant", "all zero"):
        out = collapse_metrics(*cases[name][:1], head=cases[name][1])
        assert out["effective_rank"] == pytest.approx(1.0, abs=0.01)
        assert out["avg_corr"] == 0.0 and out["std_l2"] == pytest.approx(0.0, abs=1e-12)
        assert out["collapse"] == "total" and max(out["spectrum"]) == 0.0
    z, head = cases["rank 3 + bias"]
    assert sum(v > 1e-9 * max(collapse_metrics(z, head=head)["spectrum"]) for v in
               collapse_metrics(z, head=head)["spectrum"]) == 3
    z, head = cases["isotropic"]  # isotropic in its P = 24 directions
    assert collapse_metrics(z, head=head)["effective_rank"] > 0.9 * 24
    z, head = cases["rank 1"]
    assert collapse_metrics(z, head=head)["effective_rank"] < 2.1  # the direction and the mean
    # 1e-6 deviations on a mean of 1e3: the centred spectrum is that of the deviations alone
    z, head = cases["1e-6 around a large mean"]
    dev = head.a - head.a.mean(dim=0)
    exact = torch.linalg.svdvals(dev @ head.weight.T)[:24] ** 2 / z.shape[0]  # rank 24 = P
    got = torch.tensor(collapse_metrics(z, head=head)["spectrum"], dtype=torch.float64)
    torch.testing.assert_close(got[:24], exact, rtol=1e-12, atol=0.0)  # the direct route: 4e-8 (centring z)
    assert (got[24:] == 0).all()


def test_low_rank_route_decomposes_p_plus_one_only(eig_shapes):
    shapes = eig_shapes
    z, head = head_cases()["random relu, bias"]  # M = 300, P = 24, D = 80
    collapse_metrics(z, head=head)
    assert sorted(shapes) == [(24, 24), (25, 25)]
    shapes.clear()
    collapse_metrics(z)  # D < M: the D×D Gram matrix, centred and uncentred
    assert shapes == [(80, 80), (80, 80)]
    shapes.clear()
    a = torch.randn(300, 80)  # P = D: no cheaper, the direct route
    collapse_metrics(a @ torch.randn(80, 80), head=metrics.LinearHead(a, torch.randn(80, 80)))
    assert shapes == [(80, 80), (80, 80)]


def test_low_rank_route_rejects_a_head_that_does_not_make_z():
    z, head = head_cases()["random, no bias"]
    with pytest.raises(ValueError, match=r"a \(300, 24\), weight \(81, 24\)"):
        collapse_metrics(z, head=metrics.LinearHead(head.a, torch.randn(81, 24)))
    with pytest.raises(ValueError, match=r"bias \(3,\)"):
        collapse_metrics(z, head=metrics.LinearHead(head.a, head.weight, torch.zeros(3)))
    a = torch.randn(300, 80)  # P = D: the direct route, and still a head that cannot make z is an error
    with pytest.raises(ValueError, match=r"weight \(80, 79\)"):
        collapse_metrics(a @ torch.randn(80, 80), head=metrics.LinearHead(a, torch.randn(80, 79)))
    bad = head.a.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        collapse_metrics(z, head=metrics.LinearHead(bad, head.weight))


@pytest.mark.parametrize("m, d", [(40, 10), (6, 10), (10, 10), (8, 64)])
def test_collapse_metrics_rank_from_the_shared_gram_matches_numpy(m, d):
    z = gaussian(m, d, seed=1) @ gaussian(d, d, seed=2) + 3.0
    ref = np_metrics(z.numpy().astype(np.float64))
    assert collapse_metrics(z)["effective_rank"] == pytest.approx(ref["effective_rank"], rel=1e-6)
    assert collapse_metrics(z)["effective_rank"] == pytest.approx(effective_rank(z), rel=1e-9)


def test_avg_corr_blocks_and_subset_match_numpy():
    # 1100 columns: blocks of 512 that do not divide D; a common factor gives correlations of both signs
    g = gaussian(400, 1, seed=2)
    z = gaussian(400, 1100, seed=3) + g * torch.linspace(-2, 2, 1100)
    z[:, 7] = 4.0  # constant: counts as 0
    assert avg_corr(z) == pytest.approx(np_metrics(z.numpy().astype(np.float64))["avg_corr"], rel=1e-9)
    idx = torch.randperm(1100, generator=torch.Generator().manual_seed(0))[:600].sort().values
    sub = z[:, idx].numpy().astype(np.float64)
    assert avg_corr(z, max_dims=600) == pytest.approx(np_metrics(sub)["avg_corr"], rel=1e-9)


@pytest.mark.parametrize("d", [3, 600])
def test_std_l2_in_slabs_matches_numpy(d):
    z = gaussian(50, d, seed=4) * torch.linspace(0.1, 5.0, d) + 2.0  # 600: slabs of 256 that do not divide D
    zn = z.numpy().astype(np.float64)
    zn = zn / np.sqrt((zn**2).sum(1, keepdims=True))
    assert std_l2(z) == pytest.approx(np.std(zn, axis=0, ddof=1).mean(), rel=1e-12)
    assert std_l2(torch.full((5, d), -3.0)) == 0.0


@pytest.mark.parametrize(("loss", "norm", "expected"), [("invariance", "none", "total"), ("vicreg", "batch", "none")])
def test_training_on_the_low_rank_route_reports_the_direct_metrics(monkeypatch, loss, norm, expected):
    """A real run whose projector ends 128 -> 512 (P = 128 < M = 256): the reported metrics of z come from the
    route, and equal those computed directly on the embedded z of the final model; the collapse class holds."""
    from ncssl_tune.config import TrainConfig
    from ncssl_tune.core.evaluate import embed, last_linear
    from ncssl_tune.core.train import _Run, train

    calls = []
    route = metrics.centred_low_rank
    monkeypatch.setattr(metrics, "centred_low_rank", lambda head: calls.append(head.a.shape) or route(head))
    cfg = TrainConfig.from_dict({
        "model": {"projector": "128-512", "norm": norm}, "loss": {"method": loss},
        "train": {"epochs": 5, "threads": 1},
        "eval": {"eval_samples": 256, "probe_every": 0, "knn_every": 0, "cond_views": 0}})
    states: list[dict] = []
    last = train(cfg, lambda r, s: states.append(s))
    assert last["status"] == "finished" and last["collapse"] == expected
    assert calls == [(256, 128)] * 5  # every epoch, for z only
    run = _Run(cfg)
    run.restore(states[-1])
    run.model.eval()
    x = run.train_x[run.eval_idx]
    split = embed(run.model, x, 1024, run.autocast, head_input=True)  # one pass, split before the last layer
    h, z, a = split.h, split.z, split.head_input
    plain = embed(run.model, x, 1024, run.autocast)
    assert plain.head_input is None
    assert torch.equal(plain.h, h) and torch.equal(plain.z, z) and torch.equal(last_linear(run.model)(a), z)
    # against numpy's SVD of the exact product a Wᵀ, in float64; the (P+1)² Gram matrix still leaves ~1e-8·σ_max on
    # each of the ~P near-zero σ of a collapsed z: rel 1e-6, as for the direct route's RankMe against numpy
    exact = np_metrics(a.double().numpy() @ last_linear(run.model).weight.detach().double().numpy().T)
    assert last["effective_rank"] == pytest.approx(exact["effective_rank"], rel=1e-6)
    assert last["avg_corr"] == pytest.approx(exact["avg_corr"], rel=1e-9)
    np.testing.assert_allclose(last["spectrum"], exact["spectrum"], rtol=0, atol=1e-13 * exact["spectrum"][0])
    # the direct route on the forward's float32 z: its rounding (~6e-8·|a||W| per entry) adds D - P small singular
    # values the route does not see, 2e-5 of RankMe at total collapse
    direct = collapse_metrics(z, run.thresholds)
    for key in ("effective_rank", "entropy", "avg_corr", "std_l2", "alpha_req"):
        assert last[key] == pytest.approx(direct[key], rel=1e-4, abs=1e-9), key
    assert last["collapse"] == direct["collapse"]


def test_all_finite():
    x = torch.ones(4, 3)
    assert metrics.all_finite(x, x.double())
    for bad in (math.inf, -math.inf, math.nan):
        y = x.clone()
        y[2, 1] = bad
        assert not metrics.all_finite(x, y)
    big = torch.full((4, 3), 3e38)  # the sum overflows, every entry is finite
    assert metrics.all_finite(big)
