"""Another user's latency under each attack of the red team of 2026-12-07 on the gateway (issue 23).

The gateway runs from its CLI in a process of its own, limited to 256 file descriptors, in front of a
LocalCluster (2 workers) serving a tiny Llama in 2 shards; attackers run in processes of their own
(each attack as its own user, so that every attack meets a fresh refusal budget) while another user
submits small experiments and lists deployments. Prints, per attack, that user's median and worst
latencies, what the attackers were answered and the gateway's peak memory growth; then what
``store=`` reached, what store reads answered and what client messages on the events stream logged.

Usage::

    python bench/gateway_attacks.py                         # every attack, this checkout
    python bench/gateway_attacks.py body57:2 halfopen       # some: <body>:<clients>, halfopen, stores,
                                                            # reads, websocket
    python bench/gateway_attacks.py --tree /tmp/baseline    # another checkout's package (before/after)

Bodies: ``body57`` (57 MiB of empty lists), ``dense15`` (15 MiB of them, under the 16 MiB limit),
``chunked57`` (57 MiB without a length), ``strings11`` (an 11 MiB graph sent as JSON text),
``costly11`` (11 MiB, 20,000 nodes, refused at the last). docs/gateway.md has the figures.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREE = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or REPO
if __name__ == "__main__":  # not in the processes multiprocessing starts from this module
    ARGV = list(sys.argv[1:])
    TREE = REPO
    if "--tree" in sys.argv:
        _at = sys.argv.index("--tree")
        TREE = os.path.abspath(sys.argv[_at + 1])
        del sys.argv[_at:_at + 2]
    if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != TREE:  # every process imports the tree's
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TREE, os.environ.get("PYTHONPATH")) if p)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *ARGV])

import asyncio
import contextlib
import http.server
import json
import multiprocessing as mp
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

torch.set_num_threads(1)


def _harness():
    """tests/gateway_process.py of this checkout (the tree under test may predate it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gateway_process", os.path.join(REPO, "tests", "gateway_process.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["gateway_process"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.gateway_process


gateway_process = _harness()

PROMPT = "The Eiffel Tower is in the city of"


def key(name):
    import hashlib
    return {"key_sha256": hashlib.sha256(f"{name}-key".encode()).hexdigest(), "max_concurrent": 40}


def empty_lists(mib):
    n = int(mib * 2**20) // 3
    return b'{"deployment": "tiny", "graph": {"nodes": [' + b"[]," * n + b"[]]}}"


def graph_of_nodes(n, location, last="os.system"):
    nodes = [{"id": 0, "kind": "getter", "module": "model.layers.1", "access": "output", "invoke": 0}]
    nodes += [{"id": i, "kind": "op", "target": "operator.mul", "invoke": 0, "location": location,
               "args": [{"ref": i - 1}, 2]} for i in range(1, n)]
    nodes[-1]["target"] = last
    return json.dumps({"version": 1, "model": "LlamaForCausalLM", "passes": [], "iterations": [], "nodes": nodes})


def payload(kind):
    if kind == "body57":
        return empty_lists(57), False
    if kind == "dense15":
        return empty_lists(15), False
    if kind == "chunked57":
        return empty_lists(57), True
    if kind == "strings11":
        return json.dumps({"deployment": "tiny", "graph": "[" + "[]," * (11 * 2**20 // 3) + "[]]"}).encode(), False
    if kind == "costly11":
        return json.dumps({"deployment": "tiny", "graph": graph_of_nodes(19_999, "x" * 450)}).encode(), False
    raise ValueError(kind)


def attacker(url, kind, seconds, out, who):
    body, chunked = payload(kind)
    codes = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        data = (body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)) if chunked else body
        try:
            code = requests.post(f"{url}/v1/experiments", data=data, headers={"Authorization": f"Bearer {who}-key"},
                                 timeout=120).status_code
        except requests.RequestException as exc:
            code = type(exc).__name__
        codes[code] = codes.get(code, 0) + 1
    out.put(codes)


def submit(url, graph):
    started = time.perf_counter()
    r = requests.post(f"{url}/v1/experiments", json={"deployment": "tiny", "graph": graph},
                      headers={"Authorization": "Bearer alice-key"}, timeout=120)
    took = time.perf_counter() - started
    assert r.status_code == 202, r.text
    experiment = r.json()["experiment"]
    while requests.get(f"{url}/v1/experiments/{experiment}", params={"wait": 1},
                       headers={"Authorization": "Bearer alice-key"}, timeout=120).json()["status"] not in (
            "COMPLETED", "FAILED", "CANCELLED"):
        pass
    return took


def victim(url, graph, stop, submits, listings, errors):
    while not stop.is_set():
        try:
            started = time.perf_counter()
            requests.get(f"{url}/v1/deployments", headers={"Authorization": "Bearer alice-key"}, timeout=120)
            listings.append(time.perf_counter() - started)
            submits.append(submit(url, graph))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:80]}")
        time.sleep(0.1)


def flood(gw, graph, kind, n, seconds=12.0):
    import psutil
    rss = psutil.Process(gw.pid).memory_info().rss
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=attacker, args=(gw.url, kind, seconds, out, f"m{kind}")) for _ in range(n)]
    stop = threading.Event()
    submits, listings, errors = [], [], []
    peaks = [rss]

    def sample():
        while not stop.is_set():
            with contextlib.suppress(Exception):
                peaks.append(psutil.Process(gw.pid).memory_info().rss)
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    for p in procs:
        p.start()
    time.sleep(1.0)  # attackers built their payloads
    thread = threading.Thread(target=victim, args=(gw.url, graph, stop, submits, listings, errors), daemon=True)
    thread.start()
    codes = {}
    for _ in procs:
        for k, v in out.get(timeout=seconds + 300).items():
            codes[k] = codes.get(k, 0) + v
    stop.set()
    thread.join(timeout=300)
    peak = max(peaks)
    for p in procs:
        p.join(timeout=30)
    print(f"{kind} x{n}: victim submits {len(submits)} median {statistics.median(submits or [float('nan')]):.3f} "
          f"max {max(submits, default=float('nan')):.3f} s; listing max {max(listings, default=float('nan')):.3f} s; "
          f"errors {errors[:2]}; attacker {codes}; gateway peak RSS +{(peak - rss) / 2**20:.0f} MiB", flush=True)


