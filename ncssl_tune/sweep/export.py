"""The best trial's encoder, taken home: an MLflow model on that trial's child run and a folder `<sweep>/best/`.

A researcher who found a good configuration should not have to train it again. After a sweep the best trial's
latest checkpoint (trials checkpoint every `train.checkpoint_every` epochs, default 1, and at the end: so, by
default, the epoch of its last result; best.json names the epoch) is rebuilt into the trial's `SSLModel` (backbone + projector, and the predictor of SimSiam/BYOL), and written
as an MLflow pytorch model with its resolved configuration:

    <sweep>/best/model/        mlflow.pytorch.save_model (MLmodel, the pickled module, ncssl_tune's code)
    <sweep>/best/config.yaml   the configuration the trial ran (TrainConfig, every key)
    <sweep>/best/best.json     trial, epoch, child run, model URI and the scores it reported at that epoch
    <sweep>/best/README.md     how to load it

`score_encoder` measures the downstream scores of a loaded encoder as a final epoch does (frozen h, the same
split and probes), so an export can be checked against what the trial reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

import ncssl_tune
from ncssl_tune.config import TrainConfig, mechanisms
from ncssl_tune.core.evaluate import Labels, build_evaluators, embed
from ncssl_tune.core.models import SSLModel, build_backbone, build_predictor, build_projector
from ncssl_tune.core.train import backbone_options, load_own, load_state
from ncssl_tune.naming import trial_index, trial_label
from ncssl_tune.sweep.trainable import STATE_FILE
from ncssl_tune.vocab import DOWNSTREAM, PARENT_TAG, RESOLVED_CONFIG, TAG_TRIAL

BEST_DIR = "best"  # in the sweep folder
MODEL_DIR = "model"  # the MLflow model inside BEST_DIR
MODEL_NAME = "encoder"  # the logged model's name on the child run
RESULT_LOG = "result.json"  # Ray Tune's per-trial log: its first line holds the resolved configuration


@dataclass
class BestExport:
    """Where the best encoder went; `scores` are the downstream scores the trial reported at `epoch`."""

    folder: Path
    trial_id: str
    epoch: int
    scores: dict[str, float]
    run_id: str | None = None  # the trial's MLflow child run
    model_uri: str | None = None  # models:/... of the logged model (mlflow.pytorch.load_model takes it)
    registered: str | None = None  # "NAME version N" when registered


def build_model(cfg: TrainConfig, in_channels: int, image_size: int) -> SSLModel:
    """The untrained SSLModel of `cfg`, as train() builds it, for a checkpoint's state dict."""
    backbone, feat = build_backbone(cfg.model.backbone, in_channels, image_size, backbone_options(cfg))
    projector, embed_dim = build_projector(feat, cfg.model.projector, cfg.model.norm)
    mech = mechanisms(cfg, feat)
    predictor = build_predictor(embed_dim, mech.predictor, cfg.model.norm) if mech.predictor else None
    return SSLModel(backbone, projector, predictor=predictor)


@torch.no_grad()
def score_encoder(model: SSLModel, cfg: TrainConfig, epoch: int | None = None) -> dict[str, float]:
    """Downstream scores (knn_acc, fewshot_acc, probe_acc, ...) of `model`'s frozen h on cfg's data, as train()
    measures them at its final epoch (`epoch`: the epoch whose schedule to follow, default the last). On CPU,
    like a CPU trial (no autocast)."""
    data = load_own(cfg)  # as the trial held it: a streamed dataset streams here too
    model = model.to("cpu").eval()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)  # the trial's thread count: sums in the probes round alike
    labels = Labels(data.train_y, data.test_y, data.num_classes)
    h_train = embed(model, data.train_x, 1024, contextlib.nullcontext).h
    h_test = embed(model, data.test_x, 1024, contextlib.nullcontext).h
    at = epoch if epoch is not None else cfg.train.epochs
    due = [ev for ev in build_evaluators(cfg) if ev.downstream and ev.due(at, final=at == cfg.train.epochs)]
    return {k: float(v) for ev in due for k, v in ev.score(h_train, h_test, labels).items()}


def _resolved_config(best, base: TrainConfig) -> TrainConfig:
    """The configuration the trial reported in its first result (the driver does not rebuild it)."""
    with best.filesystem.open_input_stream(f"{best.path}/{RESULT_LOG}") as f:
        for line in f.read().decode().splitlines():
            first = json.loads(line)
            if RESOLVED_CONFIG in first:
                return base.with_overrides(first[RESOLVED_CONFIG])
    raise ValueError(f"{best.path}/{RESULT_LOG}: no {RESOLVED_CONFIG} in the trial's results")


def _reported(best, epoch: int) -> dict[str, float]:
    """The downstream scores the trial reported at `epoch` and measured then (a carried probe_acc is left out)."""
    df = best.metrics_dataframe
    rows = df[df["epoch"] == epoch] if df is not None and "epoch" in df else None
    if rows is None or rows.empty:
        return {}
    row = rows.iloc[-1]
    out = {k: float(row[k]) for k in DOWNSTREAM if k in row and row[k] == row[k]}
    if "probe_epoch" in row and row["probe_epoch"] != epoch:
        out = {k: v for k, v in out.items() if not k.startswith("probe_")}
    return out


def _child_run(client, experiment_id: str, parent_run_id: str, trial_id: str):
    runs = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                                               f"tags.{TAG_TRIAL} = '{trial_id}'", max_results=1)
    return runs[0] if runs else None


