"""Cluster logic on an in-process cluster: Dask's ``gen_cluster`` runs the scheduler and two workers
on this process's event loop (no worker processes), with its timeout and its leak checks.

``serve``, ``RemoteModel`` and traces block on Dask futures, so they run in a thread with a
synchronous client of their own (:func:`blocking`) while the loop keeps the cluster going; what
the scheduler and the workers hold is then read directly from ``s`` and the workers.

The model is the conftest's ``model_dir`` (a saved 4-layer tiny Llama). Two in-process workers load
their shards at once in one process: shard loading takes a process lock for that (transformers
resolves its lazy names without one), which these tests exercise.
"""
from __future__ import annotations

import asyncio

import dask
import pytest
import torch
from distributed import Client
from distributed.utils_test import async_poll_for, gen_cluster

import nnsight_dask as nd
from nnsight_dask.client import Deployment, ShardPlacement, get_deployment
from nnsight_dask.client.coalesce import Coalescer, Member
from nnsight_dask.client.deployment import dead_shards
from nnsight_dask.client.experiment import plan_for
from nnsight_dask.errors import DeploymentError, GraphValidationError, InterventionError
from nnsight_dask.execution.stage import Carry, Stage
from nnsight_dask.scheduler import monitor
from nnsight_dask.worker import registry, tasks
from tests.cluster import route_by_hand

torch.set_num_threads(1)

TWO_WORKERS = [("127.0.0.1", 1), ("127.0.0.1", 1)]
PROMPT = "The Eiffel Tower is in the city of"


async def blocking(s, body):
    """``body(client)`` in a thread, with a synchronous client of the in-process scheduler ``s``."""
    def run():
        with Client(s.address, set_as_default=False) as client:
            return body(client)
    return await asyncio.to_thread(run)


def in_flight(client, name):
    """Experiments each shard of deployment ``name`` still holds state for."""
    record = get_deployment(client, name)
    return [client.submit(tasks.shard_status, name, s.index, workers=[s.worker], pure=False).result()["in_flight"]
            for s in record.shards]


def assert_close(a, b, tol=1e-5):
    a, b = getattr(a, "value", a), getattr(b, "value", b)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol


# -- the deployment record --------------------------------------------------------------------------
def _record():
    shards = (ShardPlacement(0, "tcp://w0:1", (0, 2), ("model.embed_tokens", "model.layers.0", "model.layers.1"),
                             "model.layers"),
              ShardPlacement(1, "tcp://w1:1", (2, 4), ("model.layers.2", "model.layers.3", "lm_head"), "model.layers"))
    return Deployment(name="fake", source="src", shards=shards, created=12.5, generation=0,
                      options={"dtype": "bfloat16", "device": None, "gguf_file": None}, monitor=True)


def test_deployment_record_round_trips_and_refuses_a_malformed_one():
    record = _record()
    assert Deployment.from_metadata(record.to_metadata()) == record
    assert record.owner("model.layers.3.mlp") == 1 and record.owner("model.embed_tokens") == 0
    moved = record.moved({1: "tcp://w2:1"})
    assert moved.workers == ["tcp://w0:1", "tcp://w2:1"] and moved.generation == 1
    assert Deployment.from_metadata(moved.to_metadata()) == moved
    broken = record.to_metadata()
    broken["shards"][1]["layers"] = [2]  # a layer range with one end
    with pytest.raises(DeploymentError, match=r"deployment 'fake' cannot be read \(IndexError.*Undeploy and serve"):
        Deployment.from_metadata(broken)
    with pytest.raises(DeploymentError, match=r"deployment 'fake' cannot be read \(KeyError: 'shards'\)"):
        Deployment.from_metadata({"name": "fake", "source": "src"})


