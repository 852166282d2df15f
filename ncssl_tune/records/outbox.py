"""An ordered queue of writes to a store that may be down: sent in order through an `execute` callable, kept and
retried while the store cannot be reached, and saved to a file so that a driver killed during an outage loses
nothing (the next session loads the file and sends what is left).

The queue knows nothing of MLflow: an operation is (kind, trial id or None, JSON-serialisable payload), saved as
that JSON list, and `execute` does the work (the tracker's kinds are `records.runs.Kind`, each sent by its entry in
a table of handlers). Sending the same operation twice must be harmless (the tracker's operations are: MLflow
stores a metric with the same key, step, timestamp and value once; artifacts overwrite; runs are found again by
their tags), because an operation sent just before a kill is still in the file.

With `start()`, a writer thread sends: `put` and `kick` return at once, so whoever queues (the sweep's driver,
between the trials' results) never waits for the store; `stop()` ends the thread. Without it, `drain` sends on
the caller's thread, as tests and the end of a sweep use it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

RETRY_FIRST_S, RETRY_MAX_S = 2.0, 30.0  # wait between attempts while the store is down (doubling)
_TRANSIENT_TEXT = ("max retries exceeded", "connection", "refused", "timed out", "timeout", "temporarily unavailable",
                   "remote end closed", "bad gateway", "service unavailable")


class Op(NamedTuple):
    kind: str  # the caller's name for the operation (a str enum such as records.runs.Kind is saved as its value)
    trial_id: str | None  # None: the sweep's parent run
    payload: Any = None


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


class Outbox:
    """Operations sent in order through `execute(op)` until one fails.

    A transient failure (`transient(err)`) keeps the operation at the head and stops; nothing is tried again
    before the retry time (2 s, doubling to 30 s) unless `drain(force=True)`. Any other failure moves the
    operation to `rejected` with its error and the queue goes on; a `fatal` error propagates. With `path`, the queue is
    written there (atomically) whenever it holds something after a change, and the file removed once empty: what
    the store has not acknowledged is on disk (an operation leaves the file once sent), whoever sends it.

    Thread-safe: one lock guards the queue and the file; an operation is sent outside it (only the writer thread,
    or the caller of `drain` when there is none, takes operations off the head).
    """

    def __init__(self, execute: Callable[[Op], None], *, path: str | Path | None = None, where: str = "the store",
                 transient: Callable[[BaseException], bool] = is_transient,
                 fatal: tuple[type[BaseException], ...] = (),
                 clock: Callable[[], float] = time.monotonic, settle_s: float = 0.0):
        self.execute = execute
        self.path = Path(path) if path else None
        self.where = where  # for messages: "MLflow tracking server http://..."
        self.transient = transient
        self.fatal = fatal  # errors that end the caller: neither retried nor recorded as refused
        self.clock = clock
        # The writer thread waits this long after work arrives before it sends (unless someone waits for a send),
        # so that whoever queued finishes first: in a sweep, the driver handling the result the operation came
        # from while that trial waits in tune.report. A send is CPU work in this process (MLflow's SQLAlchemy
        # store): started at once, it competes with the driver for the interpreter lock and the trial waits
        # longer between its epochs (bench_sweep, idle, 2 cores: p50 with MLflow on 1.51x that off without the
        # wait, 1.00-1.22x with it; results/benchmarks/README.md).
        self.settle_s = settle_s
        self._waiters = 0  # threads in wait_for: the writer does not settle while someone waits for it
        self.ops: deque[Op] = deque()
        self.rejected: list[tuple[Op, str]] = []  # refused by the store (not an outage), with the error
        self.down_since: float | None = None
        self.last_error = ""
        self._retry_at = 0.0
        self._retry_wait = RETRY_FIRST_S
        self._dirty = False  # the file (if any) lags the queue
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)  # the writer waits on it for work
        self._progress = threading.Condition(self._lock)  # wait_for's callers wait on it for the writer
        self._writer: threading.Thread | None = None
        self._stopping = False
        self.writer_error: BaseException | None = None  # a fatal error that ended the writer thread

    def __len__(self) -> int:
        return len(self.ops)

    # Ray pickles the sweep's callbacks, the tracker and its outbox with them: the lock and the thread stay here.
    def __getstate__(self) -> dict:
        with self._lock:
            state = dict(self.__dict__)
        for k in ("_lock", "_wake", "_progress", "_writer"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("settle_s", 0.0)  # the state of a sweep saved before there was settling
        self._waiters = 0
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._progress = threading.Condition(self._lock)
        self._writer = None

    def replace(self, ops: list[Op]) -> None:
        """Queue `ops` instead of what is queued (reordered, or with changed payloads). Not while a writer runs."""
        with self._lock:
            self.ops = deque(ops)
            self._dirty = True
            self.save()

    def put(self, kind: str, trial_id: str | None, payload: Any = None) -> None:
        with self._lock:
            self.ops.append(Op(kind, trial_id, payload))
            self._dirty = True
            self.save()  # on disk until sent: a driver killed before the writer gets to it loses nothing
            self._wake.notify()

    def drain(self, force: bool = False) -> bool:
        """Send queued operations in order until one fails; True when the queue is empty. With a writer thread
        running, only wakes it (returns whether the queue is empty now)."""
        if self._writer is not None:
            self.kick()
            return not self.ops
        try:
            return self._drain(force)
        finally:
            with self._lock:
                self.save()

    def _drain(self, force: bool) -> bool:
        with self._lock:
            if not self.ops:
                return True
            if not force and self.clock() < self._retry_at:
                return False
        sent = 0
        while True:
            with self._lock:
                if not self.ops or self._stopping and threading.current_thread() is self._writer:
                    break
                op = self.ops[0]
            try:
                self.execute(op)  # outside the lock: `put` never waits for the store
            except self.fatal:
                raise
            except Exception as e:  # noqa: BLE001 - classified below / recorded
                if self.transient(e):
                    with self._lock:
                        self.note_failure(e)
                    return False
                log.warning("%s refused %s for %s: %s", self.where, op.kind, op.trial_id or "the parent run", e)
                self.rejected.append((op, f"{type(e).__name__}: {str(e)[:500]}"))
            with self._lock:
                self.ops.popleft()
                self._dirty = True
                self.save()
                self._progress.notify_all()
            sent += 1
        with self._lock:
            if self.ops:
                return False
            if self.down_since is not None:
                log.warning("%s is back after %.0f s; %d queued operations sent", self.where,
                            self.clock() - self.down_since, sent)
            self.down_since, self._retry_wait, self._retry_at = None, RETRY_FIRST_S, 0.0
            return True

    # --- the writer thread
    def start(self) -> None:
        """Send from a daemon thread from now on (as soon as something is queued, retries when due)."""
        with self._lock:
            if self._writer is not None:
                return
            self._stopping = False
            self._writer = threading.Thread(target=self._write, name="outbox-writer", daemon=True)
            self._writer.start()

    def kick(self) -> None:
        """Wake the writer thread (something was queued)."""
        with self._lock:
            self._wake.notify()

    def stop(self) -> None:
        """End the writer thread once the operation it is sending (if any) is done; the rest stays queued, and
        later `drain` calls send on the caller's thread (one sender at a time: the queue's order is the store's)."""
        with self._lock:
            writer = self._writer
            if writer is None:
                return
            self._stopping = True
            self._wake.notify()
        writer.join()
        with self._lock:
            self._writer = None
            self._progress.notify_all()

    def _write(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not (self.ops and self.clock() >= self._retry_at):
                    self._wake.wait(max(0.05, self._retry_at - self.clock()) if self.ops else None)
                until = time.monotonic() + self.settle_s  # real time, whatever clock the retries use
                while not self._stopping and not self._waiters and (left := until - time.monotonic()) > 0:
                    self._wake.wait(left)
                if self._stopping:
                    return
            try:
                self._drain(force=False)
            except BaseException as e:  # noqa: BLE001 - a fatal error: the caller learns of it from writer_error
                log.error("%s: sending stopped: %s", self.where, e)
                with self._lock:
                    self.writer_error = e
                    self._progress.notify_all()
                return

    def wait_for(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait up to `timeout` s for the writer thread to make `done()` true (woken as each operation is sent,
        not by polling); gives up early when nothing is queued, the store is down or the writer has ended (or
        was never started: then nobody sends until the caller drains). Returns done()."""
        def settled() -> bool:
            return (done() or not self.ops or self.down_since is not None or self.writer_error is not None
                    or self._writer is None)

        with self._lock:
            self._waiters += 1
            self._wake.notify()  # a settling writer sends now
            try:
                self._progress.wait_for(settled, timeout)
            finally:
                self._waiters -= 1
            return done()

    def note_failure(self, err: BaseException) -> None:
        """Record that the store could not be reached: the next attempt waits (doubling while it stays down).
        Wakes wait_for's callers: they give up while the store is down."""
        with self._lock:  # reentrant: the writer calls it holding the lock
            now = self.clock()
            self.last_error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            self._progress.notify_all()
            if self.down_since is None:
                self.down_since = now
                log.warning("%s unreachable (%s); keeping %d operations and retrying", self.where, self.last_error,
                            len(self.ops))
            else:
                self._retry_wait = min(RETRY_MAX_S, self._retry_wait * 2)
            self._retry_at = now + self._retry_wait

    # --- the file
    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        try:
            if self.ops:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(json.dumps([list(op) for op in self.ops]))
                os.replace(tmp, self.path)  # a kill mid-write leaves the previous file whole
            else:
                self.path.unlink(missing_ok=True)
            self._dirty = False
        except OSError as e:
            log.error("cannot save the outbox to %s (%s); it is kept in memory", self.path, e)

    def load(self) -> list[Op]:
        """The operations a previous session left in the file (not queued: the caller decides where they go)."""
        if self.path is None or not self.path.is_file():
            return []
        try:
            return [Op(*op) for op in json.loads(self.path.read_text())]
        except (OSError, ValueError, TypeError) as e:
            log.error("cannot read the outbox %s (%s); its operations are not replayed", self.path, e)
            return []
