"""End-to-end behaviour of the plain training loop on the embedded digits (no Ray, no MLflow)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ncssl_tune.config import TrainConfig
from ncssl_tune.core import evaluate
from ncssl_tune.core.evaluate import EVALUATORS
from ncssl_tune.core.metrics import gaussian_entropy
from ncssl_tune.core.optim import LARS, build_optimizer, lr_at
from ncssl_tune.core.train import load_state, reference_scores, save_state, train

# Cheap evaluation: the tests check the loop, not the probe's resolution.
FAST_EVAL = {"probe_every": 0, "cond_views": 0, "knn_every": 5, "eval_samples": 256}
TIMING = ("epoch_seconds", "train_seconds", "images_per_s", "metrics_seconds")


def cfg(**sections) -> TrainConfig:
    d = {"train": {"epochs": 2, "threads": 2}, "eval": dict(FAST_EVAL)}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return TrainConfig.from_dict(d)


def collect(config: TrainConfig, resume: dict | None = None) -> tuple[list[dict], list[dict | None]]:
    reports, states = [], []
    train(config, lambda m, s: (reports.append(m), states.append(s)), resume=resume)
    return reports, states


def strip(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in TIMING}


@pytest.fixture(scope="module")
def control_runs():
    """The negative control against VICReg on the same budget (5 epochs, same seed and data)."""
    # BatchNorm is itself an implicit anti-collapse mechanism: with it, plain MSE shrinks z instead of
    # collapsing it to a point. The control therefore runs without it (model.norm=none).
    inv = train(cfg(model={"norm": "none"}, loss={"method": "invariance"}, train={"epochs": 5}))
    vic = train(cfg(loss={"method": "vicreg"}, train={"epochs": 5}))
    return inv, vic


def test_invariance_collapses_totally(control_runs):
    inv, _ = control_runs
    assert inv["status"] == "finished"
    assert inv["effective_rank"] < 2
    assert inv["std_l2"] < 1e-3
    assert inv["collapse"] == "total"


def test_vicreg_does_not_collapse_and_beats_the_control(control_runs):
    inv, vic = control_runs
    assert vic["collapse"] == "none"
    assert vic["effective_rank"] > 10 * inv["effective_rank"]
    assert vic["std_l2"] > 0.2 / math.sqrt(512)
    assert vic["knn_acc"] > inv["knn_acc"]


def test_report_carries_every_metric_each_epoch():
    reports, states = collect(cfg(eval={"cond_views": 2, "knn_every": 1, "probe_every": 1}))
    assert [r["epoch"] for r in reports] == [1, 2]
    names = ["effective_rank", "effective_rank_frac", "entropy", "avg_corr", "std_l2", "collapse", "lidar",
             "alpha_req", "alpha_req_dev"]
    for r in reports:
        for n in names:
            assert n in r and n + "_h" in r
        for n in ("loss", "loss_inv", "loss_var", "loss_cov", "entropy_cond", "lidar", "lidar_h", "knn_acc",
                  "probe_acc", "epoch_seconds", "images_per_s"):
            assert n in r and math.isfinite(r[n]), n
    assert [r["status"] for r in reports] == ["running", "finished"]
    for r in reports:  # the spectrum of every epoch, the one the entropy of that epoch was computed from
        assert len(r["spectrum"]) == 512 and len(r["spectrum_h"]) == 128
        assert r["spectrum"] == sorted(r["spectrum"], reverse=True)
        for suffix, d in (("", 512), ("_h", 128)):
            got = gaussian_entropy(torch.tensor(r["spectrum" + suffix]), d)
            assert got == pytest.approx(r["entropy" + suffix], rel=1e-9)
    assert reports[0]["spectrum"] != reports[1]["spectrum"]
    assert all(s is not None for s in states)  # checkpoint_every defaults to 1


def test_same_seed_same_metrics_and_other_seed_differs():
    a, _ = collect(cfg())
    b, _ = collect(cfg())
    c, _ = collect(cfg(train={"seed": 1}))
    assert [strip(m) for m in a] == [strip(m) for m in b]
    assert strip(a[-1]) != strip(c[-1])


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    config = cfg(train={"epochs": 3})
    full, states = collect(config)
    path = tmp_path / "state.pt"
    save_state(states[0], path)  # as if the run had stopped after epoch 1
    resumed, _ = collect(config, resume=load_state(path))
    assert [m["epoch"] for m in resumed] == [2, 3]
    assert [strip(m) for m in resumed] == [strip(m) for m in full[1:]]


def test_resume_with_an_ema_target_and_a_predictor_matches_uninterrupted_run(tmp_path):
    """BYOL: the EMA target's weights and its schedule step travel with the checkpoint."""
    config = cfg(loss={"method": "byol"}, model={"width": 16, "projector": "64-64"}, train={"epochs": 3})
    full, states = collect(config)
    assert states[0]["ema"]["steps"] > 0 and states[-1]["ema"]["steps"] == 3 * states[0]["ema"]["steps"]
    path = tmp_path / "state.pt"
    save_state(states[0], path)
    resumed, resumed_states = collect(config, resume=load_state(path))
    assert [strip(m) for m in resumed] == [strip(m) for m in full[1:]]
    for a, b in zip(resumed_states[-1]["ema"]["net"].values(), states[-1]["ema"]["net"].values(), strict=True):
        assert torch.equal(a, b)
    without = dict(states[0])
    del without["ema"]
    with pytest.raises(ValueError, match="holds none"):
        collect(config, resume=without)


