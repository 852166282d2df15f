"""The outbox alone, with a fake store: order, retry schedule, refused operations, and the file that carries the
queue over a killed driver."""

from __future__ import annotations

import json
import pickle
import threading
import time

import pytest

from ncssl_tune.records.outbox import RETRY_FIRST_S, RETRY_MAX_S, Op, Outbox


class Down(ConnectionError):
    pass


class FakeStore:
    """Records what reached it; `down` makes every call fail as an unreachable server; `refuse` names kinds it
    rejects as a bad request."""

    def __init__(self):
        self.sent: list[Op] = []
        self.calls = 0
        self.down = False
        self.refuse: set[str] = set()

    def execute(self, op: Op) -> None:
        self.calls += 1
        if self.down:
            raise Down("connection refused")
        if op.kind in self.refuse:
            raise ValueError(f"bad request: {op.kind}")
        if op.kind == "fatal":
            raise KeyboardInterrupt  # stands for the caller's fatal error type
        self.sent.append(op)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def outbox(store: FakeStore, clock: Clock, path=None) -> Outbox:
    return Outbox(store.execute, path=path, transient=lambda e: isinstance(e, Down), clock=clock,
                  fatal=(KeyboardInterrupt,))


def test_operations_are_sent_in_order_and_a_refused_one_does_not_block_the_rest():
    store, clock = FakeStore(), Clock()
    box = outbox(store, clock)
    store.refuse = {"bad"}
    for i, kind in enumerate(["a", "bad", "b"]):
        box.put(kind, f"t{i}", {"i": i})
    assert box.drain() is True
    assert [op.kind for op in store.sent] == ["a", "b"]
    assert [(op.kind, err) for op, err in box.rejected] == [("bad", "ValueError: bad request: bad")]
    assert len(box) == 0


def test_an_outage_keeps_the_queue_and_retries_on_a_doubling_schedule():
    store, clock = FakeStore(), Clock()
    box = outbox(store, clock)
    store.down = True
    box.put("a", None)
    box.put("b", None)
    assert box.drain() is False and box.down_since == 100.0 and "connection refused" in box.last_error
    waits = []
    for _ in range(6):
        calls = store.calls
        assert box.drain() is False and store.calls == calls  # not due: nothing tried
        start = clock.now
        while store.calls == calls:
            clock.now += 0.5
            box.drain()
        waits.append(clock.now - start)
    assert waits[0] == pytest.approx(RETRY_FIRST_S) and waits[-1] == pytest.approx(RETRY_MAX_S)
    assert waits == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    store.down = False
    clock.now += RETRY_MAX_S
    assert box.drain() is True and [op.kind for op in store.sent] == ["a", "b"] and box.down_since is None


def test_force_tries_at_once_and_a_fatal_error_propagates():
    store, clock = FakeStore(), Clock()
    box = outbox(store, clock)
    store.down = True
    box.put("a", None)
    box.drain()
    store.down = False
    assert box.drain(force=True) is True and store.sent == [Op("a", None, None)]
    box.put("fatal", None)
    with pytest.raises(KeyboardInterrupt):
        box.drain()
    assert [op.kind for op in box.ops] == ["fatal"] and box.rejected == []


def test_the_queue_is_on_disk_only_while_it_waits_and_a_new_session_reads_it_back(tmp_path):
    path = tmp_path / "outbox.json"
    store, clock = FakeStore(), Clock()
    box = outbox(store, clock, path)
    box.put("a", "t1", {"metrics": [["loss", float("nan"), 5, 1]]})
    assert box.drain() is True and not path.exists()  # the store answers: no file at all

    store.down = True
    box.put("b", "t1", {"metrics": [["loss", 0.5, 6, 2]]})
    box.drain()
    box.put("c", None, "FINISHED")  # queued while down: on disk at once, before any drain
    on_disk = json.loads(path.read_text())
    assert [op[0] for op in on_disk] == ["b", "c"]

    # the driver is killed here; the next session's outbox finds the operations in order, payloads intact
    again = outbox(FakeStore(), Clock(), path)
    left = again.load()
    assert left == [Op("b", "t1", {"metrics": [["loss", 0.5, 6, 2]]}), Op("c", None, "FINISHED")]
    again.replace(left)
    assert again.drain() is True and again.execute.__self__.sent == left and not path.exists()


def test_an_unreadable_file_is_reported_not_replayed(tmp_path, caplog):
    path = tmp_path / "outbox.json"
    path.write_text("{not json")
    assert outbox(FakeStore(), Clock(), path).load() == []
    assert "cannot read the outbox" in caplog.text


