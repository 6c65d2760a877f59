"""Remote execution on a Dask LocalCluster: round trip, shard hop, co-tenancy (DESIGN.md §7, issue 3).

One run prints four measurements, each interleaved round-robin (medians; differences are medians of
per-round paired differences) on a LocalCluster of 2 single-threaded worker processes:

1. **Round trip**: the same graph (save the last layer's output and the next-token argmax) run locally
   (``nd.LanguageModel``, this process) vs remotely (``nd.RemoteModel`` on a 1-shard and a 2-shard
   deployment). Remote overhead = remote - local. The Dask floor (one ``client.submit`` of a no-op task
   pinned to the shard worker, ``.result()``) is printed for reference.
2. **Shard hop**: hop = (2-shard experiment) - (1-shard experiment) of the same graph (equal compute,
   one more stage whose carry moves worker A -> worker B) vs the raw Dask equivalent: (task on A returning
   a tensor of the carry's size, consumed by a task on B) - (one task on A). Pure transfer (A -> B minus
   A -> A with the same two tasks) is printed too.
3. **Throughput**: experiments/s with 1, 4 and 10 client threads sharing one ``RemoteModel`` (tracing is
   thread-local) on the 2-shard deployment; every result is checked against local execution.
4. **Memory**: worker RSS (``client.run(psutil...)``) with the 2-shard deployment serving 10 clients, vs
   10 private copies (RSS growth of loading one copy in a fresh process, x10).

Targets: remote overhead (tiny GPT-2) <= 15 ms per experiment; hop <= 1.2x raw hop; 10 clients >= 3x the
single-client throughput. When the overhead target is missed, the client side of ``lm.trace`` is
profiled (cProfile) and the time split over ``run_experiment``'s parts is printed.

Usage::

    python bench/remote.py            # tiny GPT-2 and SmolLM2 (when available), < 4 minutes
    python bench/remote.py --quick    # tiny GPT-2 only, fewer rounds, < 90 s
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import use_this_checkout  # bench/ is on sys.path: it is the script's folder

# Measure the package of this checkout (also in the worker processes and the private-copy probe), not
# whatever copy happens to be pip-installed.
REPO = use_this_checkout()

import torch  # noqa: E402

torch.set_num_threads(1)

from _common import git_rev, interleaved, machine, median_ms, paired_diff_ms, table, today  # noqa: E402

PROMPT = "The Eiffel Tower is in the city of"
WORDS = PROMPT.split()
OVERHEAD_TARGET_MS = 15.0
HOP_TARGET = 1.2
THROUGHPUT_TARGET = 3.0
CLIENT_COUNTS = (1, 4, 10)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- worker-side helpers (this script is __main__, so Dask ships them to the workers by value) -------------
def _preimport() -> int:
    """Import what a shard needs, so RSS growth measured later is the model, not the libraries."""
    import psutil
    import torch
    import transformers  # noqa: F401
    from transformers.models.gpt2 import modeling_gpt2  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import nnsight_dask.worker.shard_actor  # noqa: F401
    import nnsight_dask.models.loading  # noqa: F401

    torch.set_num_threads(1)
    return psutil.Process().memory_info().rss


def _package_file() -> str:
    import nnsight_dask

    return nnsight_dask.__file__


def _rss() -> int:
    import gc

    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


def _noop() -> int:
    return 0


def _produce(nbytes: int) -> torch.Tensor:
    import torch

    return torch.ones(max(1, nbytes // 4), dtype=torch.float32)


def _consume(x: torch.Tensor) -> int:
    return int(x.numel())


PRIVATE_COPY = r"""
import gc, json, os, sys, warnings
warnings.simplefilter("ignore")
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
import psutil, torch
torch.set_num_threads(1)
import transformers
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.llama import modeling_llama
import nnsight_dask as nd
gc.collect()
before = psutil.Process().memory_info().rss
source, layers_path = sys.argv[1], sys.argv[2]
lm = nd.smollm2() if source == "smollm2" else nd.LanguageModel(source)
layers = lm
for part in layers_path.split("."):
    layers = getattr(layers, part)
with lm.trace("The Eiffel Tower is in the city of"):
    h = layers[0].output.save()
