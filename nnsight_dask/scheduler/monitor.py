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

The monitor serves what the dashboard, the CLI and waiting clients read: rows per experiment
(:meth:`ExperimentMonitor.snapshot`), the queue position of one experiment (scheduler RPC
``nnsight_experiment_status``), ``/nnsight/experiments.json`` and ``/nnsight/metrics`` on the
dashboard server, and our series in Dask's own Prometheus ``/metrics`` when ``prometheus_client``
is installed. Status changes are also logged as scheduler events under :data:`EVENTS`.

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
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from ..dask_compat import task_stream_add
from ..worker.plugin import CANCEL_HANDLER
from ..worker.telemetry import RUNNING_TOPIC, STAGES_TOPIC

#: Name of the plugin on the scheduler.
NAME = "nnsight-dask-monitor"
#: Stream op a client sends (fire-and-forget) when it submits or finishes an experiment.
STREAM_OP = "nnsight-experiment"
#: Scheduler RPC a waiting client calls (only when its experiment is slow) for its queue position.
STATUS_RPC = "nnsight_experiment_status"
#: Scheduler RPC a client calls after losing a shard's worker: was its experiment computing there?
LOST_RPC = "nnsight_experiment_lost_on"
#: Scheduler RPC returning :meth:`ExperimentMonitor.snapshot` (the CLI's ``status``).
SNAPSHOT_RPC = "nnsight_experiments"
#: Event topic with one event per experiment status change (``client.get_events(EVENTS)``).
EVENTS = "nnsight-dask-experiments"
FINISHED = ("completed", "failed", "cancelled", "retried")
STATUSES = ("queued", "running", *FINISHED)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Finished experiments kept for the page and the JSON endpoint (the counters keep counting).
KEEP_FINISHED = 2000


@dataclass
class ExperimentRecord:
    """What the scheduler knows of one experiment."""

    experiment: str
    deployment: str
    user: str
    #: Its chain's length, and the shard of each stage.
    stages: int
    shards: list[int]
    submitted: float
    retry_of: str = ""
    status: str = "queued"
    started: float | None = None
    ended: float | None = None
    stages_done: int = 0
    #: The experiments it travelled with on the direct route (``a+b+c``; itself alone when it went alone).
    route: str = ""
    bytes_returned: int = 0
    bytes_persisted: int = 0
    error: str = ""
    #: The client that submitted it (its id on the scheduler) and the workers of its shards.
    client: str = ""
    workers: list[str] = field(default_factory=list)
    #: The worker that died while this experiment was computing on it ("" if none did).
    lost_on: str = ""
    #: Who vouches for ``user``: "gateway" (a registered gateway checked it against an API key) or
    #: "client" (the name a Dask client gave itself, see ``nd.config.user``).
    via: str = "client"
    #: Experiments it shared forward passes with on the shards (co-tenant batching).
    cotenants: set[str] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass
class ShardRecord:
    deployment: str
    shard: int
    worker: str = ""
    stages_run: int = 0
    busy_seconds: float = 0.0
    #: Shared forward passes by how many experiments they ran (from the shards' batch events).
    shared_passes: dict[int, int] = field(default_factory=dict)


