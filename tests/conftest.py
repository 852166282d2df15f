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


def _unit(nodeid: str) -> str:
    """The unit of work an xdist worker takes a test in: its file (SAME_WORKER: a shared name), or itself."""
    path = nodeid.split("::", 1)[0]
    name = path.rsplit("/", 1)[-1].removesuffix(".py")
    return nodeid if name in EACH_TEST else SAME_WORKER.get(name, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """The suite runs on two xdist workers (pyproject's addopts; -n 0 runs it in one process). Each test file is
    one unit of work (EACH_TEST: each test), so its module fixtures (an mlflow server, a sweep) start once.
    (xdist's own loadgroup marks do not group under pytest 9.2, whose node ids xdist cannot rename.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return ByFile(config, log)


def pytest_collection_modifyitems(config, items):
    """Units with the most slow tests are handed out first (pyproject: --no-loadscope-reorder keeps this order), so
    that no worker is left running a long file while the other has finished."""
    slow: dict[str, int] = {}
    for item in items:
        slow[_unit(item.nodeid)] = slow.get(_unit(item.nodeid), 0) + bool(item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[_unit(item.nodeid)])  # stable: each file keeps its own order


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


