"""Outgrowing one machine: the AWS autoscaler config, a sweep over a multi-node Ray cluster, --storage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import start_local_ray

from ncssl_tune import cli
from ncssl_tune.spec import load_spec

CLUSTER_YAML = "sweeps/cluster.yaml"


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


def test_sweep_runs_trials_on_more_than_one_node(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from ncssl_tune.mlflow_store import default_tracking_uri
    from ncssl_tune.monitor import read_trials
    from ncssl_tune.sweep import RAY_DIR, TUNE_NAME, run_sweep

    session_ray = ray.is_initialized()  # the session's local Ray (conftest): restored afterwards
    if session_ray:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 3
        spec = load_spec("search_spaces/vicreg.yaml", ["eval.cond_views=0", "eval.probe_every=0",
                                                       "eval.eval_samples=128", "model.projector=64-64",
                                                       "search.scheduler.name=fifo", "search.max_concurrent=3",
                                                       "train.threads=1"],
                         num_samples=3, epochs=2, name="cluster")
        result = run_sweep(spec, tmp_path, tracking_uri=default_tracking_uri(tmp_path), monitor_interval_s=1e9)
        assert result.num_trials == 3 and result.errors == 0
        rows = read_trials(result.out_dir)
        assert [r["status"] for r in rows] == ["finished"] * 3
        nodes = set()
        for path in (result.out_dir / RAY_DIR / TUNE_NAME).glob("*/result.json"):
            for line in path.read_text().splitlines():
                nodes.add(json.loads(line)["node_id"])
        assert len(nodes) > 1, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        if session_ray:
            start_local_ray()


@pytest.mark.parametrize("storage, message", [
    ("relative/ray", "relative path"),
    ("ftp://host/ray", "unsupported scheme 'ftp'"),
    ("s3:///no-bucket", "no bucket"),
])
def test_storage_must_be_reachable_from_every_node(storage, message, capsys, monkeypatch):
    import ncssl_tune.sweep

    monkeypatch.setattr(ncssl_tune.sweep, "run_sweep", lambda *a, **k: pytest.fail("run_sweep was called"))
    assert cli.main(["search_spaces/vicreg.yaml", "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ncssl-sweep: error: --storage") and message in err


@pytest.mark.parametrize("storage", ["s3://bucket/sweeps", "gs://bucket/sweeps/", "/mnt/shared/ray"])
def test_cloud_and_shared_storage_pass_the_dry_run(storage, capsys):
    assert cli.main(["search_spaces/vicreg.yaml", "--storage", storage, "--dry-run"]) == 0
    assert f"ray tune storage: {storage.rstrip('/')}/vicreg" in capsys.readouterr().out


def test_storage_becomes_ray_tunes_storage_path_per_sweep(tmp_path):
    from ncssl_tune.monitor import CollapseStopper
    from ncssl_tune.sweep import build_tuner, tune_storage

    spec = load_spec("search_spaces/vicreg.yaml", [], name="remote")
    out_dir = tmp_path / "results" / "remote"
    assert tune_storage(spec, out_dir, None) == str(out_dir / "ray")
    assert tune_storage(spec, out_dir, "s3://bucket/sweeps/") == "s3://bucket/sweeps/remote"
    out_dir.mkdir(parents=True)
    shared = tmp_path / "shared"  # pyarrow contacts a cloud bucket at once, so a shared path stands in
    tuner = build_tuner(spec, out_dir, [], CollapseStopper(spec.search.collapse_stop), storage=str(shared))
    assert tuner._local_tuner._run_config.storage_path == str(shared / "remote")
    assert (out_dir / "optuna.log").exists()  # the Optuna journal stays in the local sweep folder
