"""Lifecycle of a shared deployment on a real LocalCluster with worker processes.

Preemption: cancel and timeout stop an experiment's compute on the shards (within a decoder layer),
free its state at once, and the next experiment runs; a client that dies has its experiments freed.
Worker death: experiments only waiting behind the one computing on a dying worker are retried without
counting; the one computing there twice fails with that reason; every future ends. Lifecycle:
``serve`` is create-if-absent under a cluster-wide lock, ``undeploy`` ends in-flight experiments with
a ``DeploymentError``, and shards spread over distinct workers again after losses and joins.

Timings are bounded generously (a loaded 2-core CI); each test prints what it measured.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import dask
import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.client import Deployment, ShardPlacement
from nnsight_dask.client.deployment import plan_placement
from nnsight_dask.errors import DeploymentError, ExperimentFailedError
from nnsight_dask.execution.partition import assign_shards
from nnsight_dask.execution.stage import plan_stages
from nnsight_dask.models import owner_of, save_tiny, tiny_llama
from nnsight_dask.worker import registry, tasks
from nnsight_dask.worker.plugin import cancel_experiments
from nnsight_dask.worker.registry import ExperimentCancelledError
from nnsight_dask.worker.shard_actor import ShardActor

pytestmark = pytest.mark.cluster
PROMPT = "The Eiffel Tower is in the city of"
#: A generation long enough (2 x 200 stages) to be cancelled, timed out or killed mid-way.
LONG = 200


@pytest.fixture(scope="module", autouse=True)
def quiet():
    # The tests below kill worker processes and count on their Nannies to restart them. A LocalCluster
    # also closes the Nanny of a worker that has not re-registered ``lost-worker-timeout`` (15 s) after
    # it left; a worker killed twice about 15 s apart is caught restarting by the first death's timer,
    # and its Nanny closed for good (seen as "its worker died meanwhile"). Nannies stay here.
    with dask.config.set({"nnsight-dask.verbose": False, "distributed.deploy.lost-worker-timeout": "1h"}):
        yield


@pytest.fixture(scope="module")
def life(client, model_dir):
    nd.serve(client, model_dir, shards=2, name="life")
    yield nd.RemoteModel(client, "life")


@pytest.fixture
def remote(client, life):
    """The "life" deployment, serving when the test starts. A test that killed workers leaves it
    to recover on its next experiment, and until then its record names the dead workers: a status
    task pinned there would wait forever (seen in random order: the timeout test right after the
    worker-death test hung in its first ``status``). So both workers are back and one trace has run."""
    client.wait_for_workers(2, timeout=60)
    with life.trace(PROMPT):
        life.output.logits.save()
    return life


def status(client, name="life"):
    """Each shard's status (experiments it holds state for, stages run)."""
    record = nd.deployments(client)[name]
    return [client.submit(tasks.shard_status, name, s.index, workers=[s.worker], pure=False).result()
            for s in record.shards]


def wait_until(condition, timeout, what, step=0.02):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(step)
    return time.monotonic()


def monitor(client, read):
    def run(dask_scheduler):
        from nnsight_dask.scheduler.monitor import monitor_of

        return read(monitor_of(dask_scheduler))
    return client.run_on_scheduler(run)


def start_long_generation(remote):
    with remote.generate(PROMPT, max_new_tokens=LONG, blocking=False) as tracer:
        tracer.result.save()
    return tracer.future


def assert_equals_local(remote, local, ids=PROMPT):
    with remote.trace(ids):
        got = remote.output.logits[:, -1].save()
    with local.trace(ids):
        ref = local.output.logits[:, -1].save()
    assert (got - ref).abs().max().item() <= 1e-5


def stopped_computing(client, name="life", quiet_for=0.5):
    """True when no shard of ``name`` runs a stage for ``quiet_for`` seconds."""
    before = [s["stages_run"] for s in status(client, name)]
    time.sleep(quiet_for)
    return [s["stages_run"] for s in status(client, name)] == before


