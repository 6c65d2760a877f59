"""The Dask fabric on a real LocalCluster with worker processes: remote results equal local ones."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import signal
import time

import dask
import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.errors import DeploymentError, ForbiddenOperationError, InterventionError

from .cluster import local_cluster

pytestmark = pytest.mark.cluster
PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def remote(client, model_dir):
    nd.serve(client, model_dir, shards=2, name="tiny")
    yield nd.RemoteModel(client, "tiny")


def both(remote, local, experiment):
    """Run ``experiment(model)`` remotely and locally; return both dicts of saved values."""
    return experiment(remote), experiment(local)


def assert_close(a, b, tol=1e-5):
    a, b = getattr(a, "value", a), getattr(b, "value", b)
    if isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y, tol)
        return
    a, b = getattr(a, "value", a), getattr(b, "value", b)
    assert a.shape == b.shape
    assert (a.float() - b.float()).abs().max().item() <= tol


# -- deployment -----------------------------------------------------------------------------------
def test_deployment_is_registered_and_spread(client, remote):
    record = nd.deployments(client)["tiny"]
    assert [list(s.layers) for s in record.shards] == [[0, 2], [2, 4]]
    assert len({s.worker for s in record.shards}) == 2  # one shard per worker
    with pytest.raises(DeploymentError, match="already exists"):
        nd.serve(client, "anything", shards=1, name="tiny")
    with pytest.raises(DeploymentError, match="no deployment named 'nope'.*tiny"):
        nd.RemoteModel(client, "nope")
    assert next(iter(remote._module.parameters())).device.type == "meta"


# -- parity ----------------------------------------------------------------------------------------
def test_trace_parity(remote, local):
    def experiment(lm):
        with lm.trace(PROMPT):
            h = lm.model.layers[1].output.save()
            lm.model.layers[2].mlp.down_proj.input[:, -1, [3, 5]] = 10
            lm.model.layers[3].output = lm.model.layers[3].output * 0.5 + lm.model.layers[0].output
            lens = lm.lm_head(lm.model.norm(lm.model.layers[1].output))[:, -1].save()
            logits = lm.output.logits.save()
        return [h, lens, logits]
    for r, l in zip(*both(remote, local, experiment)):
        assert_close(r, l)


def test_a_client_that_cannot_reach_the_workers_goes_through_the_scheduler(client, remote, local):
    """``direct_to_workers=False``: the route's call is proxied by the scheduler; same numbers."""
    def experiment(lm):
        with lm.generate(PROMPT, max_new_tokens=3) as tracer:
            lm.model.layers[2].output[:, -1] += 1
            out = tracer.result.save()
        return out
    with dask.config.set({"nnsight-dask.direct-to-workers": False}):
        got, expected = both(remote, local, experiment)
    assert torch.equal(getattr(got, "value", got), getattr(expected, "value", expected))


def test_invokes_and_cross_invoke_patch_parity(remote, local):
    def experiment(lm):
        with lm.trace() as tracer:
            with tracer.invoke("Rome is in Italy"):
                clean = lm.model.layers[3].output[:, -1].save()
            with tracer.invoke([PROMPT, "The capital of France is"]):
                lm.model.layers[1].output[:, -1] = clean
                patched = lm.output.logits[:, -1].save()
        return [clean, patched]
    for r, l in zip(*both(remote, local, experiment)):
        assert_close(r, l)


def test_gradient_parity_across_shards(remote, local):
    def experiment(lm):
        with lm.trace(PROMPT):
            g0 = lm.model.layers[0].output.grad.save()
            g3 = lm.model.layers[3].output.grad.save()
            lm.model.layers[1].output.grad = lm.model.layers[1].output.grad * 2
            lm.output.logits[:, -1].max().backward()
        return [g0, g3]
    for r, l in zip(*both(remote, local, experiment)):
        assert_close(r, l)


