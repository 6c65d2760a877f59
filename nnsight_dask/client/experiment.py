"""Experiments on a deployment: a graph travels the direct route, worker to worker.

The client sends the experiment (with others in flight from this process, :mod:`.coalesce`) to
the first shard's worker in one message; each shard's worker hands it to the next one, the carry
(hidden states, values) going straight between them, and the first worker answers with the
results (:mod:`nnsight_dask.worker.routing`). No Dask task, no scheduler on the way: the monitor
hears of an experiment from one message of the client when it starts and one when it ends, and of
its stages from the shards' telemetry, sent in batches. The client waits, watching the deployment;
every experiment ends completed, failed or cancelled:

- **Cancel and timeout stop the shards too.** The client leaves the chain and tells the shard
  workers, through a worker handler that does not queue behind the running stage
  (:data:`~nnsight_dask.worker.plugin.CANCEL_HANDLER`), to stop the experiment: its running stage
  ends before its next decoder layer, its state is freed at once, the next experiment in line starts.
- **A shard's worker dies.** The route is dropped, the lost shard re-created, and the experiment
  retried. Only a loss while the experiment was computing on that worker counts against it (the
  scheduler's monitor knows which experiment was); its second such loss fails it, and its retry
  leaves on a route of its own. An experiment only waiting behind it (queued, or in a stage on
  another shard) is retried without counting.
- **Undeploy.** An experiment in flight hears of closed shards, finds the deployment gone and ends
  with a :class:`~nnsight_dask.errors.DeploymentError` saying so.
"""
from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from distributed import Client
from distributed.protocol import to_serialize

from .. import config
from ..dask_compat import send_to_scheduler, send_to_scheduler_from_loop, shorten_stream_interval
from ..errors import DeploymentError, ExperimentFailedError
from ..execution.partition import assign_shards
from ..execution.stage import Stage, plan_stages
from ..graph.graph import InterventionGraph
from ..scheduler import monitor, rpc
from ..storage.results import ZarrSink
from ..tensors import nbytes
from ..worker.hop import Hop
from ..limits import check_graph
from ..worker.plugin import CANCEL_HANDLER
from ..worker.registry import ShardUnavailableError, ShardStateLostError
from ..worker.results import Results
from ..worker.routing import ROUTE_HANDLER
from ..worker.serialization import register as register_serializers
from .coalesce import Coalescer, Member, Route, coalescer_for
from .deployment import (
    crowded,
    dead_shards,
    get_deployment,
    recover,
    undeployed_message,
)
from .record import Deployment
from .retry import Retries

POLL_SECONDS = 0.2
#: Least time between two checks, per client and deployment, whether shards sharing a worker can
#: spread again (only while the cached placement shares one).
REBALANCE_CHECK_SECONDS = 2.0
#: Errors that mean "the shard is not there any more" (lost, moved or closed; its worker unreachable).
SHARD_GONE = (ShardUnavailableError, ShardStateLostError)
_spread_checked: dict[tuple[str, str], float] = {}


class _WorkerLost(Exception):
    pass


class _Cancelled(Exception):
    pass


def new_experiment_id() -> str:
    return uuid.uuid4().hex[:12]


def plan_for(record: Deployment, graph: InterventionGraph) -> list[Stage]:
    """The experiment's chain of stages on the deployment's current shards."""
    shards = assign_shards(graph, record.owner, record.n_shards)
    return plan_stages(graph, shards, record.n_shards)


def launch_route(client: Client, route: Route) -> None:
    """Make the route's :class:`~nnsight_dask.worker.hop.Hop` (sent by the coalescer, which also
    tells the deployment's monitor who submitted what, on the client's stream to the scheduler).

    Every member's graph goes with the hop until each shard has seen it; the first shard's worker
    answers ``{experiment: Results | error}``.
    """
    record, stages = route.record, route.stages
    register_serializers()
    workers = {shard.index: shard.worker for shard in record.shards}
    ids = "+".join(member.experiment for member in route.members)
    submitted = [{"op": monitor.STREAM_OP, "event": "submitted", "experiment": member.experiment,
                  "deployment": record.name, "user": member.user or config.user, "stages": len(stages),
                  "shards": [stage.shard for stage in stages], "workers": sorted(set(workers.values())),
                  "retry_of": member.retry_of, "reason": member.reason, "route": ids}
                 for member in route.members] if record.monitor else []
    hop = Hop(route=f"{ids}-{uuid.uuid4().hex[:6]}", origin=workers[stages[0].shard], deployment=record.name,
              stages=list(stages), workers=workers,
              graphs={member.experiment: member.graph_json for member in route.members},
              carries=dict.fromkeys(member.experiment for member in route.members))
    route.send = functools.partial(send_hop, client, hop, submitted)


