"""Where stages wait for their shard, and the one thread that computes them.

A shard computes one thing at a time (its hooks and caches serve one forward pass), so each shard
has one compute thread. Stages are handed to it (:meth:`StageQueue.submit`, from the worker's event
loop, or :meth:`StageQueue.run`, blocking) and wait in its queue; whenever it is free, it takes
everything waiting (up to ``max_batch``) and serves it as one group, so whatever waits together runs
together (group commit). A lone stage never waits for company: with nothing queued it runs at once.

Why one thread rather than the worker's thread pool: when each waiting stage held a pool thread, every
pass woke all of them to see whose stages were done, and the hand-offs through the pool's queue and
that condition cost a shard worker 15-25% of its CPU at 64 users (py-spy, docs/scaling.md). Now a
stage costs one put on a lock-free queue to arrive and one callback to leave, and the number of
Dask threads no longer bounds how many experiments can share a pass.

Under load the group is also kept together (``gather_s``): stages served in one pass answer their
clients together, and their clients' next stages come back a few milliseconds apart. A shard that
took the first of them alone at once would split the group into a pass of one and a pass of the
rest, and such splits accumulate. So after a shared pass of k stages (within the last second), a
shard that finds fewer than k waiting waits for k before it starts, up to ``gather_s`` and never
longer than that pass took; a stage with no recent company (a lone user's) never waits. Measured on
SmolLM2 with 10 client processes (bench/cotenancy.py): throughput 13 -> 17-19 experiments/s with 20 ms.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..execution.stage import Carry, Stage

#: How recent a shared pass must be for a free shard to wait for company.
_RECENT_S = 1.0
#: A compute thread idle this long ends (the next stage starts another): an undeployed shard's
#: thread must not keep its model alive.
_IDLE_S = 2.0


@dataclass(eq=False)
class StageRequest:
    """One experiment's stage waiting for the shard, and, once served, its outcome."""

    experiment: str
    stage: Stage
    #: On the experiment's first stage here: its graph (JSON).
    graph_json: str | None
    carry: Carry | None
    final: bool
    #: A peer shard of the experiment's route already checked the graph: this one only decodes it.
    checked: bool = False
    #: The carry or results to answer with, or the exception ending the experiment.
    outcome: Any = None
    done: bool = False


@dataclass(eq=False)
class _Submission:
    """Requests handed in together, and whom to tell once all are served."""

    requests: list[StageRequest]
    on_done: Callable[[], None]
    left: int = field(init=False)

    def __post_init__(self) -> None:
        self.left = len(self.requests)


class StageQueue:
    """A FIFO of stage requests, served in groups by the shard's compute thread (started when a
    stage arrives, ended when idle: at most one at a time)."""

    def __init__(self, serve: Callable[[list[StageRequest]], None], max_batch: int, gather_s: float = 0.0,
                 name: str = "nnsight-dask shard") -> None:
        self._serve = serve
        self.max_batch = max(1, int(max_batch))
        self.gather_s = max(0.0, float(gather_s))
        self.name = name
        self._inbox: queue.SimpleQueue[_Submission] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._queued = 0  # requests handed in and not yet taken into a pass
        # the compute thread's own state
        self._waiting: deque[StageRequest] = deque()
        self._owner: dict[int, _Submission] = {}
        self._last_size = 0  # stages in the previous pass ...
        self._last_end = 0.0  # ... when it ended (time.monotonic) ...
        self._last_duration = 0.0  # ... and how long it took

    def __len__(self) -> int:
        """Stages waiting for the shard (not counting the pass running now)."""
        return self._queued

    def submit(self, requests: Sequence[StageRequest], on_done: Callable[[], None]) -> None:
        """Queue ``requests``; ``on_done()`` is called in the compute thread once each has its outcome."""
        submission = _Submission(list(requests), on_done)
        if not submission.requests:
            on_done()
            return
        with self._lock:  # the thread ends only with the lock held and nothing handed in
            self._queued += len(submission.requests)
            self._inbox.put(submission)
            if self._thread is None:
                self._thread = threading.Thread(target=self._compute, name=self.name, daemon=True)
                self._thread.start()

    def run(self, requests: Sequence[StageRequest]) -> None:
        """Queue ``requests`` and return once each has its outcome."""
        served = threading.Event()
        self.submit(requests, served.set)
        served.wait()

    # -- the compute thread -----------------------------------------------------------------------
    def _compute(self) -> None:
        while True:
            if not self._waiting and not self._wait_for_work():
                return
            self._drain()
            expected = self._company_expected()
            if expected:
                self._gather(expected)
            group = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            with self._lock:
                self._queued -= len(group)
            self._last_size = len(group)
            started = time.monotonic()
            try:
                self._serve(group)
            except BaseException as exc:  # serve answers every error itself; this is a last resort
                for request in group:
                    if request.outcome is None:
                        request.outcome = exc
            self._last_end = time.monotonic()
            self._last_duration = self._last_end - started
            self._finish(group)

    def _wait_for_work(self) -> bool:
        """Block until something is handed in; ``False`` (the thread ends) after ``_IDLE_S`` idle."""
        while True:
            try:
                self._take(self._inbox.get(timeout=_IDLE_S))
                return True
            except queue.Empty:
                with self._lock:
                    if self._inbox.empty():
                        self._thread = None
                        return False

    def _take(self, submission: _Submission) -> None:
        for request in submission.requests:
            self._owner[id(request)] = submission
        self._waiting.extend(submission.requests)

    def _drain(self) -> None:
        """Take in everything handed in so far, without waiting."""
        while True:
            try:
                self._take(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _finish(self, group: list[StageRequest]) -> None:
        for request in group:
            request.done = True
            submission = self._owner.pop(id(request))
            submission.left -= 1
            if submission.left == 0:
                try:
                    submission.on_done()
                except Exception:  # whoever waits must not stop the shard's thread
                    pass

    def _company_expected(self) -> int:
        """How many stages to wait for: as many as the previous pass held when it was shared and
        recent and fewer are waiting; else 0 (start now)."""
        expected = min(self._last_size, self.max_batch)
        if (self.gather_s > 0 and expected > 1 and len(self._waiting) < expected
                and time.monotonic() - self._last_end <= _RECENT_S):
            return expected
        return 0

    def _gather(self, expected: int) -> None:
        """Wait up to ``gather_s`` for ``expected`` stages to be waiting."""
        # never longer than the pass it saves: on a tiny model (1 ms passes) a long wait costs more
        deadline = time.monotonic() + min(self.gather_s, self._last_duration)
        while len(self._waiting) < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                self._take(self._inbox.get(timeout=left))
            except queue.Empty:
                return