def test_generation_parity_with_per_step_interventions(remote, local):
    def experiment(lm):
        with lm.generate(PROMPT, max_new_tokens=4) as tracer:
            with tracer.iter[1:3]:
                lm.model.layers[2].output[:, -1] = lm.model.layers[2].output[:, -1] * 0
            with tracer.all():
                hidden = lm.model.layers[3].output[:, -1].save()
            ids = tracer.result.save()
        return [hidden, ids]
    (rh, rids), (lh, lids) = both(remote, local, experiment)
    assert torch.equal(rids, lids)
    assert_close(rh, lh)


def test_session_and_stop_parity(remote, local):
    def experiment(lm):
        with lm.session():
            with lm.trace("Rome is in Italy"):
                clean = lm.model.layers[3].output[:, -1].save()
            with lm.trace(PROMPT) as tracer:
                lm.model.layers[0].output[:, -1] = clean
                early = lm.model.layers[1].output.save()
                tracer.stop()
        return [clean, early]
    for r, l in zip(*both(remote, local, experiment)):
        assert_close(r, l)


# -- client.submit, futures, cancel ---------------------------------------------------------------------
def test_client_submit_graph(client, remote, local):
    with remote.trace("The capital of France is", execute=False) as tracer:
        h = remote.model.layers[3].output.save()
    future = client.submit(tracer.graph)
    result = future.result(timeout=60)
    with local.trace("The capital of France is"):
        ref = local.model.layers[3].output.save()
    assert_close(result["h"], ref)


def test_non_blocking_future_and_cancel(remote):
    with remote.trace(PROMPT, blocking=False) as tracer:
        out = remote.output.logits.save()
    result = tracer.future.result(timeout=60)
    assert result["out"].shape == out.value.shape
    with remote.generate(PROMPT, max_new_tokens=60, blocking=False) as tracer:
        remote.output.logits.save()
    assert tracer.future.cancel()
    assert tracer.future.cancelled()
    with remote.trace(PROMPT):  # the deployment keeps serving
        ok = remote.output.logits.save()
    assert ok.shape[0] == 1


# -- bad input ------------------------------------------------------------------------------------------
def test_errors_fail_only_that_experiment(remote):
    with pytest.raises(InterventionError, match=r"test_cluster.py:\d+: operation operator.getitem failed: IndexError"):
        with remote.trace(PROMPT):
            remote.model.layers[3].output[:, 99].save()
    with pytest.raises(ForbiddenOperationError, match="nd.apply"):
        with remote.trace(PROMPT):
            nd.apply(print, remote.model.layers[0].output)
    with remote.trace(PROMPT):
        ok = remote.model.layers[3].output.save()
    assert ok.shape[-1] == 64


# -- many users ------------------------------------------------------------------------------------------
def _one_user(model_dir_unused, scheduler, seed):
    """Run in a separate process: a second client of the same cluster."""
    from distributed import Client

    import nnsight_dask as nd

    with Client(scheduler) as client:
        lm = nd.RemoteModel(client, "tiny")
        with lm.trace(torch.tensor([[seed % 100 + 4, 5, 6]])):
            out = lm.output.logits[:, -1].save()
        return out


def test_many_concurrent_users_get_their_own_results(client, remote, local):
    prompts = [torch.tensor([[i + 4, 5, 6]]) for i in range(10)]

    def user(ids):
        with remote.trace(ids):
            out = remote.output.logits[:, -1].save()
        return out

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(user, prompts))
    for ids, got in zip(prompts, results):
        with local.trace(ids):
            ref = local.output.logits[:, -1].save()
        assert_close(got, ref)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        remote_results = list(pool.map(_one_user, [None] * 2, [client.scheduler.address] * 2, [0, 1]))
    for seed, got in zip([0, 1], remote_results):
        with local.trace(torch.tensor([[seed % 100 + 4, 5, 6]])):
            ref = local.output.logits[:, -1].save()
        assert_close(got, ref)
    # the weights exist once per shard: one shard object per worker, however many users
    held = client.run(lambda: __import__("nnsight_dask.worker.registry", fromlist=["held"]).held())
    assert sorted(len(v) for v in held.values()) == [1, 1]


