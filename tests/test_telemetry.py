"""What shards tell the monitor (worker/telemetry.py), without a cluster."""
from __future__ import annotations

import threading
import time

from nnsight_dask.worker.telemetry import Deadlines, PassLog


def test_deadlines_call_in_order_once_and_never_when_cancelled():
    deadlines, calls, done = Deadlines(), [], threading.Event()
    deadlines.after(0.06, lambda: (calls.append("late"), done.set()))
    deadlines.after(0.01, lambda: calls.append("early"))
    dropped = deadlines.after(0.03, lambda: calls.append("cancelled"))
    dropped.cancel()
    deadlines.after(0.02, lambda: 1 / 0)  # a failing call does not stop the others
    assert done.wait(5)
    time.sleep(0.05)
    assert calls == ["early", "late"]
    assert [t.name for t in threading.enumerate()].count("nnsight-deadlines") >= 1


def test_the_pass_log_hands_over_what_it_holds_once():
    log, worker = PassLog(), object()
    log.send_from(worker)
    log.add("d", 1, [("a", "p0-t0-fwd-s1"), ("b", "p0-t0-fwd-s1")], 10.0, 10.5)
    (entry,) = log.take()
    assert entry["experiments"] == ["a", "b"] and entry["labels"] == ["p0-t0-fwd-s1"] * 2
    assert (entry["deployment"], entry["shard"], entry["stop"] - entry["start"]) == ("d", 1, 0.5)
    assert log.take() == []


def test_the_pass_log_keeps_passes_only_while_a_worker_sends_them():
    """Passes of shards outside a worker (unit tests), or after their worker closed, are not kept for
    the next worker of the process to send (an in-process cluster's monitor listed a unit test's
    deployment as its own)."""
    log, first, second = PassLog(), object(), object()
    log.add("unit", 0, [("a", "p0-t0-fwd-s0")], 1.0, 1.1)  # no worker in the process yet
    log.send_from(first)
    log.send_from(second)
    log.add("d", 0, [("b", "p0-t0-fwd-s0")], 2.0, 2.1)
    log.stop_sending(first)
    log.add("d", 1, [("b", "p0-t0-fwd-s1")], 2.1, 2.2)  # the second worker still sends
    assert [(e["deployment"], e["shard"]) for e in log.take()] == [("d", 0), ("d", 1)]
    log.stop_sending(second)
    log.add("d", 0, [("c", "p0-t0-fwd-s0")], 3.0, 3.1)
    assert log.take() == []
