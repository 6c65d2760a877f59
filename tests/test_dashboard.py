"""The experiment monitor, Experiments page, JSON endpoint, metrics and progress over a real cluster."""
from __future__ import annotations

import io
import json
import threading
import time
import urllib.request
from contextlib import redirect_stderr

import pytest

import nnsight_dask as nd
from nnsight_dask.errors import InterventionError
from nnsight_dask.models import save_tiny
from nnsight_dask.scheduler import monitor, prometheus, rpc
from nnsight_dask.worker.telemetry import RUNNING_TOPIC, STAGES_TOPIC

pytestmark = pytest.mark.cluster
PROMPT = "The Eiffel Tower is"


class Terminal(io.StringIO):
    """Captures what a progress bar draws; says it is a terminal (bars stay silent elsewhere)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def cluster_with_dashboard(tmp_path_factory):
    from distributed import Client, LocalCluster

    path = str(save_tiny(tmp_path_factory.mktemp("m") / "tiny", arch="gpt2", n_layer=2))
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0",
                           scheduler_kwargs={"preload": ["nnsight_dask.service.dashboard"]},
                           env={"OMP_NUM_THREADS": "1", "NNSIGHT_DASK_TORCH_THREADS": "1"})
    client = Client(cluster)
    nd.serve(client, path, shards=2, name="dash")
    lm = nd.RemoteModel(client, "dash")
    with lm.trace(PROMPT):
        logits = lm.output.logits.save()
    with pytest.raises(InterventionError):
        with lm.trace(PROMPT):
            lm.transformer.h[1].output[:, 50].save()
    # Stage counts reach the monitor in the shards' telemetry, flushed every 0.2 s (later on a busy
    # machine): the tests below read them once the completed experiment's two stages are in.
    deadline = time.monotonic() + 30
    while rows(client)["experiments"][-1]["stages"] != "2/2" and time.monotonic() < deadline:
        time.sleep(0.05)
    yield cluster, client, lm, logits
    client.close()
    cluster.close()


def get(client, path):
    base = client.dashboard_link.rsplit("/", 1)[0]
    with urllib.request.urlopen(base + path, timeout=30) as response:
        return response.status, response.read().decode()


def rows(client):
    return json.loads(get(client, "/nnsight/experiments.json")[1])


def test_json_endpoint_lists_experiments(cluster_with_dashboard):
    _, client, _, logits = cluster_with_dashboard
    status, body = get(client, "/nnsight/experiments.json")
    data = json.loads(body)
    assert status == 200
    first_two = sorted(data["experiments"][-2:], key=lambda r: r["submitted"])
    assert [r["status"] for r in first_two] == ["completed", "failed"]
    done, failed = first_two
    assert "IndexError" in failed["error"] and "test_dashboard.py:" in failed["error"] and failed["deployment"] == "dash"
    assert done["shards"] == "0,1" and done["stages"] == "2/2" and done["run_time"] > 0 and done["queue_wait"] >= 0
    assert done["user"] == nd.config.user
    assert done["bytes_returned"] >= logits.numel() * 4  # the logits came back inline
    shards = {(s["deployment"], s["shard"]): s for s in data["shards"]}
    assert set(shards) == {("dash", 0), ("dash", 1)}
    assert all(s["stages_run"] >= 1 and s["busy_seconds"] > 0 and s["in_flight"] == 0 for s in shards.values())


def finished(client):
    """``(completed, failed)``: the fixture's one of each, and what other tests here have run since."""
    statuses = [r["status"] for r in rows(client)["experiments"]]
    assert statuses.count("completed") >= 1 and statuses.count("failed") == 1
    return statuses.count("completed"), statuses.count("failed")


def test_metrics_endpoint_and_dask_metrics(cluster_with_dashboard):
    _, client, _, _ = cluster_with_dashboard
    completed, failed = finished(client)
    status, body = get(client, "/nnsight/metrics")
    assert status == 200
    assert f'nnsight_dask_experiments_total{{status="completed"}} {completed}' in body
    assert f'nnsight_dask_experiments_total{{status="failed"}} {failed}' in body
    assert f"nnsight_dask_experiment_seconds_count {completed + failed}" in body  # completed and failed ones
    assert "nnsight_dask_bytes_returned_total" in body and "nnsight_dask_bytes_persisted_total 0" in body
    pytest.importorskip("prometheus_client")
    status, body = get(client, "/metrics")  # Dask's own Prometheus endpoint carries ours too
    assert status == 200 and "nnsight_dask_experiment_seconds_bucket" in body and "dask_scheduler_workers" in body


def test_experiments_page_is_in_the_dashboards_navigation(cluster_with_dashboard):
    """With the preload, the page is in the bar of Dask's pages, its plots in "More..." and in
    /individual-plots.json (what dask-labextension lists), and it is drawn in Dask's template."""
    _, client, _, _ = cluster_with_dashboard
    status, body = get(client, "/experiments")
    assert status == 200 and "bokeh" in body.lower()
    assert 'href="status"' in body and "More..." in body and 'href="individual-shard-busy"' in body
    _, status_page = get(client, "/status")
    assert 'href="experiments"' in status_page and 'href="individual-experiment-latency"' in status_page
    _, listing = get(client, "/individual-plots.json")
    plots = json.loads(listing)
    for path in ("/individual-experiments-per-second", "/individual-experiment-latency",
                 "/individual-experiment-queue", "/individual-shard-busy", "/individual-cotenant-batch-sizes",
                 "/individual-experiments"):
        assert path in plots.values()
        page_status, page = get(client, path)
        assert page_status == 200 and "bokeh" in page.lower()


