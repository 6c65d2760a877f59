"""The control plane at scale: throughput, latency and CPU per experiment in every process (issue 25).

The model is the simulated GPU (:class:`nnsight_dask.models.SimulatedLlama`: a tiny Llama, hidden
32, 8 decoder layers, each sleeping a fixed 4 ms per call whatever the batch, the GIL released), so
the numbers say what the control plane would cost in front of GPU shards. It is a simulation.

For each cell (shards x users x mode) the deployment runs N simulated users, each doing one
experiment after the other: a trace with one setter (``model.layers[4].mlp.output[:, -1] = 0``) and
one save (the argmax of the last logits) on a short prompt, every result checked against the local
run. After a warm-up, a window of ``--seconds`` gives:

- experiments/s (completed in the window), p50 and p99 latency (submit to result in hand);
- CPU ms per experiment of each process (psutil, user + system, over the window): the client
  process(es), the scheduler, each shard's worker (and the nanny process, which only supervises).

Processes, so that each one's CPU is its own: the scheduler runs in a process of its own
(``python -m distributed.cli.dask_scheduler``), the workers in ``dask worker --nworkers <shards>
--nthreads 16`` (one worker process per shard, one nanny each, in one supervising process), and
the clients as the mode says:

- ``threads``: N user threads in one client process (the runner);
- ``processes``: N users spread over min(N, 8) client processes (threads in each), one Client each;
- ``gateway``: N HTTP users (threads of one process of their own) through the HTTP gateway, which
  runs in the runner process with its Dask client (the "client" column is the gateway).

Every process runs one torch thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``,
``NNSIGHT_DASK_TORCH_THREADS=1``).

**Two trees in one run.** ``--tree PATH`` imports nnsight_dask from another checkout (e.g. ``git
worktree add /tmp/baseline <commit>``), in every process (runner, scheduler, workers, client
processes: ``PYTHONPATH``); ``--compare PATH`` runs that tree ("base") and this checkout ("new")
side by side, each with a cluster of its own, alternating which goes first cell by cell, and prints
both and their ratios. A tree without ``nnsight_dask/models/simulated.py`` gets this checkout's copy
of that file (it uses only ``nnsight_dask.models.tiny``), so both sides serve the same model.

**Lone latency** (``--lone``, and part of ``--quick`` and the full run): one experiment at a time on
the 4-shard deployment, ``--lone-n`` (30) per run in rounds of 5 that alternate the trees, each
experiment followed by the same forward pass run locally ("compute": 8 x 4 ms of sleep plus the
arithmetic, under the same momentary load). Per-hop overhead = (median lone - median compute) / hops,
and paired: the median of (latency - the compute right after it) / hops; hops = stages = shards
(issue 25's accounting). Target: <= 60 ms, <= 5 ms per hop.

**Contention and idle.** Each window also records the CPU the rest of the machine used meanwhile
("others", in cores), and each cluster's idle CPU per process (3 s after deploying, no experiments).

**Profiles** (``--profile DIR``): py-spy records each process of every cell during its window
(``--format raw --gil``, ``--profile-rate`` Hz: only samples of a thread holding the GIL, so waits in
epoll, locks and the simulated layers' sleeps drop out; py-spy's own idle detection counts a thread
that woke up but waits for a core as busy). The report gives per process what its samples were doing
(``_scale_profile.ACTIVITIES``: share, and that share of its CPU ms per experiment) and the top
functions. py-spy pauses each process briefly per sample: profiled runs are slower.

``--json PATH`` saves every measurement; ``--report PATH`` prints a saved run's report again.

Usage::

    python bench/scale.py --quick                    # shards 4 x users 1,16,64, threads, + lone (~2.5 min)
    python bench/scale.py --quick --compare /tmp/baseline   # both trees (~5 min on a loaded 2-core host)
    python bench/scale.py --lone --compare /tmp/baseline
    python bench/scale.py --shards 4 --users 64 --mode threads,processes,gateway
    python bench/scale.py                            # shards 1/2/4/8 x users 1/16/64/256, threads, + lone
    python bench/scale.py --tree /tmp/baseline --quick --profile /tmp/prof --json /tmp/base.json

Two cores shared with other work: each cell runs ``--repeat`` times (default 2) and both values
are printed ("a / b"); ratios use their mean.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import use_this_checkout  # bench/ is on sys.path: it is the script's folder

REPO = use_this_checkout()
#: Set by the driver for a runner (and inherited by the processes the runner spawns, which import this
#: file again): the checkout whose nnsight_dask every process imports, instead of this one.
TREE_ENV, SHIM_ENV = "ND_BENCH_SCALE_TREE", "ND_BENCH_SCALE_SHIM"
if os.environ.get(TREE_ENV):
    sys.path[:] = [os.environ[TREE_ENV], os.environ[SHIM_ENV]] + [
        p for p in sys.path if os.path.realpath(p or ".") != os.path.realpath(REPO)]
    os.environ["PYTHONPATH"] = os.pathsep.join([os.environ[TREE_ENV], os.environ[SHIM_ENV]])

from _common import git_rev, machine, table, today  # noqa: E402
from _scale_profile import profile_report  # noqa: E402

PROMPT = "The Eiffel Tower is in the city of"
SHARDS = (1, 2, 4, 8)
USERS = (1, 16, 64, 256)
MODES = ("threads", "processes", "gateway")
N_LAYER, HIDDEN, LAYER_MS = 8, 32, 4.0
THREADS_PER_WORKER = 16
MAX_CLIENT_PROCESSES = 8
LONE_SHARDS = 4
LONE_CHUNK = 5
SHIM = "nd_bench_simulated"  # this checkout's simulated.py, for a tree without one
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NNSIGHT_DASK_TORCH_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# == the experiment ==================================================================================
def setter_layer(n_layer: int) -> int:
    return n_layer // 2


def experiment(lm: Any, n_layer: int) -> int:
    """The measured experiment: one setter, one save; returns the next token's id."""
    with lm.trace(PROMPT, verbose=False):
        lm.model.layers[setter_layer(n_layer)].mlp.output[:, -1] = 0.0
        top = lm.output.logits[:, -1].argmax(-1).save()
    return int(getattr(top, "value", top).reshape(-1)[0])