class ExperimentMonitor(SchedulerPlugin):
    """Follows experiments from their clients' and shards' messages; see the module docstring."""

    name = NAME
    idempotent = True  # registering again (every ``serve``, the dashboard preload) keeps the data

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.experiments: OrderedDict[str, ExperimentRecord] = OrderedDict()
        #: Experiments with no stage done yet, in submission order (what queue positions count).
        self.waiting: dict[str, ExperimentRecord] = {}
        self.shards: dict[tuple[str, int], ShardRecord] = {}
        self.totals: dict[str, int] = dict.fromkeys(STATUSES, 0)
        self.latencies: list[int] = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.bytes_returned_total = 0
        self.bytes_persisted_total = 0
        #: Worker -> the experiment computing there now (from the shards' events).
        self.executing: dict[str, str] = {}
        #: Dask clients of registered HTTP gateways (:meth:`trust_gateway`): the users they stamp were
        #: authenticated. Registering takes a Dask client, which is trusted with everything anyway.
        self.gateways: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()

    # -- plugin hooks --------------------------------------------------------------------------
    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.stream_handlers[STREAM_OP] = self.handle_message
        scheduler.handlers[STATUS_RPC] = self.experiment_status
        scheduler.handlers[LOST_RPC] = self.experiment_lost_on
        scheduler.handlers[SNAPSHOT_RPC] = self.snapshot
        _add_http_routes(scheduler, self)
        _register_prometheus(self)

    def log_event(self, topic: str, msg: Any) -> None:
        """Events from the workers: passes shards ran, and who computes where now (module docstring)."""
        if not isinstance(msg, dict):
            return
        if topic == STAGES_TOPIC:
            worker = str(msg.get("worker") or "")
            for entry in msg.get("passes") or ():
                try:
                    self._pass(worker, entry)
                except (KeyError, TypeError, ValueError):  # a malformed entry must not stop the others
                    continue
        elif topic == RUNNING_TOPIC and msg.get("worker"):
            self.executing[msg["worker"]] = str(msg.get("experiment") or "")

    def _pass(self, worker: str, entry: dict[str, Any]) -> None:
        """A shard ran a pass: count its stages and busy time, note co-tenants, draw it in the task stream."""
        key = (str(entry["deployment"]), int(entry["shard"]))
        experiments = [str(e) for e in entry["experiments"]]
        start, stop = float(entry["start"]), float(entry["stop"])
        shard = self.shards.setdefault(key, ShardRecord(*key))
        shard.worker = worker or shard.worker
        shard.stages_run += 1
        shard.busy_seconds += stop - start
        if len(experiments) > 1:
            shard.shared_passes[len(experiments)] = shard.shared_passes.get(len(experiments), 0) + 1
        for experiment in experiments:
            record = self.experiments.get(experiment)
            if record is None:
                continue
            record.stages_done += 1
            self.waiting.pop(experiment, None)
            if record.started is None or start < record.started:
                record.started = start
            if len(experiments) > 1:
                record.cotenants.update(e for e in experiments if e != experiment)
            if record.status == "queued":
                record.status = "running"
                self._log(record)
        labels = entry.get("labels") or [""]
        task_stream_add(self.scheduler, {
            "key": f"nnsight-{'+'.join(experiments)}-{labels[0]}", "worker": worker,
            "thread": entry.get("thread", key[1]), "status": "OK", "nbytes": 0, "type": "", "typename": "",
            "metadata": {}, "startstops": [{"action": "compute", "start": start, "stop": stop}]})

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        """A worker left: the unfinished experiment it was computing (if it said so) is marked ``lost_on`` it."""
        computing = self.executing.pop(worker, None)
        record = self.experiments.get(computing or "")
        if record is not None and not record.finished and worker in record.workers:
            record.lost_on = worker

    def remove_client(self, scheduler: Any, client: str) -> None:
        """A client left (closed, or its process died): stop its unfinished experiments on their shards."""
        self.gateways.discard(client)
        by_workers: dict[str, list[str]] = {}
        for record in self.experiments.values():
            if record.client == client and record.status not in ("completed", "failed"):
                for worker in record.workers:
                    by_workers.setdefault(worker, []).append(record.experiment)
        alive = {w: e for w, e in by_workers.items() if w in scheduler.workers}
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

    def trust_gateway(self, client: str) -> None:
        """Mark experiments of Dask client ``client`` (an HTTP gateway) as stamped with authenticated users."""
        self.gateways.add(client)

    # -- messages from clients -----------------------------------------------------------------
    def handle_message(self, client: str = "", event: str = "", **message: Any) -> None:
        """``event="submitted"`` when the experiment leaves; ``"finished"`` once the client has the result.

        ``client`` is the sender's id, added by Dask's stream handling: a client that leaves has its
        unfinished experiments stopped (:meth:`remove_client`).
        """
        if event == "submitted":
            self._submitted(message, client)
        elif event == "finished":
            record = self.experiments.get(message.get("experiment", ""))
            if record is None:
                return
            for name in ("bytes_returned", "bytes_persisted"):
                value = int(message.get(name) or 0)
                setattr(self, f"{name}_total", getattr(self, f"{name}_total") + value - getattr(record, name))
                setattr(record, name, value)
            status = message.get("status")
            if status == record.status == "failed" and message.get("error"):
                record.error = message["error"]  # the client's text reads better than the scheduler's repr()
            elif status in FINISHED and not record.finished:
                self._finish(record, status, error=message.get("error") or "")
            elif status in ("failed", "cancelled") and record.status == "completed":
                # the chain completed but the client refused the result (e.g. too large inline), or
                # the experiment was stopped on the shards while the chain it shared went on
                self._recount(record, status, error=message.get("error") or "")

    def _submitted(self, message: dict[str, Any], client: str = "") -> None:
        record = ExperimentRecord(
            experiment=message["experiment"], deployment=message.get("deployment", ""),
            user=message.get("user") or "", stages=int(message.get("stages") or 0),
            route=str(message.get("route") or message["experiment"]),
            shards=list(message.get("shards", [])), submitted=time.time(), retry_of=message.get("retry_of") or "",
            client=client, workers=sorted(set(message.get("workers") or ())),
            via="gateway" if client in self.gateways else "client")
        self.experiments[record.experiment] = record
        self.totals["queued"] += 1
        self.waiting[record.experiment] = record
        previous = self.experiments.get(record.retry_of)
        if previous is not None and not previous.finished:
            self._finish(previous, "retried", error=message.get("reason") or "")
        elif previous is not None and previous.status == "cancelled":  # its client cancelled it to retry
            self._recount(previous, "retried", error=message.get("reason") or "")
        self._log(record)
        self._trim()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _finish(self, record: ExperimentRecord, status: str, error: str = "", ended: float | None = None) -> None:
        if record.status == "queued" and status in ("completed", "failed"):
            # it ran before the shards' report of it arrived (they report every 0.2 s): the event
            # stream still tells every status it went through
            record.status = "running"
            self._log(record)
        record.status = status
        record.ended = ended or time.time()
        record.error = error or record.error
        self.totals[status] += 1
        if status in ("completed", "failed"):
            seconds = record.ended - (record.started or record.submitted)
            self.latency_sum += seconds
            self.latencies[next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))] += 1
        self.waiting.pop(record.experiment, None)
        self._log(record)

    def _recount(self, record: ExperimentRecord, status: str, error: str) -> None:
        self.totals[record.status] -= 1
        self.totals[status] += 1
        record.status, record.error = status, error
        self._log(record)

    def _log(self, record: ExperimentRecord) -> None:
        if self.scheduler is not None:
            self.scheduler.log_event(EVENTS, {
                "experiment": record.experiment, "deployment": record.deployment, "user": record.user,
                "status": record.status, **({"error": record.error} if record.error else {})})

    def _trim(self) -> None:
        """Forget the oldest finished experiments beyond ``KEEP_FINISHED`` (in batches: O(1) amortized)."""
        if len(self.experiments) <= KEEP_FINISHED + KEEP_FINISHED // 4:
            return
        finished = [k for k, r in self.experiments.items() if r.finished]
        for key in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self.experiments[key]

    # -- reading -------------------------------------------------------------------------------
    def queue_position(self, record: ExperimentRecord) -> int:
        """Experiments of the same deployment submitted earlier that have not finished a stage yet."""
        if record.experiment not in self.waiting:
            return 0
        position = 0
        for other in self.waiting.values():
            if other is record:
                return position
            position += other.deployment == record.deployment
        return position

    def live_status(self, record: ExperimentRecord) -> str:
        if record.status == "queued" and record.experiment in self.executing.values():
            return "running"
        return record.status

    def experiment_status(self, experiment: str) -> dict[str, Any]:
        record = self.experiments.get(experiment)
        if record is None:
            return {"status": "unknown"}
        return {"status": self.live_status(record), "position": self.queue_position(record),
                "stages_done": record.stages_done, "stages": record.stages}

    def experiment_lost_on(self, experiment: str) -> dict[str, Any]:
        """``{"known": True, "lost_on": worker or ""}``: the worker that died while ``experiment``
        computed on it ("" if none did); ``{"known": False}`` for an experiment it never saw."""
        record = self.experiments.get(experiment)
        return {"known": False} if record is None else {"known": True, "lost_on": record.lost_on}

    def rows(self) -> list[dict[str, Any]]:
        """One row per experiment, newest first."""
        out = []
        for record in reversed(self.experiments.values()):
            start = record.started
            out.append({
                "experiment": record.experiment, "user": record.user, "deployment": record.deployment,
                "status": self.live_status(record), "position": self.queue_position(record),
                "submitted": record.submitted,
                # worker and scheduler clocks may differ by a fraction of a millisecond
                "queue_wait": round(max(0.0, start - record.submitted), 4) if start is not None else None,
                "run_time": round(record.ended - (start or record.submitted), 4) if record.ended else None,
                "stages": f"{record.stages_done}/{record.stages}",
                "shards": ",".join(str(s) for s in sorted(set(record.shards))),
                "bytes_returned": record.bytes_returned, "bytes_persisted": record.bytes_persisted,
                "error": record.error, "retry_of": record.retry_of, "via": record.via,
                "shared_with": len(record.cotenants), "cotenants": " ".join(sorted(record.cotenants)[:20]),
            })
        return out

    def shard_rows(self) -> list[dict[str, Any]]:
        """Per deployment shard: unfinished experiments with a stage there, stages run, busy time."""
        in_flight: dict[tuple[str, int], int] = {}
        for record in self.experiments.values():
            if record.finished:
                continue
            for shard in set(record.shards):
                in_flight[(record.deployment, shard)] = in_flight.get((record.deployment, shard), 0) + 1
                self.shards.setdefault((record.deployment, shard), ShardRecord(record.deployment, shard))
        return [{"deployment": d, "shard": s, "worker": r.worker, "in_flight": in_flight.get((d, s), 0),
                 "stages_run": r.stages_run, "busy_seconds": round(r.busy_seconds, 4),
                 "shared_passes": " ".join(f"{size}x{count}" for size, count in sorted(r.shared_passes.items())),
                 "batch_sizes": {str(size): count for size, count in sorted(r.shared_passes.items())}}
                for (d, s), r in sorted(self.shards.items())]

    def snapshot(self) -> dict[str, Any]:
        return {"experiments": self.rows(), "shards": self.shard_rows()}

    def prometheus_text(self) -> str:
        """Experiments by status, latency histogram, bytes returned/persisted (Prometheus text format)."""
        live: dict[str, int] = dict.fromkeys(STATUSES, 0)
        for record in self.experiments.values():
            live[self.live_status(record)] += 1
        lines = ["# HELP nnsight_dask_experiments Experiments by current status (queued/running now; finished ones kept).",
                 "# TYPE nnsight_dask_experiments gauge"]
        lines += [f'nnsight_dask_experiments{{status="{s}"}} {live[s]}' for s in STATUSES]
        lines += ["# HELP nnsight_dask_experiments_total Experiments that reached each status since the scheduler started.",
                  "# TYPE nnsight_dask_experiments_total counter"]
        lines += [f'nnsight_dask_experiments_total{{status="{s}"}} {self.totals[s]}' for s in STATUSES]
        lines += ["# HELP nnsight_dask_experiment_seconds Run time of completed and failed experiments.",
                  "# TYPE nnsight_dask_experiment_seconds histogram"]
        cumulative = 0
        for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), self.latencies):
            cumulative += count
            lines.append(f'nnsight_dask_experiment_seconds_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f"nnsight_dask_experiment_seconds_sum {self.latency_sum}")
        lines.append(f"nnsight_dask_experiment_seconds_count {cumulative}")
        lines += ["# HELP nnsight_dask_shared_passes_total Forward passes shards ran for several experiments at once, "
                  "by how many (co-tenant batching; passes run alone are not counted).",
                  "# TYPE nnsight_dask_shared_passes_total counter"]
        lines += [f'nnsight_dask_shared_passes_total{{deployment="{d}",shard="{s}",size="{size}"}} {count}'
                  for (d, s), r in sorted(self.shards.items()) for size, count in sorted(r.shared_passes.items())]
        for name, value in (("returned", self.bytes_returned_total), ("persisted", self.bytes_persisted_total)):
            lines += [f"# HELP nnsight_dask_bytes_{name}_total Bytes of saved values {name} (inline results / Zarr).",
                      f"# TYPE nnsight_dask_bytes_{name}_total counter", f"nnsight_dask_bytes_{name}_total {value}"]
        return "\n".join(lines) + "\n"


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


def _add_http_routes(scheduler: Any, monitor: ExperimentMonitor) -> None:
    application = getattr(scheduler, "http_application", None)
    if application is None or getattr(application, "_nnsight_routes", False):
        return
    from tornado import web

    class ExperimentsJSON(web.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "application/json")
            self.write(json.dumps(monitor.snapshot()))

    class Metrics(web.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "text/plain; version=0.0.4")
            self.write(monitor.prometheus_text())

    application.add_handlers(r".*", [(r"/nnsight/experiments.json", ExperimentsJSON), (r"/nnsight/metrics", Metrics)])
    application._nnsight_routes = True


def _register_prometheus(monitor: ExperimentMonitor) -> None:
    """Our series in Dask's own ``/metrics`` (it serves prometheus_client's global registry)."""
    try:
        from prometheus_client import REGISTRY
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return

    class Collector:
        def collect(self) -> Any:
            return text_string_to_metric_families(monitor.prometheus_text())

        def describe(self) -> list[Any]:
            return []  # no fixed description: collected fresh on every scrape

    previous = getattr(REGISTRY, "_nnsight_collector", None)
    if previous is not None:
        REGISTRY.unregister(previous)
    collector = Collector()
    REGISTRY.register(collector)
    REGISTRY._nnsight_collector = collector  # type: ignore[attr-defined]
