"""Builds (or restores) and runs the Ray Tune sweep for a validated SweepSpec: Optuna search, ASHA, collapse
stopper, per-trial resources. Output lands in <results_dir>/<sweep name>/. The process around it (environment,
console, Ray start and stop) is session.py's."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import optuna
import ray
from ray import tune
from ray.tune import ResultGrid
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.stopper import Stopper

from ncssl_tune.config import flatten
from ncssl_tune.core.data import DatasetError
from ncssl_tune.records.store import check_tracking_uri, warm_store
from ncssl_tune.spec import SweepSpec, resolved
from ncssl_tune.sweep import live
from ncssl_tune.sweep.export import BestExport, try_export_best
from ncssl_tune.sweep.monitor import CollapseStopper, SweepMonitor
from ncssl_tune.sweep.node_data import start_registry
from ncssl_tune.sweep.references import (
    PendingReference,
    compute_reference,
    print_reference,
    reference_scores,
    stored_reference,
)
from ncssl_tune.sweep.searcher import OptunaSearcher
from ncssl_tune.sweep.session import staged_trials, sweep_session
from ncssl_tune.sweep.space import DefineByRun, make_sampler, warm_sampler
from ncssl_tune.sweep.tracker import MlflowTracker
from ncssl_tune.sweep.trainable import run_trial

RAY_DIR = "ray"  # Ray Tune storage under the sweep folder
TUNE_NAME = "tune"
SEARCHER_STATE = "searcher_state.pkl"  # the searcher's latest state (Ray's copy lags it), in the sweep folder


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
    # Wall seconds of each phase (PHASES). Only the sweep knows where its phases begin and end;
    # benchmarks/bench_sweep.py reports them to show where the wall time outside the trials goes.
    seconds: dict[str, float] = field(default_factory=dict)
    best_export: BestExport | None = None  # the best trial's encoder (<sweep>/best/, MLflow model), export.py


# ray_start: to Ray running (the MLflow store and the references start meanwhile); setup: from there to Tune's start
# (resources checked, the data registry, the store ready, references computed on a worker); tune: Tune's run.
PHASES = ("ray_start", "setup", "tune")


def sweep_dir(spec: SweepSpec, results_dir: str | os.PathLike) -> Path:
    return Path(results_dir).resolve() / spec.name


def optuna_storage(out_dir: Path) -> optuna.storages.BaseStorage:
    """The study lives in a file beside the results, so `optuna-dashboard` and the tests can read it."""
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out_dir / "optuna.log")))


def _trainable(spec: SweepSpec, registry=None):
    fn = tune.with_parameters(run_trial, base=spec.base, objective=spec.search.metric,
                              cpus=spec.resources.cpu, gpus=spec.resources.gpu, registry=registry)
    return tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def build_tuner(spec: SweepSpec, out_dir: Path, callbacks: list, stopper: Stopper,
                storage: str | None = None, reuse_actors: bool = True, registry=None) -> tune.Tuner:
    """registry: the DataRegistry whose node copies the trials share (node_data.py); None: each its own copy."""
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
                              max_concurrent=s.max_concurrent, state_path=out_dir / SEARCHER_STATE,
                              repeats=s.repeats, base_seed=spec.base.train.seed,
                              collapse_stop=s.collapse_stop, scheduler=s.scheduler.name)
    if s.scheduler.name == "asha":
        epochs = spec.train_config().train.epochs
        scheduler = ASHAScheduler(time_attr="epoch", metric=s.metric, mode=spec.mode, max_t=epochs,
                                  grace_period=min(s.scheduler.grace_period, epochs),
                                  reduction_factor=s.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        _trainable(spec, registry),
        tune_config=tune.TuneConfig(search_alg=searcher,
                                    scheduler=scheduler, num_samples=s.num_samples * s.repeats,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(
            name=TUNE_NAME, storage_path=tune_storage(spec, out_dir, storage), stop=stopper, callbacks=callbacks,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )


def restore_tuner(spec: SweepSpec, tune_path: str, registry=None) -> tune.Tuner:
    """The stored sweep at `tune_path`, as it was saved (budget, scheduler, searcher, callbacks), to continue.

    Errored trials start again from scratch as new trials (restart_errored): Ray keeps a trial's pending STOP with
    the experiment when it failed while saving a checkpoint, so a trial resumed under its id (resume_errored) is
    stopped again at its first checkpoint."""
    return tune.Tuner.restore(tune_path, trainable=_trainable(spec, registry), resume_unfinished=True,
                              restart_errored=True)


RESOURCE_WAIT_S = 600.0  # how long a sweep on a joined cluster waits for its autoscaler to fit one trial


def _trial_bundle(spec: SweepSpec) -> dict[str, float]:
    """One trial's resources, in Ray's names."""
    return {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu}


def _lacking(spec: SweepSpec) -> list[str]:
    """Ray's names (CPU, GPU, ...) of the resources one trial asks for beyond what the whole cluster has."""
    total = ray.cluster_resources()
    return [key for key, need in _trial_bundle(spec).items() if need > total.get(key, 0.0)]