# The whole module, pickled: loads as the SSLModel it is (h, z = model(x); score_encoder takes it). MLflow's
# default "pt2" traces one forward pass into a graph, needs an example input and gives back no SSLModel.
SERIALIZATION = "pickle"


@contextlib.contextmanager
def _quiet_mlflow():
    """MLflow's warnings while saving: no signature, no input example (an image encoder has neither to give), and
    the pickle format's caution (the model is this sweep's own, loaded by its own researcher)."""
    log = logging.getLogger("mlflow")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _requirements() -> list[str]:
    return [f"torch=={torch.__version__.split('+')[0]}"]


def _code_paths() -> list[str]:
    """ncssl_tune itself travels with the model (the pickled SSLModel refers to its classes), caches left out."""
    return [str(Path(ncssl_tune.__file__).parent)]


def log_to_run(model: SSLModel, tracking_uri: str, run_id: str,
               register: str | None = None) -> tuple[str, str | None]:
    """mlflow.pytorch.log_model on the (ended) run `run_id`, which keeps its status; returns (model URI,
    "NAME version N" or None)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    before = client.get_run(run_id).info
    previous_uri = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(tracking_uri)
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pytorch.log_model(model, name=MODEL_NAME, pip_requirements=_requirements(),
                                                code_paths=_code_paths(), registered_model_name=register,
                                                serialization_format=SERIALIZATION)
        finally:  # start_run re-opened the ended run (and ends it FINISHED, or FAILED on an error): as it was
            client.set_terminated(run_id, status=before.status, end_time=before.end_time)
    finally:
        mlflow.set_tracking_uri(previous_uri)
    version = getattr(info, "registered_model_version", None)
    return info.model_uri, (f"{register} version {version}" if register and version is not None else register)


README = """# The best encoder of sweep `{sweep}`

Trial `{trial}` (as the console, trials.csv and its MLflow run name it), checkpoint of epoch {epoch}; it
reported {scores}.
Configuration: `config.yaml` (every key of the TrainConfig it ran). MLflow: {mlflow}.

The model is the trial's `SSLModel` (backbone + projector{predictor}): `h, z = model(x)` for images
x of shape (N, {channels}, {size}, {size}) in [0, 1]; h is the representation the probes score.

    import mlflow.pytorch
    model = mlflow.pytorch.load_model("{folder}/model")   # or the model URI in best.json
    model.eval()

Re-measure its downstream scores as the trial did:

    from ncssl_tune.sweep.export import load_config, score_encoder
    print(score_encoder(model, load_config("{folder}")))
"""


def load_config(folder: str | Path) -> TrainConfig:
    """The TrainConfig of an exported encoder (its `config.yaml`)."""
    return TrainConfig.from_dict(yaml.safe_load((Path(folder) / "config.yaml").read_text()))


def export_best(sweep_name: str, base: TrainConfig, out_dir: Path, best, tracking_uri: str | None = None,
                experiment_id: str | None = None, parent_run_id: str | None = None,
                register: str | None = None) -> BestExport:
    """Write `best`'s (a ray.tune.Result) latest checkpoint as the encoder of `out_dir/best/`, and log it on the
    trial's MLflow child run when a tracking URI and the parent run are given."""
    if best.checkpoint is None:
        raise ValueError(f"trial {best.metrics.get('trial_id')}: no checkpoint to export")
    cfg = _resolved_config(best, base)
    with best.checkpoint.as_directory() as d:
        state = load_state(Path(d) / STATE_FILE)
    data = load_own(cfg)
    model = build_model(cfg, data.channels, data.image_size)
    model.load_state_dict(state["model"])
    model.eval()
    epoch, trial = int(state["epoch"]), str(best.metrics.get("trial_id"))
    folder = out_dir / BEST_DIR
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp, _quiet_mlflow():  # a new best/ replaces the old whole
        staged = Path(tmp) / BEST_DIR
        staged.mkdir()
        import mlflow.pytorch

        mlflow.pytorch.save_model(model, staged / MODEL_DIR, pip_requirements=_requirements(),
                                  code_paths=_code_paths(), serialization_format=SERIALIZATION)
        cfg_dict = cfg.to_dict()
        (staged / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
        out = BestExport(folder=folder, trial_id=trial, epoch=epoch, scores=_reported(best, epoch))
        if tracking_uri and experiment_id and parent_run_id:
            import mlflow

            child = _child_run(mlflow.MlflowClient(tracking_uri), experiment_id, parent_run_id, trial)
            if child is not None:
                out.run_id = child.info.run_id
                out.model_uri, out.registered = log_to_run(model, tracking_uri, out.run_id, register)
        (staged / "best.json").write_text(json.dumps({**asdict(out), "folder": str(folder)}, indent=1))
        scores = ", ".join(f"{k} {v:.4g}" for k, v in out.scores.items()) or "no downstream score at that epoch"
        (staged / "README.md").write_text(README.format(
            sweep=sweep_name, trial=trial_label(trial_index(best.metrics.get("experiment_tag")), trial), epoch=epoch, scores=scores, folder=folder,
            mlflow=f"`{out.model_uri}` on run `{out.run_id}`" if out.model_uri else "not logged",
            predictor=", predictor" if model.predictor is not None else "", channels=data.channels,
            size=data.image_size))
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)
    return out


def try_export_best(*args: Any, **kwargs: Any) -> BestExport | None:
    """export_best, or None with the reason on stderr: a sweep's results stand without its export."""
    try:
        return export_best(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - storage, MLflow, data: each reported, none ends the sweep
        print(f"ncssl-sweep: warning: the best encoder was not exported: {e}", file=sys.stderr, flush=True)
        return None
