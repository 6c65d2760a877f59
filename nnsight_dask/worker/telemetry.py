"""What shards tell the scheduler's monitor, at a cost that does not grow with the experiments.

- :data:`STAGES_TOPIC`: every pass a shard ran (when, which experiments, which of their stages).
  Passes are buffered in the process (:data:`PASSES`) and sent as one event per worker every
  :data:`FLUSH_SECONDS` (:func:`flush`, a periodic callback of the worker), so a busy deployment
  sends a few messages a second, not several per experiment. The monitor counts stages, busy time
  and co-tenants from them and draws them in Dask's task stream.
- :data:`RUNNING_TOPIC`: which experiment computes on this worker now, sent at once only when it
  matters (:class:`RunningAnnouncer`): when the worker dies, the monitor blames the experiment that
  was computing there, not those waiting behind it.
"""
from __future__ import annotations

import threading
import time
from typing import Any

#: Event topic (``{"passes": [...]}``, see :meth:`PassLog.add`) a worker sends every ``FLUSH_SECONDS``.
STAGES_TOPIC = "nnsight-dask-stages"
#: Event topic a shard logs when an experiment computes on its worker (see :class:`RunningAnnouncer`).
RUNNING_TOPIC = "nnsight-dask-running"
FLUSH_SECONDS = 0.2
#: A stage still running after this many seconds is announced to the scheduler's monitor.
ANNOUNCE_AFTER = 0.05


class PassLog:
    """The passes this process's shards ran since the last flush (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._passes: list[dict[str, Any]] = []

    def add(self, deployment: str, shard: int, stages: list[tuple[str, str]], start: float, stop: float) -> None:
        """One pass of shard ``shard``: ``stages`` are its ``(experiment, stage label)`` pairs;
        ``start``/``stop`` are wall-clock seconds (what Dask's task stream draws)."""
        entry = {"deployment": deployment, "shard": shard, "start": start, "stop": stop,
                 "experiments": [experiment for experiment, _ in stages], "labels": [label for _, label in stages],
                 "thread": threading.get_ident()}
        with self._lock:
            self._passes.append(entry)

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            passes, self._passes = self._passes, []
        return passes


PASSES = PassLog()


def flush(worker: Any) -> None:
    """Send the buffered passes as one event (on the worker's event loop; nothing when idle)."""
    passes = PASSES.take()
    if passes:
        worker.log_event(STAGES_TOPIC, {"passes": passes})  # a dict: the scheduler adds the worker's address


class RunningAnnouncer:
    """Tells the scheduler which experiment computes on a shard, when that can matter.

    At once when other work waits on the shard, else once its stage has run ``ANNOUNCE_AFTER``
    seconds. Announcing every stage would cost every experiment a message; a short stage with
    nobody waiting has nobody to be confused with.
    """

    def __init__(self, worker: Any, deployment: str, shard: int) -> None:
        self.worker = worker
        self.deployment = deployment
        self.shard = shard

    def watch(self, experiment: str, others_waiting: bool) -> threading.Timer:
        """Announce now or after ``ANNOUNCE_AFTER``; cancel the returned timer when the stage ends."""
        timer = threading.Timer(ANNOUNCE_AFTER, self.announce, args=(experiment,))
        timer.daemon = True
        if self.worker is None:  # not in a worker (unit tests call the shard directly)
            return timer
        if others_waiting:
            self.announce(experiment)
        else:
            timer.start()
        return timer

    def announce(self, experiment: str) -> None:
        self.worker.log_event(RUNNING_TOPIC, {"experiment": experiment, "deployment": self.deployment,
                                              "shard": self.shard})


def wall_clock(perf: float) -> float:
    """``time.perf_counter()`` reading ``perf`` as wall-clock seconds (the task stream's clock)."""
    return time.time() - (time.perf_counter() - perf)
