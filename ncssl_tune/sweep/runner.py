"""Builds and runs the Ray Tune sweep for a validated SweepSpec: Optuna search, ASHA, collapse stopper,
per-trial resources, restore. Output lands in <results_dir>/<sweep name>/."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import optuna
import ray
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.stopper import Stopper

from ncssl_tune.config import flatten
from ncssl_tune.records.store import check_tracking_uri
from ncssl_tune.spec import SweepSpec, resolved
from ncssl_tune.sweep import live
from ncssl_tune.sweep.monitor import CollapseStopper, SweepMonitor, read_trials
from ncssl_tune.sweep.references import reference_scores
from ncssl_tune.sweep.searcher import OptunaSearcher
from ncssl_tune.sweep.space import DefineByRun, make_sampler
from ncssl_tune.sweep.tracker import MlflowTracker
from ncssl_tune.sweep.trainable import run_trial
from ncssl_tune.vocab import DOWNSTREAM

RAY_DIR = "ray"  # Ray Tune storage under the sweep folder
TUNE_NAME = "tune"
SEARCHER_STATE = "searcher_state.pkl"  # the searcher's latest state (Ray's copy lags it), in the sweep folder
MAX_PENDING = "TUNE_MAX_PENDING_TRIALS_PG"  # read by Ray Tune when tuner.fit() builds its controller


class _Drop(logging.Filter):
    """Drops the records of one logger whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# Every local Ray start warns that token authentication is on by default ("Set RAY_AUTH_MODE=disabled to opt out").
# On is what we want (README, "Security defaults"), and setting RAY_AUTH_MODE=token ourselves only works before
# Ray is imported, so this one line is dropped; Ray's other authentication messages still pass.
logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
    _Drop("Token authentication is enabled for this Ray cluster"))


class _NoRestoreHint(logging.Filter):
    """Ray Tune ends an interrupted run with 'Resume experiment with: Tuner.restore(path=...)'; a sweep resumes with
    `ncssl-sweep ... --resume` instead (the CLI prints the exact command), so Ray's hint is dropped at its logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resume experiment with" not in record.getMessage()


logging.getLogger("ray.tune.tune").addFilter(_NoRestoreHint())


class SweepError(RuntimeError):
    """A sweep that cannot start or continue as asked (exit status 2: nothing was run)."""


STORAGE_SCHEMES = ("s3", "gs")


def check_storage(storage: str) -> None:
    """Raise SweepError unless `storage` is a Ray Tune storage every node can reach: s3://BUCKET/..,
    gs://BUCKET/.. or an absolute path on a filesystem shared by all nodes (NFS, EFS, ...)."""
    parsed = urlparse(storage)
    if parsed.scheme in STORAGE_SCHEMES:
        if not parsed.netloc:
            raise SweepError(f"--storage {storage!r}: no bucket; use {parsed.scheme}://BUCKET/PATH")
        return
    if parsed.scheme and not (len(parsed.scheme) == 1 and os.name == "nt"):  # C:\ is a drive, not a scheme
        raise SweepError(f"--storage {storage!r}: unsupported scheme {parsed.scheme!r}; use s3://BUCKET/PATH, "
                         f"gs://BUCKET/PATH or an absolute path on a filesystem shared by all nodes")
    if not os.path.isabs(storage):
        raise SweepError(f"--storage {storage!r}: a relative path; every node resolves it against its own "
                         f"working folder. Use an absolute path on a shared filesystem, s3:// or gs://")


def tune_storage(spec: SweepSpec, out_dir: Path, storage: str | None) -> str:
    """Ray Tune's storage_path: the sweep folder's ray/ (default) or STORAGE/<sweep name>."""
    if storage is None:
        return str(out_dir / RAY_DIR)
    return f"{storage.rstrip('/')}/{spec.name}"


def _tune_exists(path: str) -> bool:
    if "://" not in path:
        return Path(path).exists()
    import pyarrow.fs

    try:
        fs, sub = pyarrow.fs.FileSystem.from_uri(path)
        return fs.get_file_info(sub).type != pyarrow.fs.FileType.NotFound
    except Exception as e:  # noqa: BLE001 - credentials, network, missing bucket: all reported the same way
        raise SweepError(f"--storage: cannot read {path}: {e}") from None


SPEC_FILE = "sweep_spec.json"  # the resolved spec a sweep started with, flattened; a resume must match it