class SlowStore(FakeStore):
    """A store that answers only when `gate` is set: what a slow server or a long upload looks like."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    def execute(self, op: Op) -> None:
        assert self.gate.wait(10), "the test never opened the gate"
        super().execute(op)


def test_with_a_writer_thread_put_never_waits_for_the_store_and_order_is_kept(tmp_path):
    path = tmp_path / "outbox.json"
    store = SlowStore()
    box = Outbox(store.execute, path=path, transient=lambda e: isinstance(e, Down))
    box.start()
    try:
        start = time.monotonic()
        for i in range(5):
            box.put("batch", "t1", {"i": i})
            box.drain()  # only wakes the writer
        assert time.monotonic() - start < 1.0 and store.sent == []
        assert [op[2]["i"] for op in json.loads(path.read_text())] == list(range(5))  # unsent: on disk
        store.gate.set()
        deadline = time.monotonic() + 10
        while len(box) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [op.payload["i"] for op in store.sent] == list(range(5)) and not path.exists()
    finally:
        store.gate.set()
        box.stop()
    assert box._writer is None
    box.put("after", None)
    assert box.drain() is True and store.sent[-1].kind == "after"  # stopped: the caller sends again


def test_stop_leaves_what_an_outage_kept_for_the_caller_and_the_outbox_pickles(tmp_path):
    store = FakeStore()
    box = Outbox(store.execute, path=tmp_path / "outbox.json")  # Down is a ConnectionError: transient
    box.start()
    store.down = True
    box.put("a", None)
    deadline = time.monotonic() + 10
    while box.down_since is None and time.monotonic() < deadline:
        time.sleep(0.01)
    box.stop()
    assert [op.kind for op in box.ops] == ["a"] and box.down_since is not None
    copy = pickle.loads(pickle.dumps(box))  # Ray pickles the tracker that holds it
    assert [op.kind for op in copy.ops] == ["a"] and copy._writer is None
    store.down = False
    assert box.drain(force=True) is True and [op.kind for op in store.sent] == ["a"]


def test_wait_for_wakes_when_the_writer_sends_and_gives_up_when_the_store_is_down():
    store = SlowStore()
    box = Outbox(store.execute, transient=lambda e: isinstance(e, Down))
    assert box.wait_for(lambda: False, 10) is False  # no writer: nobody would send, so no wait
    box.start()
    try:
        box.put("child", "t1")
        threading.Timer(0.3, store.gate.set).start()
        start = time.monotonic()
        assert box.wait_for(lambda: any(op.trial_id == "t1" for op in store.sent), 10) is True
        assert 0.25 < time.monotonic() - start < 5  # woken by the send, not by the timeout
        assert box.wait_for(lambda: False, 10) is False  # nothing queued: returns at once
        store.down = True
        box.put("child", "t2")
        start = time.monotonic()
        assert box.wait_for(lambda: False, 10) is False and box.down_since is not None
        assert time.monotonic() - start < 5  # the outage ends the wait, not the timeout
    finally:
        store.gate.set()
        box.stop()


def test_a_settling_writer_waits_before_it_sends_unless_someone_waits_for_a_send(tmp_path):
    store = FakeStore()
    box = Outbox(store.execute, settle_s=30.0)  # Down is a ConnectionError: transient
    box.start()
    try:
        box.put("batch", "t1")
        time.sleep(0.3)
        assert store.sent == [] and len(box) == 1  # settling: whoever queued goes on undisturbed
        start = time.monotonic()
        assert box.wait_for(lambda: len(store.sent) == 1, 20) is True  # a waiter ends the settling at once
        assert time.monotonic() - start < 10
        box.put("batch", "t2")
        time.sleep(0.3)
        assert [op.trial_id for op in store.sent] == ["t1"]  # the next work settles again
        start = time.monotonic()
    finally:
        box.stop()
    assert time.monotonic() - start < 10  # stop does not wait out the settling; what was queued stays queued
    assert [op.trial_id for op in box.ops] == ["t2"]
    copy = pickle.loads(pickle.dumps(box))
    assert copy.settle_s == 30.0 and copy._waiters == 0
    old = box.__getstate__()
    del old["settle_s"]  # an outbox Ray saved before there was settling
    restored = Outbox.__new__(Outbox)
    restored.__setstate__(old)
    assert restored.settle_s == 0.0
    assert box.drain() is True and [op.trial_id for op in store.sent] == ["t1", "t2"]
