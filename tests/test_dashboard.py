"""The Experiments page, JSON endpoint and metrics over real HTTP against a running cluster."""
from __future__ import annotations

import json
import urllib.request

import pytest

import nnsight_dask as nd
from nnsight_dask.errors import InterventionError
from nnsight_dask.models import save_tiny
from nnsight_dask.service.dashboard import ExperimentsPanel, ShardsPanel, experiment_rows, prometheus_text

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster_with_dashboard(tmp_path_factory):
    from distributed import Client, LocalCluster

    path = str(save_tiny(tmp_path_factory.mktemp("m") / "tiny", arch="gpt2", n_layer=2))
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0",
                           scheduler_kwargs={"preload": ["nnsight_dask.service.dashboard"]})
    client = Client(cluster)
    nd.serve(client, path, shards=2, name="dash")
    lm = nd.RemoteModel(client, "dash")
    with lm.trace("The Eiffel Tower is"):
        lm.output.logits.save()
    with pytest.raises(InterventionError):
        with lm.trace("The Eiffel Tower is"):
            lm.transformer.h[1].output[:, 50].save()
    yield cluster, client
    client.close()
    cluster.close()


def get(client, path):
    base = client.dashboard_link.rsplit("/", 1)[0]
    with urllib.request.urlopen(base + path, timeout=30) as response:
        return response.status, response.read().decode()


def test_json_endpoint_lists_experiments(cluster_with_dashboard):
    _, client = cluster_with_dashboard
    status, body = get(client, "/nnsight/experiments.json")
    data = json.loads(body)
    assert status == 200
    statuses = sorted(row["status"] for row in data["experiments"])
    assert statuses == ["completed", "failed"]
    failed = next(r for r in data["experiments"] if r["status"] == "failed")
    assert "IndexError" in failed["error"] and failed["deployment"] == "dash"
    done = next(r for r in data["experiments"] if r["status"] == "completed")
    assert done["shards"] == "0,1" and done["run_time"] > 0 and done["queue_wait"] >= 0
    assert {(s["deployment"], s["shard"]) for s in data["shards"]} == {("dash", 0), ("dash", 1)}


def test_metrics_endpoint(cluster_with_dashboard):
    _, client = cluster_with_dashboard
    status, body = get(client, "/nnsight/metrics")
    assert status == 200
    assert 'nnsight_dask_experiments{status="completed"} 1' in body
    assert 'nnsight_dask_experiments{status="failed"} 1' in body
    assert "nnsight_dask_experiment_seconds_count 2" in body  # completed and failed both finished


def test_experiments_page_and_panels(cluster_with_dashboard):
    cluster, client = cluster_with_dashboard
    status, body = get(client, "/experiments")
    assert status == 200 and "bokeh" in body.lower()
    panel = ExperimentsPanel(cluster.scheduler)
    panel.update()
    assert sorted(panel.source.data["status"]) == ["completed", "failed"]
    shards = ShardsPanel(cluster.scheduler)
    assert list(shards.source.data["shard"]) == [0, 1]


def test_rows_and_metrics_are_pure():
    events = [(1.0, {"experiment": "a", "deployment": "d", "status": "queued"}),
              (3.0, {"experiment": "a", "deployment": "d", "status": "completed"})]
    stages = [(1.5, {"experiment": "a", "deployment": "d", "shard": 0}),
              (2.0, {"experiment": "a", "deployment": "d", "shard": 1})]
    (row,) = experiment_rows(events, stages)
    assert row["queue_wait"] == 0.5 and row["run_time"] == 1.5 and row["shards"] == "0,1"
    text = prometheus_text([row])
    assert 'nnsight_dask_experiment_seconds_bucket{le="2.5"} 1' in text
