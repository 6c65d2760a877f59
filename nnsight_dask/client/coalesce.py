"""Experiments in flight together from one process share their stage tasks.

Why: every Dask task costs the client, the scheduler and the workers a few milliseconds of CPU
however little it computes, and on a small model that bookkeeping, not the model, bounds how many
experiments a deployment serves per second. So while a deployment already has one chain of stage
tasks in flight per shard (every shard has work), experiments that arrive from other threads of
the same process, or as ``blocking=False`` traces, wait and then leave together as one chain. A
stage task runs each member's stage in turn, each with its own state on the shard, so every
experiment computes exactly what it would alone (no padding, no shared batch dimension); one
member's error fails only that member (see :meth:`~nnsight_dask.worker.shard_actor.ShardActor.run_batch`).

An experiment that finds a free slot leaves at once: a lone client never waits for company. A
``solo`` experiment (one retried because a worker died while it computed there) never shares its
chain, so if it kills the worker again, no other experiment is in the stage task that dies with it.
"""
from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from distributed import Client, Future

from .. import config
from ..execution.stage import Stage
from .record import Deployment


@dataclass(eq=False)
class Member:
    """One experiment of a batch, with what its monitor announcement says."""

    experiment: str
    graph_json: str
    user: str | None = None
    retry_of: str = ""
    reason: str = ""
    #: Leave in a chain of its own (see the module docstring).
    solo: bool = False


@dataclass(eq=False)
class Batch:
    """Experiments on one deployment placement with the same chain of stages."""

    record: Deployment
    stages: list[Stage]
    members: list[Member] = field(default_factory=list)
    launched: threading.Event = field(default_factory=threading.Event)
    #: Set once the chain has ended (completed, failed or cancelled) or could not be launched.
    done: threading.Event = field(default_factory=threading.Event)
    #: The last stage's future (resolves to ``{experiment: Results | error}``), once launched.
    last: Future | None = None
    launch_error: BaseException | None = None
    #: Takes no other member (its one member is ``solo``).
    solo: bool = False
    _left: set[str] = field(default_factory=set)
    _outcome: dict[str, Any] | None = None
    _failure: BaseException | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def outcome(self) -> dict[str, Any]:
        """The last stage's answer once ``done`` (its error, or the chain's, is raised to each member)."""
        if self._failure is not None:
            raise self._failure
        assert self._outcome is not None
        return self._outcome

    async def fetch(self, client: Client) -> None:
        """On the client's event loop: wait for the last stage and take its answer, once for all members.

        Waiting and fetching there, instead of in each member's thread, saves the hand-offs between
        threads that cost milliseconds each when many threads of a process compete for the GIL.
        """
        try:
            self._outcome = await client.gather(self.last, direct=config.direct_results, asynchronous=True)
        except BaseException as exc:
            self._failure = exc

    def leave(self, client: Client, experiment: str) -> None:
        """A member gives up (cancelled, failed, retried): the chain is cancelled once all have."""
        with self._lock:
            self._left.add(experiment)
            everyone = all(m.experiment in self._left for m in self.members)
        if everyone and self.last is not None:
            client.cancel([self.last])


class Coalescer:
    """Queues experiments for one deployment of one client and launches them as batches.

    At most one chain per shard is in flight (so shards work on different batches at once); a
    pending batch takes up to ``config.max_batch_experiments`` members with equal stages. With
    sharing off (``max_batch_experiments = 1``) every experiment leaves at once in a chain of its own.
    """

    def __init__(self, client: Client, launch: Any) -> None:
        self.client = client
        self.launch = launch  # launch(client, batch) submits the batch's stage tasks; sets batch.last
        self.lock = threading.Lock()
        self.in_flight = 0
        self.pending: deque[Batch] = deque()

    def enqueue(self, member: Member, record: Deployment, stages: list[Stage]) -> Batch:
        """Put ``member`` in a batch: a new one launched now if a slot is free, else a pending one."""
        with self.lock:
            sharing = config.max_batch_experiments > 1
            if not sharing or self.in_flight < max(1, record.n_shards):
                self.in_flight += 1
                batch = Batch(record, stages, [member], solo=member.solo)
            elif member.solo:
                batch = Batch(record, stages, [member], solo=True)
                self.pending.append(batch)
                return batch
            else:
                batch = self._pending_for(record, stages)
                batch.members.append(member)
                return batch
        self._launch(batch)
        return batch

    def withdraw(self, batch: Batch, member: Member) -> bool:
        """Take a member out of a batch still pending; ``False`` when the batch is leaving or left."""
        with self.lock:
            if batch not in self.pending:
                return False
            batch.members.remove(member)
            if not batch.members:
                self.pending.remove(batch)
            return True

    def ahead_of(self, batch: Batch) -> int:
        """Experiments of this process queued before ``batch`` (the in-flight chains count one each)."""
        with self.lock:
            ahead = self.in_flight
            for other in self.pending:
                if other is batch:
                    break
                ahead += len(other.members)
            return ahead

    def _pending_for(self, record: Deployment, stages: list[Stage]) -> Batch:
        for batch in self.pending:
            if batch.record.generation == record.generation and batch.stages == stages and not batch.solo \
                    and len(batch.members) < config.max_batch_experiments:
                return batch
        batch = Batch(record, stages)
        self.pending.append(batch)
        return batch

    def _launch(self, batch: Batch) -> None:
        try:
            self.launch(self.client, batch)
        except BaseException as exc:  # e.g. the client closed: every member hears it
            batch.launch_error = exc
            batch.launched.set()
            self._finished(batch)
            return
        batch.launched.set()
        self.client.loop.add_callback(self._watch, batch)

    async def _watch(self, batch: Batch) -> None:
        await batch.fetch(self.client)
        self._finished(batch)

    def _finished(self, batch: Batch) -> None:
        """A chain ended (any way): wake its members, launch the oldest pending batch in its slot."""
        batch.done.set()
        with self.lock:
            if not self.pending:
                self.in_flight -= 1
                return
            following = self.pending.popleft()
        self._launch(following)


_coalescers: weakref.WeakKeyDictionary[Client, dict[str, Coalescer]] = weakref.WeakKeyDictionary()
_coalescers_lock = threading.Lock()


def coalescer_for(client: Client, deployment: str, launch: Any) -> Coalescer:
    """The process's coalescer for ``deployment`` on ``client`` (made on first use)."""
    with _coalescers_lock:
        per_client = _coalescers.setdefault(client, {})
        coalescer = per_client.get(deployment)
        if coalescer is None:
            coalescer = per_client[deployment] = Coalescer(client, launch)
        return coalescer
