"""Driver-side MLflow recording of a sweep: one parent run per sweep, one nested child run per trial.

Trials never talk to MLflow; `MlflowTracker` is a Ray Tune callback on the driver that buffers each trial's
per-epoch results and sends them with `log_batch` (metric names exactly as `train()` reports them, step = epoch).
Runs are found again by their tags, so a resumed sweep re-attaches to its parent and child runs instead of
duplicating them, and never logs an epoch twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import re
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ray.tune import Callback

from ncssl_tune.config import flatten
from ncssl_tune.monitor import trial_outcome
from ncssl_tune.spec import SweepSpec, resolved

if TYPE_CHECKING:
    from ncssl_tune.monitor import CollapseStopper

log = logging.getLogger(__name__)

# Tags: the schema `analysis` reads back.
TAG_KIND = "run_kind"  # "sweep" (parent) or "trial" (child)
TAG_SWEEP = "sweep"
TAG_UID = "sweep_uid"  # tells a resumed sweep (same uid) from a new sweep of the same name
TAG_TRIAL = "ray_trial_id"
TAG_STATUS = "status"  # finished | diverged | stopped | error | running | interrupted
TAG_REASON = "stop_reason"
TAG_SAMPLED = "sampled_params"  # JSON list of the keys Optuna sampled for this trial
PARENT_TAG = "mlflow.parentRunId"

SPECTRUM_CSV = "spectrum.csv"  # columns k, z, h: eigenvalues of the final epoch's covariance (descending)
SPECTRUM_PNG = "spectrum.png"
STEP_METRIC = "epoch"  # its history tells which epochs a child already holds

RUN_STATUS = {"finished": "FINISHED", "diverged": "FAILED", "error": "FAILED", "stopped": "KILLED"}
# Bookkeeping Ray adds to every result, and the trainable's copy of the objective: not metrics of the trial.
NOT_METRICS = frozenset({"objective", "timestamp", "training_iteration", "time_this_iter_s", "time_total_s",
                         "time_since_restore", "iterations_since_restore", "timesteps_since_restore",
                         "timesteps_total", "episodes_total", "pid", "done", "should_checkpoint"})
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_PER_BATCH = 100  # params or tags per log_batch; metrics go 1000 at a time
DB_SCHEMES = ("postgresql", "mysql", "mssql")


class TrackingError(ValueError):
    """The tracking store cannot be used; str() names the URI and what to fix."""


def default_tracking_uri(results_dir: str | Path) -> str:
    return f"sqlite:///{Path(results_dir).resolve()}/mlflow.db"


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError unless `uri` names a store this process can record into (called before any trial)."""
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in ("http", "https"):
        _check_server(uri, timeout_s)
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme == "file":
        _check_folder(uri, Path(urlparse(uri).path))
    elif scheme in DB_SCHEMES:
        _check_database(uri, timeout_s)
    else:
        raise TrackingError(f"tracking URI {uri!r}: unsupported scheme {scheme or '(none)'!r}; use "
                            f"sqlite:///PATH/mlflow.db (a local file), http(s)://HOST:PORT (an `mlflow server`), "
                            f"file:///PATH, or {', '.join(s + '://...' for s in DB_SCHEMES)}")