def _shortfall(spec: SweepSpec, lacking: list[str]) -> tuple[str, str]:
    """("cpu=4 (resources.cpu) but the Ray cluster has 2 CPU", "--set resources.cpu=2"): each short resource in the
    spec's names, and the flag that lowers its request to what the cluster has."""
    total, bundle = ray.cluster_resources(), _trial_bundle(spec)
    asks, fixes = [], []
    for key in lacking:
        short, have = key.lower(), total.get(key, 0.0)
        asks.append(f"{short}={bundle[key]:g} (resources.{short}) but the Ray cluster has {have:g} {key}")
        if key == "GPU" and have == 0:
            fixes.append("--set resources.gpu=0 to run on CPU")
        else:
            fixes.append(f"--set resources.{short}={have:g}" if have > 0 else f"a lower resources.{short}")
    return "; ".join(asks), " and ".join(fixes)


def check_resources(spec: SweepSpec, wait_s: float = 0.0) -> None:
    """Fail instead of waiting forever when no node can run one trial. On a joined cluster (wait_s > 0) the
    autoscaler is first asked for one trial's resources and given wait_s seconds to add a node that has them."""
    lacking = _lacking(spec)
    if lacking and wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        bundle = {k: v for k, v in _trial_bundle(spec).items() if v > 0}
        print(f"ncssl-sweep: each trial asks for {_shortfall(spec, lacking)[0]}; waiting up to {wait_s:g} s for the autoscaler to add a node "
              f"(--resource-wait)", file=sys.stderr, flush=True)
        request_resources(bundles=[bundle])
        try:
            deadline = time.monotonic() + wait_s
            while lacking and time.monotonic() < deadline:
                time.sleep(1.0)
                lacking = _lacking(spec)
        finally:
            request_resources(bundles=[])  # the request is persistent: withdraw it, trials make their own demand
    if lacking:
        asks, fixes = _shortfall(spec, lacking)
        waited = f" after waiting {wait_s:g} s for its autoscaler" if wait_s > 0 else ""
        raise SweepError(f"each trial asks for {asks}{waited}; lower the request (e.g. {fixes}) or add nodes "
                         "that have it")