def user_loop(run_one: Any, expected: int, start_at: float, stop_at: float, out: list) -> None:
    """One simulated user: experiments back to back from ``start_at`` until ``stop_at`` (wall clock);
    appends ``(started, ended, outcome)`` with outcome ``"ok"``, ``"wrong"`` or the error's text."""
    time.sleep(max(0.0, start_at - time.time()))
    while time.time() < stop_at:
        started = time.time()
        try:
            outcome = "ok" if run_one() == expected else "wrong"
        except Exception as exc:  # counted and shown; the user goes on
            outcome = f"{type(exc).__name__}: {exc}"[:200]
        out.append((started, time.time(), outcome))


def run_users(n: int, run_one: Any, expected: int, start_at: float, stop_at: float) -> list:
    records: list = []
    threads = [threading.Thread(target=user_loop, args=(run_one, expected, start_at, stop_at, records), daemon=True)
               for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


# == client processes (processes mode) and HTTP users (gateway mode): spawned by the runner ==========
_PROC: dict[str, Any] = {}


def _proc_connect(address: str, name: str, n_layer: int) -> None:
    import torch

    torch.set_num_threads(1)
    import nnsight_dask as nd
    from distributed import Client

    nd.config.verbose = False
    client = Client(address, set_as_default=False)
    _PROC.update(client=client, lm=nd.RemoteModel(client, name), n_layer=n_layer)


def _proc_users(n: int, expected: int, start_at: float, stop_at: float) -> list:
    lm, n_layer = _PROC["lm"], _PROC["n_layer"]
    return run_users(n, lambda: experiment(lm, n_layer), expected, start_at, stop_at)


def _proc_warm(expected: int) -> str:
    """One experiment, checked (first traces pay one-time costs), then a pause so that the pool's other
    processes take the other warm-up tasks; returns where nnsight_dask was imported from."""
    assert experiment(_PROC["lm"], _PROC["n_layer"]) == expected
    time.sleep(0.5)
    return _package_file()


def _http_setup() -> None:
    import torch

    torch.set_num_threads(1)


def _http_users(url: str, deployment: str, graph: str, n: int, expected: int, start_at: float, stop_at: float) -> list:
    """``n`` HTTP users in threads of this process, each on a keep-alive connection of the standard
    library's (``requests`` cost the load generator about 9 ms of CPU an experiment, more than the
    gateway it measured, on the same two cores)."""
    import http.client
    import urllib.parse

    try:
        from nnsight_dask.http_wire import decode_results
    except ImportError:  # a tree from before it moved (--tree, --compare)
        from nnsight_dask.client.http_wire import decode_results

    address = urllib.parse.urlsplit(url)
    body = json.dumps({"deployment": deployment, "graph": graph}).encode()

    def call(connection: http.client.HTTPConnection, headers: dict, method: str, path: str,
             payload: bytes | None = None) -> Any:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:200]!r}")
        return json.loads(data)

    def one(connection: http.client.HTTPConnection, headers: dict) -> int:
        experiment_id = call(connection, headers, "POST", "/v1/experiments", body)["experiment"]
        while True:
            status = call(connection, headers, "GET", f"/v1/experiments/{experiment_id}?wait=30&result=1")
            if status["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
                break
        if status["status"] != "COMPLETED":
            raise RuntimeError(f"{status['status']}: {status.get('error')}")
        document = status.get("result")  # a tree from before ?result=1 (--compare) answers without it
        if document is None:
            document = call(connection, headers, "GET", f"/v1/experiments/{experiment_id}/result")
        top = decode_results(document, open_ref=lambda ref: None)[0]["top"]
        return int(top.reshape(-1)[0])

    records: list = []
    users = []
    for i in range(n):
        headers = {"Authorization": f"Bearer u{i}-key", "Content-Type": "application/json"}
        users.append((http.client.HTTPConnection(address.hostname, address.port, timeout=120), headers))
    threads = [threading.Thread(target=user_loop, args=(lambda c=c, h=h: one(c, h), expected, start_at, stop_at,
                                                        records), daemon=True) for c, h in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for connection, _ in users:
        connection.close()
    return records


# == the runner: one process per tree, holding its cluster; commands as JSON lines on stdin ==========
class Runner:
    """Runs in a process importing nnsight_dask from ``tree``; answers the driver's commands."""

    def __init__(self, tree: str, shim_dir: str, layer_ms: float, n_layer: int) -> None:
        self.tree, self.shim_dir, self.layer_ms, self.n_layer = tree, shim_dir, layer_ms, n_layer
        self.procs: list[subprocess.Popen] = []
        self.client: Any = None
        self.pool: Any = None
        self.http_pool: Any = None
        self.gateway: Any = None
        self._local: Any = None
        self.tmp = Path(tempfile.mkdtemp(prefix="nd-bench-scale-"))

    # -- commands ----------------------------------------------------------------------------------
    def start(self, shards: int, modes: list[str], gateway_in_flight: int | None, max_users: int) -> dict:
        import torch

        torch.set_num_threads(1)
        import nnsight_dask as nd
        from distributed import Client

        nd.config.verbose = False
        source_cls, source_from = self._source_class()
        self.source = source_cls(n_layer=self.n_layer, hidden=HIDDEN, layer_ms=self.layer_ms)
        model, tokenizer = source_cls(n_layer=self.n_layer, hidden=HIDDEN, layer_ms=0.0)()
        local = nd.LanguageModel(model, tokenizer=tokenizer)
        self.expected = experiment(local, self.n_layer)

        env = {**os.environ, **ENV}
        scheduler_file = self.tmp / f"scheduler-{shards}.json"
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file), "--no-show"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.tmp / f"scheduler-{shards}.log", "w"),
            cwd=self.tmp)  # `python -m` puts the working directory first on sys.path: not a checkout's
        self.procs.append(scheduler)
        deadline = time.time() + 120
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            if time.time() > deadline or scheduler.poll() is not None:
                raise RuntimeError(f"the scheduler did not start; see {self.tmp}/scheduler-{shards}.log")
            time.sleep(0.1)
        time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        nannies = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", str(shards),
             "--nthreads", str(THREADS_PER_WORKER), "--no-dashboard", "--host", "127.0.0.1",
             "--local-directory", str(self.tmp / f"workers-{shards}")],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.tmp / f"workers-{shards}.log", "w"), cwd=self.tmp)
        self.procs.append(nannies)
        log(f"scheduler at {address}; waiting for {shards} worker(s)")
        self.client = client = Client(address)  # the default client: actor handles bind to it
        client.wait_for_workers(shards, timeout=300)
        log("workers up; serving")
        self.name, self.shards = "scale", shards
        record = nd.serve(client, self.source, shards=shards, name=self.name)
        self.lm = nd.RemoteModel(client, self.name)
        for _ in range(3):
            if experiment(self.lm, self.n_layer) != self.expected:
                raise AssertionError("the deployment's result differs from the local run")
        log("served")
        worker_pids = client.run(os.getpid)
        self.pids = {"scheduler": [scheduler.pid], "nannies": [nannies.pid]}
        for placement in record.shards:
            self.pids[f"w{placement.index}"] = [worker_pids[placement.worker]]
        self.where = where = {"runner": nd.__file__, "scheduler": client.run_on_scheduler(_package_file),
                 "workers": sorted(set(client.run(_package_file).values()))}
        idle = self._window({**self.pids, "client": [os.getpid()]}, time.time() + 0.5, time.time() + 3.5, None)
        if "processes" in modes:
            self._start_pool(address, min(MAX_CLIENT_PROCESSES, max_users))
        if "gateway" in modes:
            self._start_gateway(gateway_in_flight, max_users)
        return {"pids": self.pids, "where": where, "source": repr(self.source), "source_from": source_from,
                "expected": self.expected, "layers": [list(p.layers) for p in record.shards],
                "gateway_in_flight": getattr(self.gateway, "max_in_flight", None),
                "idle_ms_per_s": {name: used * 1e3 / 3.0 for name, used in idle["cpu"].items()},
                "idle_others_cores": idle["others_cores"]}

    def cell(self, mode: str, users: int, seconds: float, warmup: float, profile: dict | None) -> dict:
        start_at = time.time() + (1.0 if mode != "threads" else 0.2)
        t0 = start_at + warmup
        t1 = t0 + seconds
        pids = dict(self.pids)
        if mode == "threads":
            pids["client"] = [os.getpid()]
            box: list = []
            thread = threading.Thread(target=lambda: box.append(run_users(
                users, lambda: experiment(self.lm, self.n_layer), self.expected, start_at, t1)))
            thread.start()
            window = self._window(pids, t0, t1, profile)
            thread.join()
            records = box[0]
        elif mode == "processes":
            k = min(users, MAX_CLIENT_PROCESSES)
            shares = [users // k + (1 if i < users % k else 0) for i in range(k)]
            pids["client"] = self.pool_pids
            pids["runner"] = [os.getpid()]
            futures = [self.pool.submit(_proc_users, n, self.expected, start_at, t1) for n in shares]
            window = self._window(pids, t0, t1, profile)
            records = [r for f in futures for r in f.result(timeout=600)]
        elif mode == "gateway":
            pids["client"] = [os.getpid()]  # the gateway and its Dask client
            pids["http"] = self.http_pids
            future = self.http_pool.submit(_http_users, self.gateway.url, self.name, self.graph_json, users,
                                           self.expected, start_at, t1)
            window = self._window(pids, t0, t1, profile)
            records = future.result(timeout=600)
        else:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        inside = [r for r in records if t0 <= r[1] <= t1 and r[2] == "ok"]
        latencies = [(end - begin) * 1e3 for begin, end, _ in inside]
        n = len(inside)
        errors = collections.Counter(outcome for _, _, outcome in records if outcome not in ("ok",))
        cpu_ms = {proc: (seconds_used * 1e3 / n if n else float("nan")) for proc, seconds_used in window["cpu"].items()}
        return {"mode": mode, "users": users, "seconds": seconds, "n": n, "exp_s": n / seconds,
                "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                "cpu_ms": cpu_ms, "cpu_s": window["cpu"], "errors": dict(errors.most_common(3)),
                "n_errors": sum(errors.values()), "profiles": window["profiles"],
                "others_cores": window["others_cores"], "load": window["load"]}

    def lone(self, n: int, warm: bool = False) -> dict:
        """``n`` experiments one at a time, each followed by the same forward pass run locally (its
        compute, under the same momentary load); ``warm``: three unmeasured experiments first."""
        import torch

        if self._local is None:
            model, tokenizer = self.source()
            self._local = (model, tokenizer(PROMPT, return_tensors="pt").input_ids)
        model, ids = self._local
        for _ in range(3 if warm else 0):
            experiment(self.lm, self.n_layer)
        latencies, compute = [], []
        for _ in range(n):
            started = time.perf_counter()
            top = experiment(self.lm, self.n_layer)
            latencies.append((time.perf_counter() - started) * 1e3)
            assert top == self.expected
            started = time.perf_counter()
            with torch.no_grad():
                model(ids)
            compute.append((time.perf_counter() - started) * 1e3)
        return {"latencies": latencies, "compute": compute, "hops": self.shards}

    def stop(self) -> dict:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        for pool in (self.pool, self.http_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self.pool = self.http_pool = None
        if self.client is not None:
            try:
                import nnsight_dask as nd

                nd.undeploy(self.client, self.name)
            except Exception:
                pass
            self.client.close()
            self.client = None
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs = []
        return {}

    # -- helpers -----------------------------------------------------------------------------------
    def _source_class(self) -> tuple[Any, str]:
        if (Path(self.tree) / "nnsight_dask" / "models" / "simulated.py").is_file():
            from nnsight_dask.models.simulated import SimulatedLlama

            return SimulatedLlama, "nnsight_dask.models.simulated (the tree's own)"
        import importlib

        return importlib.import_module(SHIM).SimulatedLlama, f"{SHIM} (this checkout's simulated.py)"

    def _start_pool(self, address: str, k: int) -> None:
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.pool = concurrent.futures.ProcessPoolExecutor(
            k, mp_context=context, initializer=_proc_connect, initargs=(address, self.name, self.n_layer))
        # k tasks at once start k processes (the pool starts one per task while none is idle)
        futures = [self.pool.submit(_proc_warm, self.expected) for _ in range(k)]
        self.where["client processes"] = sorted({future.result(timeout=300) for future in futures})
        self.pool_pids = sorted(self.pool._processes)

    def _start_gateway(self, in_flight: int | None, max_users: int) -> None:
        import concurrent.futures
        import multiprocessing

        from nnsight_dask.service.gateway import Gateway, KeyRing, hash_key

        users = {f"u{i}": {"key_sha256": hash_key(f"u{i}-key"), "max_concurrent": 4} for i in range(max(max_users, 1))}
        self.gateway = Gateway(self.client, KeyRing.from_dict({"users": users}), port=0,
                               state_dir=str(self.tmp / "gateway"), max_in_flight=in_flight).start()
        with self.lm.trace(PROMPT, execute=False) as tracer:
            self.lm.model.layers[setter_layer(self.n_layer)].mlp.output[:, -1] = 0.0
            self.lm.output.logits[:, -1].argmax(-1).save(name="top")
        self.graph_json = tracer.graph.to_json()
        context = multiprocessing.get_context("spawn")
        self.http_pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=_http_setup)
        self.http_pool.submit(_http_users, self.gateway.url, self.name, self.graph_json, 1, self.expected,
                              time.time(), time.time() + 0.5).result(timeout=300)
        self.where["http users"] = self.http_pool.submit(_package_file).result(timeout=60)
        self.http_pids = list(self.http_pool._processes)  # one process

    def _window(self, pids: dict[str, list[int]], t0: float, t1: float, profile: dict | None) -> dict:
        """CPU seconds of each process between ``t0`` and ``t1`` (and py-spy profiles of that window)."""
        import psutil

        procs = {name: [psutil.Process(pid) for pid in group] for name, group in pids.items()}
        time.sleep(max(0.0, t0 - time.time()))
        before_each = {p.pid: _cpu(p) for group in procs.values() for p in group}
        before = {name: sum(before_each[p.pid] for p in group) for name, group in procs.items()}
        busy_before, wall_before = _busy(), time.time()
        spies = []
        if profile:
            os.makedirs(profile["dir"], exist_ok=True)
            for name, group in pids.items():
                for i, pid in enumerate(group):
                    out = Path(profile["dir"]) / f"{profile['label']}-{name}{'-' + str(i) if len(group) > 1 else ''}.txt"
                    spies.append((f"{name}-{i}" if len(group) > 1 else name, pid, str(out), subprocess.Popen(
                        [PY_SPY, "record", "--pid", str(pid), "--duration", str(max(1, round(t1 - t0))), "--rate", str(profile["rate"]),
                         "--format", "raw", "--gil", "-o", str(out)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        time.sleep(max(0.0, t1 - time.time()))
        after_each = {p.pid: _cpu(p) for group in procs.values() for p in group}
        after = {name: sum(after_each[p.pid] for p in group) for name, group in procs.items()}
        busy, wall = _busy() - busy_before, time.time() - wall_before
        ours = sum(after[name] - before[name] for name in procs)
        for *_, spy in spies:
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
        # CPU the machine spent on anything but this cell's processes (other engineers' runs, the
        # other tree's idle cluster, py-spy), in cores: how contended the window was
        return {"cpu": {name: after[name] - before[name] for name in procs},
                "others_cores": max(0.0, busy - ours) / wall, "load": os.getloadavg()[0],
                "profiles": [(name, path, after_each[pid] - before_each[pid]) for name, pid, path, _ in spies]}


def _package_file() -> str:
    import nnsight_dask

    return nnsight_dask.__file__


def _busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, anything but idle and iowait)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


def _cpu(process: Any) -> float:
    try:
        times = process.cpu_times()
        return times.user + times.system
    except Exception:  # gone
        return 0.0


def runner_main(tree: str, shim_dir: str, layer_ms: float, n_layer: int) -> None:
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to stderr; stdout carries answers only
    runner = Runner(tree, shim_dir, layer_ms, n_layer)
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            answer = {"ok": getattr(runner, op)(**command)}
        except Exception as exc:
            import traceback

            answer = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        protocol.write(json.dumps(answer) + "\n")
        protocol.flush()
        if op == "stop" and command.get("final"):
            break
    runner.stop()
    shutil.rmtree(runner.tmp, ignore_errors=True)  # scheduler and worker logs: kept only when the runner fails


# == the driver ======================================================================================
def tree_rev(path: str) -> str:
    """The checkout's commit, '+dirty' when nnsight_dask/ has uncommitted changes."""
    git = lambda *a: subprocess.run(["git", *a], cwd=path, capture_output=True, text=True).stdout.strip()  # noqa: E731
    rev = git("rev-parse", "--short", "HEAD") or "?"
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "nnsight_dask") else "")


class Tree:
    """A runner process importing nnsight_dask from ``path``."""

    def __init__(self, label: str, path: str, shim_dir: str, args: argparse.Namespace) -> None:
        self.label, self.path = label, str(Path(path).resolve())
        env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join([self.path, shim_dir]), TREE_ENV: self.path,
               SHIM_ENV: shim_dir}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--_runner", self.path, "--_shim", shim_dir,
             "--layer-ms", str(args.layer_ms), "--layers", str(args.layers)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=shim_dir)
        self.rev = tree_rev(self.path)

    def call(self, op: str, **command: Any) -> Any:
        self.send(op, **command)
        return self.receive()

    def send(self, op: str, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **command}) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label}: the runner process ended (see its log above)")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.label} ({self.path}): {answer['error']}\n{answer['traceback']}")
        return answer["ok"]

    def close(self) -> None:
        try:
            self.call("stop", final=True)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def warmup_for(users: int, base: float) -> float:
    """Seconds before the window: every user should have finished an experiment (steady state)."""
    return base + users / 50.0


