"""The Experiments page's Bokeh document and the time series behind its plots.

The monitor is driven through its own hooks, as clients (stream messages) and shard workers
(batched pass telemetry) drive it, at chosen times, so every plotted number is known in advance.
The document is built by the page's own function on a real in-process scheduler with its
dashboard; the mount on a running dashboard is checked over HTTP.
"""
from __future__ import annotations

import math

import pytest
from bokeh.document import Document
from bokeh.models import DataTable, GlyphRenderer, MultiLine, VBar
from distributed.utils_test import gen_cluster
from tornado.httpclient import AsyncHTTPClient

from nnsight_dask.scheduler import experiments_page, monitor, pages
from nnsight_dask.scheduler.records import ShardRecord
from nnsight_dask.scheduler.series import (
    BUCKET_RATIO,
    LATENCY_WINDOW,
    RATE_WINDOW,
    Finished,
    LatencyWindow,
    Series,
)
from nnsight_dask.worker.telemetry import STAGES_TOPIC

T0 = 1_800_000_000.0


def test_series_points_rates_percentiles_queue_and_busy_fractions():
    series = Series()
    shard = ShardRecord("d", 0)
    latencies = [0.1 * (i + 1) for i in range(10)]  # 0.1 .. 1.0 s
    series.sample(T0, [Finished("d", latency, latency) for latency in latencies], {"d": 3}, {("d", 0): shard})
    points = series.deployments["d"]
    assert points.rate[-1] == 10 / RATE_WINDOW
    assert points.p50[-1] == pytest.approx(0.5, rel=0.025) and points.p99[-1] == pytest.approx(1.0, rel=0.025)
    assert points.queued[-1] == 3 and series.busy_fraction(("d", 0)) == 0.0
    shard.busy_seconds = 0.25  # a quarter of the next second spent in passes
    series.sample(T0 + 1, [], {}, {("d", 0): shard})
    assert series.busy_fraction(("d", 0)) == pytest.approx(0.25)
    assert points.queued[-1] == 0 and points.rate[-1] == 10 / RATE_WINDOW  # still within the window
    series.sample(T0 + RATE_WINDOW, [], {}, {("d", 0): shard})
    assert points.rate[-1] == 0  # those ten finished more than RATE_WINDOW ago
    assert points.p50[-1] == pytest.approx(0.5, rel=0.025)  # but within LATENCY_WINDOW
    series.sample(T0 + LATENCY_WINDOW, [], {}, {("d", 0): shard})
    assert math.isnan(points.p99[-1])  # nobody finished lately: a gap in the line, not a zero
    assert list(points.times) == [T0, T0 + 1, T0 + RATE_WINDOW, T0 + LATENCY_WINDOW]

    window = LatencyWindow()  # percentiles from bucket counts: within BUCKET_RATIO of the exact ones
    values = [0.001 * 1.37 ** i for i in range(40)]
    window.add(T0, values)
    for q in (0.01, 0.5, 0.9, 0.99, 1.0):
        exact = sorted(values)[math.ceil(q * len(values)) - 1]
        assert exact / BUCKET_RATIO <= window.quantile(q) <= exact * BUCKET_RATIO
    assert window.finished_after(T0 - 1) == 40 and window.finished_after(T0) == 0
    window.add(T0 + LATENCY_WINDOW, [])
    assert window.total == 0 and window.counts == {} and math.isnan(window.quantile(0.5))


def drive(m: monitor.ExperimentMonitor) -> None:
    """Two deployments: six experiments of "gpt" (alice's and bob's, two sharing a pass) and one of "llama"."""
    def submit(experiment, deployment, user):
        m.handle_message(client="c", event="submitted", experiment=experiment, deployment=deployment, user=user,
                         stages=1, shards=[0], workers=["w0"])

    for i in range(6):
        submit(f"g{i}", "gpt", "alice" if i % 2 == 0 else "bob")
    submit("l0", "llama", "bob")
    passes = [{"deployment": "gpt", "shard": 0, "experiments": ["g0", "g1"], "labels": ["p0"] * 2,
               "start": T0, "stop": T0 + 0.5, "thread": 1},
              {"deployment": "gpt", "shard": 0, "experiments": ["g2"], "labels": ["p0"], "start": T0 + 0.5,
               "stop": T0 + 0.75, "thread": 1}]
    m.log_event(STAGES_TOPIC, {"worker": "w0", "passes": passes})
    for experiment in ("g0", "g1", "g2"):
        m.handle_message(client="c", event="finished", experiment=experiment, status="completed")


