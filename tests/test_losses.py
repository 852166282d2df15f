from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from ncssl_tune.core.losses import (
    LOSSES,
    WhiteningError,
    barlow_twins_loss,
    byol_loss,
    invariance_loss,
    off_diagonal,
    simclr_loss,
    simsiam_loss,
    vicreg_loss,
    whiten,
    wmse_loss,
)
from ncssl_tune.core.mechanisms import two_way_loss

N, D = 32, 8
# small sub-batches so W-MSE runs on the shared (N, D) inputs: w_size >= 2·D and N % w_size == 0
SMALL_KW = {"wmse": {"w_size": 16}}


def views(seed: int = 0, n: int = N, d: int = D, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=dtype)
    z2 = z1 + 0.5 * torch.randn(n, d, generator=g, dtype=dtype)
    return z1, z2


def ref_vicreg(a: np.ndarray, b: np.ndarray, lam=25.0, mu=25.0, nu=1.0, gamma=1.0) -> dict[str, float]:
    d = a.shape[1]
    inv = np.mean((a - b) ** 2)
    var = sum(
        0.5 * np.mean(np.maximum(0.0, gamma - np.sqrt(np.var(x, axis=0, ddof=1) + 1e-4))) for x in (a, b)
    )
    off = ~np.eye(d, dtype=bool)
    cov = sum(np.sum(np.cov(x, rowvar=False)[off] ** 2) / d for x in (a, b))
    return {"loss": lam * inv + mu * var + nu * cov, "loss_inv": inv, "loss_var": var, "loss_cov": cov}


def ref_barlow(a: np.ndarray, b: np.ndarray, lam=0.0051, scale=1.0) -> dict[str, float]:
    def standardize(x):
        return (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)

    n, d = a.shape
    c = np.einsum("ni,nj->ij", standardize(a), standardize(b)) / n
    on = sum((1 - c[i, i]) ** 2 for i in range(d))
    off = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    return {"loss": scale * (on + lam * off), "loss_on_diag": on, "loss_off_diag": off}


def ref_simclr(a: np.ndarray, b: np.ndarray, temperature=0.1) -> float:
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        sims = [z[i] @ z[j] / temperature for j in range(n2) if j != i]
        total += -(z[i] @ z[pos] / temperature) + math.log(sum(math.exp(s) for s in sims))
    return total / n2


def ref_whiten(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(0)
    L = np.linalg.cholesky(np.cov(xc, rowvar=False))
    return xc @ np.linalg.inv(L).T


def ref_wmse(a: np.ndarray, b: np.ndarray, perms: list[np.ndarray], w_size: int) -> float:
    losses = []
    for perm in perms:
        wa, wb = np.empty_like(a), np.empty_like(b)
        for idx in perm.reshape(-1, w_size):
            wa[idx], wb[idx] = ref_whiten(a[idx]), ref_whiten(b[idx])
        cos = np.sum(wa * wb, 1) / (np.linalg.norm(wa, axis=1) * np.linalg.norm(wb, axis=1))
        losses.append(np.mean(2 - 2 * cos))
    return float(np.mean(losses))


@pytest.mark.parametrize("kw", [{}, {"lam": 3.0, "mu": 7.0, "nu": 0.5, "gamma": 1.3}])
def test_vicreg_matches_reference(kw):
    z1, z2 = views(1)
    out = vicreg_loss(z1, z2, **kw)
    ref = ref_vicreg(z1.numpy(), z2.numpy(), **kw)
    for key, val in ref.items():
        assert out[key].item() == pytest.approx(val, rel=1e-5), key


@pytest.mark.parametrize("kw", [{}, {"lam": 0.1, "scale": 0.5}])
def test_barlow_matches_reference(kw):
    z1, z2 = views(2)
    z1 = 3.0 * z1 + 1.0  # standardisation must undo scale and shift
    out = barlow_twins_loss(z1, z2, **kw)
    ref = ref_barlow(z1.numpy(), z2.numpy(), **kw)
    for key, val in ref.items():
        assert out[key].item() == pytest.approx(val, rel=1e-5), key


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_simclr_matches_reference(temperature):
    z1, z2 = views(3, n=12)
    out = simclr_loss(z1, z2, temperature=temperature)
    assert out["loss"].item() == pytest.approx(ref_simclr(z1.numpy(), z2.numpy(), temperature), rel=1e-5)


def test_invariance_matches_reference():
    z1, z2 = views(4)
    out = invariance_loss(z1, z2)
    ref = np.mean((z1.numpy() - z2.numpy()) ** 2)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-5)
    assert out["loss_inv"].item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("w_iter", [1, 2])