# -- experiments in flight together travel together ------------------------------------------------------
def _routes(client):
    """Experiment id -> the experiments it travelled with (``a+b+c``), as the scheduler's monitor saw them."""
    def read(dask_scheduler):
        from nnsight_dask.scheduler.monitor import monitor_of

        return {e: r.route for e, r in monitor_of(dask_scheduler).experiments.items()}
    return client.run_on_scheduler(read)


def _in_flight(client, name):
    """Experiments each shard of deployment ``name`` still holds state for."""
    from nnsight_dask.worker import tasks

    record = nd.deployments(client)[name]
    return [client.submit(tasks.shard_status, name, s.index, workers=[s.worker], pure=False).result()["in_flight"]
            for s in record.shards]


def _monitor_rows(client):
    def read(dask_scheduler):
        from nnsight_dask.scheduler.monitor import monitor_of

        return monitor_of(dask_scheduler).rows()
    return {row["experiment"]: row for row in client.run_on_scheduler(read)}


def _occupy(client, remote, n=None):
    """Non-blocking generations that keep this process's route slots for the deployment busy (~1 s),
    once they run (``max_routes_per_shard`` per shard)."""
    n = n or 2 * nd.config.max_routes_per_shard
    fillers = []
    for _ in range(n):
        with remote.generate(PROMPT, max_new_tokens=60, blocking=False) as tracer:
            remote.output.logits.save()
        fillers.append(tracer)
    deadline = time.monotonic() + 30
    while sum(row["status"] in ("queued", "running") for row in _monitor_rows(client).values()) < n:
        assert time.monotonic() < deadline, "the filler generations never started"
        time.sleep(0.01)
    return fillers


def _transitions(client):
    return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)


def test_experiments_in_flight_together_travel_together_with_no_task(client, remote, local):
    prompts = [torch.tensor([[i + 4] * (2 + i % 4)]) for i in range(10)]  # lengths 2..5: nothing padded
    before = _transitions(client)
    tracers = []
    for ids in prompts:
        with remote.trace(ids, blocking=False) as tracer:
            out = remote.model.layers[3].output[:, -1].save()
        tracers.append(tracer)
    results = [tracer.future.result(timeout=60) for tracer in tracers]
    # the direct route: ten experiments, and the scheduler moved no task at all
    assert _transitions(client) == before
    for ids, result in zip(prompts, results):
        with local.trace(ids):
            ref = local.model.layers[3].output[:, -1].save()
        assert_close(result["out"], ref)
    routes = _routes(client)
    shared = [r.experiment_id for r in results if "+" in routes[r.experiment_id]]
    assert len(shared) >= 2, "no two experiments travelled together"
    for experiment in shared:
        assert experiment in routes[experiment].split("+")
    assert _in_flight(client, "tiny") == [0, 0]  # every shard forgot every finished experiment


def test_error_in_a_shared_chain_fails_only_that_experiment(client, remote, local):
    with local.trace(PROMPT):
        h = local.model.layers[3].output.save()
    seen = {e for e, row in _monitor_rows(client).items() if "index 99" in row["error"]}  # earlier tests'
    for _attempt in range(5):  # which experiments leave together depends on timing: retry until the bad one shares
        fillers = _occupy(client, remote)
        futures = {}
        for label, index in (("good1", 0), ("bad", 99), ("good2", -1)):
            with remote.trace(PROMPT, blocking=False) as tracer:
                remote.model.layers[3].output[:, index].save()
            futures[label] = tracer.future
        with pytest.raises(InterventionError, match=r"test_cluster.py:\d+: operation operator.getitem failed: IndexError"):
            futures["bad"].result(timeout=60)
        assert_close(next(iter(futures["good1"].result(timeout=60).values())), h[:, 0])
        assert_close(next(iter(futures["good2"].result(timeout=60).values())), h[:, -1])
        for tracer in fillers:
            tracer.future.cancel()
        routes, rows = _routes(client), _monitor_rows(client)
        bad = [e for e, row in rows.items() if "index 99" in row["error"] and e not in seen]
        assert len(bad) == 1
        seen.update(bad)
        if "+" in routes[bad[0]]:
            mates = routes[bad[0]].split("+")
            assert {e: rows[e]["status"] for e in mates} == {e: "failed" if e == bad[0] else "completed" for e in mates}
            return
    pytest.fail("the failing experiment never travelled with others in 5 attempts")