def test_nan_loss_ends_as_diverged_without_exception():
    reports, _ = collect(cfg(train={"lr": 1e12, "epochs": 3, "warmup_epochs": 0}))
    last = reports[-1]
    assert last["status"] == "diverged"
    assert math.isnan(last["loss"])
    assert "non-finite" in last["error"]
    assert last["epoch"] <= 3


def test_lars_trains():
    reports, _ = collect(cfg(train={"optimizer": "lars", "lr": 0.3, "epochs": 1}))
    assert math.isfinite(reports[-1]["loss"])


def test_lars_excludes_biases_and_norms_from_decay_and_adaptation():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = build_optimizer("lars", model, lr=0.1, weight_decay=0.5)
    assert isinstance(opt, LARS)
    groups = {g["lars_exclude"]: g for g in opt.param_groups}
    assert [p.shape for p in groups[False]["params"]] == [torch.Size([4, 4])]
    assert len(groups[True]["params"]) == 3 and groups[True]["weight_decay"] == 0.0


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 100, 10, 1.0, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)


def test_reference_scores_of_random_init_and_pixels():
    ref = reference_scores(cfg(eval={"knn_every": 1}))
    assert set(ref) == {"random_init", "random_init_sd", "random_init_0", "random_init_1", "random_init_2", "pixels"}
    for scores in ref.values():
        assert {"knn_acc", "probe_acc", "fewshot_acc", "fewshot_acc_std"} <= set(scores)
    draws = [ref[f"random_init_{i}"]["fewshot_acc"] for i in range(3)]
    assert ref["random_init"]["fewshot_acc"] == pytest.approx(np.mean(draws))  # three initialisations averaged
    assert ref["random_init_sd"]["fewshot_acc"] == pytest.approx(np.std(draws, ddof=1))
    assert len(set(draws)) > 1  # different initialisations: the spread is measured, not assumed
    ref.pop("random_init_sd")
    assert ref["pixels"]["probe_acc"] > 0.9  # digits are nearly linearly separable in pixel space
    assert ref["random_init"]["probe_acc"] > 0.5
    # 5 labels per class see far less than the full train split, on either representation
    for scores in ref.values():
        assert 0.1 < scores["fewshot_acc"] < scores["probe_acc"]


def test_evaluators_are_registered_label_free_first_with_distinct_names():
    # metrics_seconds is the time of the label-free evaluators, run before every downstream one
    kinds = [cls.downstream for cls in EVALUATORS]
    assert kinds == sorted(kinds) and any(kinds) and not all(kinds)
    assert len({cls.name for cls in EVALUATORS}) == len(EVALUATORS)


def test_evaluators_share_one_embedding_pass_per_image_set(monkeypatch):
    """Whichever evaluators are due, an evaluation embeds each set of images once: train, test and the views when a
    downstream evaluator is due (the eval subset is rows of train), else the eval subset and the views."""
    calls: list[int] = []
    real = evaluate.embed
    monkeypatch.setattr(evaluate, "embed", lambda model, x, *a, **kw: calls.append(len(x)) or real(model, x, *a, **kw))
    last = train(cfg(eval={"cond_views": 2, "cond_samples": 16, "knn_every": 0}, train={"epochs": 3}))
    assert last["status"] == "finished" and last["probe_epoch"] == 3
    n_train, n_test = calls[:2]
    probe_epoch, plain_epoch = [n_train, n_test, 2 * 16], [256, 2 * 16]  # the probe is due on epochs 1 and 3
    assert calls == probe_epoch + plain_epoch + probe_epoch


def _live_models() -> list:
    import gc

    from ncssl_tune.core.models import SSLModel

    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, SSLModel)]


def test_a_run_stopped_from_its_report_leaves_no_model_behind():
    """Ray stops a trial by raising SystemExit inside tune.report; with reused workers the next trial starts in the
    same process while that exception is handled, so the stopped run must already have let go of its tensors."""
    before = len(_live_models())
    calls = []

    def stop_at_second(metrics, state):
        calls.append(metrics["epoch"])
        assert len(_live_models()) == before + 1  # the live run holds its model until then
        if len(calls) == 2:
            raise SystemExit(0)

    with pytest.raises(SystemExit) as stopped:
        train(cfg(train={"epochs": 4}), stop_at_second)
    assert calls == [1, 2]
    assert stopped.value.__traceback__ is not None  # the frames are still alive here, as in Ray's handler
    assert len(_live_models()) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_finished_or_stopped_run_returns_its_cuda_memory():
    torch.cuda.synchronize()
    base = torch.cuda.memory_reserved()
    train(cfg(train={"device": "cuda"}))
    assert torch.cuda.memory_reserved() == base

    def stop(metrics, state):
        raise SystemExit(0)

    with pytest.raises(SystemExit):
        train(cfg(train={"device": "cuda"}), stop)
    assert torch.cuda.memory_reserved() == base