async def send_hop(client: Client, hop: Hop, announcements: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Tell the monitor about the route's members (``announcements``) and call the route's first
    worker, both from the client's event loop (announcing from the caller's thread cost one more
    wake-up of the loop per experiment), and return its answers; a worker that cannot be reached is
    a :class:`~nnsight_dask.worker.registry.ShardUnavailableError`."""
    for message in announcements:
        try:
            send_to_scheduler_from_loop(client, message)
        except Exception:  # monitoring must never fail an experiment
            pass
    try:
        if config.direct_to_workers:
            answer = await client.rpc(hop.origin).nnsight_dask_route(hop=to_serialize(hop))
        else:  # the scheduler passes the call on (it then costs scheduler CPU)
            answer = await client.scheduler.proxy(msg={"op": ROUTE_HANDLER, "hop": to_serialize(hop)},
                                                  worker=hop.origin)
    except OSError as exc:  # the first shard's worker died or left (CommClosedError is an OSError)
        shard = hop.stages[0].shard
        raise ShardUnavailableError(
            f"shard {shard} of deployment {hop.deployment!r} is unreachable at {hop.origin} "
            f"({type(exc).__name__}: {exc})", deployment=hop.deployment, shard=shard) from None
    return answer["outcome"].answers  # type: ignore[no-any-return]


def shorten_batching(client: Client) -> None:
    """Apply ``config.client_batch_interval`` to the client's stream to the scheduler (see there);
    checked per experiment because a reconnecting client gets a new stream with Dask's default."""
    if config.client_batch_interval is not None:
        shorten_stream_interval(client, config.client_batch_interval)


def announce(client: Client, record: Deployment, **message: Any) -> None:
    """Tell the deployment's monitor (a scheduler plugin) about an experiment, fire-and-forget, on
    the client's batched stream to the scheduler: no round trip."""
    if not record.monitor:
        return
    try:
        send_to_scheduler(client, {"op": monitor.STREAM_OP, **message})
    except Exception:  # monitoring must never fail an experiment
        pass


