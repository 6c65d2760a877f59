"""The experiment monitor's state: what the scheduler knows of every experiment and shard.

Fed by the monitor plugin (:mod:`.monitor`) from clients' stream messages and the shards' batched
telemetry; read by the scheduler RPCs (:mod:`.rpc`), the HTTP endpoints (:mod:`.http_routes`), the
Prometheus export (:mod:`.prometheus`) and the dashboard's pages (:mod:`.experiments_page`). Work per
experiment stays a few dictionary updates; whatever adds up (the run-time histogram, the plotted
series) is done by :meth:`ExperimentBook.fold` and :meth:`ExperimentBook.sample`, periodically.
"""
from __future__ import annotations

import bisect
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .records import FINISHED, LATENCY_BUCKETS, STATUSES, ExperimentRecord, ShardRecord
from .series import Finished, Series

#: Finished experiments kept for the page and the JSON endpoint (the counters keep counting).
KEEP_FINISHED = 2000


class ExperimentBook:
    """Experiments and shards as the scheduler's monitor knows them; no Dask in here."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        #: The scheduler's wall clock (a benchmark drives its own).
        self.clock = clock
        self.experiments: OrderedDict[str, ExperimentRecord] = OrderedDict()
        #: Experiments with no stage done yet, in submission order (what queue positions count).
        self.waiting: dict[str, ExperimentRecord] = {}
        self.shards: dict[tuple[str, int], ShardRecord] = {}
        self.totals: dict[str, int] = dict.fromkeys(STATUSES, 0)
        #: Run times of completed and failed experiments: counts per ``LATENCY_BUCKETS`` bucket, sum.
        self.latencies: list[int] = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        #: Completed and failed experiments since the last :meth:`fold`.
        self._unfolded: list[Finished] = []
        self.series = Series()
        self.bytes_returned_total = 0
        self.bytes_persisted_total = 0
        #: Worker -> the experiment computing there now (from the shards' events).
        self.executing: dict[str, str] = {}
        #: Dask clients of registered HTTP gateways (:meth:`trust_gateway`): the users they stamp were
        #: authenticated. Registering takes a Dask client, which is trusted with everything anyway.
        self.gateways: set[str] = set()

    def trust_gateway(self, client: str) -> None:
        """Mark experiments of Dask client ``client`` (an HTTP gateway) as stamped with authenticated users."""
        self.gateways.add(client)

    # -- what clients and shards tell ------------------------------------------------------------
    def record_pass(self, worker: str, entry: dict[str, Any]) -> None:
        """A shard ran a pass (an entry of :data:`~nnsight_dask.worker.telemetry.STAGES_TOPIC`): count
        its stages and busy time, note co-tenants."""
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
                self.status_changed(record)

    def submitted(self, message: dict[str, Any], client: str = "") -> None:
        """Client ``client`` sent experiment ``message["experiment"]`` on its way (or a retry of one)."""
        record = ExperimentRecord(
            experiment=message["experiment"], deployment=message.get("deployment", ""),
            user=message.get("user") or "", stages=int(message.get("stages") or 0),
            route=str(message.get("route") or message["experiment"]),
            shards=list(message.get("shards", [])), submitted=self.clock(), retry_of=message.get("retry_of") or "",
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
        self.status_changed(record)
        self._trim()


    def finished(self, message: dict[str, Any]) -> None:
        """The client of ``message["experiment"]`` has its answer: how it ended, bytes returned and persisted."""
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

    def worker_lost(self, worker: str) -> None:
        """The unfinished experiment ``worker`` said it was computing (if any) is marked ``lost_on`` it."""
        computing = self.executing.pop(worker, None)
        record = self.experiments.get(computing or "")
        if record is not None and not record.finished and worker in record.workers:
            record.lost_on = worker

    def unfinished_of(self, client: str) -> dict[str, list[str]]:
        """Worker -> the experiments of ``client`` not ended yet with a shard there."""
        by_workers: dict[str, list[str]] = {}
        for record in self.experiments.values():
            if record.client == client and record.status not in ("completed", "failed"):
                for worker in record.workers:
                    by_workers.setdefault(worker, []).append(record.experiment)
        return by_workers

    def status_changed(self, record: ExperimentRecord) -> None:
        """Called on every status change of ``record`` (the plugin logs it as a scheduler event)."""

    # -- bookkeeping ---------------------------------------------------------------------------
    def _finish(self, record: ExperimentRecord, status: str, error: str = "", ended: float | None = None) -> None:
        if record.status == "queued" and status in ("completed", "failed"):
            # it ran before the shards' report of it arrived (they report every 0.2 s): the event
            # stream still tells every status it went through
            record.status = "running"
            self.status_changed(record)
        record.status = status
        record.ended = ended or self.clock()
        record.error = error or record.error
        self.totals[status] += 1
        if status in ("completed", "failed"):  # counted in the histogram and the plots by fold()
            self._unfolded.append(Finished(record.deployment, record.ended - record.submitted,
                                           record.ended - (record.started or record.submitted)))
        self.waiting.pop(record.experiment, None)
        self.status_changed(record)

    def _recount(self, record: ExperimentRecord, status: str, error: str) -> None:
        self.totals[record.status] -= 1
        self.totals[status] += 1
        record.status, record.error = status, error
        self.status_changed(record)

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

    def rows(self, limit: int | None = None) -> list[dict[str, Any]]:
        """One row per experiment, newest first (the ``limit`` newest ones if given)."""
        out = []
        for record in itertools.islice(reversed(self.experiments.values()), limit):
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
        """Per deployment shard: unfinished experiments with a stage there, stages run, busy time
        (in all, and as a fraction of the last few seconds: :data:`.series.RATE_WINDOW`)."""
        in_flight: dict[tuple[str, int], int] = {}
        for record in self.experiments.values():
            if record.finished:
                continue
            for shard in set(record.shards):
                in_flight[(record.deployment, shard)] = in_flight.get((record.deployment, shard), 0) + 1
                self.shards.setdefault((record.deployment, shard), ShardRecord(record.deployment, shard))
        return [{"deployment": d, "shard": s, "worker": r.worker, "in_flight": in_flight.get((d, s), 0),
                 "stages_run": r.stages_run, "busy_seconds": round(r.busy_seconds, 4),
                 "busy_fraction": round(self.series.busy_fraction((d, s)), 3),
                 "shared_passes": " ".join(f"{size}x{count}" for size, count in sorted(r.shared_passes.items())),
                 "batch_sizes": {str(size): count for size, count in sorted(r.shared_passes.items())}}
                for (d, s), r in sorted(self.shards.items())]

    def snapshot(self) -> dict[str, Any]:
        return {"experiments": self.rows(), "shards": self.shard_rows()}

    # -- aggregation (periodic, never per experiment) --------------------------------------------
    def fold(self) -> list[Finished]:
        """Count the experiments finished since the last fold in the run-time histogram; return them."""
        unfolded, self._unfolded = self._unfolded, []
        for finished in unfolded:
            self.latency_sum += finished.run_time
            self.latencies[bisect.bisect_left(LATENCY_BUCKETS, finished.run_time)] += 1
        return unfolded

    def sample(self, now: float | None = None) -> None:
        """One point of every plotted series (the monitor calls it every :data:`.series.SAMPLE_SECONDS`)."""
        queued: dict[str, int] = {}
        for record in self.waiting.values():
            queued[record.deployment] = queued.get(record.deployment, 0) + 1
        self.series.sample(self.clock() if now is None else now, self.fold(), queued, self.shards)