def fmt_runs(values: list[float], digits: int = 0) -> str:
    return " / ".join("-" if v != v else f"{v:.{digits}f}" for v in values)


def mean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def ideal(shards: int, users: int, n_layer: int, layer_ms: float) -> float:
    """The simulated GPUs' bound, exp/s: min(users / compute, a full pipeline of 16-row passes)."""
    compute_s = n_layer * layer_ms / 1e3
    return min(users / compute_s, THREADS_PER_WORKER / (compute_s / shards))


def cpu_cells(runs: list[dict]) -> dict[str, str]:
    """Per-process CPU ms/exp as 'a / b' over the runs; workers summed and listed."""
    workers = sorted({k for r in runs for k in r["cpu_ms"] if k.startswith("w")}, key=lambda k: int(k[1:]))
    out = {"client": fmt_runs([r["cpu_ms"].get("client", float("nan")) for r in runs], 1),
           "scheduler": fmt_runs([r["cpu_ms"]["scheduler"] for r in runs], 1),
           "workers": fmt_runs([sum(r["cpu_ms"][w] for w in workers) for r in runs], 1),
           "each": " ; ".join("/".join(f"{r['cpu_ms'][w]:.1f}" for w in workers) for r in runs),
           "nannies": fmt_runs([r["cpu_ms"]["nannies"] for r in runs], 2)}
    if any("http" in r["cpu_ms"] for r in runs):
        out["http"] = fmt_runs([r["cpu_ms"].get("http", float("nan")) for r in runs], 1)
    return out