def run_experiment(client: Client, name: str, graph: InterventionGraph, *, module_paths: list[str] | None = None,
                   checked: bool = False, user: str | None = None, cancelled: threading.Event | None = None,
                   on_status: Callable[[str, dict[str, Any]], None] | None = None,
                   timeout: float | None = None, record: Deployment | None = None,
                   on_record: Callable[[Deployment], None] | None = None) -> Results:
    """Run ``graph`` on deployment ``name`` and return its results (blocking).

    ``record`` is the caller's cached deployment record (saves a scheduler round trip per
    experiment); when the shards have moved since, the fresh record is handed to ``on_record``.
    The graph is checked here to fail fast (unless the caller did: ``checked``, the gateway's
    validation), and again by the first shard it reaches, with its worker's limits.
    ``cancelled`` (set by another thread) and ``timeout`` stop the experiment on the shards too.
    """
    if record is None:
        record = get_deployment(client, name)
    if not checked:
        check_graph(graph, module_paths, policy=record.policy)
    graph_json = graph.to_json()
    experiment = new_experiment_id()
    limit = min(timeout if timeout is not None else config.experiment_timeout, record.policy.timeout)
    deadline = time.monotonic() + limit
    notify = on_status or (lambda status, info: None)
    shorten_batching(client)
    coalescer = coalescer_for(client, name, launch_route)
    record = _spread_if_due(client, name, record, on_record)
    retries, retried_from, reason, solo = Retries(), "", "", False
    while True:
        member = Member(experiment, graph_json, user=user, retry_of=retried_from, reason=reason, solo=solo)
        route = coalescer.enqueue(member, record, plan_for(record, graph))
        try:
            results = _wait(client, coalescer, route, member, deadline, limit, cancelled, on_status)
        except _WorkerLost:
            lost_on = _lost_on(client, record, experiment)
            _abandon(client, coalescer, route, member, graph, "a shard's worker died; it is retried")
            fresh = _current(client, name, experiment)
            moved = (fresh.generation, fresh.created) != (record.generation, record.created)
            decision = retries.after_loss(lost_on, moved, bool(moved and dead_shards(client, fresh)))
            reason, solo = decision.reason, solo or decision.solo
            if decision.action == "fail":
                _finished(client, record, experiment, "failed", error=decision.reason)
                raise ExperimentFailedError(f"experiment {experiment} on {name!r} failed: {decision.reason}",
                                            experiment=experiment) from None
            if decision.action == "retry":
                notify("retrying", {"experiment": experiment})
                fresh = _recover(client, name, experiment)
            record = fresh
            if on_record is not None:
                on_record(fresh)
            retried_from, experiment = experiment, new_experiment_id()
            continue
        except _Cancelled:
            _abandon(client, coalescer, route, member, graph, "cancelled by its owner")
            _finished(client, record, experiment, "cancelled")
            raise concurrent.futures.CancelledError(f"experiment {experiment} was cancelled") from None
        except BaseException as exc:
            _abandon(client, coalescer, route, member, graph, f"{type(exc).__name__}: {exc}")
            _finished(client, record, experiment, "failed", error=f"{type(exc).__name__}: {exc}")
            raise
        sink = ZarrSink.from_options(graph.options, experiment)
        try:
            persisted = sink.commit(results) if sink is not None else 0
        except BaseException as exc:
            if sink is not None:
                sink.abort()
            _finished(client, record, experiment, "failed", error=f"{type(exc).__name__}: {exc}")
            raise
        _finished(client, record, experiment, "completed", bytes_returned=nbytes(dict(results)),
                  bytes_persisted=persisted)
        notify("completed", {"experiment": experiment})
        return results


def _abandon(client: Client, coalescer: Coalescer, route: Route, member: Member, graph: InterventionGraph,
             reason: str) -> None:
    """Stop the experiment on the shards (a running stage ends before its next decoder layer, its
    state is freed now), leave the route (its call is dropped once no member is left), and drop
    its partial saves."""
    if not coalescer.withdraw(route, member):
        route.launched.wait()  # it was being launched: set within the launching call
        if route.send is not None:
            _stop_on_shards(client, route.record, [member.experiment], reason)
            route.leave(client, member.experiment)
    sink = ZarrSink.from_options(graph.options, member.experiment)
    if sink is not None:
        sink.abort()


def _finished(client: Client, record: Deployment, experiment: str, status: str, **info: Any) -> None:
    announce(client, record, event="finished", experiment=experiment, status=status, **info)


def _current(client: Client, name: str, experiment: str) -> Deployment:
    """The deployment's record now; a clear error when it was undeployed meanwhile."""
    try:
        return get_deployment(client, name)
    except DeploymentError:
        raise DeploymentError(f"experiment {experiment}: {undeployed_message(name)}", name=name,
                              experiment=experiment) from None


def _recover(client: Client, name: str, experiment: str) -> Deployment:
    try:
        return recover(client, name)
    except DeploymentError:
        _current(client, name, experiment)  # undeployed meanwhile: say so
        raise


def _lost_on(client: Client, record: Deployment, experiment: str) -> str | None:
    """The worker that died while ``experiment`` computed on it (``""``: it was only waiting), from
    the scheduler's monitor; ``None`` when there is no monitor to tell."""
    if not record.monitor:
        return None
    try:
        answer = client.sync(getattr(client.scheduler, rpc.LOST_RPC), experiment=experiment)
    except Exception:  # a scheduler with an older monitor: no answer, the loss counts
        return None
    return str(answer.get("lost_on") or "") if answer.get("known") else None


