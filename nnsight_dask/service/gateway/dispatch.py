"""Admission, fair queueing and running of the gateway's experiments.

An accepted experiment waits in its deployment's :class:`~.fairqueue.FairQueue` (light users
first, then round robin across users) until one of the deployment's ``max_in_flight`` slots is free
and its user holds fewer than ``max_in_flight_per_user`` of them, then runs in one of the dispatcher's
``max_in_flight`` threads (kept, not started per experiment: starting a thread cost the gateway
about 0.4 ms of CPU an experiment) through :func:`~nnsight_dask.client.experiment.run_experiment`,
the same path a Dask client takes (the graph the gateway validated is not checked again there; the
shards check it with their own settings): it is stamped with the user, announced to the scheduler's monitor, stopped on the shards
when cancelled or timed out, retried when a shard's worker dies. Experiments running together from
the gateway travel together on the direct route and meet on the shards, whoever sent them.

Every status change is written to the :class:`~.state.StateStore` and handed to ``publish`` (the
server's event hub). A user's experiments queued or running at once are bounded by the user's
``max_concurrent``; beyond it :meth:`Dispatcher.admit` raises :class:`QuotaExceeded`.
"""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distributed import Client

from ...client.experiment import plan_for, run_experiment
from ...http_wire import encode_results, error_to_json
from ...errors import NNsightDaskError
from ...graph.graph import InterventionGraph
from ...storage.results import TensorRef
from .deployments import DeploymentCache
from .fairqueue import FairQueue
from .keys import User
from .state import CANCELLED, COMPLETED, FAILED, QUEUED, RECEIVED, RUNNING, StateStore


class QuotaExceeded(NNsightDaskError):
    """A user asked for more than their limit (HTTP 429)."""


@dataclass(eq=False)
class Job:
    """One accepted experiment, from its admission until it ends."""

    id: str
    user: User
    deployment: str
    graph: InterventionGraph
    #: Seconds without anyone watching (status requests, an open event stream) after which the
    #: experiment is cancelled; None: it runs to its end whoever watches.
    keepalive: float | None = None
    last_seen: float = field(default_factory=time.monotonic)
    #: Open event streams and status requests waiting on it (kept by the event loop's handlers).
    watchers: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    #: Why and as what it ends when cancelled (the owner's cancel, a lapsed keepalive, a stopping gateway).
    cancel_reason: str = "cancelled by its owner"
    cancel_status: str = CANCELLED
    #: The latest event published for it (a new watcher starts from this).
    event: dict[str, Any] = field(default_factory=dict)

    def seen(self) -> None:
        self.last_seen = time.monotonic()


