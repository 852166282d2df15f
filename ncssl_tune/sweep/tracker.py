"""Driver-side MLflow recording of a sweep: one parent run per sweep, one nested child run per trial.

Trials never talk to MLflow; `MlflowTracker` is a Ray Tune callback on the driver that buffers each trial's
per-epoch results and sends them with `log_batch` (metric names exactly as `train()` reports them, step = epoch).
The pieces, in records/: `runs` (finding and writing the runs; `Kind`, the operations), `outbox` (ordered writes
that survive outages and a killed driver), `unsent` (the report of what was never sent). Each operation is sent by
its handler in `_SEND` below.

Outages of the store never end the sweep: writes wait in the outbox, are retried, and are kept in
<sweep folder>/mlflow_outbox.json while unsent, so a resumed sweep (`--resume`) sends them; what is still unsent
when a sweep ends is printed and written to <sweep folder>/mlflow_unsent.json. The sweep process lowers MLflow's
own HTTP retries when they are unset (HTTP_ENV) so that a down server costs the driver seconds, not minutes;
NCSSL_MLFLOW_END_WAIT_S (default 30) bounds the wait for the server at the end of a sweep.
"""

from __future__ import annotations

import logging
import numbers
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from ncssl_tune.naming import fmt_number, trial_index
from ncssl_tune.records.outbox import Op, Outbox
from ncssl_tune.records.runs import Kind, SweepRuns, safe_key, trial_params
from ncssl_tune.records.spectra import SpectrumHistory, stage_trial_spectra
from ncssl_tune.records.store import TrackingError
from ncssl_tune.records.unsent import UNSENT_FILE, report_unsent
from ncssl_tune.spec import SweepSpec
from ncssl_tune.sweep.monitor import trial_outcome
from ncssl_tune.vocab import (
    COLLAPSED_MARK,
    DIVERGED,
    FINISHED,
    NOT_METRICS,
    RESOLVED_CONFIG,
    RESULT_MLFLOW_RUN,
    RUN_STATUS,
    STOPPED,
    TAG_COLLAPSE,
    TAG_COLLAPSE_H,
    TAG_COLLAPSED,
    TAG_METHOD,
    TAG_NODE,
    TAG_NOTE,
    TAG_REASON,
    TAG_RUN_NAME,
    TAG_STATUS,
    TAG_TRIAL,
)

if TYPE_CHECKING:  # a type only: references.py loads the data layer, which the tracker does not need
    from ncssl_tune.sweep.references import PendingReference

__all__ = ["HTTP_ENV", "OUTBOX_FILE", "UNSENT_FILE", "MlflowTracker", "metrics_of", "safe_key"]

log = logging.getLogger(__name__)

# MLflow's HTTP client retries a failed request 7 times with exponential backoff (minutes) and waits 120 s for an
# answer; the outbox retries on its own schedule instead, so the sweep process lowers these (only when unset).
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
OUTBOX_FILE = "mlflow_outbox.json"  # in the sweep folder while operations wait for the store
OUTBOX_DIR = "mlflow_outbox"  # artifacts waiting to be sent, one folder per operation
# The writer waits this long after a result's operations are queued before sending them, so that Ray's loop
# finishes handling the result (the trial waits in tune.report meanwhile) before the writer competes with it for
# the interpreter (records/outbox.py). A trial's first result, which waits for its run to exist, is not delayed.
SETTLE_S = 0.05