def test_wmse_matches_reference(w_iter):
    z1, z2 = views(5)
    torch.manual_seed(123)
    out = wmse_loss(z1, z2, w_size=16, w_iter=w_iter)
    torch.manual_seed(123)
    perms = [torch.randperm(N).numpy() for _ in range(w_iter)]
    assert out["loss"].item() == pytest.approx(ref_wmse(z1.numpy(), z2.numpy(), perms, 16), rel=1e-5)
    assert out["whitening_retries"].item() == 0.0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_symmetric_in_views(name):
    z1, z2 = views(6)
    kw = SMALL_KW.get(name, {})
    torch.manual_seed(0)
    a = LOSSES[name](z1, z2, **kw)
    torch.manual_seed(0)
    b = LOSSES[name](z2, z1, **kw)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_returns_scalar_terms_and_gradient(name):
    z1, z2 = views(7, dtype=torch.float32)
    z1.requires_grad_(True)
    out = LOSSES[name](z1, z2, **SMALL_KW.get(name, {}))
    assert "loss" in out
    for key, val in out.items():
        assert val.ndim == 0 and val.dtype == torch.float32 and torch.isfinite(val), key
    out["loss"].backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_low_precision_inputs_computed_in_float32(name):
    z1, z2 = views(8, dtype=torch.float32)
    kw = SMALL_KW.get(name, {})
    torch.manual_seed(0)
    ref = LOSSES[name](z1.bfloat16().float(), z2.bfloat16().float(), **kw)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = LOSSES[name](z1.bfloat16(), z2.bfloat16(), **kw)
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_hyperparameters_are_keyword_only(name):
    params = list(inspect.signature(LOSSES[name]).parameters.values())
    assert [p.name for p in params[:2]] == ["z1", "z2"]
    for p in params[2:]:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty, p.name


def test_paper_defaults():
    sig = {
        name: {p.name: p.default for p in list(inspect.signature(f).parameters.values())[2:]}
        for name, f in LOSSES.items()
    }
    assert sig["vicreg"] == {"lam": 25.0, "mu": 25.0, "nu": 1.0, "gamma": 1.0}
    assert sig["barlow_twins"] == {"lam": 0.0051, "scale": 1.0}
    assert sig["wmse"] == {"w_size": 128, "w_iter": 1, "eps": 0.0}
    assert sig["simclr"] == {"temperature": 0.1}
    assert sig["invariance"] == {}
    assert sig["simsiam"] == {} and sig["byol"] == {}  # their mechanisms are model.* keys (test_mechanisms.py)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_mismatched_shapes_are_rejected(name):
    z1, _ = views(9)
    with pytest.raises(ValueError, match=r"\(32, 8\) and \(32, 7\)"):
        LOSSES[name](z1, z1[:, :7])


def test_barlow_identical_standardized_views_have_zero_on_diag():
    z, _ = views(10)
    out = barlow_twins_loss(z, z)
    # with eps=1e-5 the diagonal is 1/(1+1e-5) rather than exactly 1
    assert out["loss_on_diag"].item() < D * 1e-9
    assert out["loss_off_diag"].item() > 0


def test_vicreg_variance_term_zero_when_std_above_gamma():
    z1, z2 = views(11)
    z1, z2 = 2 * z1 / z1.std(0), 2 * z2 / z2.std(0)  # every std = 2 ≥ γ = 1
    assert vicreg_loss(z1, z2)["loss_var"].item() == 0.0
    assert vicreg_loss(z1, z2, gamma=3.0)["loss_var"].item() > 0.0


def test_invariance_of_identical_views_is_zero():
    z, _ = views(12)
    assert invariance_loss(z, z)["loss"].item() == 0.0


def ref_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([x @ y / math.sqrt((x @ x) * (y @ y)) for x, y in zip(a, b, strict=True)])  # (N,)


def test_simsiam_and_byol_match_their_formulas():
    z1, z2 = views(18)
    cos = ref_cos(z1.numpy(), z2.numpy())
    s, b = simsiam_loss(z1, z2), byol_loss(z1, z2)
    assert s["loss"].item() == pytest.approx(-cos.mean(), rel=1e-12)
    # BYOL's L + L̃ on one pair of embeddings: the two directions of 2 − 2·cos are equal
    assert b["loss"].item() == pytest.approx(2 * np.mean(2 - 2 * cos), rel=1e-12)
    assert s["cos_sim"].item() == pytest.approx(cos.mean(), rel=1e-12) == b["cos_sim"].item()


@pytest.mark.parametrize("name, same, opposite", [("simsiam", -1.0, 1.0), ("byol", 0.0, 8.0)])
def test_cosine_losses_end_points_and_scale_invariance(name, same, opposite):
    z, other = views(19)
    fn = LOSSES[name]
    assert fn(z, z)["loss"].item() == pytest.approx(same, abs=1e-12)
    assert fn(z, -z)["loss"].item() == pytest.approx(opposite, abs=1e-12)
    scale = torch.rand(N, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    torch.testing.assert_close(fn(z * scale, other)["loss"], fn(z, other)["loss"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"wmse"}))  # wmse draws a fresh split per call