# -- the stop hook, on shard actors in this process ----------------------------------------------------
def test_a_stopped_experiment_leaves_the_model_before_the_next_layer(tiny_tokenizer):
    """The cancel flag is checked before every decoder layer: a stage stops mid-forward."""
    source = lambda: (tiny_llama(n_layer=4), tiny_tokenizer)  # noqa: E731
    shard = ShardActor(deployment="life-unit", index=0, n_shards=1, source=source)
    try:
        lm = nd.LanguageModel(tiny_llama(n_layer=4), tokenizer=tiny_tokenizer)
        with lm.trace(PROMPT, execute=False) as tracer:
            logits = lm.output.logits.save()  # noqa: F841  (named "logits" in the results)
        graph = tracer.graph
        (stage,) = plan_stages(graph, assign_shards(graph, lambda path: owner_of(shard.plan, path), 1), 1)
        layers = shard.server.runner.layers
        assert len(layers) == 4
        ran: list[int] = []
        hooks = [layer.register_forward_pre_hook(lambda _m, _a, i=i: ran.append(i)) for i, layer in enumerate(layers)]

        def cancel_now(*_):  # a cancel arriving while layer 1 computes (what the worker's handler does)
            cancel_experiments(["stopped"], "cancelled by its owner")
        hooks.append(layers[1].register_forward_hook(cancel_now))
        with pytest.raises(ExperimentCancelledError, match="cancelled by its owner"):
            shard.server.run("stopped", stage, graph.to_json(), None, True)
        assert ran == [0, 1]  # layers 2 and 3 never ran
        assert shard.server.experiments == {}
        # a cancelled experiment's later stages are refused; a batch answers them as a value, no raise
        assert isinstance(shard.server.run_batch([("stopped", None)], stage, None, True)["stopped"], ExperimentCancelledError)
        for hook in hooks:
            hook.remove()
        ran.clear()
        results = shard.server.run("next", stage, graph.to_json(), None, True)  # the shard serves the next one
        assert ran == [] and sorted(results) == ["logits"] and shard.server.experiments == {}
        # the policy's timeout is enforced by the shard too, at the same hook
        shard.server.policy = nd.Policy(timeout=0.05)
        layers[0].register_forward_hook(lambda *_: time.sleep(0.1))
        with pytest.raises(ExperimentFailedError, match="ran longer than deployment 'life-unit' allows"):
            shard.server.run("slow", stage, graph.to_json(), None, True)
    finally:
        shard.close()
    assert ("life-unit", 0) not in registry.held()


# -- preemption on the cluster ----------------------------------------------------------------------
def test_cancel_stops_the_shards_at_once_and_the_next_experiment_runs(client, remote, local):
    future = start_long_generation(remote)
    wait_until(lambda: sum(s["stages_run"] for s in status(client)) > 20 and future.running(), 60,
               "the generation started")
    started = time.monotonic()
    assert future.cancel() and future.cancelled()
    cancelled = time.monotonic() - started
    assert [s["in_flight"] for s in status(client)] == [0, 0]  # its state is freed by the time cancel() returns
    freed = time.monotonic() - started
    wait_until(lambda: stopped_computing(client, quiet_for=0.3), 3, "the shards stopped computing")
    began = time.monotonic()
    assert_equals_local(remote, local)  # the next experiment runs, and right
    following = time.monotonic() - began
    print(f"\ncancel() returned after {cancelled:.3f} s, shard state freed after {freed:.3f} s, "
          f"next experiment took {following:.3f} s")
    assert cancelled < 3 and following < 3
    rows = monitor(client, lambda m: [r for r in m.rows() if r["status"] == "cancelled"])
    assert rows, "the monitor shows the cancelled experiment"