def metrics_of(result: dict) -> dict[str, float]:
    """The numeric entries of a trial result (strings, lists and Ray's bookkeeping left out)."""
    return {k: float(v) for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _metric(key: str, value: float, step: int) -> list:
    """[key, value, timestamp ms, step]: a metric as the outbox keeps it (JSON)."""
    return [safe_key(key), float(value), int(time.time() * 1000), int(step)]


def collapse_note(status: str, reason: str, result: dict) -> str | None:
    """Why a trial counts as collapsed, for its run's description, or None: the collapse stopper stopped it, or its
    last measured epoch was in total collapse. A dimensional collapse at the end is left to the `collapse` tag: it
    is a matter of degree (docs/metrics.md), not a failed run."""
    if status == STOPPED and reason.startswith("collapse"):
        return f"Collapsed: stopped by the collapse stopper, {reason}."
    if result.get(TAG_COLLAPSE) == "total":
        return f"Collapsed: its last measured epoch ({result.get('epoch', '?')}) was in total collapse."
    return None


def trial_note(metric: str, status: str, reason: str, result: dict) -> str:
    """A trial run's description, one line read without opening its metrics: its last objective value, collapse
    class and how it ended (e.g. `fewshot_acc 0.773 at epoch 3; collapse none; stopped (asha)`), then, for a
    collapsed trial, why it counts as collapsed (collapse_note)."""
    value = result.get(metric)
    score = f"{metric} {fmt_number(value)} at epoch {result.get('epoch', '?')}" if value is not None else f"no {metric}"
    ended = f"{status} ({reason})" if reason else status
    line = f"{score}; collapse {result.get(TAG_COLLAPSE) or '?'}; {ended}"
    why = collapse_note(status, reason, result)
    return f"{line}\n\n{why}" if why else line


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
    trial (tag mlflow.parentRunId), named by trial number, method and sampled values: sampled and full config as
    params (the latter as the trial reports it), per-epoch metrics (step = epoch, sent in batches every `flush_s`
    seconds and at trial end), final status FINISHED (finished, or stopped early: tag status=stopped) / FAILED
    (diverged, error) / KILLED (interrupted sweep), tags status / stop_reason / collapse, the spectra of every epoch
    (spectra.py). The experiment is tagged so that MLflow's UI opens it on its runs (schema.EXPERIMENT_KIND).

    Every MLflow write goes through one ordered `Outbox` (child creation, metric batches, tags, status changes,
    artifacts), retried while the store is down and at the end of the sweep for up to `end_wait_s` seconds, and
    kept in <out_dir>/mlflow_outbox.json meanwhile; a tracker of the same sweep (same out_dir) sends what an
    earlier, killed session left there. No hook raises: Ray never sees a tracking failure.

    `out_dir` is the sweep folder (run_sweep passes it). Without it (a tracker used outside run_sweep, as in
    tests) the tracker's files go to a fresh temporary folder, removed at the end when everything was sent: nothing
    carries over to another session.
    """

    end_wait_s = float(os.environ.get("NCSSL_MLFLOW_END_WAIT_S", "30"))

    def __init__(self, spec: SweepSpec, tracking_uri: str, ray_address: str | None = None, *,
                 flush_s: float = 5.0, out_dir: str | Path | None = None,
                 reference: dict | PendingReference | None = None):
        for key, value in HTTP_ENV.items():
            os.environ.setdefault(key, value)
        self.spec = spec
        self.tracking_uri = tracking_uri
        self.flush_s = flush_s
        self._own_dir = not out_dir
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="ncssl_mlflow_"))
        # {"random_init": {metric: v}, "pixels": {...}} or a PendingReference: parent metrics, sent once
        self.reference = reference or {}
        # replaced by the saved one when Ray restores a sweep (set_state, before setup)
        self.runs = SweepRuns(spec, tracking_uri, uuid.uuid4().hex, ray_address)
        self.outbox = Outbox(self._execute, where=f"MLflow tracking server {tracking_uri}", fatal=(TrackingError,),
                             settle_s=SETTLE_S)
        self._known: set[str] = set()  # trial ids whose child run is created or queued for creation
        self._closed: set[str] = set()  # trial ids whose final status is sent or queued
        self._last_step: dict[str, int] = {}  # trial id -> last epoch buffered
        self._pending: dict[str, list] = {}  # trial id -> metrics not yet queued
        self._pending_tags: dict[str, dict] = {}  # trial id -> tags not yet queued (sent with the metrics)
        self._node: dict[str, str] = {}  # trial id -> Ray node id of its latest result (tag TAG_NODE)
        self._spectra = SpectrumHistory()  # every epoch's spectra, kept in <sweep folder>/spectra/ until the end
        self._last_flush = time.monotonic()

    # --- Ray's saved state (kept with the experiment, given back on resume)
    def get_state(self) -> dict:
        return {"sweep_uid": self.sweep_uid}

    def set_state(self, state: dict) -> None:
        self.runs.sweep_uid = state.get("sweep_uid", self.sweep_uid)

    @property
    def sweep_uid(self) -> str:
        return self.runs.sweep_uid

    @property
    def parent_run_id(self) -> str | None:
        return self.runs.parent_run_id

    @property
    def unsent(self) -> int:
        """Operations queued (not yet sent) or refused by the store."""
        return (len(self.outbox) + len(self.outbox.rejected) + sum(map(len, self._pending.values()))
                + sum(map(len, self._pending_tags.values())))

    # --- Ray Tune hooks
    def setup(self, **info) -> None:
        self.outbox.put(Kind.PARENT, None)
        self._open_file()
        self.outbox.put(Kind.PARENT_FILES, None)
        self._send_reference()
        self.outbox.drain()  # a deleted experiment raises TrackingError here: the sweep must not start
        # From here on the writer thread sends: a hook only queues, and Ray asks the trials for their next result
        # without waiting for MLflow (run creation, metric batches, spectrum plots and uploads).
        self.outbox.start()

    @_guarded
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._child(trial, running=True)
        self.outbox.drain()

    @_guarded
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._child(trial, running=True)
        run_id = self._run_id(trial.trial_id)
        if run_id:  # Ray lets callbacks add to the result: the searcher finds the run in the trial's last result
            result[RESULT_MLFLOW_RUN] = run_id
        if isinstance(result.get(RESOLVED_CONFIG), dict):  # the first result of each start carries it
            self.outbox.put(Kind.PARAMS, trial.trial_id, trial_params({**result[RESOLVED_CONFIG], **trial.config}))
        self._buffer(trial.trial_id, result)
        self._maybe_flush()

    @_guarded
    def on_step_end(self, iteration, trials, **info) -> None:
        self._send_reference()
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
        self._send_reference(wait=True)
        self._flush()
        self.outbox.stop()  # what is left is sent from here, on this thread, within end_wait_s
        statuses = None  # trial id -> MLflow status of its child run, when the store answers
        if not self.outbox.ops:
            try:
                statuses = {r.data.tags.get(TAG_TRIAL): r.info.status for r in self.runs.children()}
            except Exception as e:  # noqa: BLE001 - classified below / recorded
                self.outbox.note_failure(e)
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
            elif (t.last_result or {}).get(TAG_STATUS) in (FINISHED, DIVERGED):
                self._finish(t)
            else:
                unfinished += 1
                if tid in self._known or (statuses is not None and tid in statuses):
                    self._child(t, running=False)
                    self.outbox.put(Kind.BATCH, tid, {"metrics": [], "tags": {TAG_STATUS: "interrupted"}})
                    self.outbox.put(Kind.TERMINATE, tid, RUN_STATUS["interrupted"])
                    self._closed.add(tid)
        self.outbox.put(Kind.BATCH, None, {"metrics": [], "tags": {
            "num_trials": len(trials), "num_unfinished": unfinished,
            TAG_STATUS: "interrupted" if unfinished else "finished"}})
        self.outbox.put(Kind.TERMINATE, None, "KILLED" if unfinished else "FINISHED")
        deadline = time.monotonic() + self.end_wait_s
        while not self.outbox.drain(force=True) and time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        if self.outbox.ops or self.outbox.rejected:
            self._report_unsent()
        elif self._own_dir:
            shutil.rmtree(self.out_dir, ignore_errors=True)

    # --- the outbox and its file
    def _open_file(self) -> None:
        """Keep the outbox in the sweep folder, and queue what an earlier session of this sweep left there
        (after this session's own parent run: the parent is found again by the sweep uid)."""
        if self.outbox.path is not None:
            return
        self.outbox.path = self.out_dir / OUTBOX_FILE
        left = [op for op in self.outbox.load() if op.kind not in (Kind.PARENT, Kind.PARENT_FILES)]
        if left:
            log.warning("MLflow: sending %d operations an earlier session of this sweep could not send",
                        len(left))
            head = [op for op in self.outbox.ops if op.kind == Kind.PARENT]
            rest = [op for op in self.outbox.ops if op.kind != Kind.PARENT]
            self.outbox.replace([*head, *left, *rest])
        # A driver killed between creating a trial's spectrum folder and queueing it leaves a folder no operation
        # names: the trial's end is recorded again in this session, with a new folder.
        queued = {Path(op.payload).name for op in self.outbox.ops if op.kind == Kind.ARTIFACTS}  # mkdtemp: unique
        folder = self.out_dir / OUTBOX_DIR
        for orphan in (p for p in (folder.iterdir() if folder.is_dir() else []) if p.name not in queued):
            shutil.rmtree(orphan, ignore_errors=True)

    def _execute(self, op: Op) -> None:
        send = _SEND.get(op.kind)  # a Kind key matches the plain string an outbox file gives back
        if send is None:
            raise ValueError(f"unknown outbox operation {op.kind!r}")
        send(self, op.trial_id, op.payload)

    def _attach_child(self, tid: str, payload: dict) -> None:
        """Kind.CHILD: epochs the store holds already for a found-again run are not buffered again."""
        floor = self.runs.attach_child(tid, payload["config"], payload["running"], payload.get("index"))
        self._last_step[tid] = max(self._last_step.get(tid, 0), floor)

    # --- per trial
    def _run_id(self, tid: str, wait_s: float = 2.0) -> str | None:
        """The trial's child run id: its creation is queued at the trial's start, and sent by the writer well
        before the first epoch ends; waits for it up to `wait_s` (not while the store is down)."""
        self.outbox.wait_for(lambda: tid in self.runs.runs, wait_s)
        return self.runs.runs.get(tid)

    def _child(self, trial, running: bool) -> None:
        """Queue the creation (or re-attachment) of the trial's child run, once per trial and session."""
        tid = trial.trial_id
        if tid in self._known:
            return
        self._known.add(tid)
        self._last_step.setdefault(tid, 0)
        self.outbox.put(Kind.CHILD, tid, {"config": dict(trial.config), "running": running,
                                          "index": trial_index(getattr(trial, "experiment_tag", None))})

    def _finish(self, trial, error: str | None = None) -> None:
        tid = trial.trial_id
        self._child(trial, running=False)
        result = trial.last_result or {}
        self._buffer(tid, result)  # no-op when this epoch was buffered already
        status, reason = trial_outcome(result, self.spec.search.collapse_stop, self.spec.search.scheduler.name, error)
        tags = {**self._pending_tags.pop(tid, {}), TAG_STATUS: status, TAG_REASON: reason}
        tags.update({k: result[k] for k in (TAG_COLLAPSE, TAG_COLLAPSE_H, TAG_METHOD) if isinstance(result.get(k), str)})
        collapsed = collapse_note(status, reason, result) is not None
        tags[TAG_COLLAPSED] = "true" if collapsed else "false"
        tags[TAG_NOTE] = trial_note(self.spec.search.metric, status, reason, result)
        if collapsed:  # seen in the runs table without opening the run
            index = trial_index(getattr(trial, "experiment_tag", None))
            tags[TAG_RUN_NAME] = self.runs.child_name(tid, dict(trial.config), index, COLLAPSED_MARK)
        metrics = self._pending.pop(tid, [])
        if "time_total_s" in result:
            metrics.append(_metric("time_total_s", result["time_total_s"], self._last_step.get(tid, 0)))
        self.outbox.put(Kind.BATCH, tid, {"metrics": metrics, "tags": tags})
        title = f"{self.spec.name} trial {tid}: {status}" + (f" ({reason})" if reason else "")
        self.outbox.put(Kind.ARTIFACTS, tid, self._spectrum_files(tid, title))
        self.outbox.put(Kind.TERMINATE, tid, RUN_STATUS[status])
        self._closed.add(tid)
        self.outbox.drain()

    def _spectrum_files(self, tid: str, title: str) -> str:
        """A folder with the trial's spectra of every epoch (CSV and two plots), removed once sent: in the sweep
        folder, so that it outlives a killed driver."""
        (self.out_dir / OUTBOX_DIR).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{tid}_", dir=self.out_dir / OUTBOX_DIR))
        stage_trial_spectra(folder, self._spectra.epochs(tid, self.out_dir), title)  # plots: by the writer
        return str(folder)

    # --- batched logging
    def _buffer(self, tid: str, result: dict) -> None:
        step = result.get("epoch", result.get("training_iteration"))
        if not isinstance(step, int) or step <= self._last_step.get(tid, 0):
            return  # an epoch replayed after a restore from an older checkpoint: MLflow holds it already
        self._last_step[tid] = step
        self._spectra.add(tid, result, self.out_dir)
        self._pending.setdefault(tid, []).extend(_metric(k, v, step) for k, v in metrics_of(result).items())
        node = result.get(TAG_NODE)
        if isinstance(node, str) and node != self._node.get(tid):  # a trial restored elsewhere moves node
            self._node[tid] = node
            self._pending_tags.setdefault(tid, {})[TAG_NODE] = node

    def _send_reference(self, wait: bool = False) -> None:
        """Queue the reference scores as parent metrics reference_<kind>_<metric> (e.g.
        reference_random_init_fewshot_acc, read by the analysis) once they are here: at once when given as a dict,
        when they arrive when given pending (references.PendingReference: computed while the first trials start).
        wait: wait for them (the sweep's end). A computation that failed sends nothing: run_sweep reports it."""
        ref = self.reference
        if ref and not isinstance(ref, dict):
            try:
                ref = ref.result() if wait else ref.ready()
            except Exception:  # noqa: BLE001 - the computation's own error, raised to the user by run_sweep
                ref = self.reference = {}
        if ref:
            now = int(time.time() * 1000)
            self.outbox.put(Kind.BATCH, None, {"tags": {}, "metrics": [
                (f"reference_{kind}_{k}", v, now, 0) for kind, scores in ref.items() for k, v in scores.items()]})
            self.reference = {}

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_s:
            self._flush()
        elif self.outbox.ops:
            self.outbox.drain()  # retries when due

    def _flush(self) -> None:
        for tid in list(self._pending.keys() | self._pending_tags.keys()):
            self.outbox.put(Kind.BATCH, tid, {"metrics": self._pending.pop(tid, []),
                                              "tags": self._pending_tags.pop(tid, {})})
        self._last_flush = time.monotonic()
        self.outbox.drain()

    def _report_unsent(self) -> Path | None:
        path, kept = report_unsent(self.out_dir, list(self.outbox.ops), self.outbox.rejected,
                                   tracking_uri=self.tracking_uri, experiment=self.spec.name,
                                   sweep_uid=self.sweep_uid, parent_run_id=self.parent_run_id, runs=self.runs.runs,
                                   last_error=self.outbox.last_error)
        self.outbox.replace(kept)  # artifact folders now under mlflow_unsent/, sent from there on --resume
        return path


# Each Kind of operation as the store receives it; sending one twice is harmless (see records/outbox.py).
_SEND: dict[Kind, Callable[[MlflowTracker, str | None, Any], None]] = {
    Kind.PARENT: lambda t, tid, _: t.runs.attach_parent(),
    Kind.PARENT_FILES: lambda t, tid, _: t.runs.log_spec_files(),
    Kind.CHILD: MlflowTracker._attach_child,
    Kind.PARAMS: lambda t, tid, params: t.runs.log_trial_params(tid, params),
    Kind.BATCH: lambda t, tid, batch: t.runs.send_batch(tid, batch["metrics"], batch["tags"]),
    Kind.ARTIFACTS: lambda t, tid, folder: t.runs.send_artifacts(tid, folder),
    Kind.TERMINATE: lambda t, tid, status: t.runs.terminate(tid, status),
}
