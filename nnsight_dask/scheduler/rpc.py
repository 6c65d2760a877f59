"""The scheduler RPCs clients call on the experiment monitor (``client.scheduler.<name>(...)``).

None is on an experiment's happy path: a client asks only while its experiment is slow (its queue
position), after losing a shard's worker (was it computing there?), or for the CLI's ``status``.
"""
from __future__ import annotations

from typing import Any

from .book import ExperimentBook

#: A waiting client's experiment: ``{"status", "position", "stages_done", "stages"}``.
STATUS_RPC = "nnsight_experiment_status"
#: After a shard's worker was lost: ``{"known": True, "lost_on": worker or ""}`` (see :func:`lost_on`).
LOST_RPC = "nnsight_experiment_lost_on"
#: Every experiment and shard the monitor keeps (``ExperimentBook.snapshot``; the CLI's ``status``).
SNAPSHOT_RPC = "nnsight_experiments"


def status(monitor: ExperimentBook, experiment: str) -> dict[str, Any]:
    """Where ``experiment`` is: queued (and how many of its deployment are ahead), or its stages done."""
    record = monitor.experiments.get(experiment)
    if record is None:
        return {"status": "unknown"}
    return {"status": monitor.live_status(record), "position": monitor.queue_position(record),
            "stages_done": record.stages_done, "stages": record.stages}


def lost_on(monitor: ExperimentBook, experiment: str) -> dict[str, Any]:
    """``{"known": True, "lost_on": worker or ""}``: the worker that died while ``experiment``
    computed on it ("" if none did); ``{"known": False}`` for an experiment it never saw."""
    record = monitor.experiments.get(experiment)
    return {"known": False} if record is None else {"known": True, "lost_on": record.lost_on}


def install(scheduler: Any, monitor: ExperimentBook) -> None:
    """Add the RPC handlers to ``scheduler`` (Dask passes each call's keyword arguments)."""
    scheduler.handlers[STATUS_RPC] = lambda experiment: status(monitor, experiment)
    scheduler.handlers[LOST_RPC] = lambda experiment: lost_on(monitor, experiment)
    scheduler.handlers[SNAPSHOT_RPC] = monitor.snapshot
