"""Ray Tune adapter around `train()`: config dict -> TrainConfig, checkpoints in and out, `tune.report`.

Runs inside a Ray worker. It uses the resources Ray assigned: torch threads = CPUs per trial, and the GPU that
Ray made visible (CUDA_VISIBLE_DEVICES) when the trial asked for one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time

import pyarrow.fs
import ray
from ray import tune

from ncssl_tune.config import flatten
from ncssl_tune.core.data import DatasetError
from ncssl_tune.core.train import TrainConfig, load_state, save_state, train
from ncssl_tune.sweep.node_data import trial_data
from ncssl_tune.vocab import (
    RESOLVED_CONFIG,
    RESULT_BETWEEN,
    RESULT_OBJECTIVE,
    RESULT_STREAK,
    TAG_COLLAPSE,
    TAG_METHOD,
    TAG_NODE,
)

STATE_FILE = "state.pt"
STREAK_FILE = "collapse_streak.json"


def next_streak(streak: tuple[str, int], state: str) -> tuple[str, int]:
    """(collapse state, consecutive epochs in it) after one more epoch in `state`."""
    return (state, streak[1] + 1) if state == streak[0] else (state, 1)


def surviving_checkpoint(ckpt: tune.Checkpoint) -> tune.Checkpoint | None:
    """The checkpoint to resume from when Ray hands back `ckpt`: itself if it exists, else the oldest newer one.

    Ray saves the experiment state (which names each trial's latest checkpoint) at most every ~10 s, or after
    `num_to_keep` new checkpoints of a trial, but it deletes a trial's checkpoint beyond `num_to_keep` as soon as
    a newer one is registered, and uploads the state asynchronously: a driver killed in between leaves a state
    naming a deleted checkpoint (ray-project/ray#27790), and the trial would fail on every retry. A checkpoint
    newer than the deleted one was registered by the driver, so its result had already reached the callbacks
    (Ray calls on_trial_result before it registers the checkpoint): restoring from the oldest such one replays
    epochs the tracker has (it ignores them) and skips none. None when no checkpoint of the trial survives."""
    fs, path = ckpt.filesystem, ckpt.path
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        return ckpt
    parent, name = os.path.split(path.rstrip("/"))
    prefix, _, index = name.rpartition("_")
    newer = sorted(info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
                   if info.type == pyarrow.fs.FileType.Directory
                   and info.base_name.rpartition("_")[0] == prefix
                   and info.base_name.rpartition("_")[2] > index)  # Ray's names: checkpoint_%06d
    return tune.Checkpoint(newer[0], filesystem=fs) if newer else None


def build_config(base: TrainConfig, sampled: dict, cpus: float, gpus: float) -> TrainConfig:
    """The base config with the sampled dotted keys, threads and device pinned to Ray's assignment."""
    cfg = base.with_overrides(sampled)
    pinned: dict[str, object] = {}
    if cfg.train.threads is None:
        pinned["train.threads"] = max(1, math.ceil(cpus))
    if gpus > 0:
        pinned["train.device"] = "cuda"  # Ray restricts CUDA_VISIBLE_DEVICES to the assigned GPU
    elif cfg.train.device == "auto":
        pinned["train.device"] = "cpu"  # a CPU-only trial must not grab a GPU Ray gave to another trial
    return cfg.with_overrides(pinned) if pinned else cfg


def run_trial(config: dict, *, base: TrainConfig, objective: str, cpus: float, gpus: float,
              registry: ray.actor.ActorHandle | None = None) -> None:
    """The Tune function trainable (bound with `tune.with_parameters`). registry: the sweep's DataRegistry
    (node_data.py), whose node copy the trial reads when its data is held in memory."""
    cfg = build_config(base, config, cpus, gpus)
    try:
        storage, data = trial_data(registry, cfg.data)
    except DatasetError as e:  # this node's copy of the data: say which node, without the loader's chain
        raise DatasetError(f"on node {ray.util.get_node_ip_address()}: {e}") from None
    # the way this trial holds its data is part of the configuration it records ("auto" decided)
    cfg = cfg.with_overrides({"data.storage": storage})
    resume = None
    # The collapse stopper on the driver decides from one result: the trial counts its epochs in the same
    # collapse state (kept with each checkpoint, so a restored trial goes on counting where it was).
    streak = ("none", 0)
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        remembered, ckpt = ckpt.path, surviving_checkpoint(ckpt)
        if ckpt is None or ckpt.path != remembered:
            logging.getLogger(__name__).warning(
                "checkpoint %s is gone; the trial resumes from %s", remembered, ckpt.path if ckpt else "scratch")
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_state(os.path.join(d, STATE_FILE))
            if os.path.exists(os.path.join(d, STREAK_FILE)):
                with open(os.path.join(d, STREAK_FILE)) as f:
                    streak = tuple(json.load(f))
    method = cfg.loss.method
    # The configuration this trial runs, flattened, in its first result (of each start): the driver records it
    # as it is instead of rebuilding it.
    resolved: dict | None = flatten(cfg.to_dict())
    between = math.nan  # seconds from the end of the previous epoch to the start of this one (none before the first)

    def report(metrics: dict, state: dict | None) -> None:
        nonlocal streak, resolved, between
        start = time.perf_counter()
        streak = next_streak(streak, metrics.get(TAG_COLLAPSE, "none"))
        # Ray's schedulers and searchers need the objective in every result, diverged ones included.
        out = {**metrics, TAG_METHOD: method, RESULT_OBJECTIVE: metrics.get(objective, math.nan),
               RESULT_STREAK: streak[1], RESULT_BETWEEN: between,
               TAG_NODE: ray.get_runtime_context().get_node_id()}  # which node ran it (multi-node sweeps)
        if resolved is not None:
            out[RESOLVED_CONFIG], resolved = resolved, None
        out.setdefault(objective, math.nan)
        # Ray's function trainables report synchronously: tune.report returns when the driver asks for the next
        # result, so the time spent here (checkpoint, then the driver's handling of the result) is time between
        # epochs; it is reported with the next epoch.
        if state is None:
            tune.report(out)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                save_state(state, os.path.join(tmp, STATE_FILE))
                with open(os.path.join(tmp, STREAK_FILE), "w") as f:
                    json.dump(list(streak), f)
                tune.report(out, checkpoint=tune.Checkpoint.from_directory(tmp))
        between = time.perf_counter() - start

    try:
        train(cfg, report, resume=resume, data=data)
    except DatasetError as e:  # this node's copy of the data: say which node, without the loader's chain
        raise DatasetError(f"on node {ray.util.get_node_ip_address()}: {e}") from None