def run_sweep(spec: SweepSpec, results_dir: str | os.PathLike = "results", *, resume: bool = False,
              address: str | None = None, tracking_uri: str | None = None, extra_callbacks: list | None = None,
              monitor_interval_s: float = 10.0, storage: str | None = None,
              resource_wait_s: float = RESOURCE_WAIT_S, stoppers: list | None = None,
              reuse_actors: bool = True, tracking_checked: bool = False, export: bool = True,
              register: str | None = None) -> SweepResult:
    """Run (or resume) the sweep; returns where the results are and the best trial.

    storage: Ray Tune's storage (checkpoints, result logs) for a multi-node cluster: s3://, gs:// or an absolute
    path on a shared filesystem; the sweep's Tune folder is STORAGE/<sweep name>/tune. None: the sweep folder's
    ray/. trials.csv, the Optuna journal and the default MLflow store stay in the local sweep folder.

    tracking_uri: MLflow store for the parent/child runs (None: no MLflow). Checked before anything starts, unless
    tracking_checked: the caller (the CLI) checked it at its own start, and the store is asked once per command.

    stoppers: more Ray Tune stoppers beside the collapse stopper (e.g. a budget of trial-epochs, benchmarks/).

    resource_wait_s: on a cluster joined with `address`, how long to wait for the autoscaler to add a node that
    fits one trial before failing (a Ray this process starts is all there is: checked at once).

    reuse_actors: a worker that ended a trial starts the next one (Ray Tune's reuse_actors) instead of a fresh
    process importing torch again (~5 s a trial on 2 cores; benchmarks/bench_sweep.py measures both). A resumed
    sweep keeps the setting it started with.

    export: write the best trial's encoder to <sweep>/best/ and log it as an MLflow model on its child run
    (export.py); register: also register it in MLflow's model registry under this name. An interrupted sweep
    exports nothing.
    """
    out_dir = sweep_dir(spec, results_dir)
    tune_path = _check_start(spec, out_dir, resume, storage)
    if tracking_uri and not tracking_checked:
        check_tracking_uri(tracking_uri)  # an unreachable server is reported before any trial starts
    run = _Run(spec, out_dir, tune_path, resume, address, tracking_uri, extra_callbacks, stoppers, storage,
               reuse_actors, export, register, marks=[time.perf_counter()])
    # The reference scores are computed here when the data is here: a Ray this sweep starts itself runs on this
    # machine alone, as does one the caller started on it (tests, benchmarks: a worker would import torch again,
    # ~5 s, for ~2 s of work); only GPU trials need a worker's device. A joined cluster (address), or a Ray with
    # a node on another machine, keeps the worker path: that node may hold the data this machine lacks.
    on_driver = address is None and spec.resources.gpu == 0 and (not ray.is_initialized() or _all_nodes_here())
    # The fixed costs of a start, overlapped: while Ray starts (~4 s here), one thread opens the MLflow store
    # (imports, a new SQLite file's tables: ~5 s), one computes the reference scores (~2 s a random-init draw),
    # on into Tune's start (PendingReference), and one rehearses the sampler (its lazy imports); nothing is
    # written to the sweep folder before the resources are checked.
    with ThreadPoolExecutor(3, thread_name_prefix="sweep-start") as early:
        warmed = early.submit(warm_store, tracking_uri) if tracking_uri else None
        early.submit(warm_sampler, spec)  # its lazy imports (space.py); a failure shows again in the sweep's own
        fresh = not resume or stored_reference(out_dir) is None
        # after the store: Tune waits for the store, not for the references (PendingReference), so the store
        # gets the cores first
        computing = early.submit(_after, warmed, compute_reference, spec) if on_driver and fresh else None
        with sweep_session(address) as started_ray:
            run.marks.append(time.perf_counter())
            if started_ray:
                check_resources(spec, wait_s=resource_wait_s if address else 0.0)
            _write_spec(spec, out_dir)
            monitor = SweepMonitor(out_dir, spec.search.collapse_stop, spec.search.scheduler.name,
                                   interval_s=monitor_interval_s, metric=spec.search.metric, mode=spec.mode,
                                   method=spec.base.loss.method)
            run.registry = start_registry()  # the trials' shared copies of the data, one per node (node_data.py)
            try:
                # The CLI checked the data before Ray started; a cluster's worker may still lack it or find it
                # damaged.
                try:
                    if computing is not None:  # Tune starts meanwhile (PendingReference)
                        reference = PendingReference(computing, out_dir, spec.search.metric)
                    else:
                        reference, fresh = reference_scores(spec, out_dir, None if on_driver else _trial_bundle(spec),
                                                            run.registry)
                        print_reference(spec.search.metric, reference)
                except DatasetError as e:
                    raise SweepError(f"{spec.path}: reference scores: {e}") from None
                if warmed is not None:
                    warmed.result()
                run.marks.append(time.perf_counter())
                return _sweep(run, monitor, reference, fresh)
            finally:
                if ray.is_initialized():
                    ray.kill(run.registry)  # and with it (their owner) the node copies: their memory is freed now


def _after(first: Future | None, fn, *args):
    """fn(*args) once `first` is done (whatever its outcome: its own caller reads it)."""
    if first is not None:
        wait([first])
    return fn(*args)


def _all_nodes_here() -> bool:
    """Whether every live node of the Ray this process is connected to runs on this machine."""
    here = ray.util.get_node_ip_address()
    return all(n["NodeManagerAddress"] == here for n in ray.nodes() if n["Alive"])


@dataclass
class _Run:
    """One call of run_sweep: what it was asked, and what it has started."""

    spec: SweepSpec
    out_dir: Path
    tune_path: str
    resume: bool
    address: str | None
    tracking_uri: str | None
    extra_callbacks: list | None
    stoppers: list | None
    storage: str | None
    reuse_actors: bool
    export: bool
    register: str | None
    marks: list[float]  # phase boundaries, for SweepResult.seconds
    registry: object = None  # the DataRegistry actor