def test_cancelling_a_queued_experiment_leaves_the_others(client, remote, local):
    fillers = _occupy(client, remote)
    futures = []
    for i in range(3):
        with remote.trace(torch.tensor([[i + 4, 5, 6]]), blocking=False) as tracer:
            out = remote.output.logits[:, -1].save()
        futures.append(tracer.future)
    assert futures[1].cancel() and futures[1].cancelled()
    for i in (0, 2):
        with local.trace(torch.tensor([[i + 4, 5, 6]])):
            ref = local.output.logits[:, -1].save()
        assert_close(futures[i].result(timeout=60)["out"], ref)
    for tracer in fillers:
        tracer.future.result(timeout=60)
    assert _in_flight(client, "tiny") == [0, 0]


# -- serialization ---------------------------------------------------------------------------------------
def test_bf16_values_cross_workers(client, model_dir):
    nd.serve(client, model_dir, shards=2, name="tiny-bf16", dtype="bfloat16")
    try:
        lm = nd.RemoteModel(client, "tiny-bf16")
        with lm.trace(PROMPT):
            h0 = lm.model.layers[0].output.save()  # computed on shard 0, carried through shard 1
            out = lm.output.logits.save()
        assert h0.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
        local = nd.LanguageModel(model_dir, dtype=torch.bfloat16)
        with local.trace(PROMPT):
            ref = local.model.layers[0].output.save()
        assert torch.equal(h0, ref)
    finally:
        nd.undeploy(client, "tiny-bf16")
    assert "tiny-bf16" not in nd.deployments(client)


# -- faults ----------------------------------------------------------------------------------------------
def test_killed_shard_worker_recovers_and_retries(model_dir):
    with local_cluster(2) as client:
        nd.serve(client, model_dir, shards=2, name="fragile")
        lm = nd.RemoteModel(client, "fragile")
        victim = nd.deployments(client)["fragile"].shards[1].worker
        pid = client.run(os.getpid, workers=[victim])[victim]
        with lm.generate(PROMPT, max_new_tokens=40, blocking=False) as tracer:
            ids = tracer.result.save()
        time.sleep(0.5)
        prompts = [torch.tensor([[i + 4, 5, 6]]) for i in range(4)]
        traces = []
        for ids_ in prompts:  # in flight or queued (sharing a chain) when the worker dies
            with lm.trace(ids_, blocking=False) as t:
                lm.output.logits[:, -1].save()
            traces.append(t.future)
        os.kill(pid, signal.SIGKILL)
        result = tracer.future.result(timeout=120)  # retried once on the recovered deployment
        assert result["ids"].shape[1] > 8
        local = nd.LanguageModel(model_dir)
        for ids_, future in zip(prompts, traces):
            with local.trace(ids_):
                ref = local.output.logits[:, -1].save()
            assert_close(next(iter(future.result(timeout=120).values())), ref)
        record = nd.deployments(client)["fragile"]
        assert record.generation == 1 and record.shards[1].worker != victim
        with lm.trace(PROMPT):
            ok = lm.output.logits.save()
        assert ok.shape[0] == 1
        # a second user whose cached placement still names the dead worker: resubmitted, not failed
        stale = nd.RemoteModel(client, "fragile")
        stale._set_deployment(dataclasses.replace(record.moved({1: victim}), generation=0))
        with stale.trace(PROMPT):
            again = stale.output.logits.save()
        assert torch.equal(again, ok)
        assert stale.deployment.generation == 1 and stale.deployment.shards[1].worker != victim
        statuses = [r["status"] for r in client.sync(client.scheduler.nnsight_experiments)["experiments"]]
        assert statuses[:2] == ["completed", "retried"]  # the stale submission shows as retried