class Dispatcher:
    """Queues and runs the gateway's experiments (thread-safe; see the module docstring)."""

    def __init__(self, client: Client, deployments: DeploymentCache, state: StateStore,
                 publish: Callable[[str, dict[str, Any]], None], max_in_flight: int,
                 max_in_flight_per_user: int) -> None:
        self.client = client
        self.deployments = deployments
        self.state = state
        self.publish = publish
        self.max_in_flight = max_in_flight
        self.max_in_flight_per_user = max(1, min(max_in_flight_per_user, max_in_flight))
        self._lock = threading.RLock()  # events are published under it, so they keep their order
        self._queues: dict[str, FairQueue[Job]] = {}
        self._running: dict[str, set[Job]] = {}
        #: Unfinished jobs by id.
        self.jobs: dict[str, Job] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, max_in_flight), thread_name_prefix="nnsight-gateway")
        self._runs: set[concurrent.futures.Future[None]] = set()
        self._stopping = False

    # -- admission -------------------------------------------------------------------------------
    def active(self, user: str) -> int:
        """How many experiments ``user`` has queued or running."""
        with self._lock:
            return sum(1 for job in self.jobs.values() if job.user.name == user)

    def admit(self, job: Job) -> None:
        """Record and queue ``job``; :class:`QuotaExceeded` (nothing recorded) over the user's limit."""
        with self._lock:
            if self._stopping:
                raise QuotaExceeded("the gateway is stopping; submit again once it is back", limit="stopping")
            active = self.active(job.user.name)
            if active >= job.user.max_concurrent:
                raise QuotaExceeded(
                    f"user {job.user.name!r} already has {active} experiment(s) queued or running, the most "
                    f"allowed (max_concurrent = {job.user.max_concurrent} in the gateway's keys.toml); "
                    "wait for one to finish", limit="max_concurrent", value=job.user.max_concurrent)
            self.jobs[job.id] = job
        # stored as QUEUED at once: a thread may start it as soon as it is pushed
        self.state.add(job.id, job.user.name, job.deployment, status=QUEUED)
        self._event(job, {"status": RECEIVED, "deployment": job.deployment})
        with self._lock:  # pushed and announced in one step: its QUEUED event comes before RUNNING
            self._queues.setdefault(job.deployment, FairQueue()).push(job.user.name, job)
            self._publish_positions(job.deployment)
        self._start_ready(job.deployment)

    def cancel(self, job: Job, reason: str | None = None, status: str = CANCELLED) -> None:
        """Stop ``job``: out of the queue at once, or on the shards within a poll of its thread."""
        with self._lock:
            if reason is not None:
                job.cancel_reason, job.cancel_status = reason, status
            job.cancel.set()
            waiting = self._queues.get(job.deployment)
            removed = waiting is not None and waiting.remove(job.user.name, job)
        if removed:
            self._end(job, job.cancel_status, error=self._cancel_error(job))
            self._publish_positions(job.deployment)

    def expire(self) -> None:
        """Cancel experiments whose keepalive lapsed (nobody watched them for that long)."""
        now = time.monotonic()
        with self._lock:
            lapsed = [job for job in self.jobs.values() if job.keepalive is not None and not job.watchers
                      and now - job.last_seen > job.keepalive and not job.cancel.is_set()]
        for job in lapsed:
            self.cancel(job, f"nobody watched it for {job.keepalive:g} s (its keepalive): its client is gone")

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new experiments, end queued ones and stop running ones (all FAILED with the reason)."""
        with self._lock:
            self._stopping = True
            jobs = list(self.jobs.values())
        for job in jobs:
            self.cancel(job, "the gateway stopped before the experiment finished; submit it again", FAILED)
        deadline = time.monotonic() + timeout
        concurrent.futures.wait(list(self._runs), max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False)

    # -- running ---------------------------------------------------------------------------------
    def _start_ready(self, deployment: str) -> None:
        """Start waiting experiments while the deployment has free slots, in the fair queue's order."""
        started = []
        with self._lock:
            running = self._running.setdefault(deployment, set())
            queue = self._queues.get(deployment)
            held: dict[str, int] = {}
            for job in running:
                held[job.user.name] = held.get(job.user.name, 0) + 1
            while queue is not None and len(running) < self.max_in_flight and not self._stopping:
                job = queue.pop(held, self.max_in_flight_per_user)
                if job is None:
                    break
                running.add(job)
                held[job.user.name] = held.get(job.user.name, 0) + 1
                started.append(job)
        for job in started:
            run = self._pool.submit(self._run, job)
            with self._lock:
                self._runs.add(run)
            run.add_done_callback(self._ran)
        if started:
            self._publish_positions(deployment)

    def _run(self, job: Job) -> None:
        try:
            served = self.deployments.get(job.deployment)
            stages = len(plan_for(served.record, job.graph))
            self.state.update(job.id, status=RUNNING, started=time.time())
            self._event(job, {"status": RUNNING, "stage": 1, "stages": stages})

            def progress(status: str, info: dict[str, Any]) -> None:
                if status == "running":
                    n = int(info.get("stages") or stages)
                    self._event(job, {"status": RUNNING, "stage": min(int(info.get("stage") or 0) + 1, n), "stages": n})

            results = run_experiment(self.client, job.deployment, job.graph, module_paths=served.module_paths,
                                     checked=True, user=job.user.name, cancelled=job.cancel, on_status=progress,
                                     record=served.record, on_record=self.deployments.update)
            refs: list[TensorRef] = []
            document = encode_results(dict(results), results.logs, lambda ref: _ref_json(ref, refs))
            self.state.save_result(job.id, json.dumps(document, separators=(",", ":")).encode())
            store = {"store_url": refs[0].url, "store_prefix": refs[0].path.split("/", 1)[0]} if refs else {}
            self._end(job, COMPLETED, **store)
        except concurrent.futures.CancelledError as exc:
            if not job.cancel.is_set():  # not ours (e.g. the gateway's Dask client closed): a failure
                self._end(job, FAILED, error=error_to_json(exc))
            else:
                self._end(job, job.cancel_status, error=self._cancel_error(job))
        except BaseException as exc:  # every experiment ends with a status; the reason goes to its owner
            self._end(job, FAILED, error=error_to_json(exc))
        finally:
            with self._lock:
                self._running.get(job.deployment, set()).discard(job)
            self._start_ready(job.deployment)

    def _ran(self, run: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._runs.discard(run)

    # -- statuses --------------------------------------------------------------------------------
    def _cancel_error(self, job: Job) -> dict[str, Any]:
        kind = "CancelledError" if job.cancel_status == CANCELLED else "ExperimentFailedError"
        return {"type": kind, "message": f"experiment {job.id} {job.cancel_reason}", "fields": {}}

    def _end(self, job: Job, status: str, *, error: dict[str, Any] | None = None, **columns: Any) -> None:
        with self._lock:
            if self.jobs.pop(job.id, None) is None:
                return  # already ended (cancelled while it finished)
        self.state.update(job.id, status=status, ended=time.time(), error=error, **columns)
        self._event(job, {"status": status, **({"error": error} if error else {})})

    def _event(self, job: Job, event: dict[str, Any]) -> None:
        with self._lock:
            job.event = {"experiment": job.id, **event}
            self.publish(job.id, job.event)

    def _publish_positions(self, deployment: str) -> None:
        """Tell every waiting experiment of ``deployment`` its place when it changed."""
        with self._lock:
            queue = self._queues.get(deployment)
            if queue is None:
                return
            for job in [job for job in self.jobs.values() if job.deployment == deployment]:
                position = queue.position(job.user.name, job)
                if position is not None and job.event.get("position") != position:
                    self._event(job, {"status": QUEUED, "position": position})


def _ref_json(ref: TensorRef, seen: list[TensorRef]) -> dict[str, Any]:
    """A persisted save as its owner sees it: where it is, never how to authenticate there."""
    seen.append(ref)
    return {"url": ref.url, "path": ref.path, "shape": list(ref.shape), "dtype": ref.dtype}