gc.collect()
after = psutil.Process().memory_info().rss
print(json.dumps({"before": before, "after": after}))
"""


class NullWriter:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True  # progress bars draw only on terminals: measure them drawing


def _get(obj, path: str):
    return functools.reduce(getattr, path.split("."), obj)


def _tensor(x):
    x = x.value if hasattr(x, "value") and not isinstance(x, torch.Tensor) else x
    if isinstance(x, (tuple, list)):
        x = x[0]
    return x


class Model:
    """One model: its local copy, its 1- and 2-shard deployments, the graph measured."""

    def __init__(self, label: str, source: str, layers_path: str) -> None:
        self.label = label
        self.source = source
        self.layers_path = layers_path
        self.key = label.split()[0].lower().replace("-", "")
        self.local = None
        self.remote: dict[int, object] = {}
        self.records: dict[int, dict] = {}

    def load_local(self) -> None:
        import nnsight_dask as nd

        self.local = nd.smollm2() if self.source == "smollm2" else nd.LanguageModel(self.source)
        self.n_layer = len(_get(self.local, self.layers_path))

    def deploy(self, client, shards: int) -> float:
        import nnsight_dask as nd

        t0 = time.perf_counter()
        name = f"bench-{self.key}-{shards}"
        self.records[shards] = nd.serve(client, self.source, shards=shards, name=name)
        self.remote[shards] = nd.RemoteModel(client, name)
        return time.perf_counter() - t0

    def experiment(self, lm, prompt: str = PROMPT, **trace_kwargs):
        """The measured graph: the last layer's output and the next token (both on the last shard)."""
        with lm.trace(prompt, **trace_kwargs):
            h = _get(lm, self.layers_path)[self.n_layer - 1].output.save()
            tok = lm.output.logits[:, -1].argmax(-1).save()
        return _tensor(h), _tensor(tok)

    def carry_bytes(self, prompt: str = PROMPT) -> int:
        """Bytes of the carry that crosses the shard boundary for this graph (hidden + inputs + pickle)."""
        from nnsight_dask.worker.serialization import dumps
        from nnsight_dask.execution.stage import Carry

        enc = self.local.tokenizer([prompt], return_tensors="pt")
        d_model = self.local._module.config.hidden_size
        carry = Carry(hidden=torch.zeros(1, enc["input_ids"].shape[1], d_model),
                      inputs={"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        _, frames = dumps(carry)
        return sum(len(memoryview(f).cast("B")) for f in frames)


def parity(model: Model, prompt: str = PROMPT) -> float:
    h_l, t_l = model.experiment(model.local, prompt)
    worst = 0.0
    for lm in model.remote.values():
        h_r, t_r = model.experiment(lm, prompt)
        if not torch.equal(t_r, t_l):
            raise AssertionError(f"{model.label}: remote next token {t_r} != local {t_l}")
        worst = max(worst, (h_r.float() - h_l.float()).abs().max().item())
    if worst > 1e-5:
        raise AssertionError(f"{model.label}: remote differs from local by {worst:.2e} > 1e-5")
    return worst


def worker_rss(client) -> dict[str, int]:
    return client.run(_rss)


# -- 1 + 2: round trip and hop ----------------------------------------------------------------------
def round_trip(client, model: Model, budget_s: float) -> dict:
    a = model.records[1].shards[0].worker
    b = model.records[2].shards[1].worker
    assert model.records[2].shards[0].worker == a and a != b
    nbytes = model.carry_bytes()

    null = NullWriter()

    def verbose_run():
        with contextlib.redirect_stderr(null):  # the bar's work, without a terminal to draw on
            return model.experiment(model.remote[2], verbose=True)

    def raw_one():
        return client.submit(_noop, workers=[a], allow_other_workers=False, pure=False).result()

    def raw_one_direct():
        return client.gather(client.submit(_noop, workers=[a], allow_other_workers=False, pure=False),
                             direct=True)

    def raw_chain(dst):
        def run():
            x = client.submit(_produce, nbytes, workers=[a], allow_other_workers=False, pure=False)
            return client.submit(_consume, x, workers=[dst], allow_other_workers=False, pure=False).result()
        return run

    variants = {
        "local": lambda: model.experiment(model.local),
        "remote1": lambda: model.experiment(model.remote[1]),
        "remote2": lambda: model.experiment(model.remote[2]),
        "raw1": raw_one,
        "remote2verbose": verbose_run,
        "raw1direct": raw_one_direct,
        "rawAB": raw_chain(b),
        "rawAA": raw_chain(a),
    }
    times = interleaved(variants, budget_s=budget_s, min_rounds=15, max_rounds=400)
    return {"times": times, "carry_bytes": nbytes, "rounds": len(times["local"])}


# -- 3 + 4: throughput and memory -------------------------------------------------------------------
def prompts_for(n: int) -> list[str]:
    """n distinct prompts (different lengths and orders), so every thread's results are its own."""
    out = []
    for i in range(n):
        words = WORDS[: 3 + i % (len(WORDS) - 2)]
        if i >= len(WORDS) - 2:
            words = list(reversed(words))
        out.append(" ".join(words))
    return out


def throughput(cluster, model: Model, shards: int, counts: tuple[int, ...], window_s: float, rounds: int,
               on_window=None, unshared: bool = False) -> dict:
    """Experiments/s of ``n`` client threads sharing one RemoteModel, for each n in ``counts``.

    Each window gets its own ``Client`` + ``RemoteModel`` (made before the clock starts), so a client
    broken by a failure in one window (see the report) cannot leak into the next.
    """
    import nnsight_dask as nd
    from distributed import Client

    name = model.records[shards].name
    prompts = prompts_for(max(counts))
    expected = {p: model.experiment(model.local, p) for p in prompts}
    wrong: list[str] = []
    failed: list[str] = []

    def client_loop(lm, prompt: str, stop_at: float, done: list[int]) -> None:
        h_l, t_l = expected[prompt]
        n = 0
        while time.perf_counter() < stop_at:
            try:
                h, t = model.experiment(lm, prompt)
            except Exception as exc:  # counted and reported; the client carries on
                failed.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            if not torch.equal(t, t_l) or (h.float() - h_l.float()).abs().max().item() > 1e-5:
                wrong.append(f"wrong result for prompt {prompt!r}")
            n += 1
        done.append(n)

    def window(n_clients: int) -> float:
        client = Client(cluster, set_as_default=False)
        try:
            lm = nd.RemoteModel(client, name)
            model.experiment(lm)
            done: list[int] = []
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client_loop, args=(lm, prompts[i], t0 + window_s, done))
                       for i in range(n_clients)]
            for th in threads:
                th.start()
            if on_window is not None:
                on_window(n_clients, t0 + window_s)
            for th in threads:
                th.join()
            return sum(done) / (time.perf_counter() - t0)
        finally:
            client.close()

    window(max(counts))  # warm-up
    def window_unshared() -> float:
        """The most clients with sharing of stage tasks off: every experiment its own chain."""
        import nnsight_dask as nd

        before, nd.config.max_batch_experiments = nd.config.max_batch_experiments, 1
        try:
            return window(max(counts))
        finally:
            nd.config.max_batch_experiments = before

    rates: dict[int | str, list[float]] = {n: [] for n in counts}
    variants: list[int | str] = [*counts, *(["unshared"] if unshared else [])]
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for n in order:
            rates.setdefault(n, []).append(window_unshared() if n == "unshared" else window(n))
    if wrong:
        raise AssertionError(f"{len(wrong)} concurrent experiments returned wrong results: {wrong[:3]}")
    return {"rates": rates, "failed": failed}


