"""The collapse classes on the default data: each ablation of benchmarks/bench_ablations.py, trained from the base
configuration of its shipped search space with its schedule, lands in the class the papers predict (default VICReg,
Barlow Twins, W-MSE, SimSiam and BYOL: none; VICReg nu = 0 and Barlow Twins lambda = 0: dimensional; invariance
without BatchNorm, SimSiam without stop-gradient or predictor, BYOL without predictor: total), and every default
beats the randomly initialised encoder on fewshot_acc by bench_ablations.MARGIN."""

from __future__ import annotations

import functools
import importlib.util
import multiprocessing
from pathlib import Path

import pytest

from ncssl_tune.core.train import reference_scores, train

_path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_ablations.py"
_spec = importlib.util.spec_from_file_location("bench_ablations", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# The shipped spaces' budget. A shortened schedule (10 epochs: a compressed cosine) left Barlow Twins lambda = 0 at
# effective_rank_frac 0.051 after the augmentation was rewritten (0.046 before), right at the 0.05 threshold; at 20
# epochs it reads 0.042 and has been below 0.05 since epoch 7 (avg_corr 0.93).
EPOCHS = 20
# collapse metrics stay every epoch; the last epoch always has the few-labels probe
CHEAP_EVAL = {"eval.cond_views": 0, "eval.knn_every": 0, "eval.probe_every": 0}


# Where the papers' prediction does not reproduce on this workload, measured with the shipped schedule (the row's
# numbers under this test's evaluation settings; results/benchmarks/ablations.json has the benchmark's, whose fuller
# evaluation draws other augmentations). Strict: a row that starts to reproduce fails here, so this table is kept
# true, except where the measured value sits at the threshold within one run's noise (STRADDLING).
NOT_REPRODUCED_COLLAPSE = {
    "byol no predictor": "collapse none, not total: std_l2 0.0142 (x sqrt(D) = 0.23 > 0.05), effective_rank_frac "
                         "0.050; with tau_0 0.996 over 440 steps the EMA target stays near its random init, and with "
                         "tau_0 0.9 the same row collapses totally (bench_ablations DIAGNOSTICS)",
}
NOT_REPRODUCED_MARGIN = {
    "simsiam": "fewshot_acc 0.738, random init 0.645: margin 0.093 < 0.20",
    "byol": "fewshot_acc 0.776, random init 0.645: margin 0.131 < 0.20",
    "barlow_twins": "fewshot_acc 0.843, random init 0.645: margin 0.198 < 0.20 (0.181 in the benchmark)",
    "wmse": "straddles: fewshot_acc 0.853, margin 0.209 here, 0.174 in the benchmark",
}
# Barlow Twins' margin straddles 0.20 with the evaluation settings (0.198 here, 0.181 in the benchmark), as W-MSE's
# does the other way (0.209 here, 0.174 there): one run's noise, so neither is held strictly to its side.
STRADDLING = {"barlow_twins", "wmse"}
DEFAULTS = [a for a in bench.ABLATIONS if a[3] == "none"]


@functools.cache
def _measured() -> tuple[dict[str, dict], float]:
    """Every ablation's last-epoch metrics and the random-init encoder's fewshot_acc (mean of 3 initialisations, the
    same for every shipped digits space), computed once for both tests on two processes of one torch thread each:
    each run is seeded and single-threaded, so it gives the same numbers as in this process, in half the time."""
    cfgs = {name: bench.base_config(space, {**overrides, **CHEAP_EVAL}, epochs=EPOCHS)
            for name, space, overrides, _ in bench.ABLATIONS}
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # spawn: no forked OpenMP or Ray state
        reference = pool.apply_async(reference_scores, (bench.base_config("vicreg", CHEAP_EVAL, epochs=EPOCHS),))
        lasts = pool.map(train, cfgs.values(), chunksize=1)
        floor = reference.get()["random_init"]["fewshot_acc"]
    return dict(zip(cfgs, lasts, strict=True)), floor


def trained(name: str) -> dict:
    return _measured()[0][name]


def random_init_fewshot() -> float:
    return _measured()[1]


def _marked(rows: list, known: dict) -> list:
    return [pytest.param(*a, id=a[0], marks=[pytest.mark.xfail(strict=a[0] not in STRADDLING, reason=known[a[0]])]
                         if a[0] in known else []) for a in rows]


@pytest.mark.slow  # 20 epochs each: the longest training in the tests
@pytest.mark.parametrize(("name", "space", "overrides", "predicted"), _marked(bench.ABLATIONS, NOT_REPRODUCED_COLLAPSE))
def test_ablation_lands_in_the_predicted_collapse_class(name, space, overrides, predicted):
    last = trained(name)
    assert last["status"] == "finished"
    assert last["collapse"] == predicted, (
        f"{name}: effective_rank_frac {last['effective_rank_frac']:.3g}, std_l2 {last['std_l2']:.3g}, "
        f"avg_corr {last['avg_corr']:.3g}")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "space", "overrides", "predicted"), _marked(DEFAULTS, NOT_REPRODUCED_MARGIN))
def test_default_beats_the_random_init_encoder(name, space, overrides, predicted):
    floor = random_init_fewshot()
    last = trained(name)
    assert last["fewshot_acc"] - floor >= bench.MARGIN, f"{name}: fewshot_acc {last['fewshot_acc']:.3f}, random init {floor:.3f}"
