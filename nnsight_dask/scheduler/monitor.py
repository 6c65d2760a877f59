"""ExperimentMonitor: a scheduler plugin that follows every experiment from the scheduler's side.

Why a plugin, fed this way: experiments travel the direct route, worker to worker
(:mod:`nnsight_dask.worker.routing`), so the scheduler is on no experiment's path; what it knows, it
is told at a cost that keeps it off the critical path too. The client sends two fire-and-forget
messages on its existing scheduler stream (Dask batches them with its other messages): who
submitted what when the experiment leaves, how it ended when the client has its answer. Each
shard worker sends the passes its shards ran every :data:`~nnsight_dask.worker.telemetry.FLUSH_SECONDS`
in one event (:data:`~nnsight_dask.worker.telemetry.STAGES_TOPIC`): the monitor counts stages,
busy time and co-tenants from them, and draws them in Dask's task stream, named
``nnsight-<experiment>+<experiment>...-p<pass>-t<step>-<fwd|bwd>-s<shard>``.

This module is the plugin: Dask's hooks and the wiring. What it knows is its state
(:class:`~.book.ExperimentBook`, which it extends); each reader has a module of its own: the
scheduler RPCs clients call (:mod:`.rpc`), ``/nnsight/experiments.json`` and ``/nnsight/metrics`` on
the dashboard server (:mod:`.http_routes`), the Prometheus export (:mod:`.prometheus`), and the
dashboard's Experiments page (:mod:`.experiments_page`), whose plots read the time series
(:mod:`.series`) that a periodic callback of the scheduler (:data:`SAMPLER`) samples once a second,
so that no reader adds work per experiment. Status changes are also logged as scheduler events
under :data:`EVENTS`.

Two lifecycle duties ride on what the monitor sees:

- **Who was running when a worker died.** Shards tell which experiment computes on their worker
  when that can matter (:data:`~nnsight_dask.worker.telemetry.RUNNING_TOPIC`: a stage that runs
  long, or has company waiting). When a worker dies, the unfinished experiment it was computing is
  marked ``lost_on`` that worker; experiments only queued there, or in a stage elsewhere, are not.
  A client retries the unmarked ones without counting the loss against them (it asks with the
  scheduler RPC ``nnsight_experiment_lost_on``).
- **Clients that leave.** Each submission arrives on its client's stream, so the monitor knows the
  client of every experiment; when the scheduler removes a client, its unfinished experiments are
  stopped on the shard workers (worker handler :data:`~nnsight_dask.worker.plugin.CANCEL_HANDLER`),
  which frees their state (KV caches) at once instead of after the shards' stale timeout.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from ..dask_compat import task_stream_add
from ..worker.plugin import CANCEL_HANDLER
from ..worker.telemetry import RUNNING_TOPIC, STAGES_TOPIC
from . import http_routes, prometheus, rpc
from .book import ExperimentBook
from .records import ExperimentRecord
from .series import SAMPLE_SECONDS

#: Name of the plugin on the scheduler.
NAME = "nnsight-dask-monitor"
#: Stream op a client sends (fire-and-forget) when it submits or finishes an experiment.
STREAM_OP = "nnsight-experiment"
#: Event topic with one event per experiment status change (``client.get_events(EVENTS)``).
EVENTS = "nnsight-dask-experiments"
#: Name of the scheduler's periodic callback that samples the plotted series (:meth:`ExperimentBook.sample`).
SAMPLER = "nnsight-dask-series"


class ExperimentMonitor(SchedulerPlugin, ExperimentBook):
    """Follows experiments from their clients' and shards' messages; see the module docstring."""

    name = NAME
    idempotent = True  # registering again (every ``serve``, the dashboard preload) keeps the data

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        ExperimentBook.__init__(self, clock)
        self.scheduler: Any = None
        self._background: set[asyncio.Task[Any]] = set()

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.stream_handlers[STREAM_OP] = self.handle_message
        rpc.install(scheduler, self)
        http_routes.install(scheduler, self)
        prometheus.register(self)
        sampler = PeriodicCallback(self.sample, SAMPLE_SECONDS * 1000)
        scheduler.periodic_callbacks[SAMPLER] = sampler
        sampler.start()

    def handle_message(self, client: str = "", event: str = "", **message: Any) -> None:
        """``event="submitted"`` when the experiment leaves; ``"finished"`` once the client has the result.

        ``client`` is the sender's id, added by Dask's stream handling: a client that leaves has its
        unfinished experiments stopped (:meth:`remove_client`).
        """
        if event == "submitted":
            self.submitted(message, client)
        elif event == "finished":
            self.finished(message)

    def log_event(self, topic: str, msg: Any) -> None:
        """Events from the workers: passes shards ran, and who computes where now (module docstring)."""
        if not isinstance(msg, dict):
            return
        if topic == STAGES_TOPIC:
            worker = str(msg.get("worker") or "")
            for entry in msg.get("passes") or ():
                try:
                    self.record_pass(worker, entry)
                    self._draw(worker, entry)
                except (KeyError, TypeError, ValueError):  # a malformed entry must not stop the others
                    continue
        elif topic == RUNNING_TOPIC and msg.get("worker"):
            self.executing[msg["worker"]] = str(msg.get("experiment") or "")

    def _draw(self, worker: str, entry: dict[str, Any]) -> None:
        """The pass in Dask's task stream, as if a task had run it."""
        labels = entry.get("labels") or [""]
        task_stream_add(self.scheduler, {
            "key": f"nnsight-{'+'.join(str(e) for e in entry['experiments'])}-{labels[0]}", "worker": worker,
            "thread": entry.get("thread", entry["shard"]), "status": "OK", "nbytes": 0, "type": "", "typename": "",
            "metadata": {}, "startstops": [{"action": "compute", "start": float(entry["start"]),
                                            "stop": float(entry["stop"])}]})

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        """A worker left: the unfinished experiment it was computing (if it said so) is marked ``lost_on`` it."""
        self.worker_lost(worker)

    def remove_client(self, scheduler: Any, client: str) -> None:
        """A client left (closed, or its process died): stop its unfinished experiments on their shards."""
        self.gateways.discard(client)
        alive = {w: e for w, e in self.unfinished_of(client).items() if w in scheduler.workers}
        if not alive:
            return
        reason = f"its client {client} left the cluster"

        async def cancel() -> None:
            await asyncio.gather(*(scheduler.broadcast(
                msg={"op": CANCEL_HANDLER, "experiments": experiments, "reason": reason},
                workers=[worker], on_error="ignore") for worker, experiments in alive.items()))

        task = asyncio.ensure_future(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def status_changed(self, record: ExperimentRecord) -> None:
        """Every status change is a scheduler event (``client.get_events(EVENTS)``)."""
        if self.scheduler is not None:
            self.scheduler.log_event(EVENTS, {
                "experiment": record.experiment, "deployment": record.deployment, "user": record.user,
                "status": record.status, **({"error": record.error} if record.error else {})})


def monitor_of(scheduler: Any) -> ExperimentMonitor | None:
    plugin = scheduler.plugins.get(NAME)
    return plugin if isinstance(plugin, ExperimentMonitor) else None


def install(scheduler: Any) -> ExperimentMonitor:
    """Add the monitor to a scheduler in-process (the dashboard preload); idempotent."""
    monitor = monitor_of(scheduler)
    if monitor is None:
        monitor = ExperimentMonitor()
        scheduler.add_plugin(monitor, name=NAME, idempotent=True)
    return monitor
