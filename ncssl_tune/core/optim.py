"""Optimizers and the learning-rate schedule used by the training loop."""

from __future__ import annotations

import math

import torch


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in the VICReg / Barlow Twins reference code.

    Parameters in groups with `lars_exclude=True` (biases and normalization weights) get neither weight decay
    nor the trust-ratio adaptation, which is what keeps large-batch ResNet runs stable.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "eta": eta, "lars_exclude": False})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if not g["lars_exclude"]:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(dp)
                    q = torch.where((p_norm > 0) & (u_norm > 0), g["eta"] * p_norm / u_norm, torch.ones_like(p_norm))
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters: 1-d tensors (biases, norm weights) get no weight decay (and no LARS adaptation)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


def build_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW([{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups], lr=lr)
    if name == "lars":
        return LARS(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose from: adamw, lars")


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, final_frac: float) -> float:
    """Linear warmup from 0 to base_lr, then cosine decay to base_lr * final_frac."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    end = base_lr * final_frac
    return end + (base_lr - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