def test_two_way_loss_without_a_mechanism_is_the_loss(name):
    """p = t = z: averaging the two directions gives a symmetric loss back unchanged, so switching a mechanism on
    keeps the loss's scale."""
    z1, z2 = views(20)
    once = LOSSES[name](z1, z2)
    both = two_way_loss(LOSSES[name], {}, z1, z2, z1, z2)
    for key in once:
        torch.testing.assert_close(both[key], once[key], rtol=1e-12, atol=1e-12)


def test_two_way_loss_stops_the_gradient_at_detached_targets():
    p1, p2 = (v.requires_grad_(True) for v in views(21))
    t1, t2 = (v.requires_grad_(True) for v in views(22))
    two_way_loss(simsiam_loss, {}, p1, p2, t1.detach(), t2.detach())["loss"].backward()
    assert p1.grad is not None and p2.grad is not None and t1.grad is None and t2.grad is None


def test_off_diagonal():
    m = torch.arange(16.0).view(4, 4)
    expected = [m[i, j].item() for i in range(4) for j in range(4) if i != j]
    assert off_diagonal(m).tolist() == expected
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        off_diagonal(torch.zeros(3, 4))


def test_whiten_gives_identity_covariance():
    z, _ = views(13, n=40, d=6, dtype=torch.float32)
    z = z @ torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) + 5.0  # correlated, shifted
    zw, retries = whiten(z)
    assert retries == 0
    cov = torch.cov(zw.T)  # (D, D), 1/(n-1)
    torch.testing.assert_close(cov, torch.eye(6), rtol=0, atol=1e-4)
    torch.testing.assert_close(zw.mean(0), torch.zeros(6), rtol=0, atol=1e-5)


def test_whiten_shrinkage_eps():
    z, _ = views(14, n=40, d=4)
    zw, _ = whiten(z, eps=0.3)
    cov = np.cov(z.numpy(), rowvar=False)
    sigma = 0.7 * cov + 0.3 * np.eye(4)
    # whitening w.r.t. Σ: cov(ẑ) = L⁻¹ Cov L⁻ᵀ with L Lᵀ = Σ
    L_inv = np.linalg.inv(np.linalg.cholesky(sigma))
    np.testing.assert_allclose(np.cov(zw.numpy(), rowvar=False), L_inv @ cov @ L_inv.T, atol=1e-10)


def test_failed_cholesky_is_retried_and_counted():
    z, _ = views(15, n=32, d=4)
    z[:, 2] = 0.0  # singular covariance: Cholesky with eps=0 fails
    zw, retries = whiten(z, eps=0.0)
    assert retries >= 1
    assert torch.isfinite(zw).all()
    torch.manual_seed(0)
    out = wmse_loss(z, views(16, n=32, d=4)[0], w_size=16)
    assert out["whitening_retries"].item() >= 2  # one per sub-batch of the degenerate view
    assert torch.isfinite(out["loss"])


def test_impossible_whitening_raises():
    z = torch.full((32, 4), float("nan"))
    with pytest.raises(WhiteningError, match="failed after"):
        whiten(z)
    with pytest.raises(WhiteningError):
        wmse_loss(z, z, w_size=16)


@pytest.mark.parametrize(
    "n, d, w_size",
    [(32, 8, 8), (32, 4, 12), (30, 4, 16)],  # w_size < 2D; N % w_size != 0 (twice)
)
def test_wmse_rejects_bad_w_size(n, d, w_size):
    z1, z2 = views(17, n=n, d=d)
    with pytest.raises(ValueError, match=rf"w_size={w_size}, D={d}, N={n}"):
        wmse_loss(z1, z2, w_size=w_size)


# --- pinned to the official reference code
# Each value below is what the authors' own code returns on the same float64 inputs (`official_inputs`), computed
# once by running the cited snippet (in float64, on one process: all_gather/all_reduce are the identity, and the
# removed torch.cholesky/triangular_solve replaced by torch.linalg.cholesky/solve_triangular):
# - VICReg.forward, facebookresearch/vicreg main_vicreg.py @ b42aa2327afe19773b4fbd7d3bcb46a9af1e4367
#   (sim_coeff = lam, std_coeff = mu, cov_coeff = nu; the target std 1 = gamma)
# - BarlowTwins.forward, facebookresearch/barlowtwins main.py @ a655214c76c97d0150277b85d16e69328ea52fd9
#   (BatchNorm1d(affine=False) in training mode, c / batch_size, lambd = lam)
# - SimSiam: the loss of main_simsiam.py `train` with criterion = nn.CosineSimilarity(dim=1),
#   facebookresearch/simsiam @ 39ac33e618948b88cbe43a65e31f142537073e55 (`official_simsiam` below)
# - BYOL: BYOLExperiment.loss_fn's repr_loss with helpers.regression_loss and l2_normalize (epsilon 1e-12),
#   google-deepmind/deepmind-research byol/byol_experiment.py and byol/utils/helpers.py @
#   4822a45504cb05042841a358f070bba35c6fbc24 (`official_byol` below, numpy for jax.numpy)
# - Whitening2d.forward (track_running_stats=False), htdt/self-supervised methods/whitening.py, and the loss of
#   WMSE.forward with norm_mse_loss on one sub-batch of the whole batch, methods/w_mse.py, both @
#   d0cdce2c9671fa3119a4f8c5376a21715489443d