# -- deployments on the cluster ---------------------------------------------------------------------
@gen_cluster(client=True, nthreads=TWO_WORKERS, timeout=30)
async def test_serve_registers_typed_record_and_undeploy_frees_shards(c, s, a, b, model_dir):
    def body(client):
        record = nd.serve(client, model_dir, shards=2, name="tiny")
        listed, fetched = nd.deployments(client), get_deployment(client, "tiny")
        with pytest.raises(DeploymentError, match="a deployment named 'tiny' already exists"):
            nd.serve(client, model_dir, shards=2, name="tiny")
        lost = dead_shards(client, record)
        actors = {w.address: [(x.deployment, x.index) for x in w.state.actors.values()] for w in (a, b)}
        held = client.run(registry.held)
        nd.undeploy(client, "tiny")
        with pytest.raises(DeploymentError, match="no deployment named 'tiny' on this cluster; deployed: none"):
            get_deployment(client, "tiny")
        return record, listed, fetched, lost, actors, held, nd.deployments(client), client.run(registry.held)

    record, listed, fetched, lost, actors, held, after, held_after = await blocking(s, body)
    assert isinstance(record, Deployment) and record.name == "tiny" and record.monitor
    assert [s_.layers for s_ in record.shards] == [(0, 2), (2, 4)]
    assert sorted(record.workers) == sorted([a.address, b.address])
    assert actors == {record.shards[0].worker: [("tiny", 0)], record.shards[1].worker: [("tiny", 1)]}
    assert listed == {"tiny": record} and fetched == record
    assert lost == []
    # in-process workers share one registry: each sees both shards, then neither
    assert {w: [tuple(x) for x in v] for w, v in held.items()} == {w: [("tiny", 0), ("tiny", 1)]
                                                                   for w in (a.address, b.address)}
    assert after == {} and held_after == {a.address: [], b.address: []}
    await async_poll_for(lambda: not a.state.actors and not b.state.actors, timeout=5)  # actors dropped


@gen_cluster(client=True, nthreads=TWO_WORKERS, timeout=30)
async def test_a_second_deployment_leaves_the_first_serving(c, s, a, b, model_dir, local):
    """Serving registers the worker plugin again; that must not close other deployments' shards."""
    def body(client):
        nd.serve(client, model_dir, shards=2, name="first")
        nd.serve(client, model_dir, shards=1, name="second")
        values = []
        for name in ("first", "second"):
            lm = nd.RemoteModel(client, name)
            with lm.trace(PROMPT):
                values.append(lm.output.logits[:, -1].save())
        held = client.run(registry.held)
        for name in ("first", "second"):
            nd.undeploy(client, name)
        return [v.value for v in values], held

    values, held = await blocking(s, body)
    with local.trace(PROMPT):
        expected = local.output.logits[:, -1].save()
    for value in values:
        assert_close(value, expected)
    assert sorted(map(tuple, held[a.address])) == [("first", 0), ("first", 1), ("second", 0)]


# -- the coalescer, with a launch function of our own ---------------------------------------------------
def recording_launch(launched):
    """A ``launch`` that records each route's members and sends them to a task answering ``{experiment: i}``."""
    def launch(client, route):
        names = [m.experiment for m in route.members]
        launched.append(names)

        async def send():
            return await client.submit(dict, [(name, i) for i, name in enumerate(names)], pure=False)
        route.send = send
    return launch


FORWARD = [Stage(0, 0, 0), Stage(0, 0, 1)]
GENERATE = [*FORWARD, Stage(0, 1, 0), Stage(0, 1, 1)]


