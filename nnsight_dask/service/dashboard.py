"""Scheduler preload: an "Experiments" page on the Dask dashboard.

Load it with ``dask scheduler --preload nnsight_dask.service.dashboard`` or
``LocalCluster(scheduler_kwargs={"preload": ["nnsight_dask.service.dashboard"]})`` (the CLI does).
Importing the module adds the ``/experiments`` Bokeh page to the dashboard's applications, which is
why it must be a preload (imported before the dashboard starts). ``dask_setup`` installs the
experiment monitor (:mod:`nnsight_dask.scheduler.monitor`, which ``nd.serve`` also installs), whose
data the page shows and which serves ``/nnsight/experiments.json`` and ``/nnsight/metrics``.
"""
from __future__ import annotations

from typing import Any

from ..scheduler import monitor as monitor_module

#: Column -> (title, relative width); the table spreads them over the page width.
EXPERIMENT_COLUMNS = {
    "experiment": ("experiment", 110), "user": ("user", 70), "deployment": ("deployment", 100),
    "status": ("status", 75), "position": ("queue pos.", 60), "queue_wait": ("queue wait s", 75),
    "run_time": ("run time s", 75), "stages": ("stages", 55), "shards": ("shards", 50),
    "bytes_returned": ("bytes returned", 90), "bytes_persisted": ("bytes persisted", 90), "error": ("error", 420),
}
SHARD_COLUMNS = {
    "deployment": ("deployment", 120), "shard": ("shard", 50), "worker": ("worker", 180),
    "in_flight": ("in flight", 70), "stages_run": ("stages run", 80), "busy_seconds": ("busy s", 80),
}
REFRESH_MS = 1000


def _table(columns: dict[str, tuple[str, int]], **kwargs: Any) -> tuple[Any, Any]:
    from bokeh.models import ColumnDataSource, DataTable, TableColumn

    source = ColumnDataSource({name: [] for name in columns})
    table = DataTable(source=source, columns=[TableColumn(field=c, title=title, width=width)
                                              for c, (title, width) in columns.items()], **kwargs)
    return source, table


def _columns(rows: list[dict[str, Any]], columns: dict[str, Any]) -> dict[str, list[Any]]:
    return {name: [("" if row[name] is None else row[name]) for row in rows] for name in columns}


class ExperimentsPanel:
    """Both tables of the page; ``update()`` refreshes them from the scheduler's monitor."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.source, self.table = _table(EXPERIMENT_COLUMNS, sizing_mode="stretch_width", height=320)
        self.shard_source, self.shard_table = _table(SHARD_COLUMNS, sizing_mode="stretch_width", height=160)
        self.update()

    def update(self) -> None:
        monitor = monitor_module.monitor_of(self.scheduler)
        snapshot = monitor.snapshot() if monitor is not None else {"experiments": [], "shards": []}
        self.source.data = _columns(snapshot["experiments"], EXPERIMENT_COLUMNS)
        self.shard_source.data = _columns(snapshot["shards"], SHARD_COLUMNS)


def experiments_doc(scheduler: Any, extra: Any, doc: Any) -> None:
    from bokeh.layouts import column
    from bokeh.models import Div

    panel = ExperimentsPanel(scheduler)
    doc.title = "Dask: nnsight-dask experiments"
    doc.add_root(column(Div(text="<h2>nnsight-dask experiments</h2>"), panel.table,
                        Div(text="<h3>Shards</h3>"), panel.shard_table, sizing_mode="stretch_width"))
    doc.add_periodic_callback(panel.update, REFRESH_MS)


def dask_setup(scheduler: Any) -> None:
    """Preload hook: install the experiment monitor now, so the page has data from the start."""
    monitor_module.install(scheduler)


def _install_page() -> None:
    from distributed.dashboard import scheduler as dashboard

    dashboard.applications.setdefault("/experiments", experiments_doc)


_install_page()
