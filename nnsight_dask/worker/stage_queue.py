"""Where stages wait for their shard, so that whatever waits together can run together.

A shard computes one thing at a time (its hooks and caches serve one forward pass). Stages arriving
while it computes queue here, each in one of the worker's threads (the router runs them there); when
it is free, the thread that finds it free takes
everything waiting (up to ``max_batch``) and serves it as one group, then hands the shard to the
next waiting thread (group commit). A lone stage never waits for company: with nothing queued it
runs at once, as it always did.

Under load the group is also kept together (``gather_s``): stages served in one pass answer their
clients together, and their clients' next stages come back a few milliseconds apart. A shard that
took the first of them alone at once would split the group into a pass of one and a pass of the
rest, and such splits accumulate. So after a shared pass of k stages (within the last second), a
shard that finds fewer than k waiting waits for k before it starts, up to ``gather_s`` and never
longer than that pass took; a stage with no recent company (a lone user's) never waits. Measured on
SmolLM2 with 10 client processes (bench/cotenancy.py): throughput 13 -> 17-19 experiments/s with 20 ms.

Why a queue in the shard, on the worker's threads: stages can only meet if several wait at once,
and a stage that waits holds a thread (the event loop must stay free for heartbeats and messages).
Workers holding
shards therefore run with as many threads as experiments may share a pass (``--nthreads 16``, the
default ``cotenant_max_batch``; with 4 threads a batch holds at most 4); the shard's torch threads are set
apart (``NNSIGHT_DASK_TORCH_THREADS``), so the extra Dask threads only wait.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..execution.stage import Carry, Stage

#: How recent a shared pass must be for a free shard to wait for company.
_RECENT_S = 1.0


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


class StageQueue:
    """A FIFO of stage requests served in groups by whichever waiting thread finds the shard free."""

    def __init__(self, serve: Callable[[list[StageRequest]], None], max_batch: int, gather_s: float = 0.0) -> None:
        self._serve = serve
        self.max_batch = max(1, int(max_batch))
        self.gather_s = max(0.0, float(gather_s))
        self._cond = threading.Condition()
        self._waiting: deque[StageRequest] = deque()
        self._busy = False
        self._gathering = False
        self._last_size = 0  # stages in the previous pass ...
        self._last_end = 0.0  # ... when it ended (time.monotonic) ...
        self._last_duration = 0.0  # ... and how long it took

    def __len__(self) -> int:
        return len(self._waiting)

    def run(self, requests: Sequence[StageRequest]) -> None:
        """Queue ``requests`` and return once each has its outcome (served by this thread or another)."""
        cond = self._cond
        with cond:
            self._waiting.extend(requests)
            if self._gathering:
                cond.notify_all()  # the thread gathering counts the arrivals
            while not all(request.done for request in requests):
                if self._busy or self._gathering:
                    cond.wait()
                    continue
                expected = self._company_expected()
                if expected:
                    self._gather(expected)
                self._busy = True
                group = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
                self._last_size = len(group)
                started = time.monotonic()
                cond.release()
                try:
                    self._serve(group)
                except BaseException as exc:  # serve answers every error itself; this is a last resort
                    for request in group:
                        if request.outcome is None:
                            request.outcome = exc
                    raise
                finally:
                    cond.acquire()
                    for request in group:
                        request.done = True
                    self._busy = False
                    self._last_end = time.monotonic()
                    self._last_duration = self._last_end - started
                    cond.notify_all()

    def _company_expected(self) -> int:
        """How many stages to wait for: as many as the previous pass held when it was shared and
        recent and fewer are waiting; else 0 (start now)."""
        expected = min(self._last_size, self.max_batch)
        if (self.gather_s > 0 and expected > 1 and len(self._waiting) < expected
                and time.monotonic() - self._last_end <= _RECENT_S):
            return expected
        return 0

    def _gather(self, expected: int) -> None:
        """Wait (the lock released meanwhile; other threads hold back) up to ``gather_s`` for
        ``expected`` stages; this thread then serves what is waiting."""
        # never longer than the pass it saves: on a tiny model (1 ms passes) a long wait costs more
        deadline = time.monotonic() + min(self.gather_s, self._last_duration)
        self._gathering = True
        try:
            while len(self._waiting) < expected:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        finally:
            self._gathering = False
