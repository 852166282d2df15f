"""The best trial's encoder, exported after a sweep (sweep/export.py): loaded in a fresh process from MLflow and
from <sweep>/best/, it scores what the trial reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import TINY_TO_THE_END, VICREG_SPACE

from ncssl_tune.spec import load_spec
from ncssl_tune.sweep.runner import run_sweep

# Runs in a fresh interpreter: nothing of the sweep's process (its model objects, imports, torch threads) helps.
# One process loads every source it is given, each on its own (the imports, ~8 s, are paid once): one JSON line
# per source.
RESCORE = """
import json, sys
import mlflow, mlflow.pytorch
from ncssl_tune.sweep.export import load_config, score_encoder
uri, folder, epoch, sources = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
mlflow.set_tracking_uri(uri)
for source in sources:
    model = mlflow.pytorch.load_model(source)
    h, z = model(__import__("torch").rand(2, 1, 8, 8))
    print(json.dumps({"source": source, "scores": score_encoder(model, load_config(folder), epoch),
                      "h": list(h.shape), "z": list(z.shape), "class": type(model).__name__}))
"""


@pytest.fixture(scope="module")
def exported(ray_session, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    uri = f"sqlite:///{results}/mlflow.db"
    spec = load_spec(VICREG_SPACE, [*TINY_TO_THE_END, "model.norm=batch"], num_samples=2, epochs=2, name="export")
    result = run_sweep(spec, results, tracking_uri=uri, monitor_interval_s=1e9, register="ncssl-export-test")
    return spec, uri, result


def _rescore(uri: str, sources: list[str], folder, epoch: int) -> dict[str, dict]:
    """What a fresh interpreter gets from each source: {source: its JSON line}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*sys.path])}
    out = subprocess.run([sys.executable, "-c", RESCORE, uri, str(folder), str(epoch), *sources], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    got = [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith("{")]
    return {g["source"]: g for g in got}


def test_the_best_trial_is_exported_with_its_configuration(exported):
    _, _, result = exported
    ex = result.best_export
    assert ex is not None and ex.trial_id == result.best_metrics["trial_id"] and ex.epoch == 2
    files = {p.name for p in ex.folder.iterdir()}
    assert files == {"model", "config.yaml", "best.json", "README.md"} and (ex.folder / "model" / "MLmodel").is_file()
    cfg = yaml.safe_load((ex.folder / "config.yaml").read_text())
    for key, value in result.best_config.items():  # what Optuna sampled is what the exported config says
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == pytest.approx(value) if isinstance(value, float) else node == value, key
    assert json.loads((ex.folder / "best.json").read_text())["model_uri"] == ex.model_uri
    # the scores the trial reported at that epoch: the ones its last result carries
    assert ex.scores and all(ex.scores[k] == result.best_metrics[k] for k in ex.scores)
    readme = (ex.folder / "README.md").read_text()
    number = result.best_metrics["experiment_tag"].split("_")[0]  # the trial's one name: number and Ray id
    assert "mlflow.pytorch.load_model" in readme and f"Trial `#{number} ({ex.trial_id})`" in readme


def test_the_model_is_logged_on_the_trial_run_which_keeps_its_status(exported):
    from mlflow import MlflowClient

    _, uri, result = exported
    ex = result.best_export
    c = MlflowClient(uri)
    run = c.get_run(ex.run_id)
    assert run.data.tags["ray_trial_id"] == ex.trial_id and run.info.status == "FINISHED"
    assert ex.model_uri.startswith("models:/")
    assert ex.registered == "ncssl-export-test version 1"
    assert c.get_registered_model("ncssl-export-test").name == "ncssl-export-test"


def test_a_fresh_process_loads_it_from_mlflow_and_from_the_folder_and_scores_what_the_trial_reported(exported):
    _, uri, result = exported
    ex = result.best_export
    sources = {"mlflow": ex.model_uri, "folder": str(ex.folder / "model")}
    loaded = _rescore(uri, list(sources.values()), ex.folder, ex.epoch)
    assert sorted(loaded) == sorted(sources.values())  # each source loaded, none skipped
    for name, source in sources.items():
        got = loaded[source]
        assert got["class"] == "SSLModel" and got["h"][0] == got["z"][0] == 2, name
        assert set(ex.scores) <= set(got["scores"]), name
        for k, v in ex.scores.items():
            assert got["scores"][k] == pytest.approx(v, abs=1e-6), (name, k)
