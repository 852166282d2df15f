from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ncssl_tune import metrics
from ncssl_tune.metrics import (
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
from ncssl_tune.spec import LABEL_FREE, OBJECTIVES, SpecError, load_spec

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


def test_no_d_by_d_decomposition_when_m_below_d(monkeypatch):
    shapes = []
    eigvalsh = torch.linalg.eigvalsh

    def recording_eigvalsh(x):
        shapes.append(tuple(x.shape))
        return eigvalsh(x)

    def forbidden(*args, **kwargs):
        raise AssertionError("unexpected decomposition")

    monkeypatch.setattr(torch.linalg, "eigvalsh", recording_eigvalsh)
    for name in ("eigh", "eig", "eigvals", "svd", "svdvals"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    m, d = 8, 64
    collapse_metrics(gaussian(m, d))
    entropy_cond(gaussian(2 * m, d).view(2, m, d))
    assert shapes and all(s in {(m, m), (2 * m, 2 * m)} for s in shapes)


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
