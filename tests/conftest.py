from __future__ import annotations

import os

# Tests only: Ray's token authentication stays on for real use (see README, "Security defaults").
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest


def start_local_ray():
    import ray

    return ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (Ray's start costs ~5 s here); shut down by its handle.
    A test that needs another cluster shuts it down and calls start_local_ray() again when done."""
    import ray

    ctx = start_local_ray()
    yield ctx
    ray.shutdown()