def _process_client(scheduler: str, name: str, layers_path: str, n_layer: int, prompt: str,
                    expected: tuple[torch.Tensor, torch.Tensor], barrier, window_s: float) -> dict:
    """One client process: its own Client and RemoteModel; experiments for ``window_s`` after the barrier."""
    import nnsight_dask as nd
    from distributed import Client

    nd.config.verbose = False
    h_l, t_l = expected
    with Client(scheduler) as client:
        lm = nd.RemoteModel(client, name)

        def run():
            with lm.trace(prompt):
                h = _get(lm, layers_path)[n_layer - 1].output.save()
                tok = lm.output.logits[:, -1].argmax(-1).save()
            return _tensor(h), _tensor(tok)

        run()
        barrier.wait(timeout=600)
        t0 = time.perf_counter()
        n, wrong = 0, 0
        while time.perf_counter() < t0 + window_s:
            h, tok = run()
            wrong += not torch.equal(tok, t_l) or (h.float() - h_l.float()).abs().max().item() > 1e-5
            n += 1
        return {"n": n, "wrong": wrong, "seconds": time.perf_counter() - t0}


def throughput_processes(client, model: Model, shards: int, n_clients: int, window_s: float) -> dict:
    """Experiments/s of ``n_clients`` separate client processes (one Client each) on one deployment.

    Experiments of different processes never share stage tasks (see ``nnsight_dask.client.coalesce``):
    this is the per-experiment cost of Dask's task machinery.
    """
    import concurrent.futures
    import multiprocessing

    name = model.records[shards].name
    prompts = prompts_for(n_clients)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n_clients + 1)
        with concurrent.futures.ProcessPoolExecutor(n_clients, mp_context=ctx) as pool:
            futures = [pool.submit(_process_client, client.scheduler.address, name, model.layers_path, model.n_layer,
                                   prompts[i], model.experiment(model.local, prompts[i]), barrier, window_s)
                       for i in range(n_clients)]
            barrier.wait(timeout=600)
            outs = [f.result(timeout=600) for f in futures]
    if any(o["wrong"] for o in outs):
        raise AssertionError(f"{sum(o['wrong'] for o in outs)} experiments of client processes returned wrong results")
    return {"rate": sum(o["n"] for o in outs) / max(o["seconds"] for o in outs), "n": n_clients}