def test_timeout_stops_the_shards_too(client, remote, local):
    """The generation is stopped mid-way on the shards: it ran fewer stages than it has (2 per token),
    its state is freed and the shards go quiet. How long after the limit the client raises is printed,
    not bounded: on a loaded host that is the client's own CPU time, not the shards' (5.3 s seen under a
    load average of 30, where 4 s was the bound)."""
    stages_before = sum(s["stages_run"] for s in status(client))
    started = time.monotonic()
    with dask.config.set({"nnsight-dask.experiment-timeout": 1.0}), \
            pytest.raises(ExperimentFailedError, match=r"did not finish within 1 s .*stopped on the shards"):
        with remote.generate(PROMPT, max_new_tokens=LONG) as tracer:
            tracer.result.save()
    raised = time.monotonic() - started
    assert [s["in_flight"] for s in status(client)] == [0, 0]
    assert stopped_computing(client)
    ran = sum(s["stages_run"] for s in status(client)) - stages_before
    print(f"\nthe 1 s timeout raised after {raised:.2f} s; the shards ran {ran} of the generation's {2 * LONG} stages")
    assert raised >= 1.0 and ran < 2 * LONG
    assert_equals_local(remote, local)


def _departing_client(address: str, started: Any) -> None:
    """A second user's process: starts a long generation, then hangs until killed."""
    import torch

    torch.set_num_threads(1)
    from distributed import Client

    import nnsight_dask as nd

    nd.config.verbose = False
    client = Client(address)
    lm = nd.RemoteModel(client, "life")
    with lm.generate(PROMPT, max_new_tokens=LONG, blocking=False) as tracer:
        tracer.result.save()
    started.set()
    time.sleep(120)


def test_a_killed_clients_experiment_is_freed_on_the_shards(client, remote):
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    process = context.Process(target=_departing_client, args=(client.scheduler.address, started), daemon=True)
    process.start()
    try:
        assert started.wait(90), "the second client never started its experiment"
        wait_until(lambda: sum(s["in_flight"] for s in status(client)) >= 1, 30, "its experiment reached the shards")
        killed = time.monotonic()
        os.kill(process.pid, signal.SIGKILL)
        freed = wait_until(lambda: sum(s["in_flight"] for s in status(client)) == 0, 10,
                           "the shards freed the dead client's experiment")
        print(f"\nthe dead client's state was freed {freed - killed:.2f} s after it was killed")
        assert stopped_computing(client)
    finally:
        process.kill()
        process.join(10)