def spec_record(spec: SweepSpec) -> dict[str, str]:
    """The resolved spec (defaults included) as {dotted key: value as JSON}, for comparing two sessions."""
    flat = flatten({k: v for k, v in resolved(spec).items() if k != "space"})
    flat.update({f"space.{p['key']}": p for p in resolved(spec)["space"]})
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in flat.items()}


def check_same_spec(spec: SweepSpec, out_dir: Path) -> None:
    """Refuse a --resume whose spec differs from the one the sweep started with: Ray Tune restores the stored
    sweep (its budget, scheduler, searcher) as saved, so a changed value would be silently ignored or mixed in."""
    path = out_dir / SPEC_FILE
    if not path.is_file():
        return  # a sweep from before this record: nothing to compare with
    before = json.loads(path.read_text())
    now = spec_record(spec)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        shown = "; ".join(f"{k}: {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}" for k in changed[:5])
        raise SweepError(f"--resume: sweep {spec.name!r} was started with other settings ({shown}"
                         f"{'; ...' if len(changed) > 5 else ''}); a stored sweep resumes as it was saved. "
                         f"Resume with the same file and flags, or start a new sweep with --name NEW")


@dataclass
class SweepResult:
    out_dir: Path
    best_config: dict | None
    best_metrics: dict | None
    num_trials: int
    errors: int
    mlflow_parent_run_id: str | None = None
    mlflow_experiment_id: str | None = None
    interrupted: list[str] = field(default_factory=list)  # trials left unfinished (Ctrl+C): resume them
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each phase: ray_start, references, tune


def sweep_dir(spec: SweepSpec, results_dir: str | os.PathLike) -> Path:
    return Path(results_dir).resolve() / spec.name


def optuna_storage(out_dir: Path) -> optuna.storages.BaseStorage:
    """The study lives in a file beside the results, so `optuna-dashboard` and the tests can read it."""
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out_dir / "optuna.log")))


