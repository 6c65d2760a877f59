"""The monitor's HTTP endpoints on the dashboard's server: ``/nnsight/experiments.json`` (rows per
experiment and shard) and ``/nnsight/metrics`` (Prometheus text, for scrapers without Dask's own
``/metrics``)."""
from __future__ import annotations

import json
from typing import Any

from . import prometheus
from .book import ExperimentBook

EXPERIMENTS_JSON = "/nnsight/experiments.json"
METRICS = "/nnsight/metrics"


def install(scheduler: Any, monitor: ExperimentBook) -> None:
    """Add both routes to the scheduler's HTTP server once (no server, no routes)."""
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
            self.write(prometheus.text(monitor))

    application.add_handlers(r".*", [(EXPERIMENTS_JSON, ExperimentsJSON), (METRICS, Metrics)])
    application._nnsight_routes = True
