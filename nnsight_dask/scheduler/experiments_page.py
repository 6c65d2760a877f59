"""The dashboard's Experiments page: live plots and the table of recent experiments (Bokeh).

Every plot reads the monitor's time series (:mod:`.series`), which the scheduler samples once a
second; the table reads the newest rows. A page's sessions only read, once a second each, so an open
browser adds nothing per experiment. The same components are served one by one at the
``/individual-...`` paths (:data:`INDIVIDUAL`), as Dask serves its own plots for JupyterLab's
dask-labextension and the dashboard's "More..." menu; :mod:`.pages` puts them all on the dashboard.

Components:

- :class:`ThroughputPlot`: experiments finished per second, one line per deployment;
- :class:`LatencyPlot`: p50 (solid) and p99 (dashed) latency, submission to answer, per deployment;
- :class:`QueuePlot`: experiments queued (no stage run yet), per deployment;
- :class:`ShardBusyPlot`: each shard's busy fraction over time (hover: its worker and load);
- :class:`BatchSizePlot`: the shards' forward passes by how many experiments shared them (co-tenancy);
- :class:`ExperimentsTable`: the newest experiments; a user's own rows are highlighted, or alone,
  from the page's "your user" box or its ``?user=`` query argument.
"""
from __future__ import annotations

from typing import Any

from ..dask_compat import use_dashboard_template
from . import monitor as monitor_module
from .book import ExperimentBook
from .series import KEEP, LATENCY_WINDOW, RATE_WINDOW, SAMPLE_SECONDS, DeploymentSeries

#: Table column -> (title, relative width); the table spreads them over the page width.
EXPERIMENT_COLUMNS = {
    "experiment": ("experiment", 110), "user": ("user", 70), "via": ("via", 55), "deployment": ("deployment", 100),
    "status": ("status", 75), "position": ("queue pos.", 60), "queue_wait": ("queue wait s", 75),
    "run_time": ("run time s", 75), "stages": ("stages", 55), "shards": ("shards", 50),
    "shared_with": ("shared passes with", 100), "bytes_returned": ("bytes returned", 90),
    "bytes_persisted": ("bytes persisted", 90), "error": ("error", 420),
}
#: Rows the table shows (newest first); the JSON endpoint has them all.
TABLE_ROWS = 500
#: Background of a row of the user the page was asked to find.
OWN_ROW_COLOR = "#ffe9a8"
REFRESH_MS = 1000
#: Where the page is served on the dashboard, and its name in the navigation bar.
PAGE = "/experiments"


def _monitor(scheduler: Any) -> ExperimentBook:
    """What the scheduler's monitor knows; nothing (an empty book) while it has none."""
    return monitor_module.monitor_of(scheduler) or ExperimentBook()


def _colors(items: list[Any]) -> list[str]:
    """A color per item, in order (Bokeh's ten categorical colors, then again)."""
    from bokeh.palettes import Category10_10

    return [Category10_10[i % len(Category10_10)] for i in range(len(items))]


def _time_figure(title: str, y_label: str, **kwargs: Any) -> Any:
    from bokeh.plotting import figure

    fig = figure(title=title, x_axis_type="datetime", y_axis_label=y_label, height=240,
                 tools="pan,wheel_zoom,box_zoom,reset,save", toolbar_location="above", **kwargs)
    fig.y_range.start = 0
    return fig


class _DeploymentLines:
    """One multi-line renderer: a line per deployment of one of its series (``values``)."""

    def __init__(self, fig: Any, values: str, legend: bool, **line: Any) -> None:
        from bokeh.models import ColumnDataSource

        self.values = values
        self.source = ColumnDataSource({"xs": [], "ys": [], "deployment": [], "color": []})
        extra = {"legend_field": "deployment"} if legend else {}
        fig.multi_line(xs="xs", ys="ys", line_color="color", line_width=2, source=self.source, **extra, **line)

    def update(self, deployments: dict[str, DeploymentSeries]) -> None:
        names = sorted(deployments)
        self.source.data = {
            "xs": [[t * 1000 for t in deployments[n].times] for n in names],
            "ys": [list(getattr(deployments[n], self.values)) for n in names],
            "deployment": names, "color": _colors(names)}


