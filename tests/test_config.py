"""The typed configuration: per-method loss parameters that match the loss functions, and `with_overrides`,
the one way a configuration is derived from another."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from ncssl_tune.config import LOSS_PARAMS, ConfigError, TrainConfig
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
