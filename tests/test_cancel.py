"""Cancelling an experiment frees its shards, whichever future the researcher holds.

On a real LocalCluster (two worker processes, a 2-shard tiny Llama) a long generation is cancelled
mid-way through the Dask future of ``client.submit(graph)`` and through the
:class:`~nnsight_dask.client.futures.ExperimentFuture` of ``blocking=False``: the shards stop
running it and free its state within a check or two, the next experiment runs at once (and right),
and the cancelled one is reported cancelled by its future and by the scheduler's monitor. The
future's own promise (``cancel()`` returns within ``cancel_wait`` even when its run is busy) is
checked without a cluster.

Timings are bounded generously (a loaded 2-core machine); each test prints what it measured.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time

import dask
import pytest

import nnsight_dask as nd
from nnsight_dask.client.futures import ExperimentFuture
from nnsight_dask.worker import tasks

pytestmark = pytest.mark.cluster
NAME = "cancel"
PROMPT = "The Eiffel Tower is in the city of"
#: A generation long enough (2 x 240 stages) to be cancelled mid-way (the tiny model's context is 256).
LONG = 240


@pytest.fixture(scope="module")
def remote(client, model_dir):
    with dask.config.set({"nnsight-dask.verbose": False}):
        nd.serve(client, model_dir, shards=2, name=NAME)
        yield nd.RemoteModel(client, NAME)


def shard_status(client):
    record = nd.deployments(client)[NAME]
    return [client.submit(tasks.shard_status, NAME, s.index, workers=[s.worker], pure=False).result()
            for s in record.shards]


def monitor_rows(client):
    def run(dask_scheduler):
        from nnsight_dask.scheduler.monitor import monitor_of

        return [row for row in monitor_of(dask_scheduler).rows() if row["deployment"] == NAME]
    return client.run_on_scheduler(run)


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.02)
    return time.monotonic()


def running_experiment(client, future, timeout=60.0):
    """The id of ``future``'s experiment, once the monitor shows it running with 20 stages done."""
    deadline = time.monotonic() + timeout
    while True:
        assert not future.done(), f"the generation ended before it was cancelled: {future}"
        rows = [r for r in monitor_rows(client) if r["status"] == "running"]
        if rows and int(rows[0]["stages"].split("/")[0]) >= 20:
            return rows[0]["experiment"]
        assert time.monotonic() < deadline, f"the generation started within {timeout} s"
        time.sleep(0.02)


def assert_shards_freed_and_next_runs(client, remote, local, experiment, cancelled_at):
    """The shards hold nothing, stop computing, the next experiment is prompt and right, and the
    monitor shows ``experiment`` cancelled; returns (freed after, next experiment took) seconds."""
    freed = wait_until(lambda: [s["in_flight"] for s in shard_status(client)] == [0, 0], 10,
                       "its state freed on both shards") - cancelled_at
    before = [s["stages_run"] for s in shard_status(client)]
    time.sleep(0.5)
    assert [s["stages_run"] for s in shard_status(client)] == before, "the shards still run it"
    began = time.monotonic()
    with remote.trace(PROMPT):
        got = remote.output.logits[:, -1].save()
    following = time.monotonic() - began
    with local.trace(PROMPT):
        ref = local.output.logits[:, -1].save()
    assert (got - ref).abs().max().item() <= 1e-5
    wait_until(lambda: {r["experiment"]: r["status"] for r in monitor_rows(client)}.get(experiment) == "cancelled",
               10, "the monitor shows it cancelled")
    return freed, following


def test_cancelling_the_dask_future_of_client_submit_stops_it_on_the_shards(client, remote, local):
    with remote.generate(PROMPT, max_new_tokens=LONG, execute=False) as tracer:
        tracer.result.save()
    future = client.submit(tracer.graph, pure=False)
    experiment = running_experiment(client, future)
    cancelled_at = time.monotonic()
    future.cancel()
    assert future.cancelled() and future.status == "cancelled"
    freed, following = assert_shards_freed_and_next_runs(client, remote, local, experiment, cancelled_at)
    print(f"\nDask future cancelled: shard state freed after {freed:.3f} s, next experiment took {following:.3f} s")
    assert freed < 3 and following < 3


def test_cancelling_an_experiment_future_returns_at_once_and_frees_the_shards(client, remote, local):
    with remote.generate(PROMPT, max_new_tokens=LONG, blocking=False) as tracer:
        tracer.result.save()
    future = tracer.future
    experiment = running_experiment(client, future)
    cancelled_at = time.monotonic()
    assert future.cancel()
    returned = time.monotonic() - cancelled_at
    assert future.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=0)
    assert [s["in_flight"] for s in shard_status(client)] == [0, 0]  # the stop is confirmed when cancel() returns
    freed, following = assert_shards_freed_and_next_runs(client, remote, local, experiment, cancelled_at)
    print(f"\nExperimentFuture.cancel() returned after {returned:.3f} s, shard state freed after {freed:.3f} s, "
          f"next experiment took {following:.3f} s")
    assert returned < 1.5 and following < 3


def test_cancel_returns_within_cancel_wait_even_while_the_run_is_busy():
    """A run busy elsewhere (e.g. re-creating a lost shard) sees the cancel late; the future is
    cancelled at once all the same, and the run's late outcome does not change that."""
    release = threading.Event()
    seen: list[bool] = []

    def busy_run(cancelled: threading.Event) -> str:
        release.wait(10)
        seen.append(cancelled.is_set())  # it would stop the experiment on the shards here
        raise concurrent.futures.CancelledError()

    callbacks: list[bool] = []
    future = ExperimentFuture(busy_run, cancel_wait=0.2)
    future.add_done_callback(lambda f: callbacks.append(f.cancelled()))
    started = time.monotonic()
    assert future.cancel()
    assert time.monotonic() - started < 1.0
    assert future.cancelled() and callbacks == [True]
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=0)
    release.set()
    future._thread.join(5)
    assert seen == [True] and future.cancelled() and callbacks == [True]  # the late end changes nothing

    finished = ExperimentFuture(lambda cancelled: "done")
    assert finished.result(timeout=5) == "done" and not finished.cancel() and not finished.cancelled()

    delivered: list[str] = []
    late = threading.Event()

    def late_result(cancelled: threading.Event) -> str:
        late.wait(10)
        return "too late"
    dropped = ExperimentFuture(late_result, delivered.append, cancel_wait=0.1)
    assert dropped.cancel()
    late.set()
    dropped._thread.join(5)
    assert dropped.cancelled() and delivered == []  # a result after the cancel is not delivered
