"""Downstream quality of frozen representations: weighted kNN, a linear probe and a few-labels linear probe.

Labels are used only here, never by the SSL loss. The full probe's weight decay is chosen on a validation split
carved from the training features; the test split is touched once, for the reported accuracy. The few-labels
probe (the semi-supervised evaluation of SimCLR / VICReg, scaled down: k labels per class) uses a fixed weight
decay, because k labels per class leave nothing to validate on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_acc(
    train_h: torch.Tensor, train_y: torch.Tensor, test_h: torch.Tensor, test_y: torch.Tensor,
    k: int = 20, t: float = 0.07, num_classes: int | None = None, chunk: int = 1024,
) -> float:
    """Weighted cosine kNN accuracy (Wu et al. 2018, as used by DINO / solo-learn).

    train_h: (N, F), train_y: (N,), test_h: (M, F), test_y: (M,). Each neighbour votes for its class with
    weight exp(cos / t).
    """
    c = num_classes or int(max(train_y.max(), test_y.max())) + 1
    k = min(k, train_h.shape[0])
    train_n = F.normalize(train_h.float(), dim=1)
    test_n = F.normalize(test_h.float(), dim=1)
    correct = 0
    for start in range(0, test_n.shape[0], chunk):
        sim = test_n[start:start + chunk] @ train_n.T  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        votes = torch.zeros(sim.shape[0], c, device=sim.device)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / t).exp())  # (m, C)
        correct += (votes.argmax(1) == test_y[start:start + chunk]).sum().item()
    return correct / test_n.shape[0]


def _fit_logreg(x: torch.Tensor, y: torch.Tensor, c: int, wds: list[float], max_iter: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """B independent multinomial logistic regressions fit together by one full-batch L-BFGS.

    x: (B, N, F) standardized (or (N, F), shared by all B), y: (B, N) or (N,), wds: B weight decays. Problem b
    minimises mean cross-entropy + wd_b/2 |W_b|^2. The problems share no parameter, so the sum of their losses
    has each one's minimiser as its block of the joint minimiser; fitting them together pays L-BFGS's Python
    overhead (its two-loop recursion is ~40 small tensor ops per iteration, most of a fit's time at these sizes)
    once instead of B times. Gradients are written in closed form (dL/dlogits = (softmax - onehot) / N), no
    autograd. Returns W (B, F, C) and bias (B, C).
    """
    b = len(wds)
    x = x.float().expand(b, *x.shape[-2:]) if x.ndim == 2 else x.float()  # (B, N, F)
    y = y.expand(b, y.shape[-1]) if y.ndim == 1 else y  # (B, N)
    n, f = x.shape[1], x.shape[2]
    onehot = F.one_hot(y, c).to(x.dtype)  # (B, N, C)
    wd = torch.tensor(wds, dtype=x.dtype, device=x.device).view(b, 1, 1)
    w = torch.zeros(b, f, c, device=x.device, requires_grad=True)
    bias = torch.zeros(b, c, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        logits = torch.baddbmm(bias.detach().unsqueeze(1), x, w.detach())  # (B, N, C)
        logp = logits.log_softmax(dim=2)
        loss = -(onehot * logp).sum() / n + 0.5 * (wd * w.detach().pow(2)).sum()
        g = (logp.exp() - onehot) / n  # (B, N, C)
        w.grad = torch.bmm(x.transpose(1, 2), g) + wd * w.detach()  # (B, F, C)
        bias.grad = g.sum(dim=1)  # (B, C)
        return loss

    opt.step(closure)
    return w.detach(), bias.detach()


def _predict(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Class predictions (B, M) of the B classifiers on x (M, F)."""
    return (torch.matmul(x.float(), w) + bias.unsqueeze(1)).argmax(dim=2)


def _stratified_split(y: torch.Tensor, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, val) with `frac` of every class in val, deterministic by seed."""
    g = torch.Generator().manual_seed(seed)
    fit, val = [], []
    for cls in torch.unique(y.cpu()):
        idx = torch.nonzero(y.cpu() == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = max(1, round(frac * len(idx))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    return torch.cat(fit), torch.cat(val)


def _standardize(train_h: torch.Tensor, test_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both (N, F) / (M, F) standardized with the statistics of all training features (no labels involved)."""
    mean, std = train_h.float().mean(0), train_h.float().std(0) + 1e-6
    return (train_h.float() - mean) / std, (test_h.float() - mean) / std


def label_draws(y: torch.Tensor, k: int, draws: int, seed: int) -> list[torch.Tensor]:
    """`draws` index sets of k samples of every class of y (N,), fixed by seed: every trial sees the same labels."""
    classes, counts = torch.unique(y.cpu(), return_counts=True)
    if k < 1 or int(counts.min()) < k:
        raise ValueError(f"few-labels probe: k={k} labels per class, but the smallest class has {int(counts.min())}")
    out = []
    for d in range(draws):
        g = torch.Generator().manual_seed(seed * 7919 + d)
        out.append(torch.cat([torch.nonzero(y.cpu() == c).flatten()[torch.randperm(int(n), generator=g)[:k]]
                              for c, n in zip(classes, counts)]))
    return out


@torch.no_grad()
def fewshot_probe(
    train_h: torch.Tensor, train_y: torch.Tensor, test_h: torch.Tensor, test_y: torch.Tensor,
    k: int = 5, draws: int = 5, weight_decay: float = 1e-2, seed: int = 0, max_iter: int = 100,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Mean top-1 test accuracy of linear classifiers each fit on k labelled training samples per class.

    train_h: (N, F), test_h: (M, F). Features are standardized with the statistics of all of train (unlabelled
    data is available in this setting); each of `draws` label draws (fixed by seed) fits one L2-regularised
    logistic regression. Returns fewshot_acc (mean over draws) and fewshot_acc_std (their standard deviation).
    """
    c = num_classes or int(max(train_y.max(), test_y.max())) + 1
    xtr, xte = _standardize(train_h, test_h)
    draws_idx = torch.stack(label_draws(train_y, k, draws, seed)).to(xtr.device)  # (draws, k*C)
    w, bias = _fit_logreg(xtr[draws_idx], train_y[draws_idx], c, [float(weight_decay)] * draws, max_iter)
    accs = (_predict(xte, w, bias) == test_y).float().mean(dim=1).tolist()
    t = torch.tensor(accs, dtype=torch.float64)
    return {"fewshot_acc": float(t.mean()), "fewshot_acc_std": float(t.std()) if len(accs) > 1 else 0.0}


@torch.no_grad()
def linear_probe(
    train_h: torch.Tensor, train_y: torch.Tensor, test_h: torch.Tensor, test_y: torch.Tensor,
    weight_decays: list[float] = (0.0, 1e-4, 1e-3, 1e-2), val_fraction: float = 0.2, seed: int = 0,
    max_iter: int = 100, num_classes: int | None = None,
) -> dict[str, float]:
    """Top-1 test accuracy of a linear classifier on frozen features.

    train_h: (N, F), test_h: (M, F). Features are standardized with train statistics. For each weight decay a
    classifier is fit on train minus a stratified validation split; the best on validation is refit on all of
    train and scored once on test. Returns probe_acc, probe_val_acc and probe_wd.
    """
    c = num_classes or int(max(train_y.max(), test_y.max())) + 1
    xtr, xte = _standardize(train_h, test_h)
    fit, val = _stratified_split(train_y, val_fraction, seed)
    fit, val = fit.to(xtr.device), val.to(xtr.device)
    wds = [float(wd) for wd in weight_decays]
    val_acc = []
    # One fit per decay, not one joint fit: at wd = 0 (and nearly at 1e-4) L-BFGS does not converge in max_iter,
    # so the classifier is wherever its own path stopped, and a joint fit's shared line search would move it.
    for wd in wds:
        w, bias = _fit_logreg(xtr[fit], train_y[fit], c, [wd], max_iter)
        val_acc.append((_predict(xtr[val], w, bias)[0] == train_y[val]).float().mean().item())
    best = max(range(len(wds)), key=lambda i: (val_acc[i], -i))  # ties keep the first (weakest) decay listed
    best_wd, best_val = wds[best], val_acc[best]
    w, bias = _fit_logreg(xtr, train_y, c, [best_wd], max_iter)
    test_acc = (_predict(xte, w, bias)[0] == test_y).float().mean().item()
    return {"probe_acc": test_acc, "probe_val_acc": best_val, "probe_wd": best_wd}
