"""Experiments in flight together from one process travel together on the direct route.

Why: every message costs the client, the workers and their event loops CPU however little the
experiment computes. So while a deployment already has routes in flight (``config.max_routes_per_shard``
per shard), experiments that arrive from other threads of the same process, or as ``blocking=False``
traces, wait and then leave together as one :class:`~nnsight_dask.worker.hop.Hop`: one message per
hop for all of them. On each shard they join the same co-tenant pass (each with its own state and
rows, see :mod:`nnsight_dask.execution.cotenancy`); one member's error fails only that member.

An experiment that finds a free slot leaves at once: a lone client never waits for company. A
``solo`` experiment (one retried because a worker died while it computed there) never shares its
route, so if it kills the worker again, no other experiment dies with it.
"""
from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from distributed import Client

from .. import config
from ..execution.stage import Stage
from .record import Deployment


@dataclass(eq=False)
class Member:
    """One experiment of a route, with what its monitor announcement says."""

    experiment: str
    graph_json: str
    user: str | None = None
    retry_of: str = ""
    reason: str = ""
    #: Leave in a chain of its own (see the module docstring).
    solo: bool = False


@dataclass(eq=False)
class Route:
    """Experiments of this process travelling together (one of them, or several with the same
    deployment placement and chain of stages): one hop message per stage carries them all."""

    record: Deployment
    stages: list[Stage]
    members: list[Member] = field(default_factory=list)
    launched: threading.Event = field(default_factory=threading.Event)
    #: Set once the route has ended (completed, failed or cancelled) or could not be launched.
    done: threading.Event = field(default_factory=threading.Event)
    #: Sends the route on its way and returns ``{experiment: Results | error}`` (set by ``launch``).
    send: Callable[[], Awaitable[dict[str, Any]]] | None = None
    launch_error: BaseException | None = None
    #: Takes no other member (its one member is ``solo``).
    solo: bool = False
    _left: set[str] = field(default_factory=set)
    _outcome: dict[str, Any] | None = None
    _failure: BaseException | None = None
    _call: asyncio.Task[Any] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def outcome(self) -> dict[str, Any]:
        """The last stage's answer once ``done`` (its error, or the chain's, is raised to each member)."""
        if self._failure is not None:
            raise self._failure
        assert self._outcome is not None
        return self._outcome

    async def fetch(self) -> None:
        """On the client's event loop: send the route and take the answer, once for all members.

        Waiting there, instead of in each member's thread, saves the hand-offs between threads that
        cost milliseconds each when many threads of a process compete for the GIL.
        """
        assert self.send is not None
        self._call = asyncio.current_task()
        try:
            self._outcome = await self.send()
        except BaseException as exc:  # its call cancelled (every member left) included
            self._failure = exc

    def leave(self, client: Client, experiment: str) -> None:
        """A member gives up (cancelled, failed, retried): the call is dropped once all have (the
        shards were told to stop them)."""
        with self._lock:
            self._left.add(experiment)
            everyone = all(m.experiment in self._left for m in self.members)
        call = self._call
        if everyone and call is not None:
            client.loop.add_callback(call.cancel)


class Coalescer:
    """Queues experiments for one deployment of one client and launches them as routes.

    At most ``config.max_routes_per_shard`` routes per shard are in flight (so shards work on
    different routes at once, and the next route waits on the shard while one computes); a pending
    route takes up to ``config.max_batch_experiments`` members with equal stages. With sharing off
    (``max_batch_experiments = 1``) every experiment leaves at once on a route of its own.
    """

    def __init__(self, client: Client, launch: Any) -> None:
        self.client = client
        self.launch = launch  # launch(client, route) announces the route and sets route.send
        self.lock = threading.Lock()
        self.in_flight = 0
        self.pending: deque[Route] = deque()

    def enqueue(self, member: Member, record: Deployment, stages: list[Stage]) -> Route:
        """Put ``member`` in a route: a new one launched now if a slot is free, else a pending one."""
        with self.lock:
            sharing = config.max_batch_experiments > 1
            if not sharing or self.in_flight < max(1, record.n_shards * config.max_routes_per_shard):
                self.in_flight += 1
                route = Route(record, stages, [member], solo=member.solo)
            elif member.solo:
                route = Route(record, stages, [member], solo=True)
                self.pending.append(route)
                return route
            else:
                route = self._pending_for(record, stages)
                route.members.append(member)
                return route
        self._launch(route)
        return route

    def withdraw(self, route: Route, member: Member) -> bool:
        """Take a member out of a route still pending; ``False`` when the route is leaving or left."""
        with self.lock:
            if route not in self.pending:
                return False
            route.members.remove(member)
            if not route.members:
                self.pending.remove(route)
            return True

    def ahead_of(self, route: Route) -> int:
        """Experiments of this process queued before ``route`` (the in-flight routes count one each)."""
        with self.lock:
            ahead = self.in_flight
            for other in self.pending:
                if other is route:
                    break
                ahead += len(other.members)
            return ahead

    def _pending_for(self, record: Deployment, stages: list[Stage]) -> Route:
        for route in self.pending:
            if route.record.generation == record.generation and route.stages == stages and not route.solo \
                    and len(route.members) < config.max_batch_experiments:
                return route
        route = Route(record, stages)
        self.pending.append(route)
        return route

    def _launch(self, route: Route) -> None:
        try:
            self.launch(self.client, route)
        except BaseException as exc:  # e.g. the client closed: every member hears it
            route.launch_error = exc
            route.launched.set()
            self._finished(route)
            return
        route.launched.set()
        self.client.loop.add_callback(self._watch, route)

    async def _watch(self, route: Route) -> None:
        await route.fetch()
        self._finished(route)

    def _finished(self, route: Route) -> None:
        """A route ended (any way): wake its members, launch the oldest pending route in its slot."""
        route.done.set()
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
