"""What shards tell the scheduler's monitor, at a cost that does not grow with the experiments.

- :data:`STAGES_TOPIC`: every pass a shard ran (when, which experiments, which of their stages).
  Passes are buffered in the process (:data:`PASSES`) and sent as one event per worker every
  :data:`FLUSH_SECONDS` (:func:`flush`, a periodic callback of the worker), so a busy deployment
  sends a few messages a second, not several per experiment. The monitor counts stages, busy time
  and co-tenants from them and draws them in Dask's task stream. The buffer keeps passes only while
  a worker of the process sends them (:meth:`PassLog.send_from`), and a worker that closes sends what
  is left first: passes of shards built outside a worker, or run after their worker closed, are not
  kept for whichever worker of the process (an in-process test cluster's) would send them next.
- :data:`RUNNING_TOPIC`: which experiment computes on this worker now, sent at once only when it
  matters (:class:`RunningAnnouncer`): when the worker dies, the monitor blames the experiment that
  was computing there, not those waiting behind it.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

#: Event topic (``{"passes": [...]}``, see :meth:`PassLog.add`) a worker sends every ``FLUSH_SECONDS``.
STAGES_TOPIC = "nnsight-dask-stages"
#: Event topic a shard logs when an experiment computes on its worker (see :class:`RunningAnnouncer`).
RUNNING_TOPIC = "nnsight-dask-running"
FLUSH_SECONDS = 0.2
#: A stage still running after this many seconds is announced to the scheduler's monitor.
ANNOUNCE_AFTER = 0.05


class PassLog:
    """The passes this process's shards ran since the last flush (thread-safe), kept while a worker
    of the process sends them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._passes: list[dict[str, Any]] = []
        #: Ids of the workers of this process that send the passes (one, outside tests).
        self._senders: set[int] = set()

    def send_from(self, worker: Any) -> None:
        """``worker`` sends the passes from now on (its periodic :func:`flush`)."""
        with self._lock:
            self._senders.add(id(worker))

    def stop_sending(self, worker: Any) -> None:
        """``worker`` closes; with no sender left, later passes are not kept."""
        with self._lock:
            self._senders.discard(id(worker))

    def add(self, deployment: str, shard: int, stages: list[tuple[str, str]], start: float, stop: float) -> None:
        """One pass of shard ``shard``: ``stages`` are its ``(experiment, stage label)`` pairs;
        ``start``/``stop`` are wall-clock seconds (what Dask's task stream draws)."""
        entry = {"deployment": deployment, "shard": shard, "start": start, "stop": stop,
                 "experiments": [experiment for experiment, _ in stages], "labels": [label for _, label in stages],
                 "thread": threading.get_ident()}
        with self._lock:
            if self._senders:
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


#: The deadline thread ends after this long without calls to make.
IDLE_EXIT_SECONDS = 0.5


class Deadlines:
    """Calls due after a delay, all served by one daemon thread of the process while there are any
    (a ``threading.Timer`` per stage would start a thread per stage)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, Callable[[], Any]]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def after(self, delay: float, call: Callable[[], Any]) -> Pending:
        with self._cond:
            token = next(self._tokens)
            self._due[token] = (time.monotonic() + delay, call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="nnsight-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
        return Pending(self, token)

    def cancel(self, token: int) -> None:
        with self._cond:
            self._due.pop(token, None)

    def _serve(self) -> None:
        while True:
            with self._cond:
                if not self._due:
                    self._cond.wait(IDLE_EXIT_SECONDS)
                    if not self._due:  # idle: the thread ends (the next call starts one)
                        self._thread = None
                        return
                now = time.monotonic()
                earliest = min(when for when, _ in self._due.values())
                if earliest > now:
                    self._cond.wait(earliest - now)
                    continue
                ready = [token for token, (when, _) in self._due.items() if when <= now]
                calls = [self._due.pop(token)[1] for token in ready]
            for call in calls:
                try:
                    call()
                except Exception:  # telemetry must never take the thread down
                    pass


class Pending:
    """A call of :class:`Deadlines` not made yet; ``cancel()`` drops it."""

    def __init__(self, deadlines: Deadlines | None, token: int = -1) -> None:
        self._deadlines = deadlines
        self._token = token

    def cancel(self) -> None:
        if self._deadlines is not None:
            self._deadlines.cancel(self._token)


DEADLINES = Deadlines()


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

    def watch(self, experiment: str, others_waiting: bool) -> Pending:
        """Announce now or after ``ANNOUNCE_AFTER``; cancel the returned call when the stage ends."""
        if self.worker is None:  # not in a worker (unit tests call the shard directly)
            return Pending(None)
        if others_waiting:
            self.announce(experiment)
            return Pending(None)
        return DEADLINES.after(ANNOUNCE_AFTER, lambda: self.announce(experiment))

    def announce(self, experiment: str) -> None:
        self.worker.log_event(RUNNING_TOPIC, {"experiment": experiment, "deployment": self.deployment,
                                              "shard": self.shard})


def wall_clock(perf: float) -> float:
    """``time.perf_counter()`` reading ``perf`` as wall-clock seconds (the task stream's clock)."""
    return time.time() - (time.perf_counter() - perf)