def test_events_and_cli_status(cluster_with_dashboard, capsys):
    _, client, _, _ = cluster_with_dashboard
    events = client.get_events(monitor.EVENTS)
    assert {"queued", "running", "completed", "failed"} <= {e["status"] for _, e in events}
    from nnsight_dask.service.cli import main

    completed, failed = finished(client)
    assert main(["status", "--scheduler", client.scheduler.address]) == 0
    out = capsys.readouterr().out
    assert "dash: " in out and f"completed {completed}" in out and f"failed {failed}" in out and "dash[1]:" in out


def test_live_status_and_progress_line(cluster_with_dashboard):
    """A long generation shows as running on the page while its progress line counts stages."""
    _, client, lm, _ = cluster_with_dashboard
    seen: list[str] = []
    stream = Terminal()

    def watch():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not seen:
            seen.extend(r["experiment"] for r in rows(client)["experiments"] if r["status"] == "running")
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with redirect_stderr(stream):
        with lm.generate(PROMPT, max_new_tokens=60, verbose=True):
            lm.transformer.h[1].output.save()
    watcher.join()
    assert seen, "the generation never showed as running"
    assert rows(client)["experiments"][0]["experiment"] == seen[0]
    assert rows(client)["experiments"][0]["status"] == "completed"
    assert "dash: running stage" in stream.getvalue()


def test_progress_line_shows_queue_position():
    from nnsight_dask.client.progress import ExperimentProgress

    stream = Terminal()
    with redirect_stderr(stream):
        progress = ExperimentProgress("dep", verbose=True)
        progress("queued", {"experiment": "x", "position": 3})
        progress("running", {"stage": 1, "stages": 4})
        progress("completed", {"experiment": "x"})
    text = stream.getvalue()
    assert "dep: queued, 3 experiment(s) ahead" in text and "dep: running stage 2 of 4" in text
    silent = ExperimentProgress("dep", verbose=False)
    silent("queued", {"position": 1})
    assert silent.bar is None
    piped = io.StringIO()  # not a terminal: nothing drawn
    with redirect_stderr(piped):
        progress = ExperimentProgress("dep", verbose=True)
        progress("running", {"stage": 1, "stages": 4})
        progress.close()
    assert piped.getvalue() == ""


def test_cancelled_experiment_is_shown_cancelled(cluster_with_dashboard):
    _, client, lm, _ = cluster_with_dashboard
    with lm.generate(PROMPT, max_new_tokens=240, blocking=False) as tracer:
        lm.transformer.h[0].output.save()
    deadline = time.monotonic() + 30
    while rows(client)["experiments"][0]["status"] != "running":  # cancelled mid-way, not before or after
        assert not tracer.future.done() and time.monotonic() < deadline
        time.sleep(0.02)
    assert tracer.future.cancel()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        latest = rows(client)["experiments"][0]
        if latest["status"] == "cancelled":
            break
        time.sleep(0.1)
    assert latest["status"] == "cancelled"


def test_monitor_counts_are_pure():
    """The monitor's bookkeeping, driven through its own hooks as clients and shard workers would."""
    m = monitor.ExperimentMonitor()
    m.handle_message(client="c1", event="submitted", experiment="a", deployment="d", user="u",
                     stages=2, shards=[0, 1], workers=["w0", "w1"])
    m.handle_message(client="c1", event="submitted", experiment="b", deployment="d", user="u",
                     stages=2, shards=[0, 1], workers=["w0", "w1"])
    assert rpc.status(m, "b") == {"status": "queued", "position": 1, "stages_done": 0, "stages": 2}
    m.log_event(RUNNING_TOPIC, {"worker": "w0", "experiment": "a", "deployment": "d", "shard": 0})
    assert rpc.status(m, "a")["status"] == "running"

    def passes(worker, *entries):  # what a shard worker's telemetry sends, several passes per event
        m.log_event(STAGES_TOPIC, {"worker": worker, "passes": [
            {"deployment": "d", "shard": shard, "experiments": experiments, "labels": ["p0-t0-fwd-s0"] * len(experiments),
             "start": start, "stop": stop, "thread": 1} for shard, experiments, start, stop in entries]})
    passes("w0", (0, ["a"], 1.0, 1.5))
    assert rpc.status(m, "b")["position"] == 0 and rpc.status(m, "a")["stages_done"] == 1
    passes("w1", (1, ["a"], 2.0, 3.0))
    passes("w0", (0, ["b"], 1.6, 1.7), (0, ["x", "y"], 1.7, 1.8))  # x, y: experiments it never heard of
    m.handle_message(client="c1", event="finished", experiment="a", status="completed", bytes_returned=40)
    m.handle_message(client="c1", event="finished", experiment="b", status="failed", error="IndexError: boom")
    (b, a) = m.rows()
    assert a["status"] == "completed" and a["bytes_returned"] == 40 and a["stages"] == "2/2"
    assert a["queue_wait"] is not None and b["stages"] == "1/2"
    assert b["status"] == "failed" and b["error"] == "IndexError: boom"
    text = prometheus.text(m)
    assert 'nnsight_dask_experiments_total{status="failed"} 1' in text
    assert 'nnsight_dask_experiments_total{status="completed"} 1' in text
    assert 'nnsight_dask_shared_passes_total{deployment="d",shard="0",size="2"} 1' in text
    assert [s["busy_seconds"] for s in m.shard_rows()] == [0.7, 1.0]
    assert [s["stages_run"] for s in m.shard_rows()] == [3, 1]
    m.remove_worker(None, "w0", stimulus_id="test")  # it said "a" computed there, but "a" had finished
    assert rpc.lost_on(m, "a") == {"known": True, "lost_on": ""}
