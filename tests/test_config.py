"""The typed configuration: per-method loss parameters that match the loss functions, and `with_overrides`,
the one way a configuration is derived from another."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from ncssl_tune.config import LOSS_PARAMS, ConfigError, Mechanisms, TrainConfig, mechanisms
from ncssl_tune.core.losses import LOSSES


def test_every_loss_has_typed_parameters():
    assert set(LOSS_PARAMS) == set(LOSSES)


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_loss_parameters_match_the_loss_signature(method):
    """Same names, same defaults, same types as the keyword-only arguments of the loss function."""
    sig = inspect.signature(LOSSES[method]).parameters.values()
    expected = {p.name: p.default for p in sig if p.kind is inspect.Parameter.KEYWORD_ONLY}
    fields = dataclasses.asdict(LOSS_PARAMS[method]())
    assert fields == expected
    assert all(type(fields[k]) is type(v) for k, v in expected.items())
    cfg = TrainConfig.from_dict({"loss": {"method": method}, "model": {"projector": "32-32"}})
    assert cfg.loss.params() == expected


def test_with_overrides_validates_and_leaves_the_original_alone():
    base = TrainConfig.from_dict({"loss": {"method": "vicreg"}})
    cfg = base.with_overrides({"loss.vicreg.lam": 3, "train.epochs": 7})
    assert cfg.loss.vicreg.lam == 3.0 and isinstance(cfg.loss.vicreg.lam, float) and cfg.train.epochs == 7
    assert base.loss.vicreg.lam == 25.0 and base.train.epochs == 20
    assert cfg.loss.params() == {"lam": 3.0, "mu": 25.0, "nu": 1.0, "gamma": 1.0}
    with pytest.raises(ConfigError, match=r"loss\.vicreg\.bogus: unknown parameter; allowed: lam, mu, nu, gamma"):
        base.with_overrides({"loss.vicreg.bogus": 1})
    with pytest.raises(ConfigError, match=r"train\.epochs: must be > 0"):
        base.with_overrides({"train.epochs": 0})


def test_get_reads_dotted_keys_and_unset_keys_hold_their_default():
    cfg = TrainConfig.from_dict({"train": {"lr": 0.01}})
    assert cfg.get("train.lr") == 0.01
    assert cfg.get("model.norm") == "batch" and cfg.get("loss.wmse.w_size") == 128
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # survives its own dict form (what trials report)


SMALL = {"projector": "256-256-32"}


@pytest.mark.parametrize("method, model, expected", [
    ("vicreg", {}, Mechanisms(predictor="", stop_grad=False, ema_tau=None)),
    ("simsiam", {}, Mechanisms(predictor="8", stop_grad=True, ema_tau=None)),  # D/4: SimSiam's 2048 -> 512
    ("byol", {}, Mechanisms(predictor="256", stop_grad=True, ema_tau=0.996)),  # the projector's hidden width
    ("simsiam", {"predictor": ""}, Mechanisms(predictor="", stop_grad=True, ema_tau=None)),
    ("simsiam", {"stop_grad": False}, Mechanisms(predictor="8", stop_grad=False, ema_tau=None)),
    ("byol", {"predictor": "", "ema_tau": 0.99}, Mechanisms(predictor="", stop_grad=True, ema_tau=0.99)),
    ("byol", {"ema": False}, Mechanisms(predictor="256", stop_grad=True, ema_tau=None)),
    ("vicreg", {"ema": True}, Mechanisms(predictor="", stop_grad=True, ema_tau=0.996)),  # an EMA implies sg
    ("barlow_twins", {"predictor": "64-64", "stop_grad": True},
     Mechanisms(predictor="64-64", stop_grad=True, ema_tau=None)),
])
def test_a_method_supplies_mechanism_defaults_and_explicit_keys_win(method, model, expected):
    cfg = TrainConfig.from_dict({"loss": {"method": method}, "model": {**SMALL, **model}})
    assert mechanisms(cfg) == expected
    assert expected.asymmetric == (method != "vicreg" or bool(model))
    # the defaults follow the method: a swept loss.method takes its own
    other = "byol" if method != "byol" else "simsiam"
    if not model:
        assert mechanisms(cfg.with_overrides({"loss.method": other})) != expected


def test_a_method_default_predictor_without_a_projector_uses_the_feature_width():
    cfg = TrainConfig.from_dict({"loss": {"method": "simsiam"}, "model": {"projector": "", "width": 16}})
    assert mechanisms(cfg, feat_dim=16).predictor == "4"


@pytest.mark.parametrize("method, model, match", [
    ("vicreg", {"ema_tau": 0.99}, (r"^model\.ema_tau: set to 0\.99, but model\.ema is false \(loss\.method vicreg's "
                                   r"default\): there is no EMA target")),
    ("byol", {"ema": False, "ema_tau": 0.99}, r"^model\.ema_tau: set to 0\.99, but model\.ema is false: "),
    ("byol", {"stop_grad": False}, r"^model\.stop_grad: false with model\.ema true \(loss\.method byol's default\)"),
    ("vicreg", {"ema": True, "stop_grad": False}, r"^model\.stop_grad: false with model\.ema true: the EMA target"),
    ("simsiam", {"predictor": "64x64"}, r"^model\.predictor: got '64x64'; expected the hidden widths"),
    ("byol", {"ema_tau": 1.0}, r"^model\.ema_tau: EMA momentum must be in \[0, 1\), got 1\.0"),
])
def test_mechanism_combinations_that_mean_nothing_are_one_line_errors(method, model, match):
    with pytest.raises(ConfigError, match=match) as err:
        TrainConfig.from_dict({"loss": {"method": method}, "model": model})
    assert "\n" not in str(err.value)