# -- lifecycle ---------------------------------------------------------------------------------------------
def test_concurrent_serves_of_one_name_create_one_deployment(client, model_dir, tmp_path):
    other = str(save_tiny(tmp_path / "other-llama", arch="llama", n_layer=2))
    outcomes: dict[str, Any] = {}

    def serve(path):
        try:
            outcomes[path] = nd.serve(client, path, shards=1, name="race")
        except DeploymentError as exc:
            outcomes[path] = exc

    threads = [threading.Thread(target=serve, args=(path,)) for path in (model_dir, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        served = [path for path, outcome in outcomes.items() if isinstance(outcome, Deployment)]
        refused = [outcome for outcome in outcomes.values() if isinstance(outcome, DeploymentError)]
        assert len(served) == 1 and len(refused) == 1, outcomes
        assert "a deployment named 'race' already exists" in str(refused[0])
        assert f"model {served[0]!r} in 1 shard(s)" in str(refused[0])  # names the deployment that won
        assert nd.deployments(client)["race"].source == served[0]
    finally:
        nd.undeploy(client, "race")
    assert "race" not in nd.deployments(client)


def test_undeploy_ends_experiments_in_flight_with_a_deployment_error(client, model_dir):
    nd.serve(client, model_dir, shards=2, name="doomed")
    lm = nd.RemoteModel(client, "doomed")
    futures = [start_long_generation(lm)]
    for i in range(3):
        with lm.trace(torch.tensor([[i + 4, 5, 6]]), blocking=False) as tracer:
            lm.output.logits.save()
        futures.append(tracer.future)
    wait_until(lambda: sum(s["stages_run"] for s in status(client, "doomed")) > 10, 60, "the generation started")
    undeployed = time.monotonic()
    nd.undeploy(client, "doomed")
    done, pending = concurrent.futures.wait(futures, timeout=30)
    ended = time.monotonic() - undeployed
    assert not pending, "an experiment of the undeployed deployment hangs"
    with pytest.raises(DeploymentError, match="'doomed' was undeployed .* while this experiment was in flight"):
        futures[0].result()
    for future in futures[1:]:  # the short ones finished before, or heard the same
        if future.exception() is not None:
            assert isinstance(future.exception(), DeploymentError), future.exception()
            assert "was undeployed" in str(future.exception())
    print(f"\nevery experiment of the undeployed deployment ended {ended:.2f} s after undeploy")
    held = client.run(registry.held)
    assert not [shard for shards in held.values() for shard in shards if shard[0] == "doomed"]
    with pytest.raises(DeploymentError, match="was undeployed|no deployment named 'doomed'"):
        with lm.trace(PROMPT):
            lm.output.save()


# -- placement ------------------------------------------------------------------------------------------------
def _record(*workers, spread=True):
    shards = tuple(ShardPlacement(i, w, (i, i + 1), (f"model.layers.{i}",), "model.layers")
                   for i, w in enumerate(workers))
    return Deployment(name="p", source="src", shards=shards, created=0.0, options={"spread": spread})


def test_placement_rule():
    # a lost shard goes to a worker holding none of the deployment, not to its other shard's worker
    assert plan_placement(_record("a", "dead"), ["a", "b"]) == {1: "b"}
    assert plan_placement(_record("a", "dead"), ["a"]) == {1: "a"}  # none free: share
    # workers back: shards sharing a worker spread again (not when the server placed them on purpose)
    assert plan_placement(_record("a", "a"), ["a", "b"]) == {1: "b"}
    assert plan_placement(_record("a", "a", "a"), ["a", "b", "c"]) == {2: "b", 1: "c"}
    assert plan_placement(_record("a", "a", spread=False), ["a", "b"]) == {}
    assert plan_placement(_record("a", "b"), ["a", "b", "c"]) == {}  # nothing else moves
    assert plan_placement(_record("dead", "dead"), ["a", "b"]) == {0: "a", 1: "b"}


# -- worker death ------------------------------------------------------------------------------------------------
# (these kill the module cluster's workers: its Nannies restart them; they run last)
def test_a_worker_death_counts_only_against_the_experiment_running_there(client, model_dir, local):
    """The culprit computes a long stage on each shard; while it computes on shard 1, three small
    experiments pass shard 0 and queue behind it. Its shard-1 worker is killed while it computes
    there, and again during its retry."""
    heavy = torch.randint(4, 100, (512, 200))  # ~1 s of compute per shard on the tiny model
    nd.serve(client, model_dir, shards=2, name="fragile")
    lm = nd.RemoteModel(client, "fragile")

    def computing_on(shard, match, steady=0.2):
        """Wait until one experiment (``match(id)``) computes on ``shard`` for ``steady`` s; its id and worker."""
        found: dict[str, str] = {}

        def steady_there():
            worker = nd.deployments(client)["fragile"].shards[shard].worker
            running = monitor(client, lambda m: dict(m.executing)).get(worker)
            if not running or not match(running):
                return False
            time.sleep(steady)
            if monitor(client, lambda m: dict(m.executing)).get(worker) != running:
                return False
            found.update(worker=worker, experiment=running)
            return True
        wait_until(steady_there, 120, f"an experiment computing on shard {shard}", step=0.01)
        return found

    def kill(worker):
        os.kill(client.run(os.getpid, workers=[worker])[worker], signal.SIGKILL)

    def rows():
        return {r["experiment"]: r for r in monitor(client, lambda m: m.rows())}

    with lm.trace(heavy, blocking=False) as tracer:
        lm.model.layers[3].output[:, -1].sum().save()
    culprit = tracer.future
    first = computing_on(0, lambda e: True)["experiment"]
    there = computing_on(1, lambda e: e == first)["worker"]
    waiting = []
    for i in range(3):  # queue behind it on shard 1, once shard 0 has run them (it is free now)
        with lm.trace(torch.tensor([[i + 4, 5, 6]]), blocking=False) as t:
            lm.output.logits[:, -1].save()
        waiting.append(t.future)
    wait_until(lambda: sum(r["stages"] == "1/2" and r["experiment"] != first for r in rows().values()) == 3, 30,
               "the waiting experiments past shard 0 (the shards report passes every 0.2 s)", step=0.02)
    kill(there)
    killed = time.monotonic()
    kill(computing_on(1, lambda e: rows().get(e, {}).get("retry_of") == first)["worker"])  # its retry, there
    with pytest.raises(ExperimentFailedError,
                       match="died while this experiment was running on it, and again during its retry"):
        culprit.result(timeout=120)
    for i, future in enumerate(waiting):  # retried (not counted, though they saw the same loss), and right
        with local.trace(torch.tensor([[i + 4, 5, 6]])):
            ref = local.output.logits[:, -1].save()
        got = next(iter(future.result(timeout=120).values()))
        assert (got - ref).abs().max().item() <= 1e-5
    ended = time.monotonic() - killed
    seen = rows()
    assert "died while this experiment was running on it" in seen[first]["error"]
    innocent = [r for r in seen.values() if r["retry_of"] and r["retry_of"] != first and r["retry_of"] in seen]
    assert innocent, "no experiment was waiting behind the culprit when its worker died"
    for row in innocent:
        assert "not counted against its retry" in seen[row["retry_of"]]["error"], seen[row["retry_of"]]
    print(f"\nevery future ended {ended:.1f} s after the first kill; {len(innocent)} waiting experiment(s) "
          "retried without counting")
    assert all(future.done() for future in [culprit, *waiting])


def test_shards_spread_again_after_two_deaths(client, remote, local):
    """Recovery puts a lost shard on a worker holding no other shard of the deployment (here: the
    one the Nanny restarts), so two deaths in a row leave the shards on distinct workers."""
    assert_equals_local(remote, local)
    for death in (1, 2):
        record = nd.deployments(client)["life"]
        victim = record.shards[death % 2].worker
        os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
        wait_until(lambda: victim not in client.scheduler_info()["workers"], 30, "the scheduler saw the death")
        assert_equals_local(remote, local)  # retried on the recovered deployment
        record = nd.deployments(client)["life"]
        assert victim not in record.workers
        assert len(set(record.workers)) == 2, f"after death {death} two shards share a worker: {record.workers}"
    assert_equals_local(remote, local)


def test_shards_sharing_a_worker_spread_when_a_worker_joins(client, model_dir, local):
    """Served with more shards than workers, a deployment moves a shard to a worker that joins
    (checked by the next experiment); the copy left behind leaves once idle."""
    client.wait_for_workers(2, timeout=60)
    nd.serve(client, model_dir, shards=3, name="crowded")
    lm = nd.RemoteModel(client, "crowded")
    assert len(set(nd.deployments(client)["crowded"].workers)) == 2
    assert_equals_local(lm, local)
    client.cluster.scale(3)
    client.wait_for_workers(3, timeout=60)
    deadline = time.monotonic() + 60
    while len(set(lm.deployment.workers)) < 3:
        assert time.monotonic() < deadline, "the shards never spread onto the new worker"
        assert_equals_local(lm, local)
        time.sleep(0.2)
    assert_equals_local(lm, local)  # on the new placement
    record = nd.deployments(client)["crowded"]
    assert record.generation == 1 and len(set(record.workers)) == 3

    def crowded_held():
        held = client.run(registry.held).values()
        return sorted(sum(name == "crowded" for name, _ in shards) for shards in held)
    wait_until(lambda: crowded_held() == [1, 1, 1], 10, "the copy left behind leaves once idle")
