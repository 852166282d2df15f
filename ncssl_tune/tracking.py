"""Driver-side MLflow recording of a sweep: one parent run per sweep, one nested child run per trial.

Trials never talk to MLflow; `MlflowTracker` is a Ray Tune callback on the driver that buffers each trial's
per-epoch results and sends them with `log_batch` (metric names exactly as `train()` reports them, step = epoch).
Runs are found again by their tags, so a resumed sweep re-attaches to its parent and child runs instead of
duplicating them, and never logs an epoch twice.

Outages of the store never end the sweep: writes wait in an ordered outbox and are retried (see MlflowTracker);
what is still unsent when the sweep ends is printed and written to <sweep folder>/mlflow_unsent.json. The sweep
process lowers MLflow's own HTTP retries when they are unset (MLFLOW_HTTP_REQUEST_MAX_RETRIES=1,
MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=0, MLFLOW_HTTP_REQUEST_BACKOFF_JITTER=0, MLFLOW_HTTP_REQUEST_TIMEOUT=10 s) so
that a down server costs the driver seconds, not minutes; NCSSL_MLFLOW_END_WAIT_S (default 30) bounds the wait
for the server at the end of a sweep.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from ncssl_tune.config import flatten
from ncssl_tune.mlflow_store import TrackingError, check_tracking_uri, sqlite_path
from ncssl_tune.monitor import trial_outcome
from ncssl_tune.schema import (
    NOT_METRICS,
    PARENT_TAG,
    RUN_STATUS,
    SPECTRUM_CSV,
    SPECTRUM_PNG,
    STEP_METRIC,
    TAG_KIND,
    TAG_NODE,
    TAG_REASON,
    TAG_SAMPLED,
    TAG_STATUS,
    TAG_SWEEP,
    TAG_TRIAL,
    TAG_UID,
)
from ncssl_tune.spec import SweepSpec, resolved
from ncssl_tune.spectra import save_spectrum_png, write_spectrum_csv

if TYPE_CHECKING:
    from ncssl_tune.monitor import CollapseStopper

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_PER_BATCH = 100  # params or tags per log_batch; metrics go 1000 at a time


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


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _tag(value: Any) -> str:
    return str(value)[:MAX_TAG_VALUE]


# --- outages of the tracking server
# MLflow's HTTP client retries a failed request 7 times with exponential backoff (minutes) and waits 120 s for an
# answer; the tracker retries on its own schedule instead, so the sweep process lowers these (only when unset).
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
RETRY_FIRST_S, RETRY_MAX_S = 2.0, 30.0  # wait between attempts while the server is down (doubling)
UNSENT_FILE = "mlflow_unsent.json"  # in the sweep folder: what could not be sent before the sweep ended
UNSENT_DIR = "mlflow_unsent"  # artifacts that could not be sent, one folder per trial
_TRANSIENT_TEXT = ("max retries exceeded", "connection", "refused", "timed out", "timeout", "temporarily unavailable",
                   "remote end closed", "bad gateway", "service unavailable")


def is_transient(err: BaseException) -> bool:
    """True when `err` says the store could not be reached (retry later), False when it refused the request."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                        TimeoutError)):
        return True
    status = None
    if isinstance(err, requests.exceptions.HTTPError) and err.response is not None:
        status = err.response.status_code
    elif isinstance(err, MlflowException):
        status = err.get_http_status_code()
    if status is not None and (status >= 500 or status == 429):
        return True
    return any(t in str(err).lower() for t in _TRANSIENT_TEXT)