def _check_server(uri: str, timeout_s: float) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    fix = ("start it (mlflow server --host 127.0.0.1 --port 5000) or pass --tracking-uri "
           "sqlite:///PATH/mlflow.db to record into a local file")
    try:
        resp = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                            max_retries=0, timeout=timeout_s, raise_on_status=False, params={"max_results": 1})
    except MlflowException as e:
        text = str(e)
        why = ("connection refused" if "refused" in text.lower() else
               f"no answer within {timeout_s:g} s" if "timed out" in text.lower() else text.split(" with exception ")[-1][:300])
        raise TrackingError(f"MLflow tracking server {uri} is not reachable ({why}); {fix}") from None
    if resp.status_code in (401, 403):
        raise TrackingError(f"MLflow tracking server {uri} refused access (HTTP {resp.status_code}); set "
                            f"MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    if resp.status_code != 200:
        raise TrackingError(f"{uri} does not answer like an MLflow tracking server (HTTP {resp.status_code} for "
                            f"/api/2.0/mlflow/experiments/search); check the host, port and path, or {fix}")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative to the cwd with three slashes, absolute with four)."""
    if urlparse(uri).scheme != "sqlite":
        return None
    rest = uri.split("://", 1)[1]
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        raise TrackingError(f"tracking URI {uri!r}: an SQLite store needs a file, e.g. "
                            f"sqlite:///results/mlflow.db (relative) or sqlite:////abs/path/mlflow.db")
    return Path(rest[1:])


def _check_sqlite(uri: str) -> None:
    path = sqlite_path(uri)
    _check_folder(uri, path.parent)
    if path.exists():
        try:
            with sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=5) as conn:
                conn.execute("select count(*) from sqlite_master").fetchone()
        except sqlite3.Error as e:
            raise TrackingError(f"tracking URI {uri!r}: {path} is not a usable SQLite database ({e}); "
                                f"move it away or choose another file") from None


def _check_folder(uri: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise TrackingError(f"tracking URI {uri!r}: cannot write into {folder} ({e.strerror or e}); choose a "
                            f"writable location") from None


def _check_database(uri: str, timeout_s: float) -> None:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": int(max(1, timeout_s))})
        with engine.connect():
            pass
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError) as e:  # no driver, DNS, auth, refused
        raise TrackingError(f"tracking URI {uri!r}: cannot connect to the database ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}); check host, credentials and that its Python "
                            f"driver is installed") from None


def metrics_of(result: dict) -> dict[str, float]:
    """The numeric entries of a trial result (strings, lists and Ray's bookkeeping left out)."""
    return {k: float(v) for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def safe_key(key: str) -> str:
    """A valid MLflow param/metric key; long keys keep a hash so two of them cannot collide."""
    key = re.sub(r"[^/\w.\- ]", "_", str(key)).lstrip("/") or "_"
    if len(key) > MAX_KEY:
        key = key[:MAX_KEY - 9] + "~" + hashlib.sha1(key.encode()).hexdigest()[:8]
    return key


def param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_VALUE else text[:MAX_PARAM_VALUE - 3] + "..."


def spec_params(spec: SweepSpec) -> dict[str, str]:
    """The whole sweep specification flattened: config keys as in the trials, then search.*, resources.*,
    space.<key>.<field>."""
    r = resolved(spec)
    space = {p["key"]: {k: v for k, v in p.items() if k != "key" and v not in (None, {}, [])} for p in r["space"]}
    flat = flatten({"name": r["name"], **r["base"], "search": r["search"], "resources": r["resources"],
                    "space": space})
    return {safe_key(k): param_value(v) for k, v in flat.items()}


def trial_params(spec: SweepSpec, config: dict) -> dict[str, str]:
    """The full training configuration of one trial, flattened; sampled keys keep their sampled values."""
    # Imported here: it imports torch, which `analysis` (a reader of this module's schema) does not need.
    from ncssl_tune.trainable import build_config

    cfg = build_config(spec.base, config, spec.resources.cpu, spec.resources.gpu)
    flat = {**flatten(cfg.to_dict()), **config}
    return {safe_key(k): param_value(v) for k, v in flat.items()}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "none"


def write_spectrum_csv(path: Path, z: Sequence[float] | None, h: Sequence[float] | None) -> None:
    z, h = list(z or []), list(h or [])
    with open(path, "w") as f:
        f.write("k,z,h\n")
        f.writelines(f"{k + 1},{z[k] if k < len(z) else ''},{h[k] if k < len(h) else ''}\n" for k in range(max(len(z), len(h))))


def read_spectrum_csv(path: str | Path) -> dict[str, list[float]]:
    """{"z": [...], "h": [...]} as written by write_spectrum_csv."""
    out: dict[str, list[float]] = {"z": [], "h": []}
    lines = Path(path).read_text().splitlines()[1:]
    for line in lines:
        _, z, h = line.split(",")
        if z:
            out["z"].append(float(z))
        if h:
            out["h"].append(float(h))
    return out


def plot_spectra(ax, curves: dict[str, Sequence[float]]) -> None:
    """Eigenvalues against their index on a log y axis; zeros (below float precision) are left out."""
    for label, values in curves.items():
        pts = [(k + 1, v) for k, v in enumerate(values) if v > 0 and math.isfinite(v)]
        if pts:
            ax.plot(*zip(*pts), label=label, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("index k (descending)")
    ax.set_ylabel("eigenvalue of covariance")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def save_spectrum_png(path: Path, z: Sequence[float] | None, h: Sequence[float] | None, title: str) -> None:
    from matplotlib.figure import Figure  # Figure without pyplot: the Agg canvas, no global state

    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.subplots()
    plot_spectra(ax, {f"z (D={len(z or [])})": z or [], f"h (F={len(h or [])})": h or []})
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110)


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _tag(value: Any) -> str:
    return str(value)[:MAX_TAG_VALUE]


class MlflowTracker(Callback):
    """Ray Tune callback recording a sweep in MLflow (driver side only).

    Parent run (experiment = sweep name): the whole spec as params, tags, the YAML as artifact. Child run per
    trial (tag mlflow.parentRunId): sampled and full config as params, per-epoch metrics (step = epoch, sent in
    batches every `flush_s` seconds and at trial end), final status FINISHED / FAILED (diverged, error) /
    KILLED (stopped early), tags status / stop_reason / collapse, the final spectrum as CSV and PNG.
    """

    def __init__(self, spec: SweepSpec, tracking_uri: str, ray_address: str | None = None, *,
                 stopper: CollapseStopper | None = None, flush_s: float = 5.0):
        check_tracking_uri(tracking_uri)
        self.spec = spec
        # The sweep's collapse stopper, for the reason of each early stop (Ray does not hand it to callbacks:
        # setup(stop=...) receives only dict criteria). Without it every early stop reads as ASHA's.
        self.stopper = stopper
        self.tracking_uri = tracking_uri
        self.ray_address = ray_address
        self.flush_s = flush_s
        self.sweep_uid = uuid.uuid4().hex  # replaced by the saved one when Ray restores a sweep (set_state)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._client = None
        self._runs: dict[str, str] = {}  # trial id -> child run id, a cache of what the tags say
        self._last_step: dict[str, int] = {}  # run id -> last epoch logged (from MLflow when re-attached)
        self._pending: dict[str, list] = {}  # run id -> Metric objects not yet sent
        self._last_flush = time.monotonic()

    # --- pickling (Ray stores callbacks in the experiment state) and Ray's saved state
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    def get_state(self) -> dict:
        return {"sweep_uid": self.sweep_uid}

    def set_state(self, state: dict) -> None:
        self.sweep_uid = state.get("sweep_uid", self.sweep_uid)

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            # Otherwise every ended run prints its URL (and costs a get_run): hundreds of lines per sweep.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    # --- Ray Tune hooks
    def setup(self, **info) -> None:
        self._attach_parent()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._attach_child(trial, running=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._buffer(self._attach_child(trial, running=True), result)
        self._maybe_flush()

    def on_step_end(self, iteration, trials, **info) -> None:
        self._maybe_flush()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, error=str(getattr(trial, "error_file", "") or "error"))

    def on_experiment_end(self, trials, **info) -> None:
        """Close every run. A trial that ended while nobody recorded it is closed from its last result. An
        interrupted sweep (Ctrl+C) leaves its unfinished trials KILLED with status "interrupted" until resumed:
        Ray marks them TERMINATED on the way out without calling on_trial_complete, and its saved state (written
        before that) resumes them."""
        self._flush()
        children = {r.data.tags.get(TAG_TRIAL): r for r in self._children()}
        unfinished = 0
        for t in trials:
            run = children.get(t.trial_id)
            if run is not None and run.info.status != "RUNNING":
                continue
            if t.status == "ERROR":
                self._finish(t, error=str(getattr(t, "error_file", "") or "error"))
            elif (t.last_result or {}).get("status") in ("finished", "diverged"):
                self._finish(t)
            else:
                unfinished += 1
                if run is not None:
                    self._set_tags(run.info.run_id, {TAG_STATUS: "interrupted"})
                    self.client.set_terminated(run.info.run_id, "KILLED")
        self._set_tags(self.parent_run_id, {"num_trials": len(trials), "num_unfinished": unfinished,
                                            TAG_STATUS: "interrupted" if unfinished else "finished"})
        self.client.set_terminated(self.parent_run_id, "KILLED" if unfinished else "FINISHED")

    # --- runs
    def _attach_parent(self) -> None:
        c = self.client
        exp = c.get_experiment_by_name(self.spec.name)
        if exp is not None and exp.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment {self.spec.name!r} at {self.tracking_uri} is deleted; restore "
                                f"it (mlflow experiments restore --experiment-id {exp.experiment_id}) or run the "
                                f"sweep under another --name")
        self.experiment_id = exp.experiment_id if exp else c.create_experiment(
            self.spec.name, artifact_location=_artifact_location(self.tracking_uri, self.spec.name))
        found = c.search_runs([self.experiment_id],
                              f"tags.{TAG_KIND} = 'sweep' and tags.{TAG_UID} = '{self.sweep_uid}'", max_results=1)
        s = self.spec.search
        tags = {TAG_KIND: "sweep", TAG_SWEEP: self.spec.name, TAG_UID: self.sweep_uid, TAG_STATUS: "running",
                "search_algorithm": s.algorithm, "objective": f"{s.metric} ({self.spec.mode})",
                "scheduler": s.scheduler.name, "git_commit": git_commit(),
                "ray_address": self.ray_address or "local", "spec_file": str(Path(self.spec.path).resolve())}
        if found:
            self.parent_run_id = found[0].info.run_id
            c.update_run(self.parent_run_id, status="RUNNING")
            self._set_tags(self.parent_run_id, tags)
            self._log_params(self.parent_run_id, spec_params(self.spec), found[0].data.params)
            return
        self.parent_run_id = c.create_run(self.experiment_id, tags=tags, run_name=self.spec.name).info.run_id
        self._log_params(self.parent_run_id, spec_params(self.spec), {})
        if Path(self.spec.path).is_file():
            c.log_artifact(self.parent_run_id, self.spec.path)
        c.log_dict(self.parent_run_id, self.spec.raw, "sweep_effective.yaml")  # the file after --set overrides

    def _children(self) -> list:
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                                           max_results=1000, page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return out

    def _attach_child(self, trial, running: bool) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        c = self.client
        found = c.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and "
                                                    f"tags.{TAG_TRIAL} = '{tid}'", max_results=1)
        params = trial_params(self.spec, trial.config)
        if found:
            run_id = found[0].info.run_id
            history = c.get_metric_history(run_id, STEP_METRIC)
            self._last_step[run_id] = max((m.step for m in history), default=0)
            self._log_params(run_id, params, found[0].data.params)
            if running and found[0].info.status != "RUNNING":  # a resumed trial runs again
                c.update_run(run_id, status="RUNNING")
                self._set_tags(run_id, {TAG_STATUS: "running"})
        else:
            tags = {PARENT_TAG: self.parent_run_id, TAG_KIND: "trial", TAG_SWEEP: self.spec.name,
                    TAG_UID: self.sweep_uid, TAG_TRIAL: tid, TAG_STATUS: "running",
                    "method": params.get("loss.method", ""), TAG_SAMPLED: json.dumps(sorted(trial.config))}
            run_id = c.create_run(self.experiment_id, tags=tags, run_name=tid).info.run_id
            self._last_step[run_id] = 0
            self._log_params(run_id, params, {})
        self._runs[tid] = run_id
        return run_id

    def _finish(self, trial, error: str | None = None) -> None:
        run_id = self._attach_child(trial, running=False)
        result = trial.last_result or {}
        self._buffer(run_id, result)  # no-op when this epoch was logged already
        reasons = self.stopper.reasons if self.stopper is not None else {}
        status, reason = trial_outcome(trial.trial_id, result, reasons, self.spec.search.scheduler.name, error)
        tags = {TAG_STATUS: status, TAG_REASON: reason}
        tags.update({k: result[k] for k in ("collapse", "collapse_h", "method") if isinstance(result.get(k), str)})
        metrics = self._pending.pop(run_id, [])
        if "time_total_s" in result:
            metrics.append(_metric("time_total_s", result["time_total_s"], self._last_step.get(run_id, 0)))
        self._send(run_id, metrics, tags)
        if result.get("spectrum") or result.get("spectrum_h"):
            with tempfile.TemporaryDirectory() as tmp:
                write_spectrum_csv(Path(tmp) / SPECTRUM_CSV, result.get("spectrum"), result.get("spectrum_h"))
                save_spectrum_png(Path(tmp) / SPECTRUM_PNG, result.get("spectrum"), result.get("spectrum_h"),
                                  f"{self.spec.name} trial {trial.trial_id}, epoch {result.get('epoch')}")
                self.client.log_artifacts(run_id, tmp)
        self.client.set_terminated(run_id, RUN_STATUS.get(status, "KILLED"))

    # --- batched logging
    def _buffer(self, run_id: str, result: dict) -> None:
        step = result.get("epoch", result.get("training_iteration"))
        if not isinstance(step, int) or step <= self._last_step.get(run_id, 0):
            return  # an epoch replayed after a restore from an older checkpoint: MLflow holds it already
        self._last_step[run_id] = step
        self._pending.setdefault(run_id, []).extend(_metric(k, v, step) for k, v in metrics_of(result).items())

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_s:
            self._flush()

    def _flush(self, run_id: str | None = None) -> None:
        for rid in [run_id] if run_id else list(self._pending):
            self._send(rid, self._pending.pop(rid, []))
        if run_id is None:
            self._last_flush = time.monotonic()

    def _send(self, run_id: str, metrics: list, tags: dict | None = None) -> None:
        """log_batch in as few calls as MLflow's limits allow (1000 metrics, 100 tags per call)."""
        from mlflow.entities import RunTag

        tag_items = [RunTag(k, _tag(v)) for k, v in (tags or {}).items()]
        while metrics or tag_items:
            self.client.log_batch(run_id, metrics=metrics[:1000], tags=tag_items[:MAX_PER_BATCH], synchronous=True)
            metrics, tag_items = metrics[1000:], tag_items[MAX_PER_BATCH:]

    def _set_tags(self, run_id: str, tags: dict) -> None:
        self._send(run_id, [], tags)

    def _log_params(self, run_id: str, params: dict[str, str], existing: dict[str, str]) -> None:
        """Log the params the run lacks; MLflow params are immutable, so a changed value is reported, not sent."""
        from mlflow.entities import Param

        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            log.warning("MLflow run %s keeps its earlier values of %s (params cannot change on resume)",
                        run_id, ", ".join(changed[:10]))
        items = [Param(k, v) for k, v in params.items() if k not in existing]
        for chunk in _chunks(items, MAX_PER_BATCH):
            self.client.log_batch(run_id, params=chunk, synchronous=True)


def _metric(key: str, value: float, step: int):
    from mlflow.entities import Metric

    return Metric(safe_key(key), float(value), int(time.time() * 1000), int(step))


def _artifact_location(uri: str, name: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database (MLflow's default is ./mlruns under the cwd)."""
    db = sqlite_path(uri)
    return None if db is None else (db.resolve().parent / "mlartifacts" / safe_key(name)).as_uri()
