"""Where stage tasks wait for their shard, so that whatever waits together can run together.

A shard computes one thing at a time (its hooks and caches serve one forward pass). Stage tasks
arriving while it computes queue here; when it is free, the thread whose task finds it free takes
everything waiting (up to ``max_batch``) and serves it as one group, then hands the shard to the
next waiting thread (group commit). A lone stage never waits for company: with nothing queued it
runs at once, as it always did.

Why a queue in the shard, not a batching window in the scheduler: Dask runs a task on a worker
thread even when it is ``async`` (measured: ten 0.5 s async tasks on a one-thread worker take 5 s),
so stages can only meet if the worker has several threads and they wait *here*. Workers holding
shards therefore run with as many threads as experiments may share a pass (``--nthreads 16``, the
default ``cotenant_max_batch``; with 4 threads a batch holds at most 4); the shard's torch threads are set
apart (``NNSIGHT_DASK_TORCH_THREADS``), so the extra Dask threads only wait.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..execution.stage import Carry, Stage


@dataclass(eq=False)
class StageRequest:
    """One experiment's stage waiting for the shard, and, once served, its outcome."""

    experiment: str
    stage: Stage
    graph_json: str | None
    carry: Carry | None
    final: bool
    #: The carry or results to answer with, or the exception ending the experiment.
    outcome: Any = None
    done: bool = False


class StageQueue:
    """A FIFO of stage requests served in groups by whichever waiting thread finds the shard free."""

    def __init__(self, serve: Callable[[list[StageRequest]], None], max_batch: int) -> None:
        self._serve = serve
        self.max_batch = max(1, int(max_batch))
        self._cond = threading.Condition()
        self._waiting: deque[StageRequest] = deque()
        self._busy = False

    def __len__(self) -> int:
        return len(self._waiting)

    def run(self, requests: Sequence[StageRequest]) -> None:
        """Queue ``requests`` and return once each has its outcome (served by this thread or another)."""
        cond = self._cond
        with cond:
            self._waiting.extend(requests)
            while not all(request.done for request in requests):
                if self._busy:
                    cond.wait()
                    continue
                self._busy = True
                group = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
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
                    cond.notify_all()