@gen_cluster(nthreads=[], scheduler_kwargs={"dashboard": True, "dashboard_address": "127.0.0.1:0"})
async def test_page_document_shows_each_plot_and_a_users_own_rows(s):
    m = monitor.install(s)
    drive(m)
    m.sample()
    document = Document()
    experiments_page.experiments_doc(s, {"pages": ["status"], "plots": []}, document)

    renderers = list(document.select({"type": GlyphRenderer}))
    lines = [r for r in renderers if isinstance(r.glyph, MultiLine)]
    per_deployment = [r for r in lines if "deployment" in r.data_source.data]
    assert len(per_deployment) == 4 and sum(r.glyph.line_dash == "dashed" for r in lines) == 1  # p99 is dashed
    assert all(r.data_source.data["deployment"] == ["gpt", "llama"] for r in per_deployment)
    values = [[list(ys) for ys in r.data_source.data["ys"]] for r in per_deployment]
    assert [[3 / RATE_WINDOW], [0.0]] in values  # experiments/s: gpt's three finished, none of llama's
    assert [[3.0], [1.0]] in values  # queue depth: g3-g5 of gpt, l0 of llama
    latency = [ys for ys in values if ys not in ([[3 / RATE_WINDOW], [0.0]], [[3.0], [1.0]])]
    assert len(latency) == 2  # p50 and p99: gpt's three answered at once, llama's line has a gap (none finished)
    for (gpt,), (llama,) in latency:
        assert 0 <= gpt < 1 and math.isnan(llama)

    busy = next(r.data_source.data for r in lines if "worker" in r.data_source.data)
    assert busy["shard"] == ["gpt[0]"] and busy["worker"] == ["w0"] and busy["ys"] == [[0.0]]  # one point yet
    (sizes,) = [r.data_source.data for r in renderers if isinstance(r.glyph, VBar)]
    assert dict(zip(sizes["x"], sizes["passes"])) == {("gpt", "1"): 1, ("gpt", "2"): 1}  # one pass alone, one shared

    (table,) = document.select({"type": DataTable})
    assert set(table.source.data["experiment"]) == {f"g{i}" for i in range(6)} | {"l0"}
    page = experiments_page.ExperimentsTable(s, user="alice")  # as for /experiments?user=alice
    data = page.source.data
    assert data["experiment"][:3] == ["l0", "g5", "g4"]  # newest first
    own = [e for e, color in zip(data["experiment"], data["highlight"]) if color == experiments_page.OWN_ROW_COLOR]
    assert own == ["g4", "g2", "g0"] and data["emphasis"][data["experiment"].index("g4")] == "bold"
    page.only_own.active = True  # "only your experiments": the table updates at once
    assert page.source.data["experiment"] == ["g4", "g2", "g0"]
    page.user.value = "bob"
    assert page.source.data["experiment"] == ["l0", "g5", "g3", "g1"]


@gen_cluster(nthreads=[], scheduler_kwargs={"dashboard": True, "dashboard_address": "127.0.0.1:0"})
async def test_pages_mounted_on_a_running_dashboard_are_in_its_navigation(s):
    """What ``nd.serve`` does on a scheduler started without the preload."""
    monitor.install(s)
    pages.add_page(s)
    assert not pages.add_page(s)  # once
    base = f"http://127.0.0.1:{s.http_server.port}"
    http = AsyncHTTPClient()
    page = (await http.fetch(base + "/experiments")).body.decode()
    assert 'href="status"' in page and "More..." in page  # Dask's template around our page
    status = (await http.fetch(base + "/status")).body.decode()
    assert 'href="experiments"' in status  # in the bar of Dask's own pages
    for path in experiments_page.INDIVIDUAL:
        assert f'href="{path.strip("/")}">{pages.menu_name(path)}<' in status  # and in "More..."
        assert "bokeh" in (await http.fetch(base + path)).body.decode().lower()
