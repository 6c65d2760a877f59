"""``client.submit(graph)``: a graph run as a plain Dask task with a researcher's own ``Client``.

Dask calls the graph on a worker; the graph hands itself to :func:`run_graph_task` (installed as
its task runner by :mod:`nnsight_dask.api`), which runs it from there on the deployment the graph
names, like any other client would.

Cancelling the Dask future (``future.cancel()``, or dropping every reference to it) stops the
experiment on the shards: Dask cannot interrupt a running task, but it marks the task cancelled on
its worker, and the experiment's wait checks that with its other limits (:class:`TaskCancelled`), then
stops the experiment on the shards' workers as any cancel does.
"""
from __future__ import annotations

import threading
from typing import Any

from distributed import get_worker, worker_client

from ..dask_compat import current_task_key, task_released
from ..graph.graph import InterventionGraph
from .experiment import run_experiment


class TaskCancelled(threading.Event):
    """Set once Dask no longer wants the result of the task running this experiment (its future was
    cancelled or released); read where the experiment's wait checks for a cancel."""

    def __init__(self, worker: Any, key: Any) -> None:
        super().__init__()
        self.worker = worker
        self.key = key

    def is_set(self) -> bool:
        if not super().is_set() and task_released(self.worker, self.key):
            self.set()
        return super().is_set()


def run_graph_task(graph: InterventionGraph) -> Any:
    """Run ``graph`` on deployment ``graph.model`` from inside a Dask task; saved values by name."""
    worker = get_worker()
    cancelled = TaskCancelled(worker, current_task_key())
    with worker_client() as client:
        return run_experiment(client, graph.model, graph, cancelled=cancelled)  # type: ignore[arg-type]  (checked by the caller)