def report(results: dict, trees: list[Any], args: argparse.Namespace, info: dict, argv: list[str], when: str) -> str:
    lines: list[str] = []
    out = lines.append
    out(f"## bench/scale.py {' '.join(argv)}")
    out("")
    out(f"{when} · {machine()}")
    for tree in trees:
        meta = info.get(tree.label, {})
        out(f"- **{tree.label}**: {tree.path} (git {tree.rev}); model source {meta.get('source')} from "
            f"{meta.get('source_from')}; nnsight_dask imported from {meta.get('where')}"
            + (f"; gateway max_in_flight {meta['gateway_in_flight']}" if meta.get("gateway_in_flight") else ""))
    out(f"- Simulated GPU: {args.layers} decoder layers x {args.layer_ms:g} ms per call whatever the batch "
        f"(sleep, GIL released), hidden {HIDDEN}; workers: one process per shard x {THREADS_PER_WORKER} threads; "
        f"scheduler in its own process; 1 torch thread everywhere. Window {args.seconds:g} s per cell after a "
        f"warm-up of {args.warmup:g} s + users/50 s; {args.repeat} run(s) per cell, shown 'a / b'.")
    out("- CPU: ms of CPU (user + system) per completed experiment, per process, over the window; 'workers' is the sum "
        "over the shard workers (each listed in shard order); 'client' is the process(es) holding Dask clients (the "
        "gateway in gateway mode; 'http' its HTTP users). 'ideal': min(users / compute, 16-row passes of a full "
        "pipeline). 'others': CPU the machine spent on other processes during the window, in cores (of 2): "
        "contention from other work.")
    idle_rows = [[tree.label, str(shards), f"{idle.get('client', float('nan')):.0f}", f"{idle['scheduler']:.0f}",
                  f"{idle['nannies']:.0f}", " / ".join(f"{v:.0f}" for k, v in sorted(idle.items()) if k.startswith("w"))]
                 for tree in trees for shards, idle in results.get("idle", {}).get(tree.label, {}).items()]
    if idle_rows:
        out("")
        out("Idle cluster (deployed, no experiments, 3 s after the start), CPU ms per second of each process:")
        out("")
        out(table(["tree", "shards", "client", "scheduler", "nannies", "each worker"], idle_rows))
    out("")
    for mode in args.modes:
        rows = []
        for shards in args.shards:
            for users in args.users:
                per_tree = {t.label: results.get((t.label, mode, shards, users), []) for t in trees}
                for tree in trees:
                    runs = per_tree[tree.label]
                    if not runs:
                        continue
                    cpu = cpu_cells(runs)
                    rows.append([str(shards), str(users), tree.label, fmt_runs([r["exp_s"] for r in runs], 1),
                                 f"{ideal(shards, users, args.layers, args.layer_ms):.0f}",
                                 fmt_runs([r["p50"] for r in runs]), fmt_runs([r["p99"] for r in runs]),
                                 cpu["client"], *([cpu.get("http", "-")] if mode == "gateway" else []),
                                 cpu["scheduler"], cpu["workers"], cpu["each"],
                                 fmt_runs([r["others_cores"] for r in runs], 2),
                                 str(sum(r["n_errors"] for r in runs)) + _error_note(runs)])
                if len(trees) == 2 and all(per_tree.values()):
                    base, new = per_tree[trees[0].label], per_tree[trees[1].label]
                    def ratio(key: Any) -> str:
                        b, n = mean([key(r) for r in base]), mean([key(r) for r in new])
                        return f"{n / b:.2f}x" if b and b == b and n == n else "-"
                    workers = lambda r: sum(v for k, v in r["cpu_ms"].items() if k.startswith("w"))  # noqa: E731
                    rows.append([str(shards), str(users), f"{trees[1].label}/{trees[0].label}",
                                 ratio(lambda r: r["exp_s"]), "", ratio(lambda r: r["p50"]), ratio(lambda r: r["p99"]),
                                 ratio(lambda r: r["cpu_ms"].get("client", float("nan"))),
                                 *([ratio(lambda r: r["cpu_ms"].get("http", float("nan")))] if mode == "gateway" else []),
                                 ratio(lambda r: r["cpu_ms"]["scheduler"]), ratio(workers), "", "", ""])
        if not rows:
            continue
        out(f"### mode: {mode}")
        out("")
        out(table(["shards", "users", "tree", "exp/s", "ideal", "p50 ms", "p99 ms", "client CPU ms/exp",
                   *(["http users CPU ms/exp"] if mode == "gateway" else []), "scheduler CPU ms/exp",
                   "workers CPU ms/exp", "each worker", "others (cores)", "errors"], rows))
        out("")
    if results.get("lone"):
        out(f"### lone experiment ({LONE_SHARDS} shards, one at a time, median of {args.lone_n})")
        out("")
        rows = []
        for tree in trees:
            runs = results["lone"].get(tree.label, [])
            if runs:
                compute = [r.get("compute_median", r["compute"]) for r in runs]
                compute = [statistics.median(c) if isinstance(c, list) else c for c in compute]
                rows.append([tree.label, fmt_runs([r["median"] for r in runs], 1),
                             fmt_runs([percentile(r["latencies"], 0.9) for r in runs], 1),
                             fmt_runs(compute, 1), str(runs[0]["hops"]),
                             fmt_runs([(r["median"] - c) / r["hops"] for r, c in zip(runs, compute)], 1),
                             fmt_runs([r["paired_overhead"] / r["hops"] for r in runs if "paired_overhead" in r], 1) or "-",
                             "<= 60 ms, <= 5 ms per hop"])
        out(table(["tree", "lone ms", "p90 ms", "compute ms (local forward)", "hops",
                   "overhead per hop ms", "paired, per hop ms", "target"], rows))
        out("")
        out(f"Experiments in rounds of {LONE_CHUNK}, alternating the trees; each followed by the same forward pass "
            "run locally ('compute'). Overhead per hop = (lone - compute) / hops; 'paired' = median over "
            "experiments of (its latency - the compute right after it) / hops.")
        out("")
    return "\n".join(lines)