class ThroughputPlot:
    """Experiments finished (completed or failed) per second, per deployment."""

    def __init__(self, scheduler: Any, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.root = _time_figure(f"Experiments per second (mean of the last {RATE_WINDOW:g} s)",
                                 "experiments/s", **kwargs)
        self.lines = _DeploymentLines(self.root, "rate", legend=True)
        self.root.legend.location = "top_left"
        self.root.legend.background_fill_alpha = 0.6
        self.update()

    def update(self) -> None:
        self.lines.update(_monitor(self.scheduler).series.deployments)


class LatencyPlot:
    """p50 and p99 latency from submission to answer, per deployment."""

    def __init__(self, scheduler: Any, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.root = _time_figure(f"Latency p50 (solid), p99 (dashed) of the last {LATENCY_WINDOW:g} s",
                                 "seconds", **kwargs)
        self.p50 = _DeploymentLines(self.root, "p50", legend=False)
        self.p99 = _DeploymentLines(self.root, "p99", legend=False, line_dash="dashed")
        self.update()

    def update(self) -> None:
        deployments = _monitor(self.scheduler).series.deployments
        self.p50.update(deployments)
        self.p99.update(deployments)


class QueuePlot:
    """Experiments queued (no stage run yet), per deployment."""

    def __init__(self, scheduler: Any, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.root = _time_figure("Queue depth (experiments with no stage run yet)", "experiments", **kwargs)
        self.lines = _DeploymentLines(self.root, "queued", legend=False)
        self.update()

    def update(self) -> None:
        self.lines.update(_monitor(self.scheduler).series.deployments)


class ShardBusyPlot:
    """Each shard's busy fraction over time, a line per shard; hovering tells its worker and load."""

    def __init__(self, scheduler: Any, **kwargs: Any) -> None:
        from bokeh.models import ColumnDataSource, HoverTool

        self.scheduler = scheduler
        self.root = _time_figure(f"Shard busy fraction (of the last {RATE_WINDOW:g} s)", "busy fraction", **kwargs)
        self.root.y_range.end = 1
        self.source = ColumnDataSource({"xs": [], "ys": [], "shard": [], "worker": [], "in_flight": [],
                                        "stages_run": [], "shared_passes": [], "color": []})
        lines = self.root.multi_line(xs="xs", ys="ys", line_color="color", line_width=2, source=self.source,
                                     legend_field="shard")
        self.root.legend.location = "top_left"
        self.root.legend.background_fill_alpha = 0.6
        self.root.add_tools(HoverTool(renderers=[lines], tooltips=[
            ("shard", "@shard"), ("worker", "@worker"), ("in flight", "@in_flight"), ("passes run", "@stages_run"),
            ("shared passes (size x count)", "@shared_passes")]))
        self.update()

    def update(self) -> None:
        monitor = _monitor(self.scheduler)
        shards = [s for s in monitor.shard_rows() if (s["deployment"], s["shard"]) in monitor.series.shards]
        points = [monitor.series.shards[(s["deployment"], s["shard"])] for s in shards]
        self.source.data = {
            "xs": [[t * 1000 for t in p.times] for p in points], "ys": [list(p.busy) for p in points],
            "shard": [f"{s['deployment']}[{s['shard']}]" for s in shards], "worker": [s["worker"] for s in shards],
            "in_flight": [s["in_flight"] for s in shards], "stages_run": [s["stages_run"] for s in shards],
            "shared_passes": [s["shared_passes"] or "-" for s in shards], "color": _colors(shards)}


def batch_sizes(monitor: ExperimentBook) -> dict[tuple[str, int], int]:
    """(deployment, experiments in a pass) -> passes its shards ran with that many, 1 included."""
    counts: dict[tuple[str, int], int] = {}
    for (deployment, _), shard in monitor.shards.items():
        shared = 0
        for size, passes in shard.shared_passes.items():
            counts[(deployment, size)] = counts.get((deployment, size), 0) + passes
            shared += passes
        if shard.stages_run > shared:
            counts[(deployment, 1)] = counts.get((deployment, 1), 0) + shard.stages_run - shared
    return dict(sorted(counts.items()))


class BatchSizePlot:
    """The shards' forward passes by how many experiments shared them (co-tenant batching)."""

    def __init__(self, scheduler: Any, **kwargs: Any) -> None:
        from bokeh.models import ColumnDataSource, FactorRange, HoverTool
        from bokeh.plotting import figure

        self.scheduler = scheduler
        self.root = figure(title="Co-tenant batch sizes (passes by experiments in them)", x_range=FactorRange(),
                           y_axis_label="passes", height=240, tools="save,reset", toolbar_location="above", **kwargs)
        self.root.add_tools(HoverTool(tooltips=[("deployment, experiments per pass", "@x"), ("passes", "@passes")]))
        self.root.y_range.start = 0
        self.root.xgrid.grid_line_color = None
        self.source = ColumnDataSource({"x": [], "passes": [], "color": []})
        self.root.vbar(x="x", top="passes", width=0.8, color="color", source=self.source)
        self.update()

    def update(self) -> None:
        counts = batch_sizes(_monitor(self.scheduler))
        deployments = sorted({deployment for deployment, _ in counts})
        color = dict(zip(deployments, _colors(deployments)))
        factors = [(deployment, str(size)) for deployment, size in counts]
        if list(self.root.x_range.factors) != factors:
            self.root.x_range.factors = factors
        self.source.data = {"x": factors, "passes": list(counts.values()),
                            "color": [color[deployment] for deployment, _ in counts]}


class ExperimentsTable:
    """The newest experiments; the rows of ``user`` (the input box) highlighted, or shown alone."""

    def __init__(self, scheduler: Any, user: str = "", sizing_mode: str = "stretch_width") -> None:
        from bokeh.layouts import column, row
        from bokeh.models import Checkbox, ColumnDataSource, DataTable, StringFormatter, TableColumn, TextInput

        self.scheduler = scheduler
        self.user = TextInput(title="Your user (its rows are highlighted)", value=user, width=260)
        self.only_own = Checkbox(label="only your experiments", active=False)
        self.source = ColumnDataSource({name: [] for name in [*EXPERIMENT_COLUMNS, "highlight", "emphasis"]})
        formatter = StringFormatter(background_color="highlight", font_style="emphasis")
        self.table = DataTable(source=self.source, columns=[
            TableColumn(field=name, title=title, width=width, formatter=formatter)
            for name, (title, width) in EXPERIMENT_COLUMNS.items()], sizing_mode="stretch_width", height=320,
            index_position=None)
        self.root = column(row(self.user, self.only_own), self.table, sizing_mode=sizing_mode)
        self.user.on_change("value", self._changed)
        self.only_own.on_change("active", self._changed)
        self.update()

    def _changed(self, attr: str, old: Any, new: Any) -> None:
        self.update()  # at once, not at the next refresh

    def update(self) -> None:
        user = self.user.value.strip()
        rows = _monitor(self.scheduler).rows(limit=TABLE_ROWS)
        if user and self.only_own.active:
            rows = [r for r in rows if r["user"] == user]
        data: dict[str, list[Any]] = {name: [("" if r[name] is None else r[name]) for r in rows]
                                      for name in EXPERIMENT_COLUMNS}
        own = [bool(user) and r["user"] == user for r in rows]
        data["highlight"] = [OWN_ROW_COLOR if mine else None for mine in own]
        data["emphasis"] = ["bold" if mine else "normal" for mine in own]
        self.source.data = data


def _query_user(doc: Any) -> str:
    """The ``?user=`` argument of the page's address ("" without one)."""
    context = getattr(doc, "session_context", None)
    request = getattr(context, "request", None)
    values = (getattr(request, "arguments", None) or {}).get("user") or [b""]
    value = values[0]
    return (value.decode(errors="replace") if isinstance(value, bytes) else str(value)).strip()


def _refresh(doc: Any, *components: Any) -> None:
    """Update every component once a second, while this browser session lasts."""
    def update() -> None:
        for component in components:
            component.update()
    doc.add_periodic_callback(update, REFRESH_MS)


def experiments_doc(scheduler: Any, extra: dict[str, Any], doc: Any) -> None:
    """The /experiments page: the four kinds of plots above the table, in the dashboard's template."""
    from bokeh.layouts import column, row
    from bokeh.models import Div

    plots = [ThroughputPlot(scheduler, sizing_mode="stretch_width"),
             LatencyPlot(scheduler, sizing_mode="stretch_width"),
             QueuePlot(scheduler, sizing_mode="stretch_width")]
    bars = [ShardBusyPlot(scheduler, sizing_mode="stretch_width"),
            BatchSizePlot(scheduler, sizing_mode="stretch_width")]
    table = ExperimentsTable(scheduler, user=_query_user(doc))
    doc.title = "Dask: nnsight-dask experiments"
    doc.add_root(column(
        Div(text=f"<h2>nnsight-dask experiments</h2><p>Sampled every {SAMPLE_SECONDS:g} s; plots keep the "
                 f"last {KEEP * SAMPLE_SECONDS / 60:g} minutes. Counts and rows: <a href='nnsight/experiments.json'>"
                 f"JSON</a>, <a href='nnsight/metrics'>Prometheus</a>.</p>"),
        row(*(p.root for p in plots), sizing_mode="stretch_width"),
        row(*(b.root for b in bars), sizing_mode="stretch_width"),
        Div(text="<h3>Recent experiments</h3>"), table.root, sizing_mode="stretch_width"))
    _refresh(doc, *plots, *bars, table)
    use_dashboard_template(doc, extra)


def _individual(component: type) -> Any:
    """A page with ``component`` alone (what dask-labextension and the "More..." menu open)."""
    def make_doc(scheduler: Any, extra: dict[str, Any], doc: Any) -> None:
        shown = component(scheduler, sizing_mode="stretch_both")
        doc.title = f"Dask: {component.__name__}"
        doc.add_root(shown.root)
        _refresh(doc, shown)
        use_dashboard_template(doc, extra, page=False)
    return make_doc


#: Path -> page of one component alone (Dask lists ``/individual-*`` paths in its "More..." menu
#: and in ``/individual-plots.json``).
INDIVIDUAL = {
    "/individual-experiments-per-second": _individual(ThroughputPlot),
    "/individual-experiment-latency": _individual(LatencyPlot),
    "/individual-experiment-queue": _individual(QueuePlot),
    "/individual-shard-busy": _individual(ShardBusyPlot),
    "/individual-cotenant-batch-sizes": _individual(BatchSizePlot),
    "/individual-experiments": _individual(ExperimentsTable),
}
#: Every page this module serves on the dashboard.
APPLICATIONS = {PAGE: experiments_doc, **INDIVIDUAL}
