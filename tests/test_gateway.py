"""The HTTP gateway over real loopback HTTP, in front of a real LocalCluster with worker processes.

One cluster, two deployments and one gateway are shared by the module; a test that needs another
gateway (a restart) starts its own on the same cluster.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import pytest
import requests
import torch
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

import nnsight_dask as nd
from nnsight_dask.client.http_api import GatewayError
from nnsight_dask.errors import ForbiddenOperationError, PolicyError
from nnsight_dask.service.cli import main as cli
from nnsight_dask.service.gateway import Gateway, KeyRing, hash_key
from nnsight_dask.service.gateway.fairqueue import FairQueue
from nnsight_dask.service.gateway.state import StateStore
from nnsight_dask.worker import tasks

pytestmark = pytest.mark.cluster
PROMPT = "The Eiffel Tower is in the city of"
#: A generation long enough to still run while a test looks at it (tests/test_lifecycle.py uses the same).
LONG = 200
KEYS = {
    "alice": {"key_sha256": hash_key("alice-key"), "max_concurrent": 8},
    "bob": {"key": "bob-key"},
    "carol": {"key_sha256": hash_key("carol-key"), "deployments": ["locked"]},
    "quota": {"key_sha256": hash_key("quota-key"), "max_concurrent": 1},
    "heavy": {"key_sha256": hash_key("heavy-key"), "max_concurrent": 40},
    "light": {"key_sha256": hash_key("light-key")},
}


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {user}-key"}


@pytest.fixture(scope="module")
def cluster(client, model_dir):
    nd.serve(client, model_dir, shards=2, name="tiny")
    nd.serve(client, model_dir, shards=1, name="locked", policy=nd.Policy(weights="deny"))
    return client


@pytest.fixture(scope="module")
def gateway(cluster, tmp_path_factory):
    keys = KeyRing.from_dict({"users": KEYS})
    with Gateway(cluster.scheduler.address, keys, port=0, state_dir=tmp_path_factory.mktemp("state"),
                 max_in_flight=2, max_body_bytes=1 << 20, body_timeout=1.0) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def lm(gateway):
    return nd.RemoteModel(gateway.url, "tiny", api_key="alice-key")


def call(gateway, method, path, user="alice", **kwargs):
    headers = {**(auth(user) if user else {}), **kwargs.pop("headers", {})}
    return requests.request(method, f"{gateway.url}/v1{path}", headers=headers, timeout=60, **kwargs)


def graph_of(lm, max_new_tokens=None) -> str:
    """The JSON graph of a generation (or a trace) recorded on ``lm`` without running it."""
    if max_new_tokens is None:
        with lm.trace(PROMPT, execute=False) as tracer:
            lm.output.logits.save()
    else:
        with lm.generate(PROMPT, max_new_tokens=max_new_tokens, execute=False) as tracer:
            tracer.result.save()
    return tracer.graph.to_json()


def submit(gateway, graph, user="alice", deployment="tiny", **fields):
    response = call(gateway, "POST", "/experiments", user, json={"deployment": deployment, "graph": graph, **fields})
    assert response.status_code == 202, response.text
    return response.json()["experiment"]


def wait_status(gateway, experiment, user="alice", until=("COMPLETED", "FAILED", "CANCELLED"), timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = call(gateway, "GET", f"/experiments/{experiment}", user, params={"wait": 0.5}).json()
        if status["status"] in until:
            return status
    raise AssertionError(f"experiment {experiment} is still {status['status']} after {timeout} s")


def shards_in_flight(client, name="tiny"):
    record = nd.deployments(client)[name]
    return [client.submit(tasks.shard_status, name, s.index, workers=[s.worker], pure=False).result()["in_flight"]
            for s in record.shards]


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


# -- same results as a Dask client and as a local model ---------------------------------------------
def test_trace_through_the_gateway_equals_the_dask_client_and_local(cluster, lm, local):
    dask_lm = nd.RemoteModel(cluster, "tiny")
    assert isinstance(lm, nd.RemoteModel) and type(lm) is not type(dask_lm)

    def experiment(model):
        with model.trace(PROMPT):
            model.model.layers[1].mlp.down_proj.input[:, -1, [3, 5]] = 10
            hidden = model.model.layers[2].output.save()
            logits = model.output.logits.save()
            half = model.output.logits.to(torch.bfloat16).save()
        with model.generate(PROMPT, max_new_tokens=3) as tracer:
            ids = tracer.result.save()
        return hidden, logits, ids, half

    over_http, over_dask, here = experiment(lm), experiment(dask_lm), experiment(local)
    for a, b, c in zip(over_http, over_dask, here):
        a, b, c = (getattr(x, "value", x) for x in (a, b, c))
        assert a.dtype == b.dtype and torch.equal(a, b)  # the same shards, the same bits: only the transport differs
        if a.dtype != torch.bfloat16:
            assert (a.float() - c.float()).abs().max() <= 1e-5


def test_sessions_and_scans_through_the_gateway(gateway, lm, local):
    def experiment(model):
        with model.session():
            with model.trace("Rome is in Italy"):
                clean = model.model.layers[3].output[:, -1].save()
            with model.trace(PROMPT):
                model.model.layers[0].output[:, -1] = clean
                patched = model.output.logits[:, -1].save()
        return clean, patched

    for a, b in zip(experiment(lm), experiment(local)):
        assert (getattr(a, "value", a) - getattr(b, "value", b)).abs().max() <= 1e-5
    submitted = len(call(gateway, "GET", "/experiments").json()["experiments"])
    with lm.scan(PROMPT):  # on fake tensors, in this process
        shape = lm.model.layers[1].output.save()
    assert tuple(shape.shape)[-1] == 64
    assert len(call(gateway, "GET", "/experiments").json()["experiments"]) == submitted  # nothing sent


def test_background_traces_and_environment_defaults(gateway, monkeypatch):
    monkeypatch.setenv("NNSIGHT_DASK_URL", gateway.url)
    monkeypatch.setenv("NNSIGHT_DASK_API_KEY", "bob-key")
    lm = nd.RemoteModel(name="tiny")
    with lm.trace(PROMPT, blocking=False) as tracer:
        logits = lm.output.logits.save()
    tracer.future.result(timeout=60)
    assert logits.value.shape[:2] == (1, len(lm.tokenizer(PROMPT)["input_ids"]))
    rows = call(gateway, "GET", "/experiments", "bob").json()["experiments"]
    assert rows[0]["status"] == "COMPLETED"  # stamped with the key's user, bob


# -- identity ----------------------------------------------------------------------------------------
def test_requests_without_a_valid_key_are_refused(gateway):
    assert call(gateway, "GET", "/health", user=None).json() == {"status": "ok"}
    assert call(gateway, "GET", "/deployments", user=None, headers={"Authorization": "bearer alice-key"}).ok
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic YWxpY2U6eA=="},
                    {"Authorization": "Bearer "}):
        response = call(gateway, "GET", "/deployments", user=None, headers=headers)
        assert response.status_code == 401
        assert "Bearer" in response.headers["WWW-Authenticate"]
        assert "API key" in response.json()["error"]["message"]
    with pytest.raises(GatewayError, match="HTTP 401"):
        nd.RemoteModel(gateway.url, "tiny", api_key="wrong")


def test_users_see_only_their_deployments_and_experiments(gateway, lm):
    listed = {d["name"] for d in call(gateway, "GET", "/deployments").json()["deployments"]}
    assert listed == {"tiny", "locked"}
    assert [d["name"] for d in call(gateway, "GET", "/deployments", "carol").json()["deployments"]] == ["locked"]
    assert call(gateway, "GET", "/deployments/tiny", "carol").status_code == 404

    experiment = submit(gateway, graph_of(lm))
    wait_status(gateway, experiment)
    assert call(gateway, "GET", f"/experiments/{experiment}/result").status_code == 200
    for method, path in (("GET", ""), ("GET", "/result"), ("DELETE", ""), ("POST", "/cancel"),
                         ("GET", "/store/x/zarr.json")):
        response = call(gateway, method, f"/experiments/{experiment}{path}", "bob")
        assert response.status_code == 404, (method, path)
        assert f"no experiment {experiment} of user 'bob'" in response.json()["error"]["message"]
    assert call(gateway, "GET", f"/experiments/{'0' * 32}").status_code == 404
    assert call(gateway, "GET", "/nothing/here").json()["error"]["type"] == "NotFound"
    assert experiment not in {row["experiment"] for row in call(gateway, "GET", "/experiments", "bob").json()["experiments"]}


def test_a_waiting_client_gets_the_result_with_the_final_status(gateway, lm):
    """``?result=1``: the status that says COMPLETED carries the result (what ``/result`` answers), so a
    waiting client needs no second request; any other status carries none."""
    done = submit(gateway, graph_of(lm))
    while (status := call(gateway, "GET", f"/experiments/{done}", params={"wait": 5, "result": 1}).json())[
            "status"] not in ("COMPLETED", "FAILED", "CANCELLED"):
        assert "result" not in status
    assert status["status"] == "COMPLETED" and status["experiment"] == done
    assert status["result"] == call(gateway, "GET", f"/experiments/{done}/result").json()
    assert "result" not in call(gateway, "GET", f"/experiments/{done}").json()

    stopped = submit(gateway, graph_of(lm, max_new_tokens=LONG))
    call(gateway, "DELETE", f"/experiments/{stopped}")
    status = wait_status(gateway, stopped)
    assert status["status"] == "CANCELLED"
    assert "result" not in call(gateway, "GET", f"/experiments/{stopped}", params={"wait": 1, "result": 1}).json()


# -- refusals ------------------------------------------------------------------------------------------
def test_malformed_requests_answer_400_and_bad_graphs_422(gateway, lm):
    cases = {b"{not json": "not valid JSON", b"[1, 2]": "must be a JSON object",
             json.dumps({"graph": "{}"}).encode(): "'deployment'", json.dumps({"deployment": "tiny"}).encode(): "'graph'",
             json.dumps({"deployment": "tiny", "graph": "{}", "keepalive": -1}).encode(): "keepalive"}
    for body, message in cases.items():
        response = call(gateway, "POST", "/experiments", data=body)
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    response = call(gateway, "POST", "/experiments", json={"deployment": "tiny", "graph": {"nodes": "x"}})
    assert response.status_code == 422 and response.json()["error"]["type"] == "GraphValidationError"
    response = call(gateway, "POST", "/experiments", json={"deployment": "nope", "graph": graph_of(lm)})
    assert response.status_code == 404 and "nope" in response.json()["error"]["message"]


def test_a_huge_body_answers_413_and_the_gateway_keeps_serving(gateway, lm):
    response = call(gateway, "POST", "/experiments", data=b"x" * ((1 << 20) + 1))
    assert response.status_code == 413 and "limit of 1048576 bytes" in response.json()["error"]["message"]
    chunked = call(gateway, "POST", "/experiments", data=(b"x" * (1 << 16) for _ in range(17)))  # no length
    assert chunked.status_code == 413
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as raw:  # declares 10 GB
        raw.sendall(b"POST /v1/experiments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-key\r\n"
                    b"Content-Length: 10000000000\r\n\r\n")
        assert raw.recv(65536).startswith(b"HTTP/1.1 413")
    with lm.trace(PROMPT):
        logits = lm.output.logits.save()
    assert logits.shape[:2] == (1, len(lm.tokenizer(PROMPT)["input_ids"]))


def test_a_slow_client_is_cut_off_without_holding_up_others(gateway):
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as raw:
        raw.sendall(b"POST /v1/experiments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-key\r\n"
                    b"Content-Length: 100\r\n\r\n{\"deploy")  # ... and nothing more
        started = time.monotonic()
        assert call(gateway, "GET", "/deployments").status_code == 200  # served meanwhile
        assert raw.recv(65536) == b""  # closed after the body timeout (1 s here)
        assert time.monotonic() - started < 5


def test_hostile_graphs_are_refused_with_the_reason_and_line(gateway, lm):
    graph = json.loads(graph_of(lm))
    op = next(node for node in graph["nodes"] if node["kind"] == "op")
    op["target"] = "os.system"
    response = call(gateway, "POST", "/experiments", json={"deployment": "tiny", "graph": graph})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "ForbiddenOperationError" and "os.system" in error["message"]

    locked = nd.RemoteModel(gateway.url, "locked", api_key="carol-key")
    with pytest.raises(PolicyError, match=r"weights='deny'") as refused, locked.trace(PROMPT):
        locked.model.layers[0].mlp.down_proj.weight.save()
    assert refused.value.rule == "weights" and "test_gateway.py" in str(refused.value)

    with pytest.raises(ForbiddenOperationError, match="my_function"):
        def my_function(x):
            return x * 2
        with lm.trace(PROMPT):
            nd.apply(my_function, lm.output.logits).save()


def test_over_quota_answers_429_naming_the_limit(gateway, lm):
    first = submit(gateway, graph_of(lm, LONG), user="quota")
    response = call(gateway, "POST", "/experiments", "quota", json={"deployment": "tiny", "graph": graph_of(lm)})
    assert response.status_code == 429
    assert "max_concurrent = 1" in response.json()["error"]["message"]
    call(gateway, "DELETE", f"/experiments/{first}", "quota")
    assert wait_status(gateway, first, "quota")["status"] == "CANCELLED"
    assert submit(gateway, graph_of(lm), user="quota")  # admitted again once the first ended


# -- statuses ------------------------------------------------------------------------------------------
def test_the_websocket_streams_the_status_events(gateway, lm):
    experiment = submit(gateway, graph_of(lm, 60))

    async def watch():
        request = HTTPRequest(f"ws://{gateway.host}:{gateway.port}/v1/experiments/{experiment}/events",
                              headers=auth("alice"))
        stream = await websocket_connect(request)
        events = []
        while (message := await stream.read_message()) is not None:
            events.append(json.loads(message))
        return events

    events = asyncio.run(asyncio.wait_for(watch(), 60))
    statuses = [event["status"] for event in events]
    assert statuses[:2] == ["RECEIVED", "QUEUED"] and statuses[-1] == "COMPLETED", statuses
    assert set(statuses) == {"RECEIVED", "QUEUED", "RUNNING", "COMPLETED"}
    assert "position" in events[1]
    running = [event for event in events if event["status"] == "RUNNING"]
    assert running[0]["stage"] == 1 and all(1 <= e["stage"] <= e["stages"] for e in running)
    assert [event["seq"] for event in events] == sorted({event["seq"] for event in events})  # each once, in order

    async def refused():
        with pytest.raises(Exception, match="404"):
            await websocket_connect(HTTPRequest(f"ws://{gateway.host}:{gateway.port}/v1/experiments/"
                                                f"{experiment}/events", headers=auth("bob")))
    asyncio.run(refused())


def test_cancel_stops_the_experiment_on_the_shards(gateway, lm, cluster):
    experiment = submit(gateway, graph_of(lm, LONG))
    wait_status(gateway, experiment, until=("RUNNING",))
    response = call(gateway, "DELETE", f"/experiments/{experiment}")
    assert response.status_code in (200, 202)
    status = wait_status(gateway, experiment)
    assert status["status"] == "CANCELLED" and "cancelled by its owner" in status["error"]["message"]
    wait_until(lambda: shards_in_flight(cluster) == [0, 0], 10, "the shards freed the experiment")
    result = call(gateway, "GET", f"/experiments/{experiment}/result")
    assert result.status_code == 409 and "CANCELLED" in result.json()["error"]["message"]

    with lm.generate(PROMPT, max_new_tokens=LONG, blocking=False) as tracer:
        tracer.result.save()
    time.sleep(0.5)
    assert tracer.future.cancel() and tracer.future.cancelled()
    # the client's cancel reaches the shards too (and the next test starts with them empty)
    wait_until(lambda: shards_in_flight(cluster) == [0, 0], 10, "the shards freed the client-cancelled experiment")


def test_a_client_that_stops_watching_has_its_experiment_freed(gateway, lm, cluster):
    experiment = submit(gateway, graph_of(lm, LONG), keepalive=0.5)
    time.sleep(2.0)  # the client "died": nobody asks about the experiment
    status = call(gateway, "GET", f"/experiments/{experiment}").json()
    assert status["status"] == "CANCELLED" and "keepalive" in status["error"]["message"]
    wait_until(lambda: shards_in_flight(cluster) == [0, 0], 10, "the shards freed the experiment")


def test_a_light_user_is_not_stuck_behind_a_heavy_one(gateway, lm):
    graph = graph_of(lm, 10)
    heavy = [submit(gateway, graph, user="heavy") for _ in range(12)]
    light = submit(gateway, graph, user="light")
    ended = {experiment: wait_status(gateway, experiment, user)["ended"]
             for user, batch in (("light", [light]), ("heavy", heavy)) for experiment in batch}
    after = sum(ended[experiment] > ended[light] for experiment in heavy)
    assert after >= 8, f"only {after} of the heavy user's 12 experiments finished after the light one"


# -- persistence ---------------------------------------------------------------------------------------
def test_persisted_saves_are_read_lazily_through_the_gateway(gateway, lm, local):
    store = "store.zarr"  # a name: under the user's prefix of the gateway's result store
    with lm.trace(PROMPT, store=store, persist_threshold=0):
        hidden = lm.model.layers[1].output.save()
    with local.trace(PROMPT):
        expected = local.model.layers[1].output.save()
    assert type(hidden).__name__ == "LazyTensor"
    assert torch.allclose(hidden[:, -1].torch(), expected[:, -1], atol=1e-5)
    assert torch.allclose(hidden.torch(), expected, atol=1e-5)

    direct = nd.RemoteModel(gateway.url, "tiny", api_key="alice-key", store_access="direct")
    with direct.trace(PROMPT, store=store, persist_threshold=0):
        again = direct.model.layers[1].output.save()
    assert torch.equal(again.torch(), hidden.torch())

    experiment = call(gateway, "GET", "/experiments").json()["experiments"][1]["experiment"]
    prefix = json.loads(call(gateway, "GET", f"/experiments/{experiment}/result").text)
    path = next(iter(prefix["saves"].values()))["zarr"]["path"]
    assert next(iter(prefix["saves"].values()))["zarr"]["url"] == f"{gateway.result_store}/alice/store.zarr"
    assert call(gateway, "GET", f"/experiments/{experiment}/store/{path}/zarr.json").status_code == 200
    for bad in (f"{path}/../../etc/passwd", "other/zarr.json", f"{path}//zarr.json"):
        assert call(gateway, "GET", f"/experiments/{experiment}/store/{bad}").status_code == 404, bad
    assert call(gateway, "GET", f"/experiments/{experiment}/store/{path}/zarr.json", "bob").status_code == 404


def test_a_lazy_slice_fetches_only_its_chunks_through_the_gateway(lm, caplog):
    with lm.trace(PROMPT, store="slices.zarr", persist_threshold=0):
        big = lm.model.layers[1].output[:, :1, :1].expand(2, 1024, 1024).save()  # 8 MiB: two 4 MiB chunks
    caplog.set_level(logging.INFO, logger="tornado.access")
    first = big[0].torch()
    assert first.shape == (1024, 1024) and torch.all(first == first[0, 0])
    fetched = [record.getMessage() for record in caplog.records if "/store/" in record.getMessage()]
    chunks = [line for line in fetched if "/c." in line]
    assert len(chunks) == 1 and "/c.0.0.0 " in chunks[0], fetched


def test_a_restarted_gateway_keeps_completed_results(cluster, lm, tmp_path):
    keys = KeyRing.from_dict({"users": KEYS})
    with Gateway(cluster, keys, port=0, state_dir=tmp_path) as first:
        done = submit(first, graph_of(lm))
        assert wait_status(first, done)["status"] == "COMPLETED"
        result = call(first, "GET", f"/experiments/{done}/result").json()
        running = submit(first, graph_of(lm, LONG))
        wait_status(first, running, until=("RUNNING",))
    crashed = StateStore(tmp_path)  # as a gateway that died with an experiment running leaves it
    crashed.add("c" * 32, "alice", "tiny", status="RUNNING")
    crashed.close()
    with Gateway(cluster, keys, port=0, state_dir=tmp_path) as second:
        assert second.interrupted == 1
        assert call(second, "GET", f"/experiments/{done}/result").json() == result
        status = call(second, "GET", f"/experiments/{running}").json()
        assert status["status"] == "FAILED" and "gateway stopped" in status["error"]["message"]
        status = call(second, "GET", f"/experiments/{'c' * 32}").json()
        assert status["status"] == "FAILED" and "gateway restarted" in status["error"]["message"]
    wait_until(lambda: shards_in_flight(cluster) == [0, 0], 10, "the shards freed the stopped experiment")


def test_a_gateway_that_cannot_listen_says_so(cluster, gateway, tmp_path):
    second = Gateway(cluster, KeyRing.from_dict({"users": KEYS}), port=gateway.port, state_dir=tmp_path)
    with pytest.raises(OSError, match="in use"):
        second.start()
    assert second.client is None  # released what it had opened
    assert call(gateway, "GET", "/health", user=None).ok  # the first one serves on


def test_the_experiments_page_is_added_without_a_preload(cluster, gateway, lm):
    dask_lm = nd.RemoteModel(cluster, "tiny")
    with dask_lm.trace(PROMPT):  # one experiment from a Dask client ...
        dask_lm.output.logits.save()
    graph = graph_of(lm)
    for user in ("heavy", "light"):  # ... and one per gateway user
        wait_status(gateway, submit(gateway, graph, user=user), user)
    base = cluster.dashboard_link.rsplit("/", 1)[0]
    page = requests.get(f"{base}/experiments", timeout=30)
    assert page.status_code == 200 and "bokeh" in page.text.lower()
    rows = requests.get(f"{base}/nnsight/experiments.json", timeout=30).json()["experiments"]
    via: dict[str, set[str]] = {}
    for row in rows:
        via.setdefault(row["user"], set()).add(row["via"])
    assert via["heavy"] == via["light"] == {"gateway"}  # users the gateway authenticated
    assert "client" in via[nd.config.user]  # the name a Dask client gave itself


# -- units -------------------------------------------------------------------------------------------
def test_keys_toml_is_read_strictly(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(f'[users.alice]\nkey_sha256 = "{hash_key("k")}"\nmax_concurrent = 2\ndeployments = ["smol"]\n'
                    '[users.bob]\nkey = "plain"\n')
    ring = KeyRing.from_toml(path)
    alice = ring.authenticate("Bearer k")
    assert alice is not None and alice.name == "alice" and alice.max_concurrent == 2
    assert alice.may_use("smol") and not alice.may_use("other")
    assert ring.authenticate("Bearer plain").name == "bob"
    assert ring.authenticate("Bearer nope") is None and ring.authenticate(None) is None
    for table, message in (({"key": "a", "key_sha256": hash_key("a")}, "exactly one"), ({"key": "a", "max": 1}, "unknown"),
                           ({"key_sha256": "abc"}, "64 hex"), ({"key": "a", "max_concurrent": 0}, "positive")):
        with pytest.raises(ValueError, match=message):
            KeyRing.from_dict({"users": {"x": table}})
    with pytest.raises(ValueError, match="same API key"):
        KeyRing.from_dict({"users": {"x": {"key": "a"}, "y": {"key": "a"}}})


def test_the_cli_makes_keys_the_gateway_accepts(capsys, tmp_path):
    assert cli(["gateway", "--new-key", "dana"]) == 0
    printed = capsys.readouterr().out
    key = printed.split("# key: ", 1)[1].split()[0]
    path = tmp_path / "keys.toml"
    path.write_text(printed)
    ring = KeyRing.from_toml(path)
    assert ring.authenticate(f"Bearer {key}").name == "dana" and key not in printed.split("[users.dana]")[1]
    assert cli(["gateway", "--keys", "keys.toml"]) == 1  # no --scheduler: a one-line error, not a traceback


def test_fair_queue_takes_users_in_turn():
    queue: FairQueue[str] = FairQueue()
    for i in range(4):
        queue.push("heavy", f"h{i}")
    queue.push("light", "l0")
    assert queue.position("light", "l0") == 1 and queue.position("heavy", "h2") == 3  # by turns
    order = [queue.pop() for _ in range(5)]
    assert order == ["l0", "h0", "h1", "h2", "h3"] and queue.pop() is None  # the shorter line first
    for item in ("a0", "a1", "b0", "b1"):
        queue.push(item[0], item)
    assert [queue.pop() for _ in range(4)] == ["a0", "b0", "a1", "b1"]  # equal lines take turns
    queue.push("a", "a0")
    queue.push("b", "b0")
    assert queue.remove("a", "a0") and not queue.remove("a", "a0") and queue.pop() == "b0"
    assert len(queue) == 0
    for item in ("h0", "h1", "g0", "l0"):
        queue.push(item[0], item)
    assert queue.pop({"h": 1, "g": 1}) == "l0"  # nothing running: goes before users who run something
    assert queue.pop({"h": 2, "g": 1}, cap=2) == "g0"  # h holds its share: skipped, keeps its turn
    assert queue.pop({"h": 2}, cap=2) is None and queue.pop() == "h0"
