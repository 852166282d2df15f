"""The architectural anti-collapse mechanisms: a predictor on the online branch, stop-gradient, an EMA target.

Which of them a run uses is `config.mechanisms(cfg)` (model.* keys, else the loss method's defaults). The online
branch is the trained network: h, z = f, g(x), and p = q(z) when there is a predictor (else p = z). The target
branch gives t = z of the same weights (shared), or of an EMA copy ξ of backbone + projector; it is detached when
stop_grad holds (always with an EMA). The loss compares p of one view with t of the other, in both directions
(`two_way_loss`). Collapse metrics, spectra and probes stay on the online branch.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ncssl_tune.core.losses import LossFn
from ncssl_tune.core.models import SSLModel


def ema_tau(step: int, total_steps: int, tau0: float) -> float:
    """BYOL's momentum at step k of K: τ = 1 − (1 − τ₀)·(cos(πk/K) + 1)/2, from τ₀ at k = 0 to 1 at k = K.

    As `target_ema` of google-deepmind/deepmind-research byol/utils/schedules.py (k clipped to K)."""
    k = min(step, total_steps)
    return 1 - (1 - tau0) * (math.cos(math.pi * k / max(total_steps, 1)) + 1) / 2


class EMATarget:
    """ξ, an exponential moving average of the online backbone + projector, that makes the target branch.

    Starts as a copy of the online weights (BYOL's official code draws it from another seed and reports no
    difference; a copy keeps one seed for the run). After optimizer step k (0-based), `update(online, k)` sets
    ξ ← τ_k·ξ + (1 − τ_k)·θ for every parameter; its BatchNorm statistics are its own, from its own forward passes
    in training mode (as in both references). Never trained, never evaluated: metrics stay on the online branch.
    """

    def __init__(self, online: SSLModel, tau0: float, total_steps: int):
        self.net = copy.deepcopy(SSLModel(online.backbone, online.projector))  # the predictor stays online-only
        self.net.requires_grad_(False)
        self.tau0, self.total_steps = tau0, total_steps
        self.steps = 0  # updates applied so far: the schedule's position, kept in checkpoints

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> the target's z: (N, D), in training mode like the online branch."""
        self.net.train()
        return self.net(x)[1]

    @torch.no_grad()
    def update(self, online: SSLModel, step: int) -> float:
        """Move ξ toward θ after optimizer step `step`; returns the τ used."""
        if step != self.steps:
            raise RuntimeError(f"EMA target updated for step {step} but {self.steps} updates were applied")
        tau = ema_tau(step, self.total_steps, self.tau0)
        for xi, theta in zip(_branch(self.net), _branch(online), strict=True):
            xi.lerp_(theta.detach(), 1 - tau)  # ξ + (1 − τ)(θ − ξ), as BYOL's update
        self.steps += 1
        return tau

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "steps": self.steps}

    def load_state_dict(self, s: dict) -> None:
        self.net.load_state_dict(s["net"])
        self.steps = int(s["steps"])


def _branch(model: SSLModel) -> Iterator[nn.Parameter]:
    """The parameters a target branch mirrors: backbone, then projector."""
    return itertools.chain(model.backbone.parameters(), model.projector.parameters())


def two_way_loss(loss_fn: LossFn, params: dict, p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor) -> dict[str, Tensor]:
    """½·[L(p1, t2) + L(p2, t1)] for every term: each view's online output p: (N, D) against the other view's
    target t: (N, D) (already detached where stop_grad holds).

    For a loss symmetric in its views with p = t (no mechanism) this is L(z1, z2), so a method's loss keeps its
    scale when a mechanism is switched on; with SimSiam's −cos it is −½·cos(p1, z2) − ½·cos(p2, z1), with BYOL's
    2·(2 − 2·cos) it is BYOL's (2 − 2·cos(p1, z'2)) + (2 − 2·cos(p2, z'1)).
    """
    a = loss_fn(p1, t2, **params)
    b = loss_fn(p2, t1, **params)
    return {k: (a[k] + b[k]) / 2 for k in a}
