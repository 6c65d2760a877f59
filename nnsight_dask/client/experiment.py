"""Experiments on a deployment: a graph becomes a chain of stage tasks pinned to shard workers.

Stage k's future is an argument of stage k+1, so Dask moves the carry (hidden states, values)
straight from one shard's worker to the next. Experiments in flight together from one process
share a chain (:mod:`.coalesce`). The client only waits for the last stage, watching
the deployment: if a shard's worker dies, the chain is cancelled, the lost shard re-created, and
the experiment retried once; every experiment ends completed, failed or cancelled.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from distributed import Client, Future, fire_and_forget
from distributed.client import FutureCancelledError

from .. import config
from ..errors import ExperimentFailedError
from ..execution.partition import assign_shards
from ..execution.stage import Stage, plan_stages
from ..graph.graph import InterventionGraph
from ..scheduler import monitor
from ..storage.results import ZarrSink
from ..tensors import nbytes
from ..worker import tasks
from ..worker.limits import check_graph
from ..worker.results import Results
from .coalesce import Batch, Coalescer, Member, coalescer_for
from .deployment import dead_shards, get_deployment, recover
from .record import Deployment

POLL_SECONDS = 0.2
#: Re-submissions allowed when only the client's cached deployment record was out of date.
STALE_RECORD_RESUBMITS = 3


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


def launch_batch(client: Client, batch: Batch) -> None:
    """Submit a batch's chain of stage tasks; sets ``batch.last``, the last stage's future.

    The last future resolves to ``{experiment: Results | error}``; the scheduler keeps the earlier
    stages for it (cancelling it cancels them), so the client holds no other future and hears of
    no other key. Keys name every member experiment. Each shard's first stage carries the graphs
    (the shard keeps them for its later stages). The deployment's monitor is told who submitted
    what just before, on the same stream.
    """
    record, stages = batch.record, batch.stages
    ids = "+".join(member.experiment for member in batch.members)
    keys = [f"nnsight-{ids}-{position:03d}-{stage.label}" for position, stage in enumerate(stages)]
    for member in batch.members:
        announce(client, record, event="submitted", experiment=member.experiment, deployment=record.name,
                 user=member.user or config.user, keys=keys, shards=[stage.shard for stage in stages],
                 retry_of=member.retry_of, reason=member.reason)
    previous: Future | None = None
    seen: set[int] = set()
    for position, stage in enumerate(stages):
        worker = record.shards[stage.shard].worker
        first_on_shard = stage.shard not in seen
        seen.add(stage.shard)
        members = [(member.experiment, member.graph_json if first_on_shard else None) for member in batch.members]
        previous = client.submit(
            tasks.run_stage, record.name, stage.shard, members, stage, previous, position == len(stages) - 1,
            key=keys[position], workers=[worker], allow_other_workers=False, pure=False)
    assert previous is not None
    batch.last = previous


def shorten_batching(client: Client) -> None:
    """Apply ``config.client_batch_interval`` to the client's stream to the scheduler (see there).

    Checked per experiment because a reconnecting client gets a new stream with Dask's default.
    """
    stream = getattr(client, "scheduler_comm", None)
    interval = config.client_batch_interval
    if interval is not None and stream is not None and getattr(stream, "interval", 0) > interval:
        stream.interval = interval


def announce(client: Client, record: Deployment, **message: Any) -> None:
    """Tell the deployment's monitor (a scheduler plugin) about an experiment, fire-and-forget.

    Goes on the client's existing batched stream to the scheduler (``Client._send_to_scheduler``,
    the call ``client.submit`` itself uses), so it costs no round trip and arrives before the
    stage tasks submitted after it.
    """
    if not record.monitor:
        return
    try:
        client._send_to_scheduler({"op": monitor.STREAM_OP, **message})
    except Exception:  # monitoring must never fail an experiment
        pass


def run_experiment(client: Client, name: str, graph: InterventionGraph, *, module_paths: list[str] | None = None,
                   user: str | None = None, cancelled: threading.Event | None = None,
                   on_status: Callable[[str, dict[str, Any]], None] | None = None,
                   timeout: float | None = None, record: Deployment | None = None,
                   on_record: Callable[[Deployment], None] | None = None) -> Results:
    """Run ``graph`` on deployment ``name`` and return its results (blocking).

    ``record`` is the caller's cached deployment record (saves a scheduler round trip per
    experiment); when the shards have moved since, the fresh record is handed to ``on_record``.
    The graph is checked here to fail fast, and again by every shard with its worker's limits.
    """
    if record is None:
        record = get_deployment(client, name)
    check_graph(graph, module_paths, policy=record.policy)
    graph_json = graph.to_json()
    experiment = new_experiment_id()
    limit = min(timeout if timeout is not None else config.experiment_timeout, record.policy.timeout)
    deadline = time.monotonic() + limit
    notify = on_status or (lambda status, info: None)
    shorten_batching(client)
    coalescer = coalescer_for(client, name, launch_batch)
    retried_from, reason = "", ""
    attempts, resubmits = 0, 0
    while True:
        member = Member(experiment, graph_json, user=user, retry_of=retried_from, reason=reason)
        batch = coalescer.enqueue(member, record, plan_for(record, graph))
        try:
            results = _wait(client, coalescer, batch, member, deadline, cancelled, on_status)
        except _WorkerLost:
            _abandon(client, coalescer, batch, member, graph)
            fresh = get_deployment(client, name)
            if fresh.generation != record.generation and not dead_shards(client, fresh) \
                    and resubmits < STALE_RECORD_RESUBMITS:
                reason, resubmits = "the deployment's shards had moved (cached placement was out of date)", resubmits + 1
            elif attempts == 1:
                error = "a shard's worker died during the run and again during the retry"
                _finished(client, record, experiment, "failed", error=error)
                raise ExperimentFailedError(f"experiment {experiment} on {name!r} failed: {error}",
                                            experiment=experiment) from None
            else:
                reason, attempts = "a shard's worker died", attempts + 1
                notify("retrying", {"experiment": experiment})
                fresh = recover(client, name)
            record = fresh
            if on_record is not None:
                on_record(fresh)
            retried_from, experiment = experiment, new_experiment_id()
            continue
        except _Cancelled:
            _abandon(client, coalescer, batch, member, graph)
            _finished(client, record, experiment, "cancelled")
            raise concurrent.futures.CancelledError(f"experiment {experiment} was cancelled") from None
        except BaseException as exc:
            _abandon(client, coalescer, batch, member, graph)
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
        if persisted or len(batch.members) > 1:
            # the monitor saw the completion itself; news to it are persisted bytes, and this
            # member's share of what a shared last stage returned
            _finished(client, record, experiment, "completed", bytes_returned=nbytes(dict(results)),
                      bytes_persisted=persisted)
        notify("completed", {"experiment": experiment})
        return results


def _abandon(client: Client, coalescer: Coalescer, batch: Batch, member: Member, graph: InterventionGraph) -> None:
    """Leave the batch (its chain is cancelled once no member is left), free the experiment's state
    on the shards and its partial saves."""
    if not coalescer.withdraw(batch, member):
        batch.launched.wait()  # it was being launched: set within the launching call
        if batch.last is not None:
            batch.leave(client, member.experiment)
            _release(client, batch.record, member.experiment)
    sink = ZarrSink.from_options(graph.options, member.experiment)
    if sink is not None:
        sink.abort()


def _finished(client: Client, record: Deployment, experiment: str, status: str, **info: Any) -> None:
    announce(client, record, event="finished", experiment=experiment, status=status, **info)


def _wait(client: Client, coalescer: Coalescer, batch: Batch, member: Member, deadline: float,
          cancelled: threading.Event | None, on_status: Callable[[str, dict[str, Any]], None] | None) -> Results:
    """Wait for the batch to leave, then for its last stage. The happy path makes no scheduler call
    besides fetching the result.

    Every ``POLL_SECONDS`` without a result: check cancellation, lost shard workers, the time
    limit, and (when someone shows progress) the queue position or stage reached.
    """
    shown: tuple[Any, ...] = ()
    while not batch.launched.wait(POLL_SECONDS):
        _check_limits(cancelled, deadline)
        if on_status is not None:
            position = coalescer.ahead_of(batch)
            if ("queued", position) != shown:
                on_status("queued", {"experiment": member.experiment, "position": position})
                shown = ("queued", position)
    if batch.launch_error is not None:
        raise batch.launch_error
    assert batch.last is not None
    record = batch.record
    while True:
        try:
            if batch.done.wait(POLL_SECONDS):
                outcome = batch.outcome().get(member.experiment)
                if isinstance(outcome, BaseException):
                    raise outcome
                if not isinstance(outcome, Results):
                    raise ExperimentFailedError(f"the last stage returned {type(outcome).__name__}, not results")
                return outcome
        except FutureCancelledError:
            if dead_shards(client, record):
                raise _WorkerLost from None
            raise
        except Exception as exc:
            if type(exc).__name__ in ("KilledWorker", "ShardUnavailableError", "ShardStateLostError") or dead_shards(client, record):
                raise _WorkerLost from None
            raise
        _check_limits(cancelled, deadline)
        if dead_shards(client, record):
            raise _WorkerLost
        if on_status is not None:
            shown = _report_progress(client, record, member.experiment, len(batch.stages), on_status, shown)


def _check_limits(cancelled: threading.Event | None, deadline: float) -> None:
    if cancelled is not None and cancelled.is_set():
        raise _Cancelled
    if time.monotonic() > deadline:
        raise ExperimentFailedError(f"the experiment did not finish within {config.experiment_timeout:.0f} s "
                                    "(nnsight_dask.config.experiment_timeout)")


def _report_progress(client: Client, record: Deployment, experiment: str, n_stages: int,
                     on_status: Callable[[str, dict[str, Any]], None], shown: tuple[Any, ...]) -> tuple[Any, ...]:
    """Queued with position k, or running stage k of n (from the monitor); tells ``on_status`` of changes."""
    status: dict[str, Any] = {}
    if record.monitor:
        try:
            status = client.sync(getattr(client.scheduler, monitor.STATUS_RPC), experiment=experiment)
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


def _release(client: Client, record: Deployment, experiment: str) -> None:
    alive = set(client.scheduler_info(n_workers=-1)["workers"])
    for shard in record.shards:
        if shard.worker in alive:
            fire_and_forget(client.submit(tasks.release, record.name, shard.index, experiment,
                                          workers=[shard.worker], pure=False))


__all__ = ["launch_batch", "run_experiment"]
