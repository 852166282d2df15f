"""The process around one sweep: the environment variables Ray Tune reads, which of Ray's log lines reach the
console, and the Ray that a sweep starts and stops itself. Nothing here runs at import: `sweep_session` does it
all when a sweep starts (run_sweep enters it, for the CLI and for Python callers alike)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from ncssl_tune.records.store import quiet_store_setup

MAX_PENDING = "TUNE_MAX_PENDING_TRIALS_PG"  # read by Ray Tune when tuner.fit() builds its controller

# Set only where unset, so a user's own value wins.
TUNE_ENV = {
    # Ray's per-trial CSV/TensorBoard loggers would duplicate what trials.csv and MLflow hold (and mangle the
    # spectrum lists); only its JSON log is kept (added in build_tuner), which Ray's own result tools read.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Trials checkpoint every epoch on purpose (exact resume); Ray then warns about frequent experiment snapshots
    # several times a minute. The snapshot cost (~20 ms) is measured in benchmarks/bench_engine.py instead.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # Ray Tune's newer console output prints its own experiment box and results path whatever RunConfig(verbose=0)
    # says; the classic output honours verbose=0 and leaves the console to the live table (SweepMonitor).
    "RAY_AIR_NEW_OUTPUT": "0",
}


def _not_token_notice(record: logging.LogRecord) -> bool:
    # Every local Ray start warns that token authentication is on by default ("Set RAY_AUTH_MODE=disabled to opt
    # out"). On is what we want (README, "Security defaults"), and setting RAY_AUTH_MODE=token ourselves only works
    # before Ray is imported, so this one line is dropped; Ray's other authentication messages still pass.
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _not_restore_hint(record: logging.LogRecord) -> bool:
    # Ray Tune ends an interrupted run with 'Resume experiment with: Tuner.restore(path=...)'; a sweep resumes with
    # `ncssl-sweep ... --resume` instead (the CLI prints the exact command).
    return "Resume experiment with" not in record.getMessage()


_FILTERS = {"ray._private.authentication.authentication_token_setup": _not_token_notice,
            "ray.tune.tune": _not_restore_hint}


def set_environment() -> None:
    """The Tune settings of every sweep (TUNE_ENV), where the user has not set them."""
    for key, value in TUNE_ENV.items():
        os.environ.setdefault(key, value)


def quiet_console() -> None:
    """Drop the two Ray log lines that mislead a sweep's user (_FILTERS) and MLflow's notes on a new store's
    tables (records.store)."""
    for name, drop in _FILTERS.items():
        logging.getLogger(name).addFilter(drop)  # the same function is not added twice: every sweep may call this
    quiet_store_setup()


@contextmanager
def own_ray(address: str | None) -> Iterator[bool]:
    """Start Ray unless this process runs one already (a caller's, e.g. a test session's, is used and left
    running); yields whether it was started here, and stops it on exit if so."""
    if ray.is_initialized():
        yield False
        return
    # Without --address the sweep starts its own Ray ("local"): a bare ray.init() would join any cluster that
    # `ray start` left on this machine (and then refuse num_cpus), so no --address would mean "somewhere".
    # logging_level: Ray's INFO lines (cluster started, result files written) are not the sweep's progress.
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, **({} if address else {"num_cpus": os.cpu_count()}))
    try:
        yield True
    finally:
        ray.shutdown()


@contextmanager
def sweep_session(address: str | None) -> Iterator[bool]:
    """Environment, console and Ray for one sweep; yields whether this session started Ray itself."""
    set_environment()
    quiet_console()
    with own_ray(address) as started:
        yield started


@contextmanager
def staged_trials(n: int) -> Iterator[None]:
    """Let Ray Tune stage `n` trials at once while the block (tuner.fit) runs, unless MAX_PENDING is set already.

    Ray Tune keeps one trial PENDING at a time for a searcher it does not wrap itself, so the second slot was
    filled only once the first trial's worker had started, or by reusing it: trials ran one at a time on 2 cores.
    The searcher holds the limit (max_concurrent); Tune may stage that many (benchmarks/bench_sweep.py sets 1 to
    measure the engine as it was)."""
    own = MAX_PENDING not in os.environ
    if own:
        os.environ[MAX_PENDING] = str(n)
    try:
        yield
    finally:
        if own:
            del os.environ[MAX_PENDING]