def _spread_if_due(client: Client, name: str, record: Deployment,
                   on_record: Callable[[Deployment], None] | None) -> Deployment:
    """While the cached placement has shards sharing a worker, check (at most every
    ``REBALANCE_CHECK_SECONDS``) whether a worker has joined to spread them (see ``recover``)."""
    if not crowded(record):
        return record
    key, now = (str(client.id), name), time.monotonic()
    if now - _spread_checked.get(key, -REBALANCE_CHECK_SECONDS) < REBALANCE_CHECK_SECONDS:
        return record
    _spread_checked[key] = now
    try:
        fresh = recover(client, name)
    except Exception:  # placement is an optimisation: the experiment runs where the shards are
        return record
    if fresh != record and on_record is not None:
        on_record(fresh)
    return fresh


def _wait(client: Client, coalescer: Coalescer, route: Route, member: Member, deadline: float, limit: float,
          cancelled: threading.Event | None, on_status: Callable[[str, dict[str, Any]], None] | None) -> Results:
    """Wait for the route to leave, then for its answer. The happy path makes no scheduler
    call.

    Every ``POLL_SECONDS`` without a result: check cancellation, lost shard workers, the time
    limit, and (when someone shows progress) the queue position or stage reached.
    """
    shown: tuple[Any, ...] = ()
    while not route.launched.wait(POLL_SECONDS):
        _check_limits(cancelled, deadline, limit)
        if on_status is not None:
            position = coalescer.ahead_of(route)
            if ("queued", position) != shown:
                on_status("queued", {"experiment": member.experiment, "position": position})
                shown = ("queued", position)
    if route.launch_error is not None:
        raise route.launch_error
    record = route.record
    while True:
        try:
            if route.done.wait(POLL_SECONDS):
                outcome = route.outcome().get(member.experiment)
                if isinstance(outcome, BaseException):
                    raise outcome
                if not isinstance(outcome, Results):
                    raise ExperimentFailedError(f"the last stage returned {type(outcome).__name__}, not results")
                return outcome
        except Exception as exc:
            if isinstance(exc, SHARD_GONE) or dead_shards(client, record):
                raise _WorkerLost from None
            raise
        _check_limits(cancelled, deadline, limit)
        if dead_shards(client, record):
            raise _WorkerLost
        if on_status is not None:
            shown = _report_progress(client, record, member.experiment, len(route.stages), on_status, shown)


def _check_limits(cancelled: threading.Event | None, deadline: float, limit: float) -> None:
    if cancelled is not None and cancelled.is_set():
        raise _Cancelled
    if time.monotonic() > deadline:
        raise ExperimentFailedError(f"the experiment did not finish within {limit:g} s (timeout=, "
                                    "nnsight_dask.config.experiment_timeout or the deployment's policy); "
                                    "it was stopped on the shards")


def _report_progress(client: Client, record: Deployment, experiment: str, n_stages: int,
                     on_status: Callable[[str, dict[str, Any]], None], shown: tuple[Any, ...]) -> tuple[Any, ...]:
    """Queued with position k, or running stage k of n (from the monitor); tells ``on_status`` of changes."""
    status: dict[str, Any] = {}
    if record.monitor:
        try:
            status = client.sync(getattr(client.scheduler, rpc.STATUS_RPC), experiment=experiment)
        except Exception:  # a scheduler that lost its monitor: progress without detail
            status = {}
    position, done = int(status.get("position") or 0), int(status.get("stages_done") or 0)
    now: tuple[Any, ...] = ("queued", position) if position else ("running", done)
    if now != shown:
        if position:
            on_status("queued", {"experiment": experiment, "position": position})
        else:
            on_status("running", {"stage": done, "stages": n_stages})
    return now


def _stop_on_shards(client: Client, record: Deployment, experiments: list[str], reason: str) -> None:
    """Stop ``experiments`` on the deployment's live shard workers and free their state there, through
    the worker handler (it runs on the worker's event loop: it does not wait for the running stage)."""
    try:
        alive = set(client.scheduler_info(n_workers=-1)["workers"])
        workers = sorted(set(record.workers) & alive)
        if workers:
            client.sync(client.scheduler.broadcast, msg={"op": CANCEL_HANDLER, "experiments": experiments,
                                                         "reason": reason}, workers=workers, on_error="ignore",
                        callback_timeout=30)
    except Exception:  # e.g. the client is closing: the monitor stops a departed client's experiments
        pass


__all__ = ["launch_route", "run_experiment"]
