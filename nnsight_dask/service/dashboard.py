"""Scheduler preload: an "Experiments" page on the Dask dashboard, a JSON endpoint and metrics.

Load it with ``dask scheduler --preload nnsight_dask.service.dashboard`` or
``LocalCluster(scheduler_kwargs={"preload": ["nnsight_dask.service.dashboard"]})`` (the CLI does).
Importing the module adds the ``/experiments`` Bokeh page to the dashboard's applications, which is
why it must be a preload (imported before the dashboard starts); ``dask_setup`` adds
``/nnsight/experiments.json`` and ``/nnsight/metrics`` (Prometheus text format).

The data are the events experiments log on the scheduler (topics ``nnsight-dask-experiments`` from
clients and ``nnsight-dask-stages`` from shard workers), folded by :func:`experiment_rows`.
"""
from __future__ import annotations

import json
from typing import Any

EXPERIMENTS = "nnsight-dask-experiments"
STAGES = "nnsight-dask-stages"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COLUMNS = ("experiment", "user", "deployment", "status", "queue_wait", "run_time", "stages", "shards", "error")


def experiment_rows(experiment_events: list[tuple[float, dict[str, Any]]],
                    stage_events: list[tuple[float, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per experiment, newest first: latest status, queue wait, run time, shards, error."""
    rows: dict[str, dict[str, Any]] = {}
    for stamp, event in experiment_events:
        row = rows.setdefault(event["experiment"], {
            "experiment": event["experiment"], "user": event.get("user") or "", "deployment": event["deployment"],
            "status": "queued", "queued_at": stamp, "started_at": None, "ended_at": None, "stages": 0,
            "shards": set(), "error": ""})
        row["status"] = event["status"]
        if event["status"] in ("completed", "failed", "cancelled"):
            row["ended_at"] = stamp
        if event.get("error"):
            row["error"] = event["error"]
    for stamp, event in stage_events:
        row = rows.get(event["experiment"])
        if row is None:
            continue
        row["stages"] += 1
        row["shards"].add(event["shard"])
        row["started_at"] = stamp if row["started_at"] is None else min(row["started_at"], stamp)
        if row["status"] == "queued":
            row["status"] = "running"
    out = []
    for row in sorted(rows.values(), key=lambda r: r["queued_at"], reverse=True):
        started, ended = row["started_at"], row["ended_at"]
        out.append({
            **{k: row[k] for k in ("experiment", "user", "deployment", "status", "stages", "error")},
            "shards": ",".join(str(s) for s in sorted(row["shards"])),
            "queue_wait": round(started - row["queued_at"], 4) if started is not None else None,
            "run_time": round(ended - (started or row["queued_at"]), 4) if ended is not None else None,
        })
    return out


def shard_rows(stage_events: list[tuple[float, dict[str, Any]]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per deployment shard: stages run, and experiments in flight whose last stage ran there."""
    in_flight = {r["experiment"] for r in rows if r["status"] in ("queued", "running", "retrying")}
    shards: dict[tuple[str, int], dict[str, Any]] = {}
    last_shard: dict[str, tuple[str, int]] = {}
    for _stamp, event in stage_events:
        key = (event["deployment"], event["shard"])
        shards.setdefault(key, {"deployment": key[0], "shard": key[1], "stages_run": 0, "in_flight": 0})
        shards[key]["stages_run"] += 1
        last_shard[event["experiment"]] = key
    for experiment, key in last_shard.items():
        if experiment in in_flight:
            shards[key]["in_flight"] += 1
    return [shards[k] for k in sorted(shards)]


def snapshot(scheduler: Any) -> dict[str, Any]:
    stages = list(scheduler.get_events(STAGES))
    rows = experiment_rows(list(scheduler.get_events(EXPERIMENTS)), stages)
    return {"experiments": rows, "shards": shard_rows(stages, rows)}


def prometheus_text(rows: list[dict[str, Any]]) -> str:
    """Experiments by status and a latency histogram, in Prometheus' text format."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines = ["# HELP nnsight_dask_experiments Experiments by status.", "# TYPE nnsight_dask_experiments gauge"]
    for status in ("queued", "running", "retrying", "completed", "failed", "cancelled"):
        lines.append(f'nnsight_dask_experiments{{status="{status}"}} {counts.get(status, 0)}')
    latencies = [r["run_time"] for r in rows if r["run_time"] is not None]
    lines += ["# HELP nnsight_dask_experiment_seconds Run time of finished experiments.",
              "# TYPE nnsight_dask_experiment_seconds histogram"]
    for bound in LATENCY_BUCKETS:
        lines.append(f'nnsight_dask_experiment_seconds_bucket{{le="{bound}"}} {sum(1 for x in latencies if x <= bound)}')
    lines.append(f'nnsight_dask_experiment_seconds_bucket{{le="+Inf"}} {len(latencies)}')
    lines.append(f"nnsight_dask_experiment_seconds_sum {sum(latencies)}")
    lines.append(f"nnsight_dask_experiment_seconds_count {len(latencies)}")
    return "\n".join(lines) + "\n"


class ExperimentsPanel:
    """The table of experiments: ``source`` feeds ``root``; ``update()`` refreshes from the scheduler."""

    def __init__(self, scheduler: Any) -> None:
        from bokeh.models import ColumnDataSource, DataTable, TableColumn

        self.scheduler = scheduler
        self.source = ColumnDataSource({name: [] for name in COLUMNS})
        self.root = DataTable(source=self.source, columns=[TableColumn(field=c, title=c.replace("_", " "))
                                                           for c in COLUMNS], sizing_mode="stretch_both")
        self.update()

    def update(self) -> None:
        rows = snapshot(self.scheduler)["experiments"]
        self.source.data = {name: [("" if r[name] is None else r[name]) for r in rows] for name in COLUMNS}


class ShardsPanel:
    """Per shard: stages run and experiments in flight."""

    FIELDS = ("deployment", "shard", "stages_run", "in_flight")

    def __init__(self, scheduler: Any) -> None:
        from bokeh.models import ColumnDataSource, DataTable, TableColumn

        self.scheduler = scheduler
        self.source = ColumnDataSource({name: [] for name in self.FIELDS})
        self.root = DataTable(source=self.source, columns=[TableColumn(field=c, title=c.replace("_", " "))
                                                           for c in self.FIELDS], height=160)
        self.update()

    def update(self) -> None:
        rows = snapshot(self.scheduler)["shards"]
        self.source.data = {name: [r[name] for r in rows] for name in self.FIELDS}


def experiments_doc(scheduler: Any, extra: Any, doc: Any) -> None:
    from bokeh.layouts import column
    from bokeh.models import Div

    experiments, shards = ExperimentsPanel(scheduler), ShardsPanel(scheduler)
    doc.title = "Dask: nnsight-dask experiments"
    doc.add_root(column(Div(text="<h2>nnsight-dask experiments</h2>"), experiments.root,
                        Div(text="<h3>Shards</h3>"), shards.root, sizing_mode="stretch_width"))
    doc.add_periodic_callback(lambda: (experiments.update(), shards.update()), 1000)


def _handlers(scheduler: Any) -> list[Any]:
    from tornado import web

    class ExperimentsJSON(web.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "application/json")
            self.write(json.dumps(snapshot(scheduler)))

    class Metrics(web.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "text/plain; version=0.0.4")
            self.write(prometheus_text(snapshot(scheduler)["experiments"]))

    return [(r"/nnsight/experiments.json", ExperimentsJSON), (r"/nnsight/metrics", Metrics)]


def dask_setup(scheduler: Any) -> None:
    """Preload hook: add the JSON and metrics endpoints to the scheduler's HTTP server."""
    scheduler.http_application.add_handlers(r".*", _handlers(scheduler))


def _install_page() -> None:
    from distributed.dashboard import scheduler as dashboard

    dashboard.applications.setdefault("/experiments", experiments_doc)


_install_page()