@gen_cluster(client=True, nthreads=TWO_WORKERS, timeout=20)
async def test_coalescer_queues_once_every_shard_is_busy(c, s, a, b):
    launched: list[list[str]] = []
    coalescer, record = Coalescer(c, recording_launch(launched)), _record()
    members = [Member(f"e{i}", "{}") for i in range(13)]
    with dask.config.set({"nnsight-dask.max-batch-experiments": 8, "nnsight-dask.max-routes-per-shard": 1}):
        # nothing below awaits, so no chain can end before the assertions on the queue
        first = [coalescer.enqueue(m, record, FORWARD) for m in members[:2]]
        assert launched == [["e0"], ["e1"]] and coalescer.in_flight == 2  # one chain per shard
        queued = [coalescer.enqueue(m, record, FORWARD) for m in members[2:11]]
        full, extra = queued[0], queued[-1]
        assert all(b_ is full for b_ in queued[:8]) and extra is not full  # a route takes 8 at most
        other = coalescer.enqueue(members[11], record, GENERATE)  # other stages: a route of its own
        assert list(coalescer.pending) == [full, extra, other] and len(launched) == 2
        assert not full.launched.is_set()
        assert coalescer.withdraw(full, members[5]) and members[5] not in full.members
        assert coalescer.withdraw(other, members[11]) and list(coalescer.pending) == [full, extra]
        assert not coalescer.withdraw(first[0], members[0])  # it left already
        assert [coalescer.ahead_of(b_) for b_ in (full, extra)] == [2, 2 + 7]

        await async_poll_for(lambda: first[0].done.is_set() or first[1].done.is_set(), timeout=10)
        assert launched[2] == ["e2", "e3", "e4", "e6", "e7", "e8", "e9"]  # together, in the freed slot
        await async_poll_for(lambda: all(b_.done.is_set() for b_ in (*first, full, extra)), timeout=10)
    assert launched[3] == ["e10"] and len(launched) == 4
    assert full.outcome() == {"e2": 0, "e3": 1, "e4": 2, "e6": 3, "e7": 4, "e8": 5, "e9": 6}
    assert first[0].outcome() == {"e0": 0}
    assert coalescer.in_flight == 0 and not coalescer.pending


@gen_cluster(client=True, nthreads=TWO_WORKERS, timeout=20)
async def test_coalescer_without_sharing_launches_each_at_once(c, s, a, b):
    launched: list[list[str]] = []
    coalescer, record = Coalescer(c, recording_launch(launched)), _record()
    with dask.config.set({"nnsight-dask.max-batch-experiments": 1}):
        routes = [coalescer.enqueue(Member(f"e{i}", "{}"), record, FORWARD) for i in range(4)]
        assert launched == [["e0"], ["e1"], ["e2"], ["e3"]] and coalescer.in_flight == 4
        assert not coalescer.pending and all(b_.launched.is_set() for b_ in routes)
        await async_poll_for(lambda: all(b_.done.is_set() for b_ in routes), timeout=10)
    assert [b_.outcome() for b_ in routes] == [{f"e{i}": 0} for i in range(4)]
    assert coalescer.in_flight == 0

    def refuse(client, route):
        raise RuntimeError("the client is closed")
    failing = Coalescer(c, refuse).enqueue(Member("x", "{}"), record, FORWARD)
    assert failing.done.is_set() and str(failing.launch_error) == "the client is closed"


PROMPTS = ["The Eiffel Tower is in Paris", "Rome is the capital of Italy", "I love my dog",
           "The cat is very happy today", "Where is the Louvre", "London"]


@gen_cluster(client=True, nthreads=TWO_WORKERS, timeout=30)
async def test_non_blocking_traces_match_local_runs_and_leave_no_state(c, s, a, b, model_dir, local):
    def body(client):
        nd.serve(client, model_dir, shards=2, name="tiny")
        lm = nd.RemoteModel(client, "tiny")
        tracers = []
        for prompt in PROMPTS:
            with lm.trace(prompt, blocking=False) as tracer:
                hidden = lm.model.layers[1].output.save()  # noqa: F841  (computed on shard 0, carried on)
                logits = lm.output.logits[:, -1].save()  # noqa: F841  (results come back by name)
            tracers.append(tracer)
        results = [tracer.future.result(timeout=20) for tracer in tracers]
        return results, in_flight(client, "tiny")

    results, held = await blocking(s, body)
    assert held == [0, 0]  # every shard forgot every finished experiment
    assert len({r.experiment_id for r in results}) == len(PROMPTS)
    for prompt, result in zip(PROMPTS, results):
        with local.trace(prompt):
            hidden = local.model.layers[1].output.save()
            logits = local.output.logits[:, -1].save()
        assert sorted(result) == ["hidden", "logits"]
        assert_close(result["hidden"], hidden)
        assert_close(result["logits"], logits)
    rows = monitor.monitor_of(s).rows()
    assert sorted(r["experiment"] for r in rows) == sorted(r.experiment_id for r in results)
    assert {r["status"] for r in rows} == {"completed"}


