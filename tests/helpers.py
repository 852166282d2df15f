"""What several test modules share: quick-sweep overrides, search-space files, a local Ray, an `mlflow server`, and
reading back what a sweep recorded in MLflow. Fixtures live in conftest.py; this module is imported by name
(pyproject.toml puts tests/ on pytest's pythonpath)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
VICREG_SPACE = REPO / "search_spaces" / "vicreg.yaml"

# --- overrides (`--set` strings) for quick sweeps

# A small synthetic dataset and model: one epoch well under a second on a CPU core.
TINY = ["data.dataset=synthetic", "data.synthetic={n: 400, size: 8, channels: 1, classes: 4}",
        "eval.probe_weight_decays=[0.0]", "model.width=16", "eval.cond_views=0", "train.batch_size=64"]

# Tiny trials, two at a time, with a small evaluation subset: for tests of what a sweep records.
TINY_SWEEP = [*TINY, "eval.eval_samples=64", "search.max_concurrent=2"]

# Tiny trials (probe only at the first and last epoch), a FIFO scheduler and no collapse stopper, so every trial
# is meant to run to its last epoch; one retry, for the tests that kill a trial's worker.
TINY_TO_THE_END = [*TINY, "eval.probe_every=0", "eval.eval_samples=256", "model.projector=64-64",
                   "search.max_concurrent=2", "search.scheduler.name=fifo", "search.collapse_stop.total=false",
                   "search.max_failures=1"]

# The shipped data (embedded digits) with a cheap evaluation: kNN every epoch, probe only at the first and last.
DIGITS_SWEEP = ["eval.cond_views=0", "eval.eval_samples=256", "eval.probe_every=0", "eval.knn_every=1",
                "model.projector=128-128", "search.max_concurrent=2"]


# A grid sweep whose three trials end the three ways a trial can end on its own: lr 3e-3 finishes, 1e4 collapses
# totally and is stopped by the collapse stopper (at epoch 2), 1e8 diverges in its first epoch. Run once per session
# (conftest.outcomes_sweep) and read by the tests of what a sweep records for each ending.
OUTCOMES_SPACE = """\
name: outcomes
data: {dataset: synthetic, synthetic: {n: 400, size: 8, channels: 1, classes: 4}}
model: {projector: 64-64, width: 16}
loss: {method: vicreg}
train: {epochs: 3, batch_size: 64}
eval: {cond_views: 0, eval_samples: 64, probe_weight_decays: [0.0], probe_every: 0}
search: {algorithm: grid, num_samples: 3, max_concurrent: 2, metric: knn_acc, scheduler: {name: fifo}}
space:
  train.lr: {type: categorical, values: [3.0e-3, 1.0e+4, 1.0e+8]}
"""


def space_without(folder: Path, *keys: str) -> Path:
    """search_spaces/vicreg.yaml with some swept keys removed (so `--set` can fix them, or to drop a costly
    dimension), written to <folder>/vicreg.yaml."""
    raw = yaml.safe_load(VICREG_SPACE.read_text())
    for k in keys:
        del raw["space"][k]
    path = Path(folder) / "vicreg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- a local Ray and a local MLflow server

def start_local_ray():
    import ray

    return ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


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


@contextmanager
def mlflow_server(root: Path):
    """A started MlflowServer in `root`, stopped (by its handle) when the block ends."""
    srv = MlflowServer(root)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


# --- reading back what a sweep recorded in MLflow (trials.csv: ncssl_tune.sweep.monitor.read_trials)


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