def official_inputs(seed: int, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)  # numpy's generator: the same numbers on every platform and version
    a = rng.standard_normal((n, d))
    return torch.tensor(a), torch.tensor(a + 0.5 * rng.standard_normal((n, d)))


@pytest.mark.parametrize("kw, official", [({}, 7.712067765079775),
                                          ({"lam": 3.0, "mu": 7.0, "nu": 0.5}, 1.4453468446320366)])
def test_vicreg_matches_the_official_code(kw, official):
    z1, z2 = official_inputs(1, 32, 8)
    assert vicreg_loss(z1, z2, **kw)["loss"].item() == pytest.approx(official, rel=1e-12)


@pytest.mark.parametrize("lam, official", [(0.0051, 0.09964333026302925), (0.1, 0.2192877120035142)])
def test_barlow_twins_matches_the_official_code(lam, official):
    z1, z2 = official_inputs(2, 32, 8)
    assert barlow_twins_loss(3 * z1 + 1, z2, lam=lam)["loss"].item() == pytest.approx(official, rel=1e-12)


@pytest.mark.parametrize("eps, official_row0", [
    (0.0, [2.0732201845899656, -1.7336327227291028, -0.24598279270440793, -0.10469867791223464,
           -2.016598920750569, 0.6711394286565201]),
    (0.3, [2.112825875394421, -1.9060634614550078, -0.11422945003266671, -0.2490099001365384,
           -1.6767720280133642, 0.20969012620939675]),
])
def test_whiten_matches_the_w_mse_authors_whitening(eps, official_row0):
    z, _ = official_inputs(3, 24, 6)
    zw, retries = whiten(z, eps=eps)
    assert retries == 0
    assert zw[0].tolist() == pytest.approx(official_row0, rel=1e-10)


@pytest.mark.parametrize("eps, official", [(0.0, 0.2637274493897319), (0.1, 0.2517849775846188)])
def test_wmse_matches_the_w_mse_authors_loss(eps, official):
    z1, z2 = official_inputs(4, 32, 8)
    # one sub-batch of the whole batch: the random split cannot change the loss
    assert wmse_loss(z1, z2, w_size=32, eps=eps)["loss"].item() == pytest.approx(official, rel=1e-10)


def official_simsiam(p1, p2, z1, z2) -> float:
    """facebookresearch/simsiam main_simsiam.py, transcribed: z1, z2 come detached out of SimSiam.forward."""
    criterion = torch.nn.CosineSimilarity(dim=1)
    return (-(criterion(p1, z2.detach()).mean() + criterion(p2, z1.detach()).mean()) * 0.5).item()


def official_byol(p1, p2, z1, z2) -> float:
    """google-deepmind/deepmind-research byol: regression_loss in both directions, summed, then the batch mean."""
    def l2_normalize(x, epsilon=1e-12):
        return x * (1 / np.sqrt(np.maximum(np.sum(np.square(x), axis=-1, keepdims=True), epsilon)))

    def regression_loss(x, y):
        return np.sum((l2_normalize(x) - l2_normalize(y)) ** 2, axis=-1)

    p1, p2, z1, z2 = (t.numpy() for t in (p1, p2, z1, z2))
    return float(np.mean(regression_loss(p1, z2) + regression_loss(p2, z1)))


@pytest.mark.parametrize("name, official, transcription", [("simsiam", -0.04789099079952554, official_simsiam),
                                                           ("byol", 3.808436036801898, official_byol)])
def test_simsiam_and_byol_match_the_official_code(name, official, transcription):
    """The trainer's loss with a predictor (p) and a target branch (z): two_way_loss, as core/train.py takes it."""
    z1, z2 = official_inputs(5, 32, 8)
    p1, p2 = official_inputs(6, 32, 8)
    assert transcription(p1, p2, z1, z2) == pytest.approx(official, rel=1e-12)
    got = two_way_loss(LOSSES[name], {}, p1, p2, z1.detach(), z2.detach())["loss"].item()
    assert got == pytest.approx(official, rel=1e-12)