def halfopen(gw, graph):
    held, stop, reopened = [], threading.Event(), [0]

    def closed(s):
        try:
            return s.recv(1, socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def hold():
        while not stop.is_set():
            for s in [s for s in held if closed(s)]:
                held.remove(s)
                s.close()
            while len(held) < 300 and not stop.is_set():
                try:
                    s = socket.create_connection((gw.host, gw.port), timeout=5)
                    s.sendall(b"GET /v1/deployments HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    s.settimeout(None)
                    held.append(s)
                    reopened[0] += 1
                except OSError:
                    time.sleep(0.05)
            time.sleep(0.2)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    time.sleep(3.0)
    results = []
    for _ in range(3):
        started = time.perf_counter()
        try:
            requests.get(f"{gw.url}/v1/deployments", headers={"Authorization": "Bearer alice-key"}, timeout=30)
            results.append(f"{time.perf_counter() - started:.3f}")
        except requests.RequestException as exc:
            results.append(f"{type(exc).__name__} after {time.perf_counter() - started:.1f} s")
    stop.set()
    t.join(timeout=30)
    for s in held:
        s.close()
    print(f"halfopen300: victim GET /deployments: {results}; attacker opened {reopened[0]}", flush=True)


class Recorder(http.server.BaseHTTPRequestHandler):
    seen = []

    def _answer(self):
        Recorder.seen.append(f"{self.command} {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"internal_secret_field": "s3cr3t"}).encode()
        self.send_response(500)
        self.send_header("X-Internal-Build", "leaky-9.9")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = _answer

    def log_message(self, *a):
        pass


def stores(gw, service, other_dir, tmp):
    import nnsight_dask as nd
    eve = nd.RemoteModel(gw.url, "tiny", api_key="eve-key")
    out = []
    for store, options in ((f"{service}/admin", {"headers": {"Authorization": "Bearer stolen"}}),
                           (str(other_dir), None), (str(tmp / "anywhere"), None)):
        Recorder.seen.clear()
        try:
            with eve.trace(PROMPT, store=store, persist_threshold=0, storage_options=options):
                eve.model.layers[1].output.save()
            out.append(f"{store[:40]}: COMPLETED")
        except Exception as exc:
            text = str(exc)
            out.append(f"{store[:40]}: {type(exc).__name__} (service saw {len(Recorder.seen)} requests; "
                       f"leaks status/headers/json: {['500' in text, 'leaky' in text, 'internal_secret' in text]})")
    print("store=: " + " | ".join(out), flush=True)


def reads(gw):
    import nnsight_dask as nd
    lm = nd.RemoteModel(gw.url, "tiny", api_key="alice-key")
    store = "reads" if _scoped(gw) else f"{tempfile.mkdtemp()}/s"  # before issue 23: any path
    with lm.trace(PROMPT, store=store, persist_threshold=0):
        lm.model.layers[1].output.save()
    h = {"Authorization": "Bearer alice-key"}
    experiment = requests.get(f"{gw.url}/v1/experiments", headers=h).json()["experiments"][0]["experiment"]
    saves = requests.get(f"{gw.url}/v1/experiments/{experiment}/result", headers=h).json()["saves"]
    path = next(iter(saves.values()))["zarr"]["path"]
    base = f"{gw.url}/v1/experiments/{experiment}/store"
    out = []
    for label, key, rng in (("directory", path, None), ("%00", f"{path}/zarr.json%00", None),
                            ("reversed", f"{path}/zarr.json", "bytes=10-5"),
                            ("huge", f"{path}/zarr.json", "bytes=99999999999999999999999-")):
        r = requests.get(f"{base}/{key}", headers={**h, **({"Range": rng} if rng else {})})
        out.append(f"{label} {r.status_code}")
    print("store reads: " + ", ".join(out), flush=True)


def _scoped(gw):
    """Whether this gateway scopes stores per user (a relative name is then under the user's prefix)."""
    import importlib.util

    return importlib.util.find_spec("nnsight_dask.service.gateway.stores") is not None


def websocket(gw, graph_long):
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect
    h = {"Authorization": "Bearer alice-key"}
    experiment = requests.post(f"{gw.url}/v1/experiments", json={"deployment": "tiny", "graph": graph_long},
                               headers=h).json()["experiment"]
    before = gw.log_text().count("NotImplementedError")

    async def chatter():
        stream = await websocket_connect(HTTPRequest(f"ws://{gw.host}:{gw.port}/v1/experiments/{experiment}/events",
                                                     headers=h))
        for i in range(50):
            with contextlib.suppress(Exception):
                await stream.write_message(f"hi {i}")
        await asyncio.sleep(1.0)
        code = stream.close_code  # the gateway's, if it closed the stream
        stream.close()
        return code

    code = asyncio.run(chatter())
    requests.delete(f"{gw.url}/v1/experiments/{experiment}", headers=h)
    time.sleep(1.0)
    print(f"websocket: 50 client messages -> {gw.log_text().count('NotImplementedError') - before} "
          f"NotImplementedError tracebacks in the gateway log; close code {code}", flush=True)


def main(selected):
    import nnsight_dask as nd
    from distributed import Client, LocalCluster
    from nnsight_dask.models import save_tiny

    print(f"tree {TREE}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="measure-"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    service = f"http://127.0.0.1:{server.server_address[1]}"
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                           env={"OMP_NUM_THREADS": "1", "NNSIGHT_DASK_TORCH_THREADS": "1"})
    client = Client(cluster)
    model = str(save_tiny(tmp / "tiny", arch="llama", n_layer=4))
    nd.serve(client, model, shards=2, name="tiny")
    users = {"alice": key("alice"), "eve": key("eve"),
             **{f"m{kind}": key(f"m{kind}") for kind in ("body57", "dense15", "chunked57", "strings11", "costly11")}}
    try:
        with gateway_process(client.scheduler.address, tmp / "gw", users, nofile=256, pythonpath=TREE) as gw:
            lm = nd.RemoteModel(gw.url, "tiny", api_key="alice-key")
            with lm.trace(PROMPT, execute=False) as tracer:
                lm.model.layers[1].output[:, -1].save()
            graph = tracer.graph.to_json()
            with lm.generate(PROMPT, max_new_tokens=100, execute=False) as tracer:
                tracer.result.save()
            graph_long = tracer.graph.to_json()
            alone = [submit(gw.url, graph) for _ in range(5)]
            print(f"alone: submit median {statistics.median(alone):.3f} s", flush=True)
            for name in selected or ["body57:2", "dense15:2", "chunked57:2", "strings11:8", "costly11:8", "halfopen",
                                      "stores", "reads", "websocket"]:
                if name == "halfopen":
                    halfopen(gw, graph)
                elif name == "stores":
                    stores(gw, service, tmp / "gw" / "state" / "store" / "alice", tmp)
                elif name == "reads":
                    reads(gw)
                elif name == "websocket":
                    websocket(gw, graph_long)
                else:
                    kind, n = name.split(":")
                    flood(gw, graph, kind, int(n))
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main(sys.argv[1:])
