"""The /experiments page as a browser sees it: a real Bokeh client session over the dashboard's websocket.

``tests/test_dashboard.py`` checks the page's HTML and the panels built in-process; here
``bokeh.client.pull_session`` opens the page the way BokehJS does (HTTP for the session token, then
the websocket protocol: ACK, PULL-DOC), so the document the server sends to browsers is the one
checked. Only the ``experiment`` and ``status`` fields are read, so columns may come and go.
"""
from __future__ import annotations

import json
import time
import urllib.request

import pytest

import nnsight_dask as nd
from nnsight_dask.errors import InterventionError
from nnsight_dask.models import save_tiny

pytestmark = pytest.mark.cluster

FINISHED = ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """A 2-worker cluster with the dashboard preload, a 2-shard tiny GPT-2 and three finished experiments."""
    from distributed import Client, LocalCluster

    path = str(save_tiny(tmp_path_factory.mktemp("m") / "tiny", arch="gpt2", n_layer=2))
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                           scheduler_kwargs={"preload": ["nnsight_dask.service.dashboard"]},
                           env={"OMP_NUM_THREADS": "1", "NNSIGHT_DASK_TORCH_THREADS": "1"})
    client = Client(cluster)
    try:
        nd.serve(client, path, shards=2, name="dash-session")
        lm = nd.RemoteModel(client, "dash-session")
        with lm.trace("The Eiffel Tower is"):
            lm.output.logits[:, -1].save()
        with lm.generate("The Eiffel Tower is", max_new_tokens=2):
            lm.generator.output.save()
        with pytest.raises(InterventionError):
            with lm.trace("The Eiffel Tower is"):
                lm.transformer.h[1].output[:, 50].save()   # 4 tokens: out of range
        base = client.dashboard_link.rsplit("/", 1)[0]
        yield base, _finished_rows(base, 3)
    finally:
        client.close()
        cluster.close()


def _experiments_json(base: str) -> list[dict]:
    with urllib.request.urlopen(base + "/nnsight/experiments.json", timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read())["experiments"]


def _finished_rows(base: str, count: int, timeout: float = 10.0) -> list[dict]:
    """The JSON endpoint's rows once ``count`` experiments are listed and all have finished."""
    deadline = time.monotonic() + timeout
    while True:
        rows = _experiments_json(base)
        if len(rows) >= count and all(r["status"] in FINISHED for r in rows):
            return rows
        assert time.monotonic() < deadline, f"experiments did not all finish in time: {rows}"
        time.sleep(0.1)


def _pull(url: str, **arguments: str):
    from bokeh.client import pull_session

    session = pull_session(url=url, arguments=arguments or None)
    try:
        return session.document
    finally:
        session.close()


def _experiment_tables(document) -> list:
    from bokeh.models import DataTable

    return [table for table in document.select({"type": DataTable})
            if {"experiment", "status"} <= set(table.source.data)]


def test_experiments_page_session_has_one_row_per_experiment(dashboard):
    base, rows = dashboard
    expected = sorted((r["experiment"], r["status"]) for r in rows)
    assert sorted(status for _, status in expected) == ["completed", "completed", "failed"]
    assert len({experiment for experiment, _ in expected}) == 3

    document = _pull(base + "/experiments")
    tables = _experiment_tables(document)
    assert len(tables) == 1, f"expected one DataTable with experiment and status columns, got {len(tables)}"
    (table,) = tables
    data = table.source.data
    got = sorted(zip(data["experiment"], data["status"]))
    assert got == expected
    fields = {column.field for column in table.columns}
    assert {"experiment", "status"} <= fields   # shown, not only in the source


def test_each_session_gets_the_current_rows(dashboard):
    """A second session is a fresh document with the same rows (no state shared between browsers)."""
    base, rows = dashboard
    first, second = _pull(base + "/experiments"), _pull(base + "/experiments")
    assert first is not second
    for document in (first, second):
        (table,) = _experiment_tables(document)
        assert sorted(table.source.data["experiment"]) == sorted(r["experiment"] for r in rows)


def test_the_user_argument_highlights_that_users_rows(dashboard):
    """``/experiments?user=<name>`` opens the page with that user's rows highlighted: this test's
    experiments are all ``nd.config.user``'s, another name's none."""
    base, rows = dashboard
    from nnsight_dask.scheduler.experiments_page import OWN_ROW_COLOR

    for user, highlighted in ((nd.config.user, len(rows)), ("somebody-else", 0)):
        (table,) = _experiment_tables(_pull(base + "/experiments", user=user))
        assert table.source.data["highlight"].count(OWN_ROW_COLOR) == highlighted
