"""Ray Tune adapter around `train()`: config dict -> TrainConfig, checkpoints in and out, `tune.report`.

Runs inside a Ray worker. It uses the resources Ray assigned: torch threads = CPUs per trial, and the GPU that
Ray made visible (CUDA_VISIBLE_DEVICES) when the trial asked for one.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile

import ray
from ray import tune

from ncssl_tune.config import set_dotted
from ncssl_tune.train import TrainConfig, load_state, save_state, train

STATE_FILE = "state.pt"


def build_config(base: dict, sampled: dict, cpus: float, gpus: float) -> TrainConfig:
    """Merge the sampled dotted keys into the base config and pin threads/device to Ray's assignment."""
    d = copy.deepcopy(base)
    for key, value in sampled.items():
        set_dotted(d, key, value)
    d.setdefault("train", {})
    d["train"].setdefault("threads", max(1, math.ceil(cpus)))
    if gpus > 0:
        d["train"]["device"] = "cuda"  # Ray restricts CUDA_VISIBLE_DEVICES to the assigned GPU
    elif d["train"].get("device", "auto") == "auto":
        d["train"]["device"] = "cpu"  # a CPU-only trial must not grab a GPU Ray gave to another trial
    return TrainConfig.from_dict(d)


def run_trial(config: dict, *, base: dict, objective: str, cpus: float, gpus: float) -> None:
    """The Tune function trainable (bound with `tune.with_parameters`)."""
    cfg = build_config(base, config, cpus, gpus)
    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_state(os.path.join(d, STATE_FILE))
    method = cfg.loss.method

    def report(metrics: dict, state: dict | None) -> None:
        # Ray's schedulers and searchers need the objective in every result, diverged ones included.
        out = {**metrics, "method": method, "objective": metrics.get(objective, math.nan),
               "node_id": ray.get_runtime_context().get_node_id()}  # which node ran it (multi-node sweeps)
        out.setdefault(objective, math.nan)
        if state is None:
            tune.report(out)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_state(state, os.path.join(tmp, STATE_FILE))
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(tmp))

    train(cfg, report, resume=resume)
