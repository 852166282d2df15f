"""A sweep's reference scores: the downstream scores of the randomly initialised encoder and of raw pixels for the
sweep's base configuration, the floor any of its trials must beat. Computed once per sweep and kept in
<sweep>/reference.json; the tracker logs them on the parent run and the analysis draws them."""

from __future__ import annotations

import json
import math
from concurrent.futures import Future
from pathlib import Path

import ray

from ncssl_tune.core.data import DatasetError
from ncssl_tune.spec import SweepSpec
from ncssl_tune.vocab import DOWNSTREAM

REFERENCE_FILE = "reference.json"


@ray.remote
def _reference_task(cfg, registry):
    from ncssl_tune.core.train import reference_scores
    from ncssl_tune.sweep.node_data import trial_data

    storage, data = trial_data(registry, cfg.data)  # the node's copy that its trials read
    return reference_scores(cfg.with_overrides({"data.storage": storage}), data=data)


def reference_scores(spec: SweepSpec, out_dir: Path, bundle: dict[str, float] | None = None, registry=None
                     ) -> tuple[dict[str, dict[str, float]], bool]:
    """({"random_init": {metric: v}, "pixels": {...}}, computed now?) for the sweep's base configuration.

    bundle: one trial's resources ({"CPU": c, "GPU": g}): computed on a Ray worker that has them, because on a
    cluster that is where the data and the accelerator are. None: computed in this process, which spares a worker
    start (~5 s on a 2-core machine; the computation itself is ~1 s on digits).

    Data that cannot be read where the scores are computed raises DatasetError, the worker's own (unwrapped from
    Ray's RayTaskError, whose text carries the remote traceback), so the caller can report it as one line."""
    ref = stored_reference(out_dir)
    if ref is not None:
        return ref, False
    ref = compute_reference(spec, bundle, registry)
    store_reference(out_dir, ref)
    return ref, True


def stored_reference(out_dir: Path) -> dict[str, dict[str, float]] | None:
    """The scores an earlier session of the sweep computed, or None."""
    path = out_dir / REFERENCE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def store_reference(out_dir: Path, ref: dict[str, dict[str, float]]) -> None:
    (out_dir / REFERENCE_FILE).write_text(json.dumps(ref, indent=2))


def compute_reference(spec: SweepSpec, bundle: dict[str, float] | None = None, registry=None
                      ) -> dict[str, dict[str, float]]:
    """The scores, computed now (see reference_scores for `bundle`; registry: the sweep's DataRegistry, whose
    node copy the worker reads); writes nothing. With bundle None it needs no Ray: run_sweep computes it on a
    thread while Ray starts, on this process's own copy of the data (freed when it is done)."""
    if bundle is not None:
        task = _reference_task.options(num_cpus=bundle["CPU"], num_gpus=bundle["GPU"])
        try:
            scores = ray.get(task.remote(spec.base, registry))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, DatasetError):
                raise e.cause from None
            raise
    else:
        import torch

        from ncssl_tune.core.train import reference_scores as compute

        # the threads one trial gets: more than the cores would spin against the trial workers starting meanwhile
        threads = torch.get_num_threads()
        try:
            scores = compute(spec.base.with_overrides({"train.threads": max(1, math.ceil(spec.resources.cpu))}))
        finally:
            torch.set_num_threads(threads)
    return {kind: {k: float(v) for k, v in s.items() if k in DOWNSTREAM} for kind, s in scores.items()}


class PendingReference:
    """Reference scores still being computed on the driver (a thread of run_sweep) while Tune starts the first
    trials: their workers spend seconds starting and importing torch before a first epoch (~8 s on 2 cores), in
    which the computation (~2 s per random-init draw) no longer holds Tune back. When the scores arrive they are
    written to reference.json and printed; the tracker logs them on the parent run (`ready`), and run_sweep waits
    for them (`result`) before the sweep ends. The CLI has loaded and checked the data before (cli.py), so a
    DatasetError here means the data changed since: the sweep's trials then fail on it as well."""

    def __init__(self, future: Future, out_dir: Path, metric: str):
        self.future, self.out_dir, self.metric = future, out_dir, metric
        future.add_done_callback(self._arrived)

    def __reduce__(self):
        # Ray pickles the Tuner's callbacks (the tracker holds this): a copy is the scores if here, else none to
        # send (the live tracker, not a copy, logs them; a resumed sweep reads reference.json)
        return dict, (self.ready() or {},)

    def _arrived(self, future: Future) -> None:
        if future.exception() is None:
            store_reference(self.out_dir, future.result())
            print_reference(self.metric, future.result())

    def ready(self) -> dict[str, dict[str, float]] | None:
        """The scores if they are here (None while computing, or if the computation failed: `result` raises)."""
        done = self.future.done() and self.future.exception() is None
        return self.future.result() if done else None

    def result(self) -> dict[str, dict[str, float]]:
        """The scores, waiting for them; raises what the computation raised."""
        return self.future.result()


def print_reference(metric: str, reference: dict) -> None:
    if metric in DOWNSTREAM:
        sd = (reference.get("random_init_sd") or {}).get(metric)
        spread = f" ± {sd:.3f} (SD of {sum(k[-1].isdigit() for k in reference)} inits)" if sd is not None else ""
        pixels = reference.get("pixels")  # none for a streamed dataset
        pixels = f"{pixels[metric]:.3f}" if pixels else "not scored (streamed data)"
        print(f"reference {metric}: random-init encoder {reference['random_init'][metric]:.3f}{spread}, raw pixels "
              f"{pixels}", flush=True)
