"""The "Experiments" page of the Dask dashboard: a Bokeh application served by the scheduler.

It shows the experiment monitor's rows (:mod:`.monitor`) and refreshes every second. The monitor
mounts it on a running scheduler's dashboard when it starts (:func:`add_page`), so ``nd.serve`` on a
plain ``LocalCluster`` gets the page without a preload; a scheduler started with the preload
``nnsight_dask.service.dashboard`` has it from the start.
"""
from __future__ import annotations

from typing import Any

from ..dask_compat import bokeh_applications, bokeh_prefix, has_bokeh_page
from . import monitor as monitor_module

#: Column -> (title, relative width); the table spreads them over the page width.
EXPERIMENT_COLUMNS = {
    "experiment": ("experiment", 110), "user": ("user", 70), "via": ("via", 55), "deployment": ("deployment", 100),
    "status": ("status", 75), "position": ("queue pos.", 60), "queue_wait": ("queue wait s", 75),
    "run_time": ("run time s", 75), "stages": ("stages", 55), "shards": ("shards", 50),
    "shared_with": ("shared passes with", 100), "bytes_returned": ("bytes returned", 90), "bytes_persisted": ("bytes persisted", 90), "error": ("error", 420),
}
SHARD_COLUMNS = {
    "deployment": ("deployment", 120), "shard": ("shard", 50), "worker": ("worker", 180),
    "in_flight": ("in flight", 70), "stages_run": ("stages run", 80), "busy_seconds": ("busy s", 80),
    "shared_passes": ("shared passes (size x count)", 170),
}
REFRESH_MS = 1000
#: Where the page is served on the dashboard.
PAGE = "/experiments"


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


def add_page(scheduler: Any) -> bool:
    """Mount the Experiments page on a running scheduler's dashboard that lacks it; True if added.

    For a scheduler started without the preload (a plain ``LocalCluster``): called in the
    scheduler's process, on its event loop, by the monitor when it starts (``nd.serve`` and the
    gateway register it). The page is a Bokeh application of its own, added next to Dask's.
    """
    application = getattr(scheduler, "http_application", None)
    bokeh = bokeh_applications(application)
    if not bokeh or any(has_bokeh_page(app, PAGE) for app in bokeh):
        return False  # no dashboard (bokeh missing, or disabled), or the page is there
    from distributed.dashboard.core import BokehApplication
    from distributed.dashboard.scheduler import template_variables
    from tornado.ioloop import IOLoop

    page = BokehApplication({PAGE: experiments_doc}, scheduler, prefix=bokeh_prefix(bokeh[0]),
                            template_variables=template_variables(scheduler))
    application.add_application(page)
    page.initialize(IOLoop.current())
    page.start()
    return True
