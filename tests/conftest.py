"""Fixtures only; what tests share besides fixtures is in helpers.py."""

from __future__ import annotations

import os

# Tests only: Ray's token authentication stays on for real use (see README, "Security defaults").
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest
from helpers import MlflowServer, start_local_ray


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
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        srv.start()
        yield srv.uri
    finally:
        srv.stop()


@pytest.fixture
def own_server(tmp_path_factory):
    """A server of the test's own, which the test may stop and restart."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_own"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
