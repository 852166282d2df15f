"""What an epoch's evaluation measures: small evaluators that share one set of embeddings.

Each evaluator has a `name`, a schedule `due(epoch, final)` read from EvalConfig and `__call__(shared) -> dict`
that returns its metrics (the style of stable-pretraining's RankMe / LiDAR / OnlineKNN / OnlineProbe callbacks).
EVALUATORS lists them in the order they run, which is the order of their metrics in a report. `SharedEmbeddings`
computes each embedding at most once per evaluation, on first use: the fixed eval subset (h, z and, on the
low-rank route, the head input), the K augmented views of entropy_cond and LiDAR, and the two splits' embeddings
for the downstream evaluators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor

from ncssl_tune.config import EvalConfig, TrainConfig, mechanisms
from ncssl_tune.core.augment import TwoViewAugment
from ncssl_tune.core.data import as_float, batches, index_batches
from ncssl_tune.core.metrics import (
    CollapseThresholds,
    LinearHead,
    all_finite,
    collapse_metrics,
    entropy_cond,
    lidar,
    low_rank_route,
)
from ncssl_tune.core.models import SSLModel
from ncssl_tune.core.probe import fewshot_probe, knn_acc, linear_probe

Autocast = Callable[[], Any]  # () -> the run's torch.autocast context


@dataclass(frozen=True)
class Embedding:
    """One eval-mode pass of the model over N images, float32."""

    h: Tensor  # (N, F) representation, the backbone's output
    z: Tensor  # (N, D) projector output
    head_input: Tensor | None = None  # (N, P) input of the projector's last nn.Linear, when asked for

    def rows(self, idx: Tensor) -> Embedding:
        """The embedding of the images at idx: (len(idx),) indices into N."""
        a = self.head_input
        return Embedding(self.h[idx], self.z[idx], None if a is None else a[idx])


def last_linear(model: SSLModel) -> torch.nn.Linear | None:
    """The projector's last layer when it is an nn.Linear (build_projector's always is), else None."""
    proj = model.projector
    if isinstance(proj, torch.nn.Sequential) and len(proj) > 0 and isinstance(proj[-1], torch.nn.Linear):
        return proj[-1]
    return None


@torch.no_grad()
def embed(model: SSLModel, x: torch.Tensor, batch: int, autocast: Autocast, head_input: bool = False) -> Embedding:
    """h: (N, F), z: (N, D) of x: (N, C, H, W) images (uint8, float or streamed) in eval mode, float32; with
    head_input also a: (N, P), the input of the projector's last nn.Linear (z = a Wᵀ + b, for metrics.LinearHead;
    head_input needs last_linear(model))."""
    last = last_linear(model) if head_input else None
    if head_input and last is None:
        raise ValueError("embed: head_input needs a projector that ends with an nn.Linear")
    hs, zs, as_ = [], [], []
    for xb in batches(x, index_batches(x.shape[0], batch)):
        xb = as_float(xb)
        with autocast():
            if last is None:
                h, z = model(xb)
            else:  # SSLModel.forward split before the last layer, in one pass
                h = model.backbone(xb)
                a = model.projector[:-1](h)
                z = last(a)
                as_.append(a.float())
        hs.append(h.float())
        zs.append(z.float())
    return Embedding(torch.cat(hs), torch.cat(zs), torch.cat(as_) if head_input else None)


@dataclass(frozen=True)
class Labels:
    """The labels of both splits, read only by the downstream evaluators (never by the SSL loss)."""

    train: Tensor  # (N,)
    test: Tensor  # (T,)
    num_classes: int


class SharedEmbeddings:
    """The embeddings one evaluation's evaluators share, each computed once, on first use.

    With splits (some due evaluator reads them) the whole train and test splits are embedded up front, and the eval
    subset is their rows at eval_idx rather than a second pass. Reading `eval` checks it is finite.
    """

    def __init__(self, model: SSLModel, autocast: Autocast, augment: TwoViewAugment, train_x: Tensor,
                 test_x: Tensor, eval_idx: Tensor, labels: Labels, e: EvalConfig, epoch: int, splits: bool):
        self.model, self.autocast, self.augment = model, autocast, augment
        self.train_x, self.eval_idx, self.labels, self.epoch = train_x, eval_idx, labels, epoch
        self.cond_views, self.cond_samples = e.cond_views, e.cond_samples
        last = last_linear(model)
        # z = a Wᵀ through a narrow last layer (P < min(M, D)): the metrics decompose (P+1)² instead of min(M, D)²
        low_rank = last is not None and low_rank_route(last.in_features, len(eval_idx), last.out_features)
        self.last = last if low_rank else None
        self.train: Embedding | None = None
        self.test: Embedding | None = None
        if splits:
            # One pass over train serves kNN, the probes and (its rows at eval_idx) the collapse metrics.
            self.train = self._embed(train_x, head_input=low_rank)
            self.test = self._embed(test_x)

    def _embed(self, x: Tensor, head_input: bool = False) -> Embedding:
        return embed(self.model, x, 1024, self.autocast, head_input=head_input)

    @cached_property
    def x_eval(self) -> Tensor:
        return as_float(self.train_x[self.eval_idx])  # (M, C, H, W)

    @cached_property
    def eval(self) -> Embedding:
        """h: (M, F), z: (M, D) and, on the low-rank route, head_input: (M, P) of the fixed eval subset."""
        if self.train is not None:
            out = self.train.rows(self.eval_idx)
        else:
            out = self._embed(self.x_eval, head_input=self.last is not None)
        if not all_finite(out.h, out.z):
            raise FloatingPointError(f"non-finite embeddings after epoch {self.epoch}")
        return out

    @cached_property
    def head(self) -> LinearHead | None:
        """The layer that made the eval subset's z (z = a Wᵀ + b) on the low-rank route, else None."""
        a = self.eval.head_input
        return None if a is None else LinearHead(a, self.last.weight, self.last.bias)

    @cached_property
    def views(self) -> Embedding:
        """h: (K, Mc, F), z: (K, Mc, D) of K augmented views of the eval subset's first Mc images."""
        x = self.x_eval[:self.cond_samples]  # (Mc, C, H, W)
        v = self.augment.views(x, self.cond_views)  # (K, Mc, C, H, W): draws from the global RNG, as training does
        k, mm = v.shape[:2]
        out = self._embed(v.flatten(0, 1))
        return Embedding(out.h.view(k, mm, -1), out.z.view(k, mm, -1))


