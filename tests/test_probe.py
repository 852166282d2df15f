"""The few-labels linear probe against scikit-learn's logistic regression and at its end points."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from ncssl_tune.core.probe import _fit_logreg, fewshot_probe, label_draws, linear_probe


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class clusters: x (n, dim), y (n,); spread is the within-class std around unit-scale means."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return means[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_label_draws_take_k_of_every_class_and_depend_only_on_seed():
    y = torch.arange(10).repeat_interleave(30)
    draws = label_draws(y, k=5, draws=4, seed=3)
    assert len(draws) == 4
    for idx in draws:
        assert torch.bincount(y[idx], minlength=10).tolist() == [5] * 10
        assert len(set(idx.tolist())) == 50
    assert all(torch.equal(a, b) for a, b in zip(draws, label_draws(y, 5, 4, seed=3)))
    assert not torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], label_draws(y, 5, 1, seed=4)[0])
    with pytest.raises(ValueError, match="k=31 labels per class, but the smallest class has 30"):
        label_draws(y, k=31, draws=1, seed=0)


def test_fewshot_matches_sklearn_logistic_regression():
    """Same objective written independently: mean cross-entropy + wd/2 |W|^2 equals sklearn's C = 1 / (n wd)."""
    xtr, ytr = blobs(40, 5, 8, spread=1.2, seed=0)
    xte, yte = blobs(40, 5, 8, spread=1.2, seed=0)
    xte = xte + 0.3 * torch.randn(xte.shape, generator=torch.Generator().manual_seed(9))
    k, wd = 4, 0.05
    got = fewshot_probe(xtr, ytr, xte, yte, k=k, draws=3, weight_decay=wd, seed=1, max_iter=500)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    ztr, zte = ((xtr - mean) / std).numpy(), ((xte - mean) / std).numpy()
    accs = []
    for idx in label_draws(ytr, k, 3, seed=1):
        clf = LogisticRegression(C=1.0 / (len(idx) * wd), max_iter=5000, tol=1e-10)
        clf.fit(ztr[idx.numpy()], ytr[idx].numpy())
        accs.append(float((clf.predict(zte) == yte.numpy()).mean()))
    assert got["fewshot_acc"] == pytest.approx(np.mean(accs), abs=1.5 / len(yte))
    assert got["fewshot_acc_std"] == pytest.approx(np.std(accs, ddof=1), abs=2.0 / len(yte))


def test_fewshot_end_points():
    sep_tr, ytr = blobs(30, 10, 16, spread=0.01, seed=1)
    sep_te, yte = blobs(30, 10, 16, spread=0.01, seed=1)
    assert fewshot_probe(sep_tr, ytr, sep_te, yte, k=1, draws=2)["fewshot_acc"] == 1.0
    noise = torch.randn(300, 16, generator=torch.Generator().manual_seed(2))  # carries nothing of y
    chance = fewshot_probe(noise, ytr, torch.randn(300, 16), yte, k=5, draws=5)["fewshot_acc"]
    assert chance < 0.2  # 10 classes: 0.1 expected
    const = torch.ones(300, 16)  # a totally collapsed representation
    assert fewshot_probe(const, ytr, const, yte, k=5, draws=3)["fewshot_acc"] == pytest.approx(0.1)


def test_linear_probe_matches_sklearn_and_picks_the_decay_on_validation():
    xtr, ytr = blobs(60, 4, 6, spread=1.5, seed=3)
    xte, yte = blobs(60, 4, 6, spread=1.5, seed=4)
    wd = 0.02
    got = linear_probe(xtr, ytr, xte, yte, weight_decays=[wd], max_iter=500)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    clf = LogisticRegression(C=1.0 / (len(ytr) * wd), max_iter=5000, tol=1e-10)
    clf.fit(((xtr - mean) / std).numpy(), ytr.numpy())
    want = float((clf.predict(((xte - mean) / std).numpy()) == yte.numpy()).mean())
    assert got["probe_wd"] == wd
    assert got["probe_acc"] == pytest.approx(want, abs=1.5 / len(yte))
    # the grid keeps the decay with the best validation accuracy, the first of equals
    grid = [0.0, 1e-2, 1.0, 30.0]
    val = [linear_probe(xtr, ytr, xte, yte, weight_decays=[d], max_iter=500)["probe_val_acc"] for d in grid]
    chosen = linear_probe(xtr, ytr, xte, yte, weight_decays=grid, max_iter=500)
    assert chosen["probe_val_acc"] == max(val) and chosen["probe_wd"] == grid[val.index(max(val))]


def test_joint_fit_equals_separate_fits_when_each_converges():
    """The B problems share no parameter: fit together, each lands on its own minimiser."""
    x, y = blobs(20, 3, 5, spread=1.0, seed=5)
    wds = [0.3, 0.1, 0.05]
    w, b = _fit_logreg(x, y, 3, wds, max_iter=500)
    for i, wd in enumerate(wds):
        wi, bi = _fit_logreg(x, y, 3, [wd], max_iter=500)
        # float32 L-BFGS stops on its 1e-9 loss-change tolerance: both land within ~5e-4 of the minimiser
        assert torch.allclose(w[i], wi[0], atol=2e-3) and torch.allclose(b[i], bi[0], atol=2e-3)
    assert not torch.allclose(w[0], w[2], atol=1e-2)  # the decays do make different classifiers
