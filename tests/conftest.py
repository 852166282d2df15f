from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


MLFLOW = Path(sys.executable).parent / "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """An `mlflow server` on 127.0.0.1 with its own SQLite store and artifact folder. start() and stop() (by the
    Popen handle) can repeat: it comes back on the same port with the same store, as after a server restart."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> None:
        # Own process group, so its uvicorn worker stops with it; no job runner (it starts 7 idle consumers).
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                 "--artifacts-destination", str(self.root / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group outlived the SIGTERM
        except ProcessLookupError:
            pass
        proc.wait()


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


# --- tiny trials and reading back what a sweep recorded, shared by the sweep, tracking and fault tests

# A small synthetic dataset and model: one epoch well under a second on a CPU core.
TINY = ["data.dataset=synthetic", "data.synthetic={n: 400, size: 8, channels: 1, classes: 4}",
        "eval.probe_weight_decays=[0.0]", "model.width=16", "eval.cond_views=0", "train.batch_size=64"]


def mlflow_client(client_or_uri):
    from mlflow import MlflowClient

    return MlflowClient(client_or_uri) if isinstance(client_or_uri, str) else client_or_uri


def runs_of(client_or_uri, experiment: str) -> tuple[list, list]:
    """(parent runs, child runs) of a sweep's MLflow experiment."""
    from ncssl_tune.vocab import TAG_KIND

    c = mlflow_client(client_or_uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    return ([r for r in runs if r.data.tags.get(TAG_KIND) == "sweep"],
            [r for r in runs if r.data.tags.get(TAG_KIND) == "trial"])


def steps(client_or_uri, run_id: str, key: str = "effective_rank") -> list[int]:
    """The steps (epochs) a run holds for `key`, sorted; an epoch logged twice appears twice."""
    return sorted(m.step for m in mlflow_client(client_or_uri).get_metric_history(run_id, key))