def _error_note(runs: list[dict]) -> str:
    kinds = collections.Counter()
    for r in runs:
        kinds.update(r["errors"])
    return f" ({'; '.join(f'{k} x{v}' for k, v in kinds.most_common(2))})" if kinds else ""


def parse_list(text: str, allowed: tuple | None = None, cast: Any = int) -> list:
    values = [cast(x) for x in text.split(",") if x.strip()]
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"unknown value(s) {bad}; choose from {list(allowed)}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="comma list (default 1,2,4,8; --quick 4)")
    parser.add_argument("--users", help="comma list (default 1,16,64,256; --quick 1,16,64)")
    parser.add_argument("--mode", default="threads", help="comma list of threads,processes,gateway or 'all' (default threads)")
    parser.add_argument("--quick", action="store_true", help="shards 4 x users 1,16,64, 5 s windows, + lone")
    parser.add_argument("--lone", action="store_true", help="only the lone-experiment latency (unless --shards/--users)")
    parser.add_argument("--lone-n", type=int, default=30)
    parser.add_argument("--no-lone", action="store_true", help="skip the lone measurement")
    parser.add_argument("--seconds", type=float, help="measured window per cell (default 6; --quick 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up before the window: this + users/50 s")
    parser.add_argument("--repeat", type=int, default=2, help="runs per cell (default 2)")
    parser.add_argument("--tree", help="import nnsight_dask from this checkout instead of this one")
    parser.add_argument("--compare", metavar="PATH", help="run PATH ('base') and this checkout ('new') side by side")
    parser.add_argument("--layer-ms", type=float, default=LAYER_MS, help="simulated ms per decoder layer call")
    parser.add_argument("--layers", type=int, default=N_LAYER, help="decoder layers of the simulated model")
    parser.add_argument("--gateway-in-flight", type=int, help="the gateway's max_in_flight (default: its config)")
    parser.add_argument("--profile", metavar="DIR", help="py-spy each process during each window; summary at the end")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    parser.add_argument("--profile-top", type=int, default=12)
    parser.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    parser.add_argument("--report", metavar="JSON", help="print the report of a run saved with --json, and exit")
    parser.add_argument("--_runner", help=argparse.SUPPRESS)
    parser.add_argument("--_shim", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._runner:  # sys.path and PYTHONPATH were set for the tree at import (TREE_ENV)
        runner_main(args._runner, args._shim, args.layer_ms, args.layers)
        return

    if args.report:
        print(report_from_json(parser, args.report, args.profile_top))
        return
    resolve(args)
    groups = list(args.shards)
    if args.want_lone and LONE_SHARDS not in groups:
        groups.append(LONE_SHARDS)

    shim_dir = tempfile.mkdtemp(prefix="nd-bench-scale-shim-")
    shutil.copy(Path(REPO) / "nnsight_dask" / "models" / "simulated.py", Path(shim_dir) / f"{SHIM}.py")
    specs = ([("base", args.compare), ("new", REPO)] if args.compare
             else [(Path(args.tree).name, args.tree)] if args.tree else [("this", REPO)])

    results: dict = {"lone": {}, "idle": {}}
    info: dict = {}
    profiles: list = []
    started = time.time()
    cell_index = 0
    trees: list[Tree] = []
    try:
        for shards in groups:
            log(f"{shards} shard(s): starting {len(specs)} cluster(s)")
            trees = [Tree(label, path, shim_dir, args) for label, path in specs]
            for tree in trees:  # the clusters start together (their idle windows overlap: both count in 'others')
                tree.send("start", shards=shards, modes=list(args.modes) if shards in args.shards else [],
                          gateway_in_flight=args.gateway_in_flight, max_users=max(args.users or [1]))
            for tree in trees:
                info[tree.label] = tree.receive()
                results["idle"].setdefault(tree.label, {})[shards] = info[tree.label]["idle_ms_per_s"]
                log(f"{tree.label}: deployed in {shards} shard(s), layers {info[tree.label]['layers']}; "
                    f"nnsight_dask from {info[tree.label]['where']}")
            if shards in args.shards:
                for r in range(args.repeat):
                    for users in args.users:
                        for mode in args.modes:
                            order = trees if (cell_index + r) % 2 == 0 else trees[::-1]
                            cell_index += 1
                            for tree in order:
                                label = f"{tree.label}-{mode}-s{shards}-u{users}-r{r}"
                                profile = ({"dir": args.profile, "label": label, "rate": args.profile_rate}
                                           if args.profile else None)
                                res = tree.call("cell", mode=mode, users=users, seconds=args.seconds,
                                                warmup=warmup_for(users, args.warmup), profile=profile)
                                results.setdefault((tree.label, mode, shards, users), []).append(res)
                                if res["profiles"]:
                                    profiles.append((label, res, res["profiles"]))
                                log(f"{label}: {res['exp_s']:.1f} exp/s, p50 {res['p50']:.0f} ms, p99 {res['p99']:.0f} ms, "
                                    f"scheduler {res['cpu_ms']['scheduler']:.1f} ms/exp, others {res['others_cores']:.2f} cores, "
                                    f"errors {res['n_errors']}")
            if args.want_lone and shards == LONE_SHARDS:
                # rounds of LONE_CHUNK experiments, alternating the trees, so load hits both alike
                chunks = max(1, -(-args.lone_n // LONE_CHUNK))
                for r in range(args.repeat):
                    runs = {tree.label: {"latencies": [], "compute": []} for tree in trees}
                    for k in range(chunks):
                        for tree in (trees if (r + k) % 2 == 0 else trees[::-1]):
                            res = tree.call("lone", n=LONE_CHUNK, warm=(k == 0))
                            runs[tree.label]["latencies"] += res["latencies"]
                            runs[tree.label]["compute"] += res["compute"]
                            runs[tree.label]["hops"] = res["hops"]
                    for label, run in runs.items():
                        run["median"] = statistics.median(run["latencies"])
                        run["compute_median"] = statistics.median(run["compute"])
                        run["paired_overhead"] = statistics.median(a - b for a, b in zip(run["latencies"], run["compute"]))
                        results["lone"].setdefault(label, []).append(run)
                        log(f"{label}: lone {run['median']:.1f} ms (compute {run['compute_median']:.1f} ms)")
            for tree in trees:
                tree.close()
            trees = []
    finally:
        for tree in trees:
            tree.close()
        shutil.rmtree(shim_dir, ignore_errors=True)

    labels = [argparse.Namespace(label=label, path=str(Path(path).resolve()), rev=tree_rev(path)) for label, path in specs]
    text = report(results, labels, args, info, sys.argv[1:], today())
    if profiles:
        text += "\n" + profile_report(profiles, args.profile_top)
    text += f"\n(run took {time.time() - started:.0f} s)"
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "argv": sys.argv[1:], "when": today(), "machine": machine(), "git": git_rev(), "info": info,
            "trees": [vars(t) for t in labels],
            "cells": [{"tree": k[0], "mode": k[1], "shards": k[2], "users": k[3], "runs": v}
                      for k, v in results.items() if k not in ("lone", "idle")],
            "lone": results["lone"], "idle": results["idle"]}, indent=1, default=str))