class Evaluator:
    """One evaluation: `due(epoch, final)` says when, `__call__(shared)` returns its metrics."""

    name: ClassVar[str]
    downstream: ClassVar[bool] = False  # reads labels and both splits' embeddings; else the eval subset only
    carried: ClassVar[bool] = False  # its metrics ride along every later report until it is due again

    def __init__(self, cfg: TrainConfig):
        self.e = cfg.eval

    def due(self, epoch: int, final: bool) -> bool:
        return True

    def __call__(self, shared: SharedEmbeddings) -> dict[str, Any]:
        raise NotImplementedError


def collapse_thresholds(e: EvalConfig) -> CollapseThresholds:
    return CollapseThresholds(total_std=e.collapse_total_std, dim_rank_frac=e.collapse_dim_frac)


class CollapseMetrics(Evaluator):
    """effective_rank (RankMe), entropy, avg_corr, std_l2, alpha_req, collapse and spectrum of z, every epoch."""

    name = "collapse"
    rep, suffix = "z", ""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.thresholds = collapse_thresholds(cfg.eval)

    def __call__(self, shared: SharedEmbeddings) -> dict[str, Any]:
        head = shared.head if self.rep == "z" else None
        m = collapse_metrics(getattr(shared.eval, self.rep), self.thresholds, suffix=self.suffix, head=head)
        # every epoch's: the driver keeps them all for the trial's spectrum-over-epochs record
        spectrum = [float(v) for v in m.pop(f"spectrum{self.suffix}")]
        return {f"spectrum{self.suffix}": spectrum, **m}


class CollapseMetricsH(CollapseMetrics):
    """The same metrics of h (suffix _h); the low-rank route is z's alone."""

    name = "collapse_h"
    rep, suffix = "h", "_h"


class PredictorMetrics(Evaluator):
    """The numeric collapse metrics of the predictor's output p = q(z) on the eval subset (suffix _p: std_l2_p,
    effective_rank_p, ...), when the run has a predictor: SimSiam's collapse shows first in p's std_l2 (Chen & He
    2021). No spectrum or collapse class: those of the online branch's z and h are the run's."""

    name = "collapse_p"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.thresholds = collapse_thresholds(cfg.eval)
        self.has_predictor = bool(mechanisms(cfg).predictor)

    def due(self, epoch: int, final: bool) -> bool:
        return self.has_predictor

    def __call__(self, shared: SharedEmbeddings) -> dict[str, Any]:
        q = shared.model.predictor
        with shared.autocast():
            p = q(shared.eval.z).float()  # (M, D), eval mode: BatchNorm with its running statistics
        m = collapse_metrics(p, self.thresholds, suffix="_p")
        return {k: v for k, v in m.items() if not isinstance(v, (str, list))}


