"""A hostile key holder (or someone with no key) against the gateway (issue 23, items 3-7).

Each test replays one attack of the red team's report over real HTTP against the gateway started
by its CLI in a process of its own (limited to 256 file descriptors, as in the report), in front of a
real LocalCluster, and measures what another user gets meanwhile: their latency, or their data.
The figures print with ``pytest -s``.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import json
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import torch
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

import nnsight_dask as nd
from nnsight_dask.errors import PolicyError
from nnsight_dask.service.gateway import hash_key

from .gateway_process import GatewayProcess, gateway_process

pytestmark = pytest.mark.cluster
PROMPT = "The Eiffel Tower is in the city of"
#: Another user's latency bound under attack. Before: 10-28 s (items 3), no answer at all (item 4, whose
#: target is 15 s). Measured after: 0.05-2.5 s, on 2 cores shared by the attackers, the victim, the
#: cluster and the gateway.
VICTIM_BOUND = 5.0


class Recorder(http.server.BaseHTTPRequestHandler):
    """An "internal service" on loopback: answers everything 500 with headers and JSON worth stealing."""

    seen: list[str] = []

    def _answer(self) -> None:
        Recorder.seen.append(f"{self.command} {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"internal_secret_field": "s3cr3t", "admin_token": "t0k3n"}).encode()
        self.send_response(500)
        self.send_header("X-Internal-Build", "leaky-9.9")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def internal_service() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def user(name: str, **table: object) -> dict[str, object]:
    return {"key_sha256": hash_key(f"{name}-key"), **table}


@pytest.fixture(scope="module")
def cluster(client, model_dir, internal_service):
    nd.serve(client, model_dir, shards=2, name="tiny")
    # a deployment whose operator lists a network store (the only way gateway users reach one)
    nd.serve(client, model_dir, shards=1, name="net",
             policy=nd.Policy(stores=[f"{internal_service}/"], storage_options=["block_size"]))
    return client


@pytest.fixture(scope="module")
def gw(cluster, tmp_path_factory, internal_service) -> Iterator[GatewayProcess]:
    users = {"alice": user("alice", max_concurrent=8), "bob": user("bob"),
             "mallory": user("mallory", max_concurrent=40), "trudy": user("trudy", max_concurrent=40),
             "eve": user("eve"), "rita": user("rita"), "carol": user("carol"), "wendy": user("wendy"),
             "net": user("net", stores=[f"{internal_service}/"])}
    with gateway_process(cluster.scheduler.address, tmp_path_factory.mktemp("gateway"), users, nofile=256) as gw:
        yield gw


def call(gw: GatewayProcess, method: str, path: str, who: str | None = "alice", timeout: float = 60,
         headers: dict[str, str] | None = None, **kwargs: object) -> requests.Response:
    headers = {**({"Authorization": f"Bearer {who}-key"} if who else {}), **(headers or {})}
    url = f"{gw.url}/v1{path}"
    return requests.request(method, url, headers=headers, timeout=timeout, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def small_graph(gw) -> str:
    lm = nd.RemoteModel(gw.url, "tiny", api_key="alice-key")
    with lm.trace(PROMPT, execute=False) as tracer:
        lm.model.layers[1].output[:, -1].save()
    return tracer.graph.to_json()


def wait_final(gw: GatewayProcess, experiment: str, who: str = "alice", timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = call(gw, "GET", f"/experiments/{experiment}", who, params={"wait": 1}).json()
        if status["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return status
    raise AssertionError(f"experiment {experiment} did not end within {timeout} s")


def submit_latency(gw: GatewayProcess, graph: str, who: str = "alice") -> float:
    """Seconds from POST to the 202 of one small experiment (then waits for its end, off the clock)."""
    started = time.perf_counter()
    response = call(gw, "POST", "/experiments", who, json={"deployment": "tiny", "graph": graph})
    took = time.perf_counter() - started
    assert response.status_code == 202, response.text
    wait_final(gw, response.json()["experiment"], who)
    return took


class Victim(threading.Thread):
    """Another user submitting small experiments (and listing deployments) while an attack runs."""

    def __init__(self, gw: GatewayProcess, graph: str) -> None:
        super().__init__(daemon=True)
        self.gw, self.graph = gw, graph
        self.stop = threading.Event()
        self.submits: list[float] = []
        self.listings: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                started = time.perf_counter()
                assert call(self.gw, "GET", "/deployments", timeout=60).status_code == 200
                self.listings.append(time.perf_counter() - started)
                self.submits.append(submit_latency(self.gw, self.graph))
            except Exception as exc:  # noqa: BLE001 - a victim's failure is the measure
                self.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.1)

    def __enter__(self) -> Victim:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(timeout=120)

    def report(self, what: str) -> str:
        worst = max(self.submits + self.listings, default=float("nan"))
        return (f"{what}: victim submits {len(self.submits)}, median {statistics.median(self.submits or [0]):.3f} s, "
                f"max submit {max(self.submits, default=float('nan')):.3f} s, max listing "
                f"{max(self.listings, default=float('nan')):.3f} s (worst {worst:.3f} s), errors {self.errors[:2]}")


def attack_in_threads(n: int, seconds: float, attack: Callable[[], object]) -> list[object]:
    """Run ``attack`` over and over in ``n`` threads for ``seconds``; what each call answered."""
    answers: list[object] = []
    deadline = time.monotonic() + seconds

    def loop() -> None:
        while time.monotonic() < deadline:
            try:
                answers.append(attack())
            except requests.RequestException as exc:
                answers.append(type(exc).__name__)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)
    return answers


def no_server_errors(gw: GatewayProcess) -> None:
    log = gw.log_text()
    for bad in ("Traceback", "NotImplementedError", "Uncaught exception", " 500 "):
        assert bad not in log, f"the gateway logged {bad!r}:\n{log[-3000:]}"


# -- item 3: the event loop and the validation pool ----------------------------------------------
def empty_lists(mebibytes: float) -> bytes:
    n = int(mebibytes * 2**20) // 3
    return b'{"deployment": "tiny", "graph": {"nodes": [' + b"[]," * n + b"[]]}}"


def test_huge_and_dense_bodies_neither_stall_nor_bloat_the_gateway(gw, small_graph):
    """The red team's 57 MiB body of empty lists froze every user 10-15 s and added ~1.4 GB."""
    alone = statistics.median(submit_latency(gw, small_graph) for _ in range(5))
    huge, dense = empty_lists(57), empty_lists(15)  # 57 MiB: over the 16 MiB limit; 15 MiB: under it
    rss = gw.rss()

    def attack() -> object:
        answers = []
        for body in (huge, dense, (huge[i:i + (1 << 20)] for i in range(0, len(huge), 1 << 20))):
            answers.append(call(gw, "POST", "/experiments", "mallory", data=body, timeout=120).status_code)
        return tuple(answers)

    with Victim(gw, small_graph) as victim:
        answers = attack_in_threads(2, 12.0, attack)
    print(f"\nalone: submit {alone:.3f} s; {victim.report('57 MiB / 15 MiB / chunked 57 MiB bodies, 2 threads')}; "
          f"gateway RSS {rss / 2**20:.0f} -> {gw.rss() / 2**20:.0f} MiB; answers {sorted(set(map(str, answers)))}")
    assert answers[0] == (413, 413, 413), answers[:5]  # refused: over the limit, or over the JSON values bound
    assert all(isinstance(a, tuple) and set(a) <= {413, 429} for a in answers), answers  # 429: refusals counted
    assert not victim.errors and len(victim.submits) >= 3
    assert max(victim.submits + victim.listings) < VICTIM_BOUND
    assert gw.rss() - rss < 300 << 20