def _trainable(spec: SweepSpec):
    fn = tune.with_parameters(run_trial, base=spec.base, objective=spec.search.metric,
                              cpus=spec.resources.cpu, gpus=spec.resources.gpu)
    return tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def build_tuner(spec: SweepSpec, out_dir: Path, callbacks: list, stopper: Stopper,
                storage: str | None = None, reuse_actors: bool = True) -> tune.Tuner:
    s = spec.search
    with warnings.catch_warnings():
        # Multivariate, grouped TPE (space.make_sampler) is what we mean to use; Optuna flags both options
        # "experimental" with a warning on every sweep that no user can act on.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = make_sampler(spec)
    # Optuna logs every study it creates or loads at INFO; the live table is the sweep's progress report.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = OptunaSearcher(DefineByRun(spec.space, spec.base), metric=s.metric, mode=spec.mode,
                              sampler=sampler, storage=optuna_storage(out_dir), study_name=spec.name,
                              max_concurrent=s.max_concurrent, state_path=out_dir / SEARCHER_STATE)
    if s.scheduler.name == "asha":
        epochs = spec.train_config().train.epochs
        scheduler = ASHAScheduler(time_attr="epoch", metric=s.metric, mode=spec.mode, max_t=epochs,
                                  grace_period=min(s.scheduler.grace_period, epochs),
                                  reduction_factor=s.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        _trainable(spec),
        tune_config=tune.TuneConfig(search_alg=searcher,
                                    scheduler=scheduler, num_samples=s.num_samples,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(
            name=TUNE_NAME, storage_path=tune_storage(spec, out_dir, storage), stop=stopper, callbacks=callbacks,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )


RESOURCE_WAIT_S = 600.0  # how long a sweep on a joined cluster waits for its autoscaler to fit one trial


def _trial_bundle(spec: SweepSpec) -> dict[str, float]:
    """One trial's resources, in Ray's names."""
    return {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu}


def _lacking(spec: SweepSpec) -> list[str]:
    total = ray.cluster_resources()
    return [f"{key.lower()}={need:g} (resources.{key.lower()}) but the Ray cluster has {total.get(key, 0.0):g} {key}"
            for key, need in _trial_bundle(spec).items() if need > total.get(key, 0.0)]


def check_resources(spec: SweepSpec, wait_s: float = 0.0) -> None:
    """Fail instead of waiting forever when no node can run one trial. On a joined cluster (wait_s > 0) the
    autoscaler is first asked for one trial's resources and given wait_s seconds to add a node that has them."""
    lacking = _lacking(spec)
    if lacking and wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        bundle = {k: v for k, v in _trial_bundle(spec).items() if v > 0}
        print(f"ncssl-sweep: each trial asks for {'; '.join(lacking)}; waiting up to {wait_s:g} s for the "
              f"autoscaler to add a node (--resource-wait)", file=sys.stderr, flush=True)
        request_resources(bundles=[bundle])
        try:
            deadline = time.monotonic() + wait_s
            while lacking and time.monotonic() < deadline:
                time.sleep(1.0)
                lacking = _lacking(spec)
        finally:
            request_resources(bundles=[])  # the request is persistent: withdraw it, trials make their own demand
        if lacking:
            lacking[-1] += f" after waiting {wait_s:g} s for its autoscaler"
    if lacking:
        raise SweepError(f"each trial asks for {'; '.join(lacking)}; lower the request (e.g. --set "
                         f"resources.gpu=0 to run on CPU) or add nodes that have it")


def run_sweep(spec: SweepSpec, results_dir: str | os.PathLike = "results", *, resume: bool = False,
              address: str | None = None, tracking_uri: str | None = None, extra_callbacks: list | None = None,
              monitor_interval_s: float = 10.0, storage: str | None = None,
              resource_wait_s: float = RESOURCE_WAIT_S, stoppers: list | None = None,
              reuse_actors: bool = True) -> SweepResult:
    """Run (or resume) the sweep; returns where the results are and the best trial.

    storage: Ray Tune's storage (checkpoints, result logs) for a multi-node cluster: s3://, gs:// or an absolute
    path on a shared filesystem; the sweep's Tune folder is STORAGE/<sweep name>/tune. None: the sweep folder's
    ray/. trials.csv, the Optuna journal and the default MLflow store stay in the local sweep folder.

    tracking_uri: MLflow store for the parent/child runs (None: no MLflow). Checked before anything starts.

    stoppers: more Ray Tune stoppers beside the collapse stopper (e.g. a budget of trial-epochs, benchmarks/).

    resource_wait_s: on a cluster joined with `address`, how long to wait for the autoscaler to add a node that
    fits one trial before failing (a Ray this process starts is all there is: checked at once).

    reuse_actors: a worker that ended a trial starts the next one (Ray Tune's reuse_actors) instead of a fresh
    process importing torch again (~5 s a trial on 2 cores; benchmarks/bench_sweep.py measures both). A resumed
    sweep keeps the setting it started with.
    """
    out_dir = sweep_dir(spec, results_dir)
    if storage is not None:
        check_storage(storage)
    tune_path = f"{tune_storage(spec, out_dir, storage)}/{TUNE_NAME}"
    exists = _tune_exists(tune_path)
    if resume and not exists:
        raise SweepError(f"--resume: no sweep to resume at {tune_path}; run without --resume to start it")
    if exists and not resume:
        raise SweepError(f"{out_dir} already holds sweep {spec.name!r}; pass --resume to continue it, or "
                         f"--name NEW to start another")
    if resume:
        check_same_spec(spec, out_dir)
    if tracking_uri:
        check_tracking_uri(tracking_uri)  # an unreachable server is reported before any trial starts
    # Ray's per-trial CSV/TensorBoard loggers would duplicate what trials.csv and MLflow hold (and mangle the
    # spectrum lists); only its JSON log is kept (added in build_tuner), which Ray's own result tools read.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Trials checkpoint every epoch on purpose (exact resume); Ray then warns about frequent experiment snapshots
    # several times a minute. The snapshot cost (~20 ms) is measured in benchmarks/bench_engine.py instead.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Ray Tune's newer console output prints its own experiment box and results path whatever RunConfig(verbose=0)
    # says; the classic output honours verbose=0 and leaves the console to the live table (SweepMonitor).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started_ray = False
    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase], clock = now - clock, now

    if not ray.is_initialized():
        # Without --address the sweep starts its own Ray ("local"): a bare ray.init() would join any cluster that
        # `ray start` left on this machine (and then refuse num_cpus), so no --address would mean "somewhere".
        # logging_level: Ray's INFO lines (cluster started, result files written) are not the sweep's progress.
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING,
                 **({} if address else {"num_cpus": os.cpu_count()}))
        started_ray = True
    lap("ray_start")
    try:
        if started_ray:
            check_resources(spec, wait_s=resource_wait_s if address else 0.0)
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / SPEC_FILE).exists():
            (out_dir / SPEC_FILE).write_text(json.dumps(spec_record(spec), indent=1, sort_keys=True, default=str))
        monitor = SweepMonitor(out_dir, spec.search.collapse_stop, spec.search.scheduler.name,
                               interval_s=monitor_interval_s)
        # A Ray this sweep started itself runs on this machine alone: the data is here, and only GPU trials need
        # a worker's device. A joined cluster (address) or a Ray the caller started keeps the worker path.
        local = started_ray and address is None and spec.resources.gpu == 0
        reference, fresh = reference_scores(spec, out_dir, None if local else _trial_bundle(spec))
        lap("references")
        metric = spec.search.metric
        if metric in DOWNSTREAM:
            print(f"reference {metric}: random-init encoder {reference['random_init'][metric]:.3f}, raw pixels "
                  f"{reference['pixels'][metric]:.3f}", flush=True)
        # flush_s=0: each result's metrics (one log_batch per epoch) reach MLflow in on_trial_result, which Ray
        # calls before it registers that result's checkpoint and saves the experiment state. A driver killed
        # with epochs still buffered would otherwise resume the trial past them and leave a gap in MLflow.
        tracker = MlflowTracker(spec, tracking_uri, address, flush_s=0.0, out_dir=out_dir,
                                reference=reference if fresh else None) if tracking_uri else None
        # Ray keeps (pickled) what the Tuner was given and a resumed Tuner uses that: it is given stand-ins that
        # forward to this process's callbacks and stoppers, registered under the sweep's Tune path. The saved
        # callback state is matched by position and class: the tracker keeps its place after the monitor.
        session_callbacks = [monitor, *([tracker] if tracker else []), *(extra_callbacks or [])]
        session_stoppers = [CollapseStopper(spec.search.collapse_stop), *(stoppers or [])]
        live.register(tune_path, session_callbacks, session_stoppers)
        try:
            if resume:
                # Errored trials start again from scratch as new trials (restart_errored): Ray keeps a trial's
                # pending STOP with the experiment when it failed while saving a checkpoint, so a trial resumed
                # under its id (resume_errored) is stopped again at its first checkpoint.
                tuner = tune.Tuner.restore(tune_path, trainable=_trainable(spec), resume_unfinished=True,
                                           restart_errored=True)
            else:
                tuner = build_tuner(spec, out_dir, [live.LiveCallbacks(tune_path, session_callbacks),
                                                    JsonLoggerCallback()],
                                    live.LiveStopper(tune_path, session_stoppers), storage, reuse_actors)
            # Ray Tune keeps one trial PENDING at a time for a searcher it does not wrap itself, so the second slot
            # was filled only once the first trial's worker had started, or by reusing it: trials ran one at a time
            # on 2 cores. The searcher holds the limit (max_concurrent); Tune may stage that many (unless the
            # variable is set already: benchmarks/bench_sweep.py sets 1 to measure the engine as it was).
            own = MAX_PENDING not in os.environ
            if own:
                os.environ[MAX_PENDING] = str(spec.search.max_concurrent or spec.search.num_samples)
            try:
                grid = tuner.fit()
            finally:
                if own:
                    del os.environ[MAX_PENDING]
        finally:
            live.unregister(tune_path)
        lap("tune")
        monitor.write_csv()
        errors = sum(1 for r in grid if r.error is not None)
        best = None
        try:
            best = grid.get_best_result(metric=spec.search.metric, mode=spec.mode, scope="last",
                                        filter_nan_and_inf=True)
        except RuntimeError:
            pass
        return SweepResult(out_dir=out_dir, best_config=best.config if best else None,
                           best_metrics=best.metrics if best else None, num_trials=len(grid), errors=errors,
                           mlflow_parent_run_id=tracker.parent_run_id if tracker else None,
                           mlflow_experiment_id=tracker.runs.experiment_id if tracker else None,
                           interrupted=list(monitor.interrupted), seconds=seconds)
    finally:
        if started_ray:
            ray.shutdown()


def timed_sweep(spec: SweepSpec, **kwargs) -> tuple[float, list[dict]]:
    """Run a sweep in a throwaway results folder; returns (wall seconds, trials.csv rows). For benchmarks."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_sweep(spec, tmp, monitor_interval_s=30.0, **kwargs)
        return time.perf_counter() - start, read_trials(result.out_dir)
