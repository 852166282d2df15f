"""The MLflow runs of one sweep: the parent run (found again by the sweep's uid) and one child run per trial (found
again by its Ray trial id), and the writes to them within MLflow's limits. Every method talks to the store and may
raise; the tracker calls them through its outbox, as operations of a `Kind`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

from ncssl_tune.config import flatten
from ncssl_tune.naming import config_id, run_name
from ncssl_tune.records.spectra import draw_staged_plots
from ncssl_tune.records.store import TrackingError, sqlite_path
from ncssl_tune.spec import SweepSpec, resolved
from ncssl_tune.vocab import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PARENT_TAG,
    RUNNING,
    STEP_METRIC,
    TAG_CONFIG,
    TAG_KIND,
    TAG_METHOD,
    TAG_OBJECTIVE,
    TAG_SAMPLED,
    TAG_STATUS,
    TAG_SWEEP,
    TAG_TRIAL,
    TAG_TRIAL_NUMBER,
    TAG_UID,
)

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_PER_BATCH = 100  # params or tags per log_batch; metrics go 1000 at a time
EFFECTIVE_SPEC = "sweep_effective.yaml"  # the spec file after --set overrides, beside the file itself


class Kind(StrEnum):
    """The writes a sweep queues in its outbox: the first field of each [kind, trial id, payload] entry of
    <sweep folder>/mlflow_outbox.json (a trial id of None means the parent run). The payload of each kind:"""

    PARENT = "parent"  # None: create the parent run, or find it again by the sweep uid
    PARENT_FILES = "parent_files"  # None: the spec files as artifacts of the parent run
    CHILD = "child"  # {"config": sampled values, "running": bool, "index": Ray's trial number or None}
    PARAMS = "params"  # {key: value}: the params a child run lacks
    BATCH = "batch"  # {"metrics": [[key, value, timestamp ms, step], ...], "tags": {key: value}}
    ARTIFACTS = "artifacts"  # the path of a folder to log as artifacts, removed once sent
    TERMINATE = "terminate"  # the run's final MLflow status (FINISHED, FAILED, KILLED)


def child_runs(client, experiment_id: str, parent_run_id: str) -> list:
    """Every child run of `parent_run_id`, all pages of MLflow's search."""
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000,
                                  page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def safe_key(key: str) -> str:
    """A valid MLflow param/metric key; long keys keep a hash so two of them cannot collide."""
    key = re.sub(r"[^/\w.\- ]", "_", str(key)).lstrip("/") or "_"
    if len(key) > MAX_KEY:
        key = key[:MAX_KEY - 9] + "~" + hashlib.sha1(key.encode()).hexdigest()[:8]
    return key


def param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_VALUE else text[:MAX_PARAM_VALUE - 3] + "..."


def tag_value(value: Any) -> str:
    return str(value)[:MAX_TAG_VALUE]


def spec_params(spec: SweepSpec) -> dict[str, str]:
    """The whole sweep specification flattened: config keys as in the trials, then search.*, resources.*,
    space.<key>.<field>."""
    r = resolved(spec)
    space = {p["key"]: {k: v for k, v in p.items() if k != "key" and v not in (None, {}, [])} for p in r["space"]}
    flat = flatten({"name": r["name"], **r["base"], "search": r["search"], "resources": r["resources"],
                    "space": space})
    return {safe_key(k): param_value(v) for k, v in flat.items()}