def graph_of_nodes(n: int, location: str, last: str = "os.system") -> str:
    """A graph of ``n`` nodes that decodes and checks node by node, refused at its last (the costliest
    graph within the limits: ~1.5 s of a validation thread)."""
    nodes = [{"id": 0, "kind": "getter", "module": "model.layers.1", "access": "output", "invoke": 0}]
    nodes += [{"id": i, "kind": "op", "target": "operator.mul", "invoke": 0, "location": location,
               "args": [{"ref": i - 1}, 2]} for i in range(1, n)]
    nodes[-1]["target"] = last
    return json.dumps({"version": 1, "model": "LlamaForCausalLM", "passes": [], "iterations": [], "nodes": nodes})


def test_parallel_huge_graphs_do_not_starve_another_users_submit(gw, small_graph):
    """8 parallel 11 MiB graph strings filled the shared validation pool: another user's submit took
    18 s (0.02 s alone)."""
    dense = json.dumps({"deployment": "tiny", "graph": "[" + "[]," * (11 * 2**20 // 3) + "[]]"}).encode()
    costly = json.dumps({"deployment": "tiny", "graph": graph_of_nodes(19_999, "x" * 450)}).encode()
    assert 10 * 2**20 < len(costly) < 12 * 2**20 and 10 * 2**20 < len(dense) < 12 * 2**20
    alone = statistics.median(submit_latency(gw, small_graph) for _ in range(5))
    bodies = [dense, costly]

    def attack() -> object:
        bodies.reverse()
        return call(gw, "POST", "/experiments", "trudy", data=bodies[0], timeout=120).status_code

    with Victim(gw, small_graph) as victim:
        answers = attack_in_threads(8, 15.0, attack)
    counts = {code: answers.count(code) for code in set(answers)}
    print(f"\nalone: submit {alone:.3f} s; {victim.report('8 threads of 11 MiB graphs')}; attacker got {counts}")
    assert set(counts) <= {413, 422, 429}, counts
    assert counts.get(429, 0) > 0  # admitted per user before the body was read
    assert not victim.errors and len(victim.submits) >= 3
    assert max(victim.submits + victim.listings) < VICTIM_BOUND


def test_refused_requests_spend_a_per_user_budget(gw, small_graph):
    """Bad graphs fail 422 before any quota applies: counted, they end in 429 before the body is read."""
    bad = {"deployment": "tiny", "graph": {"nodes": "x"}}
    codes = [call(gw, "POST", "/experiments", "rita", json=bad).status_code for _ in range(40)]
    assert codes[0] == 422 and 429 in codes and codes.index(429) >= 25, codes
    refused = call(gw, "POST", "/experiments", "rita", json={"deployment": "tiny", "graph": small_graph})
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "RateLimited"
    assert int(refused.headers["Retry-After"]) >= 1 and "refused" in refused.json()["error"]["message"]
    with socket.create_connection((gw.host, gw.port), timeout=10) as raw:  # declares 11 MiB, sends none
        raw.sendall(b"POST /v1/experiments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer rita-key\r\n"
                    b"Content-Length: 11534336\r\n\r\n")
        assert raw.recv(65536).startswith(b"HTTP/1.1 429")  # answered from the headers alone
    assert submit_latency(gw, small_graph) < VICTIM_BOUND  # another user is not affected


# -- item 4: connections that never finish their headers -----------------------------------------
def test_connections_without_a_key_cannot_lock_users_out(gw, small_graph):
    """With 256 file descriptors, 300 connections that never finish their headers locked everyone out."""
    held: list[socket.socket] = []
    stop = threading.Event()
    reopened = [0]

    def closed(s: socket.socket) -> bool:
        try:
            return s.recv(1, socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def hold() -> None:  # keep 300 half-open connections, reopening those the gateway closes
        while not stop.is_set():
            for s in [s for s in held if closed(s)]:
                held.remove(s)
                s.close()
            while len(held) < 300 and not stop.is_set():
                with contextlib.suppress(OSError):
                    s = socket.create_connection((gw.host, gw.port), timeout=5)
                    s.sendall(b"GET /v1/deployments HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    s.settimeout(None)  # blocking, so that MSG_DONTWAIT peeks without waiting
                    held.append(s)
                    reopened[0] += 1
            time.sleep(0.2)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        time.sleep(3.0)  # 300 open, and reopened as they close
        latencies = []
        for _ in range(3):
            started = time.perf_counter()
            assert call(gw, "GET", "/deployments", timeout=30).status_code == 200
            latencies.append(time.perf_counter() - started)
            latencies.append(submit_latency(gw, small_graph))
    finally:
        stop.set()
        holder.join(timeout=30)
        for s in held:
            s.close()
    print(f"\n300 half-open connections (reopened {reopened[0]} times): authenticated requests took "
          f"{', '.join(f'{t:.3f}' for t in latencies)} s")
    assert max(latencies) < 15.0  # the red team's target
    assert max(latencies) < VICTIM_BOUND
    assert reopened[0] > 300  # the gateway closed some of them: the cap on connections without a key


def test_a_connection_that_never_sends_its_headers_is_closed_after_the_header_timeout(gw):
    with socket.create_connection((gw.host, gw.port), timeout=30) as raw:
        raw.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert raw.recv(65536) == b""
        assert 5 < time.monotonic() - started < 20  # the header timeout is 10 s, not tornado's 300 s idle


# -- item 5: the reach of store= --------------------------------------------------------------------
def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_store_reaches_only_the_users_own_prefix(gw, internal_service, tmp_path):
    """SSRF with the user's headers, another user's store, any directory the worker can write."""
    bob = nd.RemoteModel(gw.url, "tiny", api_key="bob-key")
    with bob.trace(PROMPT, store="bobs-run", persist_threshold=0):
        mine = bob.model.layers[1].output.save()
    bobs = gw.result_store / "bob"
    before = tree_digest(bobs)
    assert before and torch.equal(mine.torch(), mine.torch())

    eve = nd.RemoteModel(gw.url, "tiny", api_key="eve-key")
    Recorder.seen.clear()
    attacks = {
        f"{internal_service}/admin": {"headers": {"Authorization": "Bearer stolen"}},
        f"{internal_service}/x": None,
        str(bobs / "bobs-run"): None,
        "../bob/bobs-run": None,
        str(tmp_path / "anywhere"): None,
        "/etc/nnsight-dask": None,
        "simplecache::file:///tmp/x": None,
        "mine": {"headers": {"X-Forwarded-For": "1.2.3.4"}},  # her own prefix, but options the policy lists not
    }
    for store, options in attacks.items():
        with pytest.raises(PolicyError) as refused:
            with eve.trace(PROMPT, store=store, persist_threshold=0, storage_options=options):
                eve.model.layers[1].output.save()
        assert refused.value.rule in ("store_scope", "storage_options"), (store, refused.value)
    assert Recorder.seen == []  # nothing reached the internal service
    assert tree_digest(bobs) == before  # bob's data untouched
    assert not (tmp_path / "anywhere").exists()

    with eve.trace(PROMPT, store="mine", persist_threshold=0):  # her own prefix works
        hers = eve.model.layers[1].output.save()
    assert hers.torch().shape[-1] == 64 and (gw.result_store / "eve" / "mine").is_dir()


def test_store_errors_name_the_rule_not_the_stores_answer(gw, internal_service):
    """Where the operator lists a network store (the deployment's policy, and the user's stores in
    keys.toml), a failing write tells the user the rule, never the service's status, headers or JSON."""
    net = nd.RemoteModel(gw.url, "net", api_key="net-key")
    Recorder.seen.clear()
    with pytest.raises(PolicyError, match="storage_options") as refused:  # an option the policy does not list
        with net.trace(PROMPT, store=f"{internal_service}/run", persist_threshold=0,
                       storage_options={"headers": {"Authorization": "Bearer stolen"}}):
            net.model.layers[1].output.save()
    assert refused.value.rule == "storage_options" and not Recorder.seen
    with pytest.raises(Exception) as failed:  # an option it lists
        with net.trace(PROMPT, store=f"{internal_service}/run", persist_threshold=0,
                       storage_options={"block_size": 0}):
            net.model.layers[1].output.save()
    text = str(failed.value)
    assert Recorder.seen, "the listed store was reached"
    assert getattr(failed.value, "rule", None) == "store_errors", (type(failed.value), text)
    assert "withheld" in text and "store" in text, text
    for leak in ("internal_secret_field", "admin_token", "X-Internal-Build", "leaky", "500", "Internal Server"):
        assert leak not in text, (leak, text)


def test_the_shards_hold_the_store_scope_and_a_dask_client_keeps_its_freedom(cluster, tmp_path):
    """The gateway only fails fast: a scoped graph sent straight to a shard meets the same rule
    there; a Dask client's own graph (no scope) still writes where its user says."""
    from nnsight_dask.execution.stage import Carry, Stage

    from . import cluster as harness

    route_by_hand = getattr(harness, "route_by_hand", None)
    if route_by_hand is None:
        pytest.skip("tests.cluster.route_by_hand (the direct route by hand) is not there yet")
    dask_lm = nd.RemoteModel(cluster, "tiny")
    with dask_lm.trace(PROMPT, store=str(tmp_path / "mine"), persist_threshold=0, execute=False) as tracer:
        dask_lm.model.layers[1].output.save()
    graph = tracer.graph
    graph.options["store_scope"] = {"user": "eve", "stores": [f"file://{tmp_path}/eve"]}
    record = nd.deployments(cluster)["tiny"]
    answers = route_by_hand(cluster, record, {"bypass": graph.to_json()}, [Stage(0, 0, 0)], {"bypass": Carry()})
    assert isinstance(answers["bypass"], PolicyError) and answers["bypass"].rule == "store_scope"
    assert not (tmp_path / "mine").exists()

    with dask_lm.trace(PROMPT, store=str(tmp_path / "mine"), persist_threshold=0):
        free = dask_lm.model.layers[1].output.save()
    assert free.torch().shape[-1] == 64 and (tmp_path / "mine").is_dir()


# -- item 6: store reads ------------------------------------------------------------------------------
def test_store_reads_answer_4xx_with_a_reason(gw):
    wendy = nd.RemoteModel(gw.url, "tiny", api_key="wendy-key")
    with wendy.trace(PROMPT, store="reads", persist_threshold=0):
        wendy.model.layers[1].output.save()
    experiment = call(gw, "GET", "/experiments", "wendy").json()["experiments"][0]["experiment"]
    saves = call(gw, "GET", f"/experiments/{experiment}/result", "wendy").json()["saves"]
    path = next(iter(saves.values()))["zarr"]["path"]
    store = f"/experiments/{experiment}/store"
    meta = call(gw, "GET", f"{store}/{path}/zarr.json", "wendy")
    assert meta.status_code == 200
    size = len(meta.content)

    cases = {  # (path, Range) -> status
        (f"{path}", None): 404,                                 # a directory
        (path.split("/")[0], None): 404,                        # the experiment's directory
        (f"{path}/zarr.json%00", None): 400,                    # embedded null byte
        (f"{path}/zarr.json%00/x", None): 400,
        (f"{path}/zarr.json", "bytes=10-5"): 416,               # reversed
        (f"{path}/zarr.json", "bytes=99999999999999999999999-"): 416,  # huge
        (f"{path}/zarr.json", f"bytes={size + 10}-"): 416,      # past the end
        (f"{path}/zarr.json", "bytes=0-1,4-5"): 416,            # several ranges
        (f"{path}/zarr.json", "items=0-5"): 416,
        (f"{path}/zarr.json", "bytes=0-99999999999999999"): 206,  # clamped to the object
        (f"{path}/zarr.json", "bytes=-5"): 206,                  # the last 5 bytes
    }
    for (key, byte_range), expected in cases.items():
        response = call(gw, "GET", f"{store}/{key}", "wendy", headers={"Range": byte_range} if byte_range else {})
        assert response.status_code == expected, (key, byte_range, response.status_code, response.text)
        if expected >= 400:
            assert response.json()["error"]["message"], (key, byte_range)
    tail = call(gw, "GET", f"{store}/{path}/zarr.json", "wendy", headers={"Range": "bytes=-5"})
    assert tail.content == meta.content[-5:] and tail.headers["Content-Range"] == f"bytes {size - 5}-{size - 1}/{size}"
    whole = call(gw, "GET", f"{store}/{path}/zarr.json", "wendy", headers={"Range": "bytes=0-99999999999999999"})
    assert whole.content == meta.content
    no_server_errors(gw)


# -- item 7: the events websocket -----------------------------------------------------------------
def test_client_messages_on_the_events_stream_are_answered_without_errors(gw, small_graph):
    lm = nd.RemoteModel(gw.url, "tiny", api_key="alice-key")
    with lm.generate(PROMPT, max_new_tokens=200, execute=False) as tracer:
        tracer.result.save()
    experiment = call(gw, "POST", "/experiments", json={"deployment": "tiny", "graph": tracer.graph.to_json()}).json()
    experiment = experiment["experiment"]

    async def chatter() -> tuple[int | None, str | None, int]:
        request = HTTPRequest(f"ws://{gw.host}:{gw.port}/v1/experiments/{experiment}/events",
                              headers={"Authorization": "Bearer alice-key"})
        stream = await websocket_connect(request)
        for i in range(200):
            with contextlib.suppress(Exception):
                await stream.write_message(f"hello {i}")
        received = 0
        while await stream.read_message() is not None:
            received += 1
        return stream.close_code, stream.close_reason, received

    code, reason, received = asyncio.run(asyncio.wait_for(chatter(), 60))
    assert code == 1003 and "only sends" in (reason or ""), (code, reason)
    for wait in ("nan", "inf", "-inf", "x" * 100):  # a nan timer would corrupt the event loop's timers
        answer = call(gw, "GET", f"/experiments/{experiment}", params={"wait": wait})
        assert answer.status_code == 400 and "takes seconds" in answer.text, (wait, answer.text)
    assert submit_latency(gw, small_graph) < VICTIM_BOUND
    call(gw, "DELETE", f"/experiments/{experiment}")
    wait_final(gw, experiment)
    no_server_errors(gw)


def test_a_client_that_leaves_mid_body_frees_its_admission(gw, small_graph):
    """Admission slots are held while a body is read; a client that gives up must not keep one."""
    for _ in range(5):  # more than gateway-max-submitting-per-user (2)
        with socket.create_connection((gw.host, gw.port), timeout=10) as raw:
            raw.sendall(b"POST /v1/experiments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bob-key\r\n"
                        b"Content-Length: 1000\r\n\r\n{\"deployment\"")
    time.sleep(0.5)
    assert submit_latency(gw, small_graph, "bob") < VICTIM_BOUND


# -- units ---------------------------------------------------------------------------------------------
def test_the_validation_pool_takes_users_in_turn():
    from nnsight_dask.service.gateway.admission import FairPool

    pool = FairPool(workers=1, per_user=1)
    order: list[str] = []
    gate = threading.Event()
    try:
        first = pool.submit("heavy", gate.wait, 10)  # holds the one thread
        time.sleep(0.1)
        calls = [pool.submit("heavy", order.append, f"h{i}") for i in range(5)]
        calls.append(pool.submit("light", order.append, "l0"))
        gate.set()
        for call in [first, *calls]:
            call.result(timeout=10)
    finally:
        pool.shutdown()
    assert order.index("l0") <= 1, order  # the light user's call went next (or after one heavy one), not last


def test_refusals_spend_a_bucket_that_refills():
    from nnsight_dask.service.gateway.admission import Admission, Refused

    admission = Admission(max_submitting=2, refusals_per_minute=60)  # a token a second
    for _ in range(60):
        admission.refusals.spend("u")
    with pytest.raises(Refused, match="too many requests the gateway refused") as refused:
        admission.begin("u", active=0, max_concurrent=4)
    assert 0 < refused.value.retry_after <= 1.0 and refused.value.limit == "refusals_per_minute"
    admission.begin("v", 0, 4)
    admission.begin("v", 0, 4)
    with pytest.raises(Refused, match="gateway-max-submitting-per-user = 2"):
        admission.begin("v", 0, 4)
    admission.end("v")
    with pytest.raises(Refused, match="max_concurrent = 4"):
        admission.begin("v", active=3, max_concurrent=4)
    time.sleep(1.05)
    admission.begin("u", 0, 4)  # refilled


def test_bodies_are_refused_unparsed_past_the_values_bound():
    from nnsight_dask.service.gateway.bodies import BodyError, json_values, parse_json

    assert json_values(b'{"a": [1, 2, {"b": "c,d"}]}') == 8  # marks inside strings count too: an upper bound
    assert parse_json(b'{"a": [1, 2]}', 10) == {"a": [1, 2]}
    with pytest.raises(BodyError, match="over the gateway's limit of 10") as big:
        parse_json(b"[" + b"[]," * 10 + b"[]]", 10)
    assert big.value.status == 413
    with pytest.raises(BodyError, match="not valid JSON") as bad:
        parse_json(b"{nope", 10)
    assert bad.value.status == 400


def test_store_ranges_are_parsed_strictly():
    from nnsight_dask.service.gateway.handlers import ApiError, _byte_range

    assert _byte_range(None) is None
    assert _byte_range("bytes=0-9") == (0, 9) and _byte_range("bytes=5-") == (5, None)
    assert _byte_range("bytes=-5") == (None, 5)
    for bad in ("bytes=9-0", "bytes=0-1,3-4", "items=0-1", "bytes=-", "bytes=" + "9" * 30 + "-"):
        with pytest.raises(ApiError) as refused:
            _byte_range(bad)
        assert refused.value.status_code == 416, bad


def test_a_relative_store_lands_under_the_users_prefix():
    from nnsight_dask.graph.graph import InterventionGraph
    from nnsight_dask.service.gateway import KeyRing
    from nnsight_dask.service.gateway.stores import scope_graph

    ring = KeyRing.from_dict({"users": {"ann": {"key": "a", "stores": ["/data/ann"]}}})
    ann = ring.users["ann"]
    for given, resolved in (("run1", "file:///results/ann/run1"), ("/data/ann/x", "/data/ann/x"),
                            ("s3://b/x", "s3://b/x"), (None, None)):
        graph = InterventionGraph(options={"store_scope": {"user": "someone", "stores": ["/"]}}
                                  | ({"store": given} if given else {}))
        scope_graph(graph, ann, "file:///results")
        assert graph.options.get("store") == resolved
        assert graph.options["store_scope"] == {"user": "ann", "stores": ["file:///results/ann", "file:///data/ann"]}
    for name in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="a user's name"):
            KeyRing.from_dict({"users": {name: {"key": "k"}}})


def test_a_client_waits_its_turn_when_its_user_is_submitting_already(gw, small_graph):
    """Submissions in progress are bounded per user (2); ``nd.RemoteModel``'s session retries that
    refusal (only that one) until a slot frees."""
    from nnsight_dask.client.http_api import GatewaySession

    slow = []
    for _ in range(2):  # two uploads of carol's that hold her two slots
        raw = socket.create_connection((gw.host, gw.port), timeout=10)
        raw.sendall(b"POST /v1/experiments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer carol-key\r\n"
                    b"Content-Length: 1000\r\n\r\n{")
        slow.append(raw)
    time.sleep(0.3)
    busy = call(gw, "POST", "/experiments", "carol", json={"deployment": "tiny", "graph": small_graph})
    assert busy.status_code == 429 and busy.json()["error"]["fields"]["limit"] == "max_submitting"
    session = GatewaySession(gw.url, "carol-key")
    answer: list[object] = []
    waiting = threading.Thread(target=lambda: answer.append(session.call(
        "POST", "/experiments", body={"deployment": "tiny", "graph": small_graph})))
    waiting.start()
    time.sleep(1.0)
    assert not answer  # still waiting its turn
    for raw in slow:
        raw.close()
    waiting.join(timeout=30)
    assert answer and "experiment" in answer[0]  # type: ignore[operator]
    wait_final(gw, answer[0]["experiment"], "carol")  # type: ignore[index]


def test_keys_are_compared_with_every_user(monkeypatch):
    """No early exit: an answer takes as many digest comparisons whichever key, or none, matched."""
    import hmac

    from nnsight_dask.service.gateway import KeyRing

    ring = KeyRing.from_dict({"users": {f"u{i}": {"key": f"k{i}"} for i in range(5)}})
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    for header in ("Bearer k0", "Bearer k4", "Bearer wrong"):
        compared.clear()
        ring.authenticate(header)
        assert len(compared) == 5, header