def _sweep(run: _Run, monitor: SweepMonitor, reference: dict | PendingReference, fresh: bool) -> SweepResult:
    """run_sweep once Ray runs and the references are known or being computed: the Tune run, then the export of
    the best trial."""
    spec, out_dir = run.spec, run.out_dir
    # flush_s=0: each result's metrics (one log_batch per epoch) are queued, and so on disk in the outbox, in
    # on_trial_result, which Ray calls before it registers that result's checkpoint and saves the experiment
    # state. A driver killed with epochs still buffered would otherwise resume the trial past them and leave
    # a gap in MLflow. The tracker's writer thread sends them (tracker.py).
    tracker = MlflowTracker(spec, run.tracking_uri, run.address, flush_s=0.0, out_dir=out_dir,
                            reference=reference if fresh else None) if run.tracking_uri else None
    # The saved callback state is matched by position and class: the tracker keeps its place after the monitor.
    callbacks = [monitor, *([tracker] if tracker else []), *(run.extra_callbacks or [])]
    grid = _fit(run, callbacks, [CollapseStopper(spec.search.collapse_stop), *(run.stoppers or [])])
    run.marks.append(time.perf_counter())
    if isinstance(reference, PendingReference):
        try:
            reference.result()  # here long since, unless the sweep was shorter than its computation
        except DatasetError as e:
            raise SweepError(f"{spec.path}: reference scores: {e}") from None
    monitor.write_csv()
    result = _result(spec, out_dir, grid, monitor, tracker,
                     {p: b - a for p, a, b in zip(PHASES, run.marks, run.marks[1:])})
    best = _best(spec, grid)
    if run.export and best is not None and not result.interrupted:
        start = time.perf_counter()
        result.best_export = try_export_best(
            spec.name, spec.base, out_dir, best, run.tracking_uri, result.mlflow_experiment_id,
            result.mlflow_parent_run_id, run.register)
        result.seconds["export"] = time.perf_counter() - start
    return result


def _check_start(spec: SweepSpec, out_dir: Path, resume: bool, storage: str | None) -> str:
    """Refuse what cannot start (nothing to resume, a sweep already there, a changed spec on --resume) before
    Ray starts; returns the sweep's Tune path."""
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
    return tune_path


def _write_spec(spec: SweepSpec, out_dir: Path) -> None:
    """The sweep folder, with the spec it started with (SPEC_FILE; a resume keeps the first one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / SPEC_FILE).exists():
        (out_dir / SPEC_FILE).write_text(json.dumps(spec_record(spec), indent=1, sort_keys=True, default=str))


def _fit(run: _Run, callbacks: list, stoppers: list) -> ResultGrid:
    """Build or restore the Tuner and run it with this process's callbacks and stoppers.

    Ray keeps (pickled) what the Tuner was given and a resumed Tuner uses that: it is given stand-ins that forward
    to this process's callbacks and stoppers, registered under the sweep's Tune path (live.py)."""
    spec, tune_path = run.spec, run.tune_path
    live.register(tune_path, callbacks, stoppers)
    try:
        if run.resume:
            tuner = restore_tuner(spec, tune_path, run.registry)
        else:
            tuner = build_tuner(spec, run.out_dir, [live.LiveCallbacks(tune_path, callbacks), JsonLoggerCallback()],
                                live.LiveStopper(tune_path, stoppers), run.storage, run.reuse_actors, run.registry)
        with staged_trials(spec.search.max_concurrent or spec.search.num_samples):
            return tuner.fit()
    finally:
        live.unregister(tune_path)


def _best(spec: SweepSpec, grid: ResultGrid):
    """The trial with the best last value of the objective, or None when no trial reported it."""
    try:
        return grid.get_best_result(metric=spec.search.metric, mode=spec.mode, scope="last",
                                    filter_nan_and_inf=True)
    except RuntimeError:  # no trial reported the metric
        return None


def _result(spec: SweepSpec, out_dir: Path, grid: ResultGrid, monitor: SweepMonitor,
            tracker: MlflowTracker | None, seconds: dict[str, float]) -> SweepResult:
    best = _best(spec, grid)
    return SweepResult(out_dir=out_dir, best_config=best.config if best else None,
                       best_metrics=best.metrics if best else None, num_trials=len(grid),
                       errors=sum(1 for r in grid if r.error is not None),
                       mlflow_parent_run_id=tracker.parent_run_id if tracker else None,
                       mlflow_experiment_id=tracker.runs.experiment_id if tracker else None,
                       interrupted=list(monitor.interrupted), seconds=seconds)