def trial_params(config: dict) -> dict[str, str]:
    """MLflow params from a trial's {dotted key: value} (its sampled values, or the resolved configuration it
    reports in its first result)."""
    return {safe_key(k): param_value(v) for k, v in config.items()}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "none"


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def artifact_location(uri: str, name: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database (MLflow's default is ./mlruns under the cwd)."""
    db = sqlite_path(uri)
    return None if db is None else (db.resolve().parent / "mlartifacts" / safe_key(name)).as_uri()


class SweepRuns:
    """Creates or finds the runs of one sweep (experiment = sweep name) and writes to them.

    `run_id(trial_id)` is the child run of a trial, looked up in the store when this session has not attached it
    (operations replayed from an earlier session's outbox). `floor[trial_id]` is the last epoch the store held when
    a child was found again: epochs up to it are not sent twice.
    """

    def __init__(self, spec: SweepSpec, tracking_uri: str, sweep_uid: str, ray_address: str | None = None):
        self.spec = spec
        self.tracking_uri = tracking_uri
        self.sweep_uid = sweep_uid
        self.ray_address = ray_address
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.runs: dict[str, str] = {}  # trial id -> child run id, once created or found
        self.floor: dict[str, int] = {}
        self._client = None

    def __getstate__(self) -> dict:  # Ray may pickle callbacks (Ray Client); the connection stays here
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            # Otherwise every ended run prints its URL (and costs a get_run): hundreds of lines per sweep.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_id(self, trial_id: str | None) -> str:
        if trial_id is None:
            if self.parent_run_id is None:
                raise KeyError("no MLflow parent run (its creation failed)")
            return self.parent_run_id
        if trial_id not in self.runs:
            found = self._find_child(trial_id)
            if not found:
                raise KeyError(f"no MLflow run for trial {trial_id} (its creation failed)")
            self.runs[trial_id] = found[0].info.run_id
        return self.runs[trial_id]

    # --- the parent run
    def attach_parent(self) -> None:
        c = self.client
        name = self.spec.name
        exp = c.get_experiment_by_name(name)
        if exp is not None and exp.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment {name!r} at {self.tracking_uri} is deleted; restore "
                                f"it (mlflow experiments restore --experiment-id {exp.experiment_id}) or run the "
                                f"sweep under another --name")
        self.experiment_id = exp.experiment_id if exp else c.create_experiment(
            name, artifact_location=artifact_location(self.tracking_uri, name),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        if exp is not None and exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before the tag, or by hand
            c.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        found = c.search_runs([self.experiment_id],
                              f"tags.{TAG_KIND} = 'sweep' and tags.{TAG_UID} = '{self.sweep_uid}'", max_results=1)
        s = self.spec.search
        tags = {TAG_KIND: "sweep", TAG_SWEEP: name, TAG_UID: self.sweep_uid, TAG_STATUS: "running",
                "search_algorithm": s.algorithm, TAG_OBJECTIVE: f"{s.metric} ({self.spec.mode})",
                "scheduler": s.scheduler.name, "git_commit": git_commit(),
                "ray_address": self.ray_address or "local", "spec_file": str(Path(self.spec.path).resolve())}
        if found:
            self.parent_run_id = found[0].info.run_id
            c.update_run(self.parent_run_id, status="RUNNING")
            self.send(self.parent_run_id, [], tags)
            self.log_params(self.parent_run_id, spec_params(self.spec), found[0].data.params)
            return
        self.parent_run_id = c.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id
        self.log_params(self.parent_run_id, spec_params(self.spec), {})

    def log_spec_files(self) -> None:
        """The spec file and the spec after --set overrides, once per parent run."""
        run_id = self.run_id(None)
        if any(a.path == EFFECTIVE_SPEC for a in self.client.list_artifacts(run_id)):
            return  # a resumed sweep: logged by its first session
        if Path(self.spec.path).is_file():
            self.client.log_artifact(run_id, self.spec.path)
        self.client.log_dict(run_id, self.spec.raw, EFFECTIVE_SPEC)

    # --- child runs
    def children(self) -> list:
        return child_runs(self.client, self.experiment_id, self.parent_run_id)

    def _find_child(self, trial_id: str) -> list:
        return self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.run_id(None)}' and "
                                                             f"tags.{TAG_TRIAL} = '{trial_id}'", max_results=1)

    def attach_child(self, trial_id: str, config: dict, running: bool, index: int | None = None) -> int:
        """Create the trial's child run or find it again; returns the last epoch the store holds for it.
        `index`: Ray's number of the trial, for the run name and the trial_number tag."""
        c = self.client
        found = self._find_child(trial_id)
        params = trial_params(config)
        if found:
            run_id = found[0].info.run_id
            history = c.get_metric_history(run_id, STEP_METRIC)
            self.floor[trial_id] = max((m.step for m in history), default=0)
            self.log_params(run_id, params, found[0].data.params)
            if running and found[0].info.status != "RUNNING":  # a resumed trial runs again
                c.update_run(run_id, status="RUNNING")
                self.send(run_id, [], {TAG_STATUS: "running"})
            if index is not None and TAG_TRIAL_NUMBER not in found[0].data.tags:  # a run from before the tag
                self.send(run_id, [], {TAG_TRIAL_NUMBER: index})
        else:
            tags = {PARENT_TAG: self.run_id(None), TAG_KIND: "trial", TAG_SWEEP: self.spec.name,
                    TAG_UID: self.sweep_uid, TAG_TRIAL: trial_id, TAG_STATUS: RUNNING, TAG_METHOD: self.method(config),
                    TAG_SAMPLED: json.dumps(sorted(config)), TAG_CONFIG: config_id(config),
                    **({TAG_TRIAL_NUMBER: str(index)} if index is not None else {})}
            run_id = c.create_run(self.experiment_id, tags=tags,
                                  run_name=self.child_name(trial_id, config, index)).info.run_id
            self.log_params(run_id, params, {})
        self.runs[trial_id] = run_id
        return self.floor.get(trial_id, 0)

    def method(self, config: dict) -> str:
        """A trial's method: sampled, or the sweep's base method."""
        return str(config.get("loss.method", self.spec.base.loss.method))

    def child_name(self, trial_id: str, config: dict, index: int | None, mark: str = "") -> str:
        """A child run's name: `#3 vicreg lam=25.1`, or `#3 [collapsed] vicreg lam=25.1` with a mark."""
        return run_name(index, trial_id, self.method(config), config, mark)

    def log_trial_params(self, trial_id: str, params: dict[str, str]) -> None:
        """The params of a trial's child run that it lacks (its resolved configuration, once it reports it)."""
        run_id = self.run_id(trial_id)
        self.log_params(run_id, params, self.client.get_run(run_id).data.params)

    # --- writes
    def send_batch(self, trial_id: str | None, metrics: list[list], tags: dict) -> None:
        """A Kind.BATCH: epochs a found-again child run holds already (up to its floor) are not sent twice."""
        from mlflow.entities import Metric

        floor = self.floor.get(trial_id, 0) if trial_id else 0
        self.send(self.run_id(trial_id), [Metric(k, v, ts, step) for k, v, ts, step in metrics
                                          if trial_id is None or step > floor or k == "time_total_s"], tags)

    def send_artifacts(self, trial_id: str | None, folder: str) -> None:
        draw_staged_plots(folder)  # the trial's plots, drawn here, off the path of the trials' results
        self.client.log_artifacts(self.run_id(trial_id), folder)
        shutil.rmtree(folder, ignore_errors=True)

    def terminate(self, trial_id: str | None, status: str) -> None:
        self.client.set_terminated(self.run_id(trial_id), status)

    def send(self, run_id: str, metrics: list, tags: dict | None = None) -> None:
        """log_batch in as few calls as MLflow's limits allow (1000 metrics, 100 tags per call)."""
        from mlflow.entities import RunTag

        tag_items = [RunTag(k, tag_value(v)) for k, v in (tags or {}).items()]
        while metrics or tag_items:
            self.client.log_batch(run_id, metrics=metrics[:1000], tags=tag_items[:MAX_PER_BATCH], synchronous=True)
            metrics, tag_items = metrics[1000:], tag_items[MAX_PER_BATCH:]

    def log_params(self, run_id: str, params: dict[str, str], existing: dict[str, str]) -> None:
        """Log the params the run lacks; MLflow params are immutable, so a changed value is reported, not sent."""
        from mlflow.entities import Param

        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            log.warning("MLflow run %s keeps its earlier values of %s (params cannot change on resume)",
                        run_id, ", ".join(changed[:10]))
        items = [Param(k, v) for k, v in params.items() if k not in existing]
        for chunk in _chunks(items, MAX_PER_BATCH):
            self.client.log_batch(run_id, params=chunk, synchronous=True)
