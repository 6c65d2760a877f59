"""The HTTP gateway under load: many users over loopback HTTP against one deployment (issue 13).

One LocalCluster (2 single-threaded worker processes) holds one 2-shard deployment. Two gateways
stand in front of it, differing only in how many experiments they run at once on the deployment:

- **serial**: ``max_in_flight=1``, one experiment at a time (NDIF's model: a queue per model);
- **concurrent**: ``max_in_flight=8`` (the default): experiments of different users are in flight
  together, so they meet on the shards (and share stage tasks).

Simulated users are threads speaking plain HTTP (submit the graph JSON, wait with ``?wait=``, fetch
the result), so the numbers are the gateway's and the cluster's, not the cost of recording a trace.
Every result is checked against local execution of the same graph.

1. **Users**: 1, 10 and 50 users, each submitting its experiments one after the other: throughput
   (experiments/s) and p50/p99 latency (submit to result in hand), serial vs concurrent.
2. **Flood**: 10 heavy clients each submit 4 generations (10 tokens each) at once, then a light user
   submits one trace: the light user's latency, against the same trace alone, for: plain Dask clients
   (no gateway, no fairness: the state before the gateway), the serial gateway and the concurrent
   gateway (both round robin across users).

Usage::

    python bench/gateway.py            # tiny Llama (4 layers), ~2 minutes on 2 cores
    python bench/gateway.py --quick    # fewer experiments, < 1 minute
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

from _common import use_this_checkout  # bench/ is on sys.path: it is the script's folder

use_this_checkout()

import requests  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from _common import machine, today  # noqa: E402

import nnsight_dask as nd  # noqa: E402
from nnsight_dask.http_wire import decode_results  # noqa: E402
from nnsight_dask.models import save_tiny  # noqa: E402
from nnsight_dask.service.gateway import Gateway, KeyRing, hash_key  # noqa: E402

PROMPT = "The Eiffel Tower is in the city of"
#: The flood: FLOOD_CLIENTS heavy clients (users) each queue FLOOD_PER_CLIENT generations of
#: HEAVY_TOKENS tokens at once (issue 13 measured 200 generations from 25 clients).
FLOOD_CLIENTS, FLOOD_PER_CLIENT, HEAVY_TOKENS = 10, 4, 10
FLOOD = FLOOD_CLIENTS * FLOOD_PER_CLIENT


class User:
    """One simulated user: its own HTTP connection and key."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {name}-key"

    def submit(self, graph: str) -> str:
        response = self.http.post(f"{self.url}/v1/experiments", json={"deployment": "bench", "graph": graph}, timeout=60)
        response.raise_for_status()
        return response.json()["experiment"]

    def result(self, experiment: str, name: str = "top") -> torch.Tensor:
        while True:
            status = self.http.get(f"{self.url}/v1/experiments/{experiment}", params={"wait": 30}, timeout=90).json()
            if status["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
                break
        if status["status"] != "COMPLETED":
            raise RuntimeError(f"experiment {experiment} {status['status']}: {status.get('error')}")
        document = self.http.get(f"{self.url}/v1/experiments/{experiment}/result", timeout=60).json()
        return decode_results(document, open_ref=lambda ref: None)[0][name]

    def run(self, graph: str) -> torch.Tensor:
        return self.result(self.submit(graph))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def users_round(url: str, graph: str, expected: torch.Tensor, n_users: int, per_user: int) -> tuple[float, list[float]]:
    """``n_users`` threads run ``per_user`` experiments each, back to back: (wall seconds, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    users = [User(url, f"u{i}") for i in range(n_users)]
    barrier = threading.Barrier(n_users + 1)

    def work(user: User) -> None:
        barrier.wait()
        for _ in range(per_user):
            started = time.perf_counter()
            top = user.run(graph)
            elapsed = time.perf_counter() - started
            assert torch.equal(top, expected), "a result differs from local execution"
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=work, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies


def light_under_flood(url: str, graph: str, heavy_graph: str, expected: torch.Tensor) -> float:
    """The light user's latency with the heavy users' ``FLOOD`` generations queued just before."""
    heavy, light = [User(url, f"h{i}") for i in range(FLOOD_CLIENTS)], User(url, "light")
    flood = [(user, user.submit(heavy_graph)) for user in heavy for _ in range(FLOOD_PER_CLIENT)]
    started = time.perf_counter()
    top = light.run(graph)
    latency = time.perf_counter() - started
    assert torch.equal(top, expected)
    for user, experiment in flood:
        user.result(experiment, "ids")
    return latency


def light_under_flood_dask(heavy: list, light, expected: torch.Tensor) -> float:
    """The same with plain Dask clients, one per heavy user and one for the light user (no gateway):
    the state issue 13 measured."""
    flood = []
    for model in heavy:
        for _ in range(FLOOD_PER_CLIENT):
            with model.generate(PROMPT, max_new_tokens=HEAVY_TOKENS, blocking=False) as tracer:
                tracer.result.save()
            flood.append(tracer.future)
    started = time.perf_counter()
    with light.trace(PROMPT):
        top = light.output.logits[:, -1].argmax(-1).save()
    latency = time.perf_counter() - started
    assert torch.equal(top, expected)
    for future in flood:
        future.result()
    return latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer experiments per user")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    scale = 1 if args.quick else 2
    directory = tempfile.mkdtemp(prefix="nnsight-bench-gateway-")
    path = str(save_tiny(f"{directory}/model", arch="llama", n_layer=4))
    local = nd.LanguageModel(path)
    with local.trace(PROMPT):
        expected = local.output.logits[:, -1].argmax(-1).save()
    users = {f"u{i}": {"key_sha256": hash_key(f"u{i}-key"), "max_concurrent": 4} for i in range(50)}
    users.update({f"h{i}": {"key_sha256": hash_key(f"h{i}-key"), "max_concurrent": FLOOD_PER_CLIENT}
                  for i in range(FLOOD_CLIENTS)})
    users["light"] = {"key_sha256": hash_key("light-key")}
    keys = KeyRing.from_dict({"users": users})
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                           env={"OMP_NUM_THREADS": "1", "NNSIGHT_DASK_TORCH_THREADS": "1"})
    client = Client(cluster)
    nd.config.verbose = False
    try:
        nd.serve(client, path, shards=2, name="bench")
        gateways = {name: Gateway(client, keys, port=0, state_dir=f"{directory}/{name}", max_in_flight=limit).start()
                    for name, limit in (("serial", 1), ("concurrent", 8))}
        remote = nd.RemoteModel(gateways["serial"].url, "bench", api_key="light-key")
        with remote.trace(PROMPT, execute=False) as tracer:
            remote.output.logits[:, -1].argmax(-1).save(name="top")
        graph = tracer.graph.to_json()
        with remote.generate(PROMPT, max_new_tokens=HEAVY_TOKENS, execute=False) as tracer:
            tracer.result.save(name="ids")
        heavy_graph = tracer.graph.to_json()
        for gateway in gateways.values():  # warm up connections, caches and the shards
            users_round(gateway.url, graph, expected, 4, 3)

        print(f"# bench/gateway.py{' --quick' if args.quick else ''}: {today()}, {machine()}")
        print("# tiny Llama (4 layers, hidden 64), 2 shards on 2 worker processes; users are HTTP clients on loopback\n")
        print("| users | experiments | serial: exp/s | p50 ms | p99 ms | concurrent: exp/s | p50 ms | p99 ms | speed-up |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n_users, per_user in ((1, 20 * scale), (10, 4 * scale), (50, 2 * scale)):
            row = []
            rates = []
            for name in ("serial", "concurrent"):
                wall, latencies = users_round(gateways[name].url, graph, expected, n_users, per_user)
                rates.append(len(latencies) / wall)
                row += [f"{rates[-1]:.1f}", f"{percentile(latencies, 0.5) * 1e3:.0f}", f"{percentile(latencies, 0.99) * 1e3:.0f}"]
            print(f"| {n_users} | {n_users * per_user} | " + " | ".join(row) + f" | {rates[1] / rates[0]:.2f}x |")

        repeats = 2 if args.quick else 3
        light = User(gateways["concurrent"].url, "light")
        alone = statistics.median(_timed(light, graph) for _ in range(5))
        print(f"\n| a light user's trace, {FLOOD} generations of {FLOOD_CLIENTS} heavy users queued before it | "
              f"latency ms (median of {repeats}) |")
        print("|---|---:|")
        print(f"| alone (concurrent gateway, no load) | {alone * 1e3:.0f} |")
        clients = [Client(cluster.scheduler_address, set_as_default=False) for _ in range(FLOOD_CLIENTS + 1)]
        models = [nd.RemoteModel(other, "bench") for other in clients]
        dask = statistics.median(light_under_flood_dask(models[1:], models[0], expected) for _ in range(repeats))
        for other in clients:
            other.close()
        print(f"| {FLOOD_CLIENTS + 1} Dask clients, no gateway (no fairness) | {dask * 1e3:.0f} |")
        for name in ("serial", "concurrent"):
            latency = statistics.median(light_under_flood(gateways[name].url, graph, heavy_graph, expected) for _ in range(repeats))
            print(f"| gateway, {name} (max_in_flight={gateways[name].max_in_flight}), fair queue | {latency * 1e3:.0f} |")
        for gateway in gateways.values():
            gateway.stop()
    finally:
        client.close()
        cluster.close()


def _timed(user: User, graph: str) -> float:
    started = time.perf_counter()
    user.run(graph)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