def _guarded(hook):
    """Ray must never see an exception from a tracking hook: a failure is logged, the sweep goes on."""
    def wrapper(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception:  # recording must not end the sweep
            log.exception("MLflow tracking: %s failed; the sweep continues", hook.__name__)
    wrapper.__name__, wrapper.__doc__ = hook.__name__, hook.__doc__
    return wrapper


class MlflowTracker(Callback):
    """Ray Tune callback recording a sweep in MLflow (driver side only).

    Parent run (experiment = sweep name): the whole spec as params, tags, the YAML as artifact. Child run per
    trial (tag mlflow.parentRunId): sampled and full config as params, per-epoch metrics (step = epoch, sent in
    batches every `flush_s` seconds and at trial end), final status FINISHED / FAILED (diverged, error) /
    KILLED (stopped early), tags status / stop_reason / collapse, the final spectrum as CSV and PNG.

    Outages: every MLflow write goes through one ordered outbox (child creation, metric batches, tags, status
    changes, artifacts). When the store cannot be reached the outbox is kept and retried on later hooks, every
    2 s doubling to 30 s, and at the end of the sweep for up to `end_wait_s` seconds; metrics keep their
    timestamps, so a batch sent twice is stored once. What is still unsent then is printed and written to
    <sweep folder>/mlflow_unsent.json (with the metric values; artifacts moved to mlflow_unsent/<trial>/).
    No hook raises: Ray never sees a tracking failure.
    """

    end_wait_s = float(os.environ.get("NCSSL_MLFLOW_END_WAIT_S", "30"))

    def __init__(self, spec: SweepSpec, tracking_uri: str, ray_address: str | None = None, *,
                 stopper: CollapseStopper | None = None, flush_s: float = 5.0, out_dir: str | Path | None = None):
        for key, value in HTTP_ENV.items():
            os.environ.setdefault(key, value)
        check_tracking_uri(tracking_uri)
        self.spec = spec
        # The sweep's collapse stopper, for the reason of each early stop (Ray does not hand it to callbacks:
        # setup(stop=...) receives only dict criteria). Without it every early stop reads as ASHA's.
        self.stopper = stopper
        self.tracking_uri = tracking_uri
        self.ray_address = ray_address
        self.flush_s = flush_s
        self.out_dir = Path(out_dir) if out_dir else None  # else found from Ray's storage path (<out>/ray/tune)
        self.sweep_uid = uuid.uuid4().hex  # replaced by the saved one when Ray restores a sweep (set_state)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._client = None
        self._runs: dict[str, str] = {}  # trial id -> child run id, once created or found
        self._known: set[str] = set()  # trial ids whose child run is created or queued for creation
        self._closed: set[str] = set()  # trial ids whose final status is sent or queued
        self._last_step: dict[str, int] = {}  # trial id -> last epoch buffered
        self._floor: dict[str, int] = {}  # trial id -> last epoch MLflow held when the run was found again
        self._pending: dict[str, list] = {}  # trial id -> Metric objects not yet queued
        self._pending_tags: dict[str, dict] = {}  # trial id -> tags not yet queued (sent with the metrics)
        self._node: dict[str, str] = {}  # trial id -> Ray node id of its latest result (tag TAG_NODE)
        self._outbox: deque = deque()  # (kind, trial id or None for the parent, payload), sent in order
        self._rejected: list[tuple] = []  # (op, error): operations the store refused (not an outage)
        self._parent_new = False
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._retry_wait = RETRY_FIRST_S
        self._last_error = ""
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

    @property
    def unsent(self) -> int:
        """Operations queued (not yet sent) or refused by the store."""
        return (len(self._outbox) + len(self._rejected) + sum(map(len, self._pending.values()))
                + sum(map(len, self._pending_tags.values())))

    # --- Ray Tune hooks
    def setup(self, **info) -> None:
        self._outbox.append(("parent", None, None))
        self._outbox.append(("parent_files", None, None))
        self._drain()  # a deleted experiment raises TrackingError here: the sweep must not start

    @_guarded
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._child(trial, running=True)
        self._drain()

    @_guarded
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._child(trial, running=True)
        self._buffer(trial.trial_id, result)
        self._maybe_flush()

    @_guarded
    def on_step_end(self, iteration, trials, **info) -> None:
        self._maybe_flush()

    @_guarded
    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial)

    @_guarded
    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, error=str(getattr(trial, "error_file", "") or "error"))

    @_guarded
    def on_experiment_end(self, trials, **info) -> None:
        """Close every run. A trial that ended while nobody recorded it is closed from its last result. An
        interrupted sweep (Ctrl+C) leaves its unfinished trials KILLED with status "interrupted" until resumed:
        Ray marks them TERMINATED on the way out without calling on_trial_complete, and its saved state (written
        before that) resumes them. Then what could not be sent is retried for up to `end_wait_s` seconds, and
        what is left is reported (stderr and mlflow_unsent.json in the sweep folder)."""
        self._flush()
        statuses = None  # trial id -> MLflow status of its child run, when the store answers
        if not self._outbox:
            try:
                statuses = {r.data.tags.get(TAG_TRIAL): r.info.status for r in self._children()}
            except Exception as e:  # noqa: BLE001 - classified below / recorded
                self._note_failure(e)
        unfinished = 0
        for t in trials:
            tid = t.trial_id
            if tid in self._closed:
                continue
            if statuses is not None and statuses.get(tid, "RUNNING") != "RUNNING":
                continue  # closed by an earlier session
            if statuses is None and tid not in self._known:
                continue  # store unreachable: a trial this session never saw was closed before
            if t.status == "ERROR":
                self._finish(t, error=str(getattr(t, "error_file", "") or "error"))
            elif (t.last_result or {}).get("status") in ("finished", "diverged"):
                self._finish(t)
            else:
                unfinished += 1
                if tid in self._known or (statuses is not None and tid in statuses):
                    self._child(t, running=False)
                    self._outbox.append(("batch", tid, {"metrics": [], "tags": {TAG_STATUS: "interrupted"}}))
                    self._outbox.append(("terminate", tid, "KILLED"))
                    self._closed.add(tid)
        self._outbox.append(("batch", None, {"metrics": [], "tags": {
            "num_trials": len(trials), "num_unfinished": unfinished,
            TAG_STATUS: "interrupted" if unfinished else "finished"}}))
        self._outbox.append(("terminate", None, "KILLED" if unfinished else "FINISHED"))
        deadline = time.monotonic() + self.end_wait_s
        while not self._drain(force=True) and time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        if self._outbox or self._rejected:
            self._report_unsent()

    # --- the outbox
    def _drain(self, force: bool = False) -> bool:
        """Send queued operations in order until one fails; True when the outbox is empty. While the store is
        down, nothing is tried before the retry time (unless `force`)."""
        if not self._outbox:
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        sent = 0
        while self._outbox:
            op = self._outbox[0]
            try:
                self._execute(*op)
            except TrackingError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below / recorded
                if is_transient(e):
                    self._note_failure(e)
                    return False
                log.warning("MLflow refused %s for %s: %s", op[0], op[1] or "the parent run", e)
                self._rejected.append((op, f"{type(e).__name__}: {str(e)[:500]}"))
            self._outbox.popleft()
            sent += 1
        if self._down_since is not None:
            log.warning("MLflow tracking server %s is back after %.0f s; %d queued operations sent",
                        self.tracking_uri, time.monotonic() - self._down_since, sent)
        self._down_since, self._retry_wait, self._retry_at = None, RETRY_FIRST_S, 0.0
        return True

    def _note_failure(self, err: BaseException) -> None:
        now = time.monotonic()
        self._last_error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        if self._down_since is None:
            self._down_since = now
            log.warning("MLflow tracking server %s unreachable (%s); keeping %d operations and retrying",
                        self.tracking_uri, self._last_error, len(self._outbox))
        else:
            self._retry_wait = min(RETRY_MAX_S, self._retry_wait * 2)
        self._retry_at = now + self._retry_wait

    def _run_id(self, tid: str | None) -> str:
        run_id = self.parent_run_id if tid is None else self._runs.get(tid)
        if run_id is None:
            raise KeyError(f"no MLflow run for {tid or 'the parent'} (its creation failed)")
        return run_id

    def _execute(self, kind: str, tid: str | None, payload: Any) -> None:
        if kind == "parent":
            self._attach_parent()
        elif kind == "parent_files":
            if self._parent_new:
                if Path(self.spec.path).is_file():
                    self.client.log_artifact(self._run_id(None), self.spec.path)
                # the file after --set overrides
                self.client.log_dict(self._run_id(None), self.spec.raw, "sweep_effective.yaml")
        elif kind == "child":
            self._attach_child(tid, payload["config"], payload["running"])
        elif kind == "batch":
            floor = self._floor.get(tid, 0) if tid else 0
            metrics = [m for m in payload["metrics"] if m.step > floor or m.key == "time_total_s"]
            self._send(self._run_id(tid), metrics, payload["tags"])
        elif kind == "artifacts":
            self.client.log_artifacts(self._run_id(tid), payload)
            shutil.rmtree(payload, ignore_errors=True)
        elif kind == "terminate":
            self.client.set_terminated(self._run_id(tid), payload)
        else:
            raise ValueError(f"unknown outbox operation {kind!r}")

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
        self._parent_new = True
        self._log_params(self.parent_run_id, spec_params(self.spec), {})

    def _children(self) -> list:
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                                           max_results=1000, page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return out

    def _child(self, trial, running: bool) -> None:
        """Queue the creation (or re-attachment) of the trial's child run, once per trial and session."""
        if self.out_dir is None:
            self.out_dir = _sweep_folder(trial)
        tid = trial.trial_id
        if tid in self._known:
            return
        self._known.add(tid)
        self._last_step.setdefault(tid, 0)
        self._outbox.append(("child", tid, {"config": dict(trial.config), "running": running}))

    def _attach_child(self, tid: str, config: dict, running: bool) -> None:
        c = self.client
        parent = self._run_id(None)
        found = c.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}' and "
                                                    f"tags.{TAG_TRIAL} = '{tid}'", max_results=1)
        params = trial_params(self.spec, config)
        if found:
            run_id = found[0].info.run_id
            history = c.get_metric_history(run_id, STEP_METRIC)
            self._floor[tid] = max((m.step for m in history), default=0)
            self._last_step[tid] = max(self._last_step.get(tid, 0), self._floor[tid])
            self._log_params(run_id, params, found[0].data.params)
            if running and found[0].info.status != "RUNNING":  # a resumed trial runs again
                c.update_run(run_id, status="RUNNING")
                self._set_tags(run_id, {TAG_STATUS: "running"})
        else:
            tags = {PARENT_TAG: parent, TAG_KIND: "trial", TAG_SWEEP: self.spec.name,
                    TAG_UID: self.sweep_uid, TAG_TRIAL: tid, TAG_STATUS: "running",
                    "method": params.get("loss.method", ""), TAG_SAMPLED: json.dumps(sorted(config))}
            run_id = c.create_run(self.experiment_id, tags=tags, run_name=tid).info.run_id
            self._log_params(run_id, params, {})
        self._runs[tid] = run_id

    def _finish(self, trial, error: str | None = None) -> None:
        tid = trial.trial_id
        self._child(trial, running=False)
        result = trial.last_result or {}
        self._buffer(tid, result)  # no-op when this epoch was buffered already
        reasons = self.stopper.reasons if self.stopper is not None else {}
        status, reason = trial_outcome(tid, result, reasons, self.spec.search.scheduler.name, error)
        tags = {**self._pending_tags.pop(tid, {}), TAG_STATUS: status, TAG_REASON: reason}
        tags.update({k: result[k] for k in ("collapse", "collapse_h", "method") if isinstance(result.get(k), str)})
        metrics = self._pending.pop(tid, [])
        if "time_total_s" in result:
            metrics.append(_metric("time_total_s", result["time_total_s"], self._last_step.get(tid, 0)))
        self._outbox.append(("batch", tid, {"metrics": metrics, "tags": tags}))
        if result.get("spectrum") or result.get("spectrum_h"):
            tmp = tempfile.mkdtemp(prefix="ncssl_spectrum_")  # removed once sent
            write_spectrum_csv(Path(tmp) / SPECTRUM_CSV, result.get("spectrum"), result.get("spectrum_h"))
            save_spectrum_png(Path(tmp) / SPECTRUM_PNG, result.get("spectrum"), result.get("spectrum_h"),
                              f"{self.spec.name} trial {tid}, epoch {result.get('epoch')}")
            self._outbox.append(("artifacts", tid, tmp))
        self._outbox.append(("terminate", tid, RUN_STATUS.get(status, "KILLED")))
        self._closed.add(tid)
        self._drain()

    # --- batched logging
    def _buffer(self, tid: str, result: dict) -> None:
        step = result.get("epoch", result.get("training_iteration"))
        if not isinstance(step, int) or step <= self._last_step.get(tid, 0):
            return  # an epoch replayed after a restore from an older checkpoint: MLflow holds it already
        self._last_step[tid] = step
        self._pending.setdefault(tid, []).extend(_metric(k, v, step) for k, v in metrics_of(result).items())
        node = result.get(TAG_NODE)
        if isinstance(node, str) and node != self._node.get(tid):  # a trial restored elsewhere moves node
            self._node[tid] = node
            self._pending_tags.setdefault(tid, {})[TAG_NODE] = node

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_s:
            self._flush()
        elif self._outbox:
            self._drain()  # retries when due

    def _flush(self) -> None:
        for tid in list(self._pending.keys() | self._pending_tags.keys()):
            self._outbox.append(("batch", tid, {"metrics": self._pending.pop(tid, []),
                                                "tags": self._pending_tags.pop(tid, {})}))
        self._last_flush = time.monotonic()
        self._drain()

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

    # --- what could not be sent
    def _report_unsent(self) -> Path | None:
        """Print a summary of the operations never sent and write them (metric values included) to
        <sweep folder>/mlflow_unsent.json; unsent artifacts move to <sweep folder>/mlflow_unsent/<trial>/."""
        folder = self.out_dir or Path("results").resolve() / self.spec.name
        entries: dict[str, dict] = {}

        def entry(tid: str | None) -> dict:
            key = tid or "(parent)"
            if key not in entries:
                entries[key] = {"trial_id": tid, "run_id": self._runs.get(tid) if tid else self.parent_run_id,
                                "run_created": bool(self._runs.get(tid) if tid else self.parent_run_id),
                                "epochs": set(), "metrics": [], "tags": {}, "final_status": None,
                                "artifacts": [], "errors": []}
            return entries[key]

        ops = [(op, None) for op in self._outbox] + list(self._rejected)
        for (kind, tid, payload), error in ops:
            e = entry(tid)
            if error:
                e["errors"].append(f"{kind}: {error}")
            if kind == "batch":
                e["metrics"] += [[m.key, m.value if math.isfinite(m.value) else str(m.value), m.step, m.timestamp]
                                 for m in payload["metrics"]]
                e["epochs"].update(m.step for m in payload["metrics"] if m.key != "time_total_s")
                e["tags"].update({k: _tag(v) for k, v in payload["tags"].items()})
            elif kind == "terminate":
                e["final_status"] = payload
            elif kind == "artifacts":
                dest = folder / UNSENT_DIR / (tid or "parent")
                try:
                    dest.mkdir(parents=True, exist_ok=True)
                    for f in Path(payload).iterdir():
                        shutil.move(str(f), dest / f.name)
                        e["artifacts"].append(str(dest / f.name))
                    shutil.rmtree(payload, ignore_errors=True)
                except OSError as err:
                    e["errors"].append(f"artifacts kept in {payload}: {err}")
                    e["artifacts"].append(str(payload))
            elif kind in ("child", "parent", "parent_files"):
                e.setdefault("pending", []).append(kind)
        for e in entries.values():
            e["epochs"] = sorted(e["epochs"])
        report = {"tracking_uri": self.tracking_uri, "experiment": self.spec.name, "sweep_uid": self.sweep_uid,
                  "parent_run_id": self.parent_run_id, "last_error": self._last_error,
                  "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": list(entries.values())}
        path = folder / UNSENT_FILE
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1, default=str))
        except OSError as err:
            log.error("cannot write %s (%s)", path, err)
            path = None
        lines = [(f"MLflow: {len(ops)} operations could not be recorded at {self.tracking_uri} "
                  f"({self._last_error or 'refused'}):")]
        for key, e in entries.items():
            epochs = f"epochs {_ranges(e['epochs'])}" if e["epochs"] else "no epochs"
            what = ", ".join(x for x in (epochs, f"status {e['final_status']}" if e["final_status"] else "",
                                         f"{len(e['artifacts'])} artifacts" if e["artifacts"] else "",
                                         f"tags {sorted(e['tags'])}" if e["tags"] and not e["epochs"] else "") if x)
            lines.append(f"  {'trial ' + key if e['trial_id'] else key}: run {e['run_id'] or '(not created)'}: {what}")
        lines.append(f"  details (metric values included): {path}" if path else "  (no file could be written)")
        print("\n".join(lines), file=sys.stderr)
        log.warning("MLflow: %d operations unsent; see %s", len(ops), path)
        return path


def _ranges(steps: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    out: list[str] = []
    for s in steps:
        if out and s == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{s}"
        else:
            out.append(str(s))
    return ", ".join(out)


def _sweep_folder(trial) -> Path | None:
    """The sweep folder from Ray's experiment path (<sweep folder>/ray/tune, see sweep.py)."""
    try:
        path = Path(trial.remote_experiment_path)
    except Exception:  # noqa: BLE001 - a fake trial in tests, or another Ray layout
        return None
    return path.parent.parent if path.parent.name == "ray" and "://" not in str(path) else None


def _metric(key: str, value: float, step: int):
    from mlflow.entities import Metric

    return Metric(safe_key(key), float(value), int(time.time() * 1000), int(step))


def _artifact_location(uri: str, name: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database (MLflow's default is ./mlruns under the cwd)."""
    db = sqlite_path(uri)
    return None if db is None else (db.resolve().parent / "mlartifacts" / safe_key(name)).as_uri()
