"""The architectural mechanisms: the predictor, the EMA target and its schedule, and how the trainer wires them
(core/mechanisms.py, core/train.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncssl_tune.config import TrainConfig
from ncssl_tune.core.mechanisms import EMATarget, ema_tau
from ncssl_tune.core.models import SSLModel, build_predictor
from ncssl_tune.core.train import _Run, train


# BYOL's official schedule, google-deepmind/deepmind-research byol/utils/schedules.py @
# 8457046b2c2ec259158efff7e238d006a9e6a224 (target_ema with _cosine_decay), transcribed with numpy for jax.numpy
def official_target_ema(global_step: int, base_ema: float, max_steps: int) -> float:
    global_step = np.minimum(global_step, max_steps)
    decay = 1.0 * 0.5 * (1 + np.cos(np.pi * global_step / max_steps))
    return float(1.0 - (1.0 - base_ema) * decay)


@pytest.mark.parametrize("step", [0, 1, 37, 50, 99, 100, 150])
def test_ema_schedule_is_byols(step):
    assert ema_tau(step, 100, 0.996) == pytest.approx(official_target_ema(step, 0.996, 100), rel=0, abs=1e-15)
    assert ema_tau(step, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi * min(step, 100) / 100) + 1) / 2)


def test_ema_schedule_end_points():
    assert ema_tau(0, 10, 0.9) == pytest.approx(0.9) and ema_tau(10, 10, 0.9) == 1.0
    assert ema_tau(5, 10, 0.9) == pytest.approx(0.95)


def small_model(predictor: str = "") -> SSLModel:
    torch.manual_seed(0)
    m = SSLModel.build("small_cnn", "32-16", 1, 8, {"width": 16})
    if predictor:
        m.predictor = build_predictor(16, predictor)
    return m


def test_predictor_keeps_the_embedding_width_with_simsiams_layers():
    q = build_predictor(16, "4")
    assert q(torch.randn(5, 16)).shape == (5, 16) and q.out_dim == 16
    linear = [m for m in q if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in linear] == [(16, 4, False), (4, 16, True)]
    assert [m.in_features for m in build_predictor(16, "8-8", norm="none") if isinstance(m, torch.nn.Linear)] == [16, 8, 8]
    with pytest.raises(ValueError, match="hidden widths"):
        build_predictor(16, "")


def test_ema_update_moves_the_target_toward_the_online_weights_only_for_backbone_and_projector():
    online = small_model(predictor="4")
    target = EMATarget(online, tau0=0.9, total_steps=10)
    assert not any(k.startswith("predictor") for k in target.net.state_dict())
    xi0 = [p.clone() for p in target.net.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    tau = target.update(online, 0)
    assert tau == pytest.approx(0.9)
    theta = [*online.backbone.parameters(), *online.projector.parameters()]
    for xi, x0, th in zip(target.net.parameters(), xi0, theta, strict=True):
        torch.testing.assert_close(xi, tau * x0 + (1 - tau) * th)
        assert not xi.requires_grad
    with pytest.raises(RuntimeError, match="step 5 but 1 updates"):
        target.update(online, 5)
    again = EMATarget(small_model(), tau0=0.9, total_steps=10)
    again.load_state_dict(target.state_dict())
    assert again.steps == 1
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(again(x), target(x))


FAST = {"train": {"epochs": 2, "threads": 2, "batch_size": 64},
        "eval": {"probe_every": 0, "cond_views": 0, "knn_every": 5, "eval_samples": 128},
        "model": {"width": 16, "projector": "64-64"}}


def cfg(method: str, **model) -> TrainConfig:
    return TrainConfig.from_dict({**FAST, "loss": {"method": method}, "model": {**FAST["model"], **model}})


def test_trainer_loss_is_simsiams_on_predictor_and_detached_target():
    run = _Run(cfg("simsiam"))
    try:
        run.model.train()
        v1, v2 = run.augment(run.train_x[:32])
        torch.manual_seed(1)
        got = run.step_loss(v1, v2)["loss"]
        torch.manual_seed(1)
        _, z1 = run.model(v1)
        _, z2 = run.model(v2)
        p1, p2 = run.model.predictor(z1), run.model.predictor(z2)
        cos = torch.nn.CosineSimilarity(dim=1)
        official = -(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) * 0.5
        torch.testing.assert_close(got, official)
        got.backward()  # only through p: the projector's gradient comes from the predictor's input alone
        assert all(p.grad is not None for p in run.model.predictor.parameters())
    finally:
        run.close()


@pytest.mark.parametrize("method, model, has_p", [("simsiam", {}, True), ("byol", {}, True),
                                                   ("simsiam", {"predictor": ""}, False)])
def test_reports_carry_the_predictors_collapse_metrics(method, model, has_p):
    last = train(cfg(method, **model))
    assert last["status"] == "finished" and math.isfinite(last["loss"]) and math.isfinite(last["cos_sim"])
    assert ("std_l2_p" in last) == has_p and ("effective_rank_p" in last) == has_p
    if has_p:
        assert math.isfinite(last["std_l2_p"]) and "spectrum_p" not in last and "collapse_p" not in last
    assert math.isfinite(last["std_l2"]) and last["collapse"] in ("none", "dimensional", "total")