def private_copy(model: Model) -> dict:
    out = subprocess.run([sys.executable, "-c", PRIVATE_COPY, model.source, model.layers_path],
                         capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"private-copy probe failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(cluster, client, model: Model, idle: dict[str, int], window_s: float) -> dict:
    """Worker RSS: idle (libraries imported), with the 2-shard deployment, and while 10 clients run."""
    import nnsight_dask as nd
    from nnsight_dask.worker import tasks

    loaded = worker_rss(client)
    record = model.records[2]
    status = [client.submit(tasks.shard_status, record.name, s.index, workers=[s.worker],
                            pure=False).result() for s in record.shards]
    weight_bytes = sum(s["weight_bytes"] for s in status)
    peak = dict(loaded)

    def sample(_n: int, stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            for w, rss in worker_rss(client).items():
                peak[w] = max(peak.get(w, 0), rss)
            time.sleep(0.2)

    load = throughput(cluster, model, 2, (10,), window_s, 1, on_window=sample)
    for w, rss in worker_rss(client).items():
        peak[w] = max(peak.get(w, 0), rss)
    copy = private_copy(model)
    del nd
    return {"idle": sum(idle.values()), "loaded": sum(loaded.values()), "peak10": sum(peak.values()),
            "weight_bytes": weight_bytes, "copy_growth": copy["after"] - copy["before"],
            "copy_rss": copy["after"], "rate10": load["rates"][10][0], "failed": load["failed"]}


# -- profile ----------------------------------------------------------------------------------------
PARTS = [
    ("tracer enter (tokenize, record)", "tracing/tracer.py", "__enter__"),
    ("check_graph (validate)", "worker/limits.py", "check_graph"),
    ("graph.to_json", "graph/graph.py", "to_json"),
    ("launch_route (announce + client.submit xN)", "client/experiment.py", "launch_route"),
    ("_wait (chain runs + result fetch)", "client/experiment.py", "_wait"),
    ("ZarrSink.commit", "storage/results/sink.py", "commit"),
]


def profile_client(model: Model, shards: int, n: int) -> dict:
    lm = model.remote[shards]
    for _ in range(3):
        model.experiment(lm)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(n):
        model.experiment(lm)
    prof.disable()
    total = (time.perf_counter() - t0) / n
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    parts = {}
    for label, file_suffix, func in PARTS:
        cum = sum(v[3] for (f, _line, name), v in stats.items() if f.endswith(file_suffix) and name == func)
        parts[label] = cum / n
    run_exp = sum(v[3] for (f, _l, name), v in stats.items()
                  if f.endswith("client/experiment.py") and name == "run_experiment") / n
    return {"total": total, "run_experiment": run_exp, "parts": parts}


# -- main -------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2 only, fewer rounds (< 90 s)")
    args = parser.parse_args()
    started = time.perf_counter()
    quick = args.quick

    from distributed import Client, LocalCluster

    import nnsight_dask as nd
    from nnsight_dask.models import save_tiny, smollm2_available

    nd.config.verbose = False  # the per-experiment progress bar is measured separately (tiny model)
    tmp = Path(tempfile.mkdtemp(prefix="nd-bench-remote-"))
    tiny_path = str(save_tiny(tmp / "tiny-gpt2", arch="gpt2", n_layer=2, n_embd=64))
    models = [Model("GPT-2 2x64", tiny_path, "transformer.h")]
    smol_note = ""
    if not quick:
        if smollm2_available():
            models.append(Model("SmolLM2-135M", "smollm2", "model.layers"))
        else:
            smol_note = "SmolLM2 not available (see nnsight_dask.models.SMOLLM2_INSTALL): skipped"
    mem_model = models[-1]

    log("starting LocalCluster(2 workers x 1 thread, processes)")
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                           env={"OMP_NUM_THREADS": "1", "NNSIGHT_DASK_TORCH_THREADS": "1"})
    client = Client(cluster)
    try:
        client.run(_preimport)
        where = {os.path.dirname(os.path.dirname(f)) for f in [nd.__file__, *client.run(_package_file).values()]}
        if where != {REPO}:
            raise RuntimeError(f"nnsight_dask imported from {where}, not from this checkout {REPO}")
        idle = worker_rss(client)
        for m in models:
            m.load_local()

        # Memory model's 2-shard deployment first, so its RSS is measured with nothing else loaded.
        serve_s: dict[str, float] = {}
        log(f"serving {mem_model.label} (2 shards)")
        serve_s[f"{mem_model.label} x2"] = mem_model.deploy(client, 2)
        log("memory: 10 clients on the 2-shard deployment")
        mem = memory(cluster, client, mem_model, idle, window_s=2.0 if quick else 3.0)
        for m in models:
            for shards in (1, 2):
                if shards not in m.remote:
                    log(f"serving {m.label} ({shards} shard{'s' * (shards > 1)})")
                    serve_s[f"{m.label} x{shards}"] = m.deploy(client, shards)
        worst = {m.label: parity(m) for m in models}

        rt = {}
        for m in models:
            budget = (12.0 if quick else 35.0) if m is models[0] else 30.0
            log(f"round trip + hop: {m.label} ({budget:.0f} s)")
            rt[m.label] = round_trip(client, m, budget)

        tp = {}
        for m in models:
            window_s, rounds = (1.5, 2) if quick else ((2.5, 3) if m is models[0] else (2.5, 2))
            log(f"throughput: {m.label} ({(len(CLIENT_COUNTS) + (m is models[0])) * rounds} windows of {window_s} s)")
            tp[m.label] = throughput(cluster, m, 2, CLIENT_COUNTS, window_s, rounds, unshared=m is models[0])
        log(f"throughput: {models[0].label}, {max(CLIENT_COUNTS)} client processes")
        procs = throughput_processes(client, models[0], 2, max(CLIENT_COUNTS), window_s=2.0 if quick else 3.0)

        tiny = models[0]
        t = rt[tiny.label]["times"]
        overhead_tiny = max(paired_diff_ms(t["remote1"], t["local"]), paired_diff_ms(t["remote2"], t["local"]))
        prof = None
        if overhead_tiny > OVERHEAD_TARGET_MS:
            log("remote overhead target missed: profiling the client side")
            prof = profile_client(tiny, 2, 40 if quick else 80)

        for m in models:
            for shards in (1, 2):
                nd.undeploy(client, f"bench-{m.key}-{shards}")
    finally:
        client.close()
        cluster.close()

    # -- report ------------------------------------------------------------------------------------
    lines: list[str] = []
    out = lines.append
    out(f"## Remote (bench/remote.py{' --quick' if quick else ''})")
    out("")
    out(f"{today()} · git {git_rev()} · {machine()}")
    out(f"LocalCluster: 2 worker processes x 1 thread, torch {torch.__version__} (1 thread), "
        f"distributed {__import__('distributed').__version__}; medians over interleaved rounds.")
    if smol_note:
        out(smol_note)
    out("Deploy time: " + ", ".join(f"{k} {v:.1f} s" for k, v in serve_s.items())
        + "; parity (max |remote - local|): " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    out("")
    out("### 1. Round trip: remote vs local, same graph (last layer output + next-token argmax saved)")
    out("")
    rows = []
    for m in models:
        r = rt[m.label]
        t = r["times"]
        floor = median_ms(t["raw1"])
        for shards, key in ((1, "remote1"), (2, "remote2"), ("2, progress bar", "remote2verbose")):
            over = paired_diff_ms(t[key], t["local"])
            target = f"{verdict(over <= OVERHEAD_TARGET_MS)} (<= {OVERHEAD_TARGET_MS:.0f} ms)" if m is tiny else "-"
            rows.append([m.label, str(shards), f"{median_ms(t['local']):.2f}", f"{median_ms(t[key]):.2f}",
                         f"{over:+.2f}", f"{floor:.2f}", f"{median_ms(t['raw1direct']):.2f}", str(r["rounds"]),
                         target])
    out(table(["model", "shards", "local ms", "remote ms", "overhead ms", "Dask floor ms", "floor, direct ms",
               "rounds", "target"], rows))
    out("")
    out("Dask floor: one `client.submit` of a no-op task pinned to the shard's worker, then `.result()` "
        "(result fetched via the scheduler); 'direct': `client.gather(future, direct=True)` (fetched from the "
        "worker). 'progress bar': `lm.trace(..., verbose=True)` (the default of `nd.config.verbose`), its "
        "tqdm bar drawn to a null stream; the other rows run with `nd.config.verbose = False`.")
    out("")
    out("### 2. Shard hop vs raw worker-to-worker transfer of the same bytes")
    out("")
    rows = []
    hop_ok = {}
    for m in models:
        r = rt[m.label]
        t = r["times"]
        hop = paired_diff_ms(t["remote2"], t["remote1"])
        raw_hop = paired_diff_ms(t["rawAB"], t["raw1"])
        transfer = paired_diff_ms(t["rawAB"], t["rawAA"])
        hop_ok[m.label] = hop <= HOP_TARGET * raw_hop
        ratio = hop / raw_hop if raw_hop > 0 else float("inf")
        rows.append([m.label, f"{r['carry_bytes']:,}", f"{hop:.2f}", f"{raw_hop:.2f}", f"{transfer:+.2f}",
                     f"{ratio:.2f}x", f"{verdict(hop_ok[m.label])} (<= {HOP_TARGET}x)"])
    out(table(["model", "carry bytes", "hop ms", "raw hop ms", "pure transfer ms", "hop / raw", "target"], rows))
    out("")
    out("hop = 2-shard - 1-shard experiment (paired per round). raw hop = (task on A returning a tensor of "
        "the carry's size -> task on B) - (one task on A). pure transfer = A->B chain - A->A chain.")
    out("")
    out("### 3. Throughput: concurrent clients on the 2-shard deployment (one RemoteModel, one thread each)")
    out("")
    rows = []
    tp_ok = {}
    for m in models:
        rates = tp[m.label]["rates"]
        base = statistics.median(rates[1])
        for n in CLIENT_COUNTS:
            med = statistics.median(rates[n])
            speedup = med / base
            target = "-"
            if n == 10:
                tp_ok[m.label] = speedup >= THROUGHPUT_TARGET
                target = f"{verdict(tp_ok[m.label])} (>= {THROUGHPUT_TARGET:.0f}x)" if m is tiny else (
                    f"({verdict(tp_ok[m.label])})")
            rows.append([m.label, str(n), f"{med:.1f}", f"{1e3 * n / med:.1f}", f"{speedup:.2f}x", target])
        if "unshared" in rates:
            med, n = statistics.median(rates["unshared"]), max(CLIENT_COUNTS)
            rows.append([m.label, f"{n}, sharing off", f"{med:.1f}", f"{1e3 * n / med:.1f}", f"{med / base:.2f}x", "-"])
        if m is tiny:
            n = procs["n"]
            rows.append([m.label, f"{n} processes", f"{procs['rate']:.1f}", f"{1e3 * n / procs['rate']:.1f}",
                         f"{procs['rate'] / base:.2f}x", "-"])
    out(table(["model", "clients", "experiments/s", "latency ms", "vs 1 client", "target"], rows))
    out("")
    out("Clients are threads sharing one `RemoteModel`; experiments in flight together from one process share "
        "stage tasks once every shard is busy (`nnsight_dask.client.coalesce`). 'processes': separate client "
        "processes, one `Client` each; their experiments never share tasks. 'sharing off': "
        "`nd.config.max_batch_experiments = 1`, every experiment in its own chain. Every concurrent result was checked "
        "against local execution of its own prompt (distinct prompts per client): all correct.")
    for m in models:
        failed = tp[m.label]["failed"]
        if failed:
            kinds = sorted({f.split(":")[0] for f in failed})
            out(f"{m.label}: {len(failed)} experiment(s) raised under concurrency ({', '.join(kinds)}); first: "
                f"`{failed[0]}`")
    out("")
    out(f"### 4. Memory: {mem_model.label}, 2-shard deployment serving 10 clients vs 10 private copies")
    out("")
    mib = 1 / 2**20
    dep_growth = mem["peak10"] - mem["idle"]
    ten_copies = 10 * mem["copy_growth"]
    rows = [
        ["model weights held by the shards", f"{mem['weight_bytes'] * mib:.1f}"],
        ["workers idle (libraries imported), sum of RSS", f"{mem['idle'] * mib:.1f}"],
        ["workers with the deployment loaded", f"{mem['loaded'] * mib:.1f}"],
        [f"workers, peak while 10 clients run ({mem['rate10']:.1f} exp/s)", f"{mem['peak10'] * mib:.1f}"],
        ["-> deployment + 10 clients, growth over idle", f"{dep_growth * mib:.1f}"],
        ["one private copy: RSS growth of loading it (fresh process)", f"{mem['copy_growth'] * mib:.1f}"],
        ["-> 10 private copies (x10, libraries not counted)", f"{ten_copies * mib:.1f}"],
        ["-> 10 private processes (x10 full RSS incl. libraries)", f"{10 * mem['copy_rss'] * mib:.1f}"],
    ]
    out(table(["quantity", "MiB"], rows))
    if mem["failed"]:
        out(f"({len(mem['failed'])} experiment(s) raised during this run; first: `{mem['failed'][0]}`)")
    out("")
    out(f"10 private copies need {ten_copies / max(dep_growth, 1):.1f}x the memory of one shared deployment "
        "serving 10 clients.")
    if prof is not None:
        out("")
        out(f"### Client-side profile (cProfile, tiny GPT-2, 2 shards): {prof['total'] * 1e3:.1f} ms per "
            f"`lm.trace` under the profiler, run_experiment {prof['run_experiment'] * 1e3:.1f} ms")
        out("")
        rows = [[label, f"{v * 1e3:.2f}"] for label, v in prof["parts"].items()]
        out(table(["part (cumulative)", "ms / experiment"], rows))
    out("")
    out("### Targets")
    out("")
    t = rt[tiny.label]["times"]
    out(f"- remote overhead, tiny GPT-2 <= {OVERHEAD_TARGET_MS:.0f} ms: "
        f"{verdict(overhead_tiny <= OVERHEAD_TARGET_MS)} (worst of 1/2 shards: {overhead_tiny:+.1f} ms; "
        f"Dask floor {median_ms(t['raw1']):.1f} ms)")
    out(f"- hop <= {HOP_TARGET}x raw transfer: " + ", ".join(f"{k} {verdict(v)}" for k, v in hop_ok.items()))
    out(f"- 10 clients >= {THROUGHPUT_TARGET:.0f}x single-client throughput: "
        + ", ".join(f"{k} {verdict(v)}" for k, v in tp_ok.items()))
    out("")
    out(f"Total bench time {time.perf_counter() - started:.0f} s.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