class EntropyCond(Evaluator):
    """entropy_cond: the Gaussian estimate of H(Z|X) from the K augmented views."""

    name = "entropy_cond"

    def due(self, epoch: int, final: bool) -> bool:
        return bool(self.e.cond_views)

    def __call__(self, shared: SharedEmbeddings) -> dict[str, Any]:
        return {"entropy_cond": float(entropy_cond(shared.views.z))}


class LiDAR(Evaluator):
    """lidar and lidar_h from the same K views as entropy_cond: no extra forward pass."""

    name = "lidar"

    def due(self, epoch: int, final: bool) -> bool:
        return bool(self.e.cond_views)

    def __call__(self, shared: SharedEmbeddings) -> dict[str, Any]:
        v = shared.views
        return {"lidar": lidar(v.z), "lidar_h": lidar(v.h)}


class Downstream(Evaluator):
    """An evaluator of frozen features of both splits with their labels: `score` serves raw pixels too."""

    downstream = True

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.seed = cfg.data.seed

    def __call__(self, shared: SharedEmbeddings) -> dict[str, Any]:
        return self.score(shared.train.h, shared.test.h, shared.labels)

    def score(self, train_f: Tensor, test_f: Tensor, labels: Labels) -> dict[str, float]:
        """Metrics of frozen train_f: (N, F), test_f: (T, F)."""
        raise NotImplementedError


class OnlineKNN(Downstream):
    """knn_acc: weighted cosine kNN, every knn_every epochs and at the end."""

    name = "knn"

    def due(self, epoch: int, final: bool) -> bool:
        return final or bool(self.e.knn_every and epoch % self.e.knn_every == 0)

    def score(self, train_f: Tensor, test_f: Tensor, labels: Labels) -> dict[str, float]:
        return {"knn_acc": knn_acc(train_f, labels.train, test_f, labels.test, k=self.e.knn_k, t=self.e.knn_t,
                                   num_classes=labels.num_classes)}


class FewLabelsProbe(OnlineKNN):
    """fewshot_acc (and its std over the label draws); as cheap as kNN (~0.1 s on digits), so on kNN's schedule."""

    name = "fewshot"

    def due(self, epoch: int, final: bool) -> bool:
        return bool(self.e.fewshot_k) and super().due(epoch, final)

    def score(self, train_f: Tensor, test_f: Tensor, labels: Labels) -> dict[str, float]:
        e = self.e
        return fewshot_probe(train_f, labels.train, test_f, labels.test, k=e.fewshot_k, draws=e.fewshot_draws,
                             weight_decay=e.fewshot_weight_decay, num_classes=labels.num_classes, seed=self.seed)


class LinearProbe(Downstream):
    """probe_acc (weight decay chosen on a validation split): first epoch, every probe_every epochs and at the end.

    Carried: every report holds the latest probe so a scheduler never meets a missing metric."""

    name = "probe"
    carried = True

    def due(self, epoch: int, final: bool) -> bool:
        return final or epoch == 1 or bool(self.e.probe_every and epoch % self.e.probe_every == 0)

    def score(self, train_f: Tensor, test_f: Tensor, labels: Labels) -> dict[str, float]:
        e = self.e
        return linear_probe(train_f, labels.train, test_f, labels.test, weight_decays=e.probe_weight_decays,
                            val_fraction=e.probe_val_fraction, num_classes=labels.num_classes, seed=self.seed)


# In the order they run, which is the order of their metrics in a report. The label-free evaluators of the eval
# subset come before the downstream ones: their time, with their own forward passes, is metrics_seconds.
EVALUATORS: tuple[type[Evaluator], ...] = (
    CollapseMetrics, CollapseMetricsH, PredictorMetrics, EntropyCond, LiDAR, OnlineKNN, FewLabelsProbe, LinearProbe,
)


def build_evaluators(cfg: TrainConfig) -> tuple[Evaluator, ...]:
    """One instance of every registered evaluator, configured by cfg."""
    return tuple(cls(cfg) for cls in EVALUATORS)