def resolve(args: argparse.Namespace) -> None:
    """Fill in the presets: modes, shards, users, window, and whether to measure the lone latency."""
    lone_only = args.lone and not (args.shards or args.users or args.quick)
    args.modes = MODES if args.mode == "all" else parse_list(args.mode, MODES, str)
    args.shards = parse_list(args.shards) if args.shards else ([] if lone_only else [4] if args.quick else list(SHARDS))
    args.users = parse_list(args.users) if args.users else ([] if lone_only else [1, 16, 64] if args.quick else list(USERS))
    args.seconds = args.seconds or (5.0 if args.quick else 6.0)
    full = args.shards == list(SHARDS) and args.users == list(USERS)
    args.want_lone = not args.no_lone and (args.lone or args.quick or full)


def report_from_json(parser: argparse.ArgumentParser, path: str, top: int) -> str:
    """The report of a run saved with ``--json`` (profiles summarized again from their files)."""
    saved = json.loads(Path(path).read_text())
    args = parser.parse_args(saved["argv"])
    resolve(args)
    results: dict = {(c["tree"], c["mode"], c["shards"], c["users"]): c["runs"] for c in saved["cells"]}
    results["lone"] = saved.get("lone", {})
    results["idle"] = saved.get("idle") or {label: {"last": meta["idle_ms_per_s"]} for label, meta in saved["info"].items()
                                           if "idle_ms_per_s" in meta}
    trees = [argparse.Namespace(**t) for t in saved.get("trees", [])] or [
        argparse.Namespace(label=label, path=str(Path(meta["where"]["runner"]).parents[1]), rev="?")
        for label, meta in saved["info"].items()]
    profiles = [(f"{c['tree']}-{c['mode']}-s{c['shards']}-u{c['users']}-r{r}", run, run["profiles"])
                for c in saved["cells"] for r, run in enumerate(c["runs"]) if run.get("profiles")]
    text = report(results, trees, args, saved["info"], saved["argv"], saved["when"])
    return text + ("\n" + profile_report(profiles, top) if profiles else "")


if __name__ == "__main__":
    main()
