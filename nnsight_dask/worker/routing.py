"""The direct route: an experiment's stages go worker to worker, with no Dask task and no scheduler.

Why: a Dask task costs the scheduler about a millisecond of CPU at best, and a chain of stage tasks
per experiment cost 9-15 ms of scheduler CPU per experiment under load (docs/scaling.md). On GPU
shards that, not the shards, would bound a deployment's throughput. Dask itself routes actor calls
this way: straight to the worker holding the actor, by rpc.

How a batch of experiments (one :class:`~.hop.Hop`) travels:

1. The client calls :data:`ROUTE_HANDLER` on the worker of the first stage's shard (the *origin*).
2. Each worker has the stage run by its shard's compute thread (never on the event loop, which keeps
   heartbeats and messages flowing, see :mod:`.stage_queue`), then hands the hop to the next stage's worker with
   :data:`HOP_HANDLER` (a message that waits for no answer), which carries on in the background.
   Stages on the same worker follow without a message.
3. The last stage's worker sends the outcome to the origin (:data:`DELIVER_HANDLER`), which
   answers the client's call.

Nothing waits forever: an unreachable next worker ends the hop's members with
:class:`~.registry.ShardUnavailableError` (their client retries them); when a worker dies holding a
hop, the waiting client notices the dead shard and cancels, and the cancel handler
(:func:`cancel_routes`) answers the origin's pending call.
"""
from __future__ import annotations

import asyncio
import weakref
from typing import Any

from distributed.protocol import to_serialize

from .hop import Hop, Outcome, portable_error
from .registry import ShardUnavailableError, lookup

ROUTE_HANDLER = "nnsight_dask_route"
HOP_HANDLER = "nnsight_dask_hop"
DELIVER_HANDLER = "nnsight_dask_deliver"


class Router:
    """One worker's end of the direct route: its handlers and the calls it answers as origin.

    One per worker, whatever number of times the plugin is registered (a re-registration must not
    orphan the calls in flight).
    """

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        #: Route id -> (the client's pending answer, the route's experiments, those not cancelled yet).
        self.pending: dict[str, tuple[asyncio.Future[dict[str, Any]], list[str], set[str]]] = {}
        self._background: set[asyncio.Task[None]] = set()

    def install(self) -> None:
        handlers = self.worker.handlers
        handlers[ROUTE_HANDLER] = self.route
        handlers[HOP_HANDLER] = self.hop
        handlers[DELIVER_HANDLER] = self.deliver

    # -- handlers ---------------------------------------------------------------------------------
    async def route(self, hop: Hop) -> dict[str, Any]:
        """A client's call: run ``hop`` from its first stage here; answer its :class:`~.hop.Outcome`.

        What a client sends is checked here, on the cluster: the first shard each graph reaches
        checks it; later shards trust what their peers checked (``Hop.checked``), and only decode it.
        """
        hop.distrust()
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[hop.route] = (answer, list(hop.carries), set(hop.carries))
        try:
            self._spawn(self.advance(hop))
            answers = await answer
        finally:
            self.pending.pop(hop.route, None)
        return {"outcome": to_serialize(Outcome(answers))}

    def hop(self, hop: Hop) -> None:
        """Another worker hands on ``hop`` (it waits for no answer): take it; the stage runs meanwhile."""
        self._spawn(self.advance(hop))

    def deliver(self, route: str, outcome: Outcome) -> None:
        """The last stage's worker answers a route this worker is origin of."""
        entry = self.pending.get(route)
        if entry is not None and not entry[0].done():
            entry[0].set_result(outcome.answers)

    def cancel_routes(self, experiments: list[str], error: BaseException) -> None:
        """Routes of which every member was cancelled answer their client now (a dead worker may
        hold the hop: nobody else would)."""
        for answer, members, live in list(self.pending.values()):
            live.difference_update(experiments)
            if not live and not answer.done():
                answer.set_result({experiment: error for experiment in members})

    # -- the route --------------------------------------------------------------------------------
    async def advance(self, hop: Hop) -> None:
        """Run ``hop``'s stages held by this worker, then hand it on or deliver its outcome."""
        try:
            while True:
                await self._run_stage(hop)
                if hop.final or not hop.carries:
                    await self._deliver(hop)
                    return
                hop.step()
                following = hop.workers[hop.stage.shard]
                if following != self.worker.address:
                    await self._hand_on(hop, following)
                    return
        except Exception as exc:  # a bug of ours: the members hear it, the origin's call never hangs
            hop.end_all(portable_error(exc))
            await self._deliver(hop)

    async def _run_stage(self, hop: Hop) -> None:
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[dict[str, Any]] = loop.create_future()
        try:
            shard = lookup(hop.deployment, hop.stage.shard)
            # the shard's compute thread serves it (never the event loop, which keeps heartbeats and
            # messages flowing) and calls back here
            shard.server.submit_batch(hop.members(), hop.stage, hop.carries, hop.final, hop.checked,
                                      lambda answers: loop.call_soon_threadsafe(_settle, answered, answers))
            answers = await answered
        except Exception as exc:  # the shard is not here (moved, closed)
            answers = dict.fromkeys(hop.carries, exc)
        hop.record(answers)

    async def _hand_on(self, hop: Hop, following: str) -> None:
        try:
            # no answer to wait for (reply=False): the next worker takes the hop and runs it; if it dies
            # holding it, the waiting client sees its shard's worker gone and cancels
            await self.worker.rpc(following).nnsight_dask_hop(hop=to_serialize(hop), reply=False)
        except OSError as exc:  # its worker died or left (CommClosedError is an OSError)
            error = ShardUnavailableError(
                f"shard {hop.stage.shard} of deployment {hop.deployment!r} is unreachable at {following} "
                f"({type(exc).__name__}); the deployment may be recovering from a lost worker",
                deployment=hop.deployment, shard=hop.stage.shard)
            hop.end_all(error)
            await self._deliver(hop)

    async def _deliver(self, hop: Hop) -> None:
        outcome = hop.outcome()
        if hop.origin == self.worker.address:
            self.deliver(hop.route, outcome)
            return
        try:
            await self.worker.rpc(hop.origin).nnsight_dask_deliver(route=hop.route, outcome=to_serialize(outcome),
                                                                   reply=False)
        except OSError:  # the origin died: its client already heard (its call's connection closed)
            pass

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _settle(future: asyncio.Future[dict[str, Any]], answers: dict[str, Any]) -> None:
    if not future.done():
        future.set_result(answers)


_routers: weakref.WeakKeyDictionary[Any, Router] = weakref.WeakKeyDictionary()


def router_of(worker: Any) -> Router:
    """The worker's router (made, and its handlers installed, on first use)."""
    router = _routers.get(worker)
    if router is None:
        router = _routers[worker] = Router(worker)
    router.install()
    return router


def cancel_routes(experiments: list[str], error: BaseException) -> None:
    """Answer this process's pending routes whose members are all among ``experiments``."""
    for router in list(_routers.values()):
        router.cancel_routes(experiments, error)

