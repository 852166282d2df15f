"""Outgrowing one machine: the AWS autoscaler config, a sweep over a multi-node Ray cluster, --storage."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers import free_port, start_local_ray

from ncssl_tune import cli
from ncssl_tune.spec import load_spec

CLUSTER_YAML = "sweeps/cluster.yaml"
LOCAL_AUTOSCALE_YAML = "sweeps/local-autoscale.yaml"


def test_cluster_yaml_passes_rays_schema_and_scales_gpu_workers_from_zero():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(Path(CLUSTER_YAML).read_text())
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        jsonschema.validate(config, json.load(f))  # the file as written: no unknown or mistyped keys
    validate_config(prepare_config(config))  # as `ray up` sees it, with the provider's defaults filled in
    assert config["provider"]["type"] == "aws" and config["idle_timeout_minutes"] > 0
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    assert any("pip install" in c for c in config["setup_commands"])


@pytest.mark.parametrize("storage, message", [
    ("relative/ray", "relative path"),
    ("ftp://host/ray", "unsupported scheme 'ftp'"),
    ("s3:///no-bucket", "no bucket"),
])
def test_storage_must_be_reachable_from_every_node(storage, message, capsys, monkeypatch):
    import ncssl_tune.sweep.runner

    monkeypatch.setattr(ncssl_tune.sweep.runner, "run_sweep", lambda *a, **k: pytest.fail("run_sweep was called"))
    assert cli.main(["search_spaces/vicreg.yaml", "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ncssl-sweep: error: --storage") and message in err


@pytest.mark.parametrize("storage", ["s3://bucket/sweeps", "gs://bucket/sweeps/", "/mnt/nfs/ray"])
def test_cloud_and_shared_storage_pass_the_dry_run(storage, capsys):
    assert cli.main(["search_spaces/vicreg.yaml", "--storage", storage, "--dry-run"]) == 0
    assert f"ray tune storage: {storage.rstrip('/')}/vicreg" in capsys.readouterr().out


def test_storage_becomes_ray_tunes_storage_path_per_sweep(tmp_path):
    from ncssl_tune.sweep.monitor import CollapseStopper
    from ncssl_tune.sweep.runner import build_tuner, tune_storage

    spec = load_spec("search_spaces/vicreg.yaml", [], name="remote")
    out_dir = tmp_path / "results" / "remote"
    assert tune_storage(spec, out_dir, None) == str(out_dir / "ray")
    assert tune_storage(spec, out_dir, "s3://bucket/sweeps/") == "s3://bucket/sweeps/remote"
    out_dir.mkdir(parents=True)
    shared = tmp_path / "shared"  # pyarrow contacts a cloud bucket at once, so a shared path stands in
    tuner = build_tuner(spec, out_dir, [], CollapseStopper(spec.search.collapse_stop), storage=str(shared))
    assert tuner._local_tuner._run_config.storage_path == str(shared / "remote")
    assert (out_dir / "optuna.log").exists()  # the Optuna journal stays in the local sweep folder


def test_local_autoscale_yaml_passes_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(Path(LOCAL_AUTOSCALE_YAML).read_text())
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        jsonschema.validate(config, json.load(f))
    # Not prepare_config: it fills defaults from the provider's example.yaml, which Ray's wheel does not ship
    # (the file above is complete: `ray start --autoscaling-config` uses it as written, see the test below).
    validate_config(config)
    assert config["provider"]["type"] == "fake_multinode"
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] >= 2 for t in workers)


@contextmanager
def fake_autoscaling_cluster():
    """`ray start --head` with sweeps/local-autoscale.yaml (Ray's fake multi-node provider): its autoscaler adds
    and removes worker raylets on this machine. Yields the GCS address. Ended by the pids it started: the head
    process and everything below it (the provider's worker nodes are children of the head's monitor)."""
    import psutil
    import ray

    port = free_port()
    config = yaml.safe_load(Path(LOCAL_AUTOSCALE_YAML).read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"  # the shipped file assumes this machine's IP:6379
    head_cpus = config["available_node_types"][config["head_node_type"]]["resources"]["CPU"]
    tmp = tempfile.mkdtemp(prefix="ncssl-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    config_path = os.path.join(tmp, "autoscale.yaml")
    Path(config_path).write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    with open(os.path.join(tmp, "head.log"), "w") as log:
        head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}",
                                 "--node-ip-address=127.0.0.1", f"--num-cpus={head_cpus}", "--include-dashboard=false",
                                 f"--temp-dir={tmp}/ray", f"--autoscaling-config={config_path}"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert head.poll() is None, Path(tmp, "head.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the fake cluster's head did not start within 60 s"
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        tree = psutil.Process(head.pid).children(recursive=True)
        head.terminate()  # `ray start --block` ends its node's processes on SIGTERM
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            head.kill()
        for proc in tree:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def autoscaling_cluster():
    import ray

    session_ray = ray.is_initialized()
    if session_ray:
        ray.shutdown()
    try:
        with fake_autoscaling_cluster() as address:
            yield address
    finally:
        if session_ray:
            start_local_ray()


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


@pytest.mark.slow
def test_autoscaler_adds_worker_nodes_for_a_sweep_and_removes_them_when_idle(autoscaling_cluster, tmp_path):
    import ray
    from mlflow import MlflowClient
    from ray.tune import Callback

    from ncssl_tune.records.store import default_tracking_uri
    from ncssl_tune.sweep.monitor import read_trials
    from ncssl_tune.sweep.runner import RAY_DIR, TUNE_NAME, run_sweep

    ray.init(address=autoscaling_cluster, log_to_driver=False)
    try:
        assert len(_alive_nodes()) == 1  # the head alone: one cpu, one trial at a time
        head = next(n["NodeID"] for n in _alive_nodes() if "node:__internal_head__" in n["Resources"])

        class NodeCount(Callback):
            most = 0

            def on_trial_result(self, iteration, trials, trial, result, **info):
                NodeCount.most = max(NodeCount.most, len(_alive_nodes()))

        spec = load_spec("search_spaces/vicreg.yaml", ["eval.cond_views=0", "eval.probe_every=0",
                                                       "eval.eval_samples=128", "model.projector=64-64",
                                                       "search.scheduler.name=fifo", "search.max_concurrent=3",
                                                       "train.threads=1", "search.collapse_stop.total=false"],
                         num_samples=3, epochs=3, name="autoscale")
        uri = default_tracking_uri(tmp_path)
        result = run_sweep(spec, tmp_path, tracking_uri=uri, extra_callbacks=[NodeCount()], monitor_interval_s=1e9)
        assert result.num_trials == 3 and result.errors == 0
        assert NodeCount.most >= 2  # the autoscaler added workers for the trials the head could not hold
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id],
                                  "tags.run_kind = 'trial'")
        nodes = {r.data.tags["node_id"] for r in runs}
        assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
        assert len(nodes) >= 2 and nodes - {head}, (nodes, head)  # trials ran on added worker nodes
        assert [r["status"] for r in read_trials(result.out_dir)] == ["finished"] * 3
        reported = {json.loads(line)["node_id"] for path in (result.out_dir / RAY_DIR / TUNE_NAME).glob("*/result.json")
                    for line in path.read_text().splitlines()}
        assert reported == nodes  # each trial's node, as Ray recorded it, is its MLflow tag
        deadline = time.monotonic() + 120  # idle_timeout_minutes 0.2, removed one by one
        while len(_alive_nodes()) > 1:
            assert time.monotonic() < deadline, f"idle workers not removed: {len(_alive_nodes())} nodes alive"
            time.sleep(2)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_gpu_sweep_fails_when_the_autoscaler_cannot_add_a_gpu_node(autoscaling_cluster, tmp_path):
    from ncssl_tune.sweep.runner import SweepError, run_sweep

    spec = load_spec("search_spaces/vicreg.yaml", ["resources.gpu=1"], num_samples=1, epochs=1, name="gpu")
    start = time.monotonic()
    with pytest.raises(SweepError, match=r"gpu=1 \(resources.gpu\).*0 GPU after waiting 3 s.*resources.gpu=0"):
        run_sweep(spec, tmp_path, address=autoscaling_cluster, resource_wait_s=3)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "gpu").exists()  # nothing was started or written