# -- the scheduler's monitor ------------------------------------------------------------------------------
@gen_cluster(client=True, nthreads=TWO_WORKERS, timeout=30)
async def test_monitor_shows_completed_and_failed_experiments(c, s, a, b, model_dir):
    def body(client):
        nd.serve(client, model_dir, shards=2, name="tiny")
        lm = nd.RemoteModel(client, "tiny")
        with dask.config.set({"nnsight-dask.user": "alice"}):
            with lm.trace(PROMPT):
                logits = lm.output.logits.save()
            with pytest.raises(InterventionError, match="operator.getitem failed: IndexError"), lm.trace(PROMPT):
                lm.model.layers[3].output[:, 99].save()
        return logits

    logits = await blocking(s, body)
    plugin = s.plugins[monitor.NAME]
    assert isinstance(plugin, monitor.ExperimentMonitor)
    # the client's own error text (with the user's line) follows on its stream; wait for it
    await async_poll_for(lambda: "test_inprocess_cluster.py:" in plugin.rows()[0]["error"], timeout=5)
    # the shards report the passes they ran every telemetry.FLUSH_SECONDS, in one event per worker
    await async_poll_for(lambda: plugin.rows()[1]["stages"] == "2/2", timeout=5)
    failed, done = plugin.rows()  # newest first
    assert (done["status"], done["user"], done["deployment"], done["error"]) == ("completed", "alice", "tiny", "")
    assert done["stages"] == "2/2" and done["shards"] == "0,1" and done["run_time"] > 0
    assert done["bytes_returned"] >= logits.numel() * 4
    assert (failed["status"], failed["user"], failed["deployment"]) == ("failed", "alice", "tiny")
    assert "IndexError" in failed["error"] and "index 99 is out of bounds" in failed["error"]
    assert plugin.totals["completed"] == 1 and plugin.totals["failed"] == 1
    snapshot = await c.scheduler.nnsight_experiments()  # the RPC the CLI reads: the same rows
    assert list(snapshot["experiments"]) == plugin.rows()  # (msgpack hands lists back as tuples)
    assert [(r["deployment"], r["shard"], r["in_flight"]) for r in snapshot["shards"]] == [("tiny", 0, 0),
                                                                                          ("tiny", 1, 0)]


# -- a shard checks graphs with its worker's settings -------------------------------------------------------
@gen_cluster(client=True, nthreads=TWO_WORKERS, timeout=30)
async def test_shard_validates_graphs_with_the_workers_limits(c, s, a, b, model_dir):
    def body(client):
        record = nd.serve(client, model_dir, shards=2, name="tiny")
        lm = nd.RemoteModel(client, "tiny")
        with lm.generate(PROMPT, max_new_tokens=5, execute=False) as tracer:
            tracer.result.save()
        graph = tracer.graph

        def route(experiment):  # straight to the first shard's worker on the direct route, no client check
            answer = route_by_hand(client, record, {experiment: graph.to_json()}, plan_for(record, graph))[experiment]
            if isinstance(answer, BaseException):
                raise answer
            return answer

        # in-process workers read this process's settings: the limit below is theirs too
        with dask.config.set({"nnsight-dask.max-new-tokens-limit": 2}), \
                pytest.raises(GraphValidationError, match="max_new_tokens=5; this server allows at most 2"):
            route("over")
        refused = in_flight(client, "tiny")
        ran = route("within")  # the default limit (1024) lets the same graph through
        return refused, ran, in_flight(client, "tiny"), len(lm.tokenizer(PROMPT)["input_ids"])

    refused, ran, finished, prompt_length = await blocking(s, body)
    assert refused == [0, 0]  # the refused experiment left no state on the shard
    (tokens,) = ran.values()
    assert ran.experiment_id == "within" and tokens.shape[-1] == prompt_length + 5  # 5 new tokens
    assert finished == [0, 0]
