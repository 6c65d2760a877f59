"""``client.submit(graph)``: a graph run as a plain Dask task with a researcher's own ``Client``.

Dask calls the graph on a worker; the graph hands itself to :func:`run_graph_task` (installed as
its task runner by :mod:`nnsight_dask.api`), which runs it from there on the deployment the graph
names, like any other client would.
"""
from __future__ import annotations

from typing import Any

from distributed import worker_client

from ..graph.graph import InterventionGraph
from .experiment import run_experiment


def run_graph_task(graph: InterventionGraph) -> Any:
    """Run ``graph`` on deployment ``graph.model`` from inside a Dask task; saved values by name."""
    with worker_client() as client:
        return run_experiment(client, graph.model, graph)  # type: ignore[arg-type]  (checked by the caller)
