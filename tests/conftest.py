"""Fixtures only; what tests share besides fixtures is in helpers.py."""

from __future__ import annotations

import os

# Tests only: Ray's token authentication stays on for real use (see README, "Security defaults").
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import types

import pytest
from helpers import OUTCOMES_SPACE, mlflow_server, start_local_ray

# Test files that must share one xdist worker: both read the session's outcomes sweep (run once per worker).
SAME_WORKER = {"test_reliability": "outcomes", "test_spectra": "outcomes"}
# Files whose tests share no module fixture and are long one by one (whole sweeps): each test is a unit of its own.
EACH_TEST = {"test_benchmarks", "test_faults"}


def pytest_collection_modifyitems(config, items):
    """The suite runs on two xdist workers (pyproject's addopts; -n 0 runs it in one process). Each test file is
    one unit of work (EACH_TEST: each test), so its module fixtures (an mlflow server, a sweep) start once; units
    with the most slow tests are handed out first, so that no worker is left running a long file while the other
    has finished."""
    def group(item) -> str:
        name = item.module.__name__
        return item.nodeid if name in EACH_TEST else SAME_WORKER.get(name, name)

    slow: dict[str, int] = {}  # slow tests per unit of work
    for item in items:
        slow[group(item)] = slow.get(group(item), 0) + bool(item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[group(item)])  # stable: each file keeps its own order
    if config.getoption("dist", "no") == "loadgroup":
        for item in items:
            item.add_marker(pytest.mark.xdist_group(group(item)))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (Ray's start costs ~5 s here); shut down by its handle.
    A test that needs another cluster shuts it down and calls helpers.start_local_ray() again when done."""
    import ray

    ctx = start_local_ray()
    yield ctx
    ray.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `mlflow server` (own SQLite store and artifact root) for this module; stopped by its handle."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as srv:
        yield srv.uri


@pytest.fixture
def own_server(tmp_path_factory):
    """A server of the test's own, which the test may stop and restart."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow_own")) as srv:
        yield srv


@pytest.fixture(scope="session")
def outcomes_sweep(ray_session, tmp_path_factory):
    """helpers.OUTCOMES_SPACE swept once (trials that finish, are stopped for collapse, diverge), recorded in a
    SQLite MLflow store; tests only read it (a sweep's start-up costs ~15 s)."""
    from ncssl_tune.records.store import default_tracking_uri
    from ncssl_tune.spec import load_spec
    from ncssl_tune.sweep.runner import run_sweep

    tmp = tmp_path_factory.mktemp("outcomes")
    path = tmp / "outcomes.yaml"
    path.write_text(OUTCOMES_SPACE)
    spec = load_spec(str(path))
    uri = default_tracking_uri(tmp / "results")
    result = run_sweep(spec, tmp / "results", tracking_uri=uri, monitor_interval_s=1e9)
    return types.SimpleNamespace(spec=spec, uri=uri, result=result, tmp=tmp)
