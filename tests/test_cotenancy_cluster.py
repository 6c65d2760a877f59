"""Co-tenant batching on a real LocalCluster: experiments of separate clients meet on the shards and
share forward passes, and every one of them gets what it gets alone."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from distributed import Client

import nnsight_dask as nd
from nnsight_dask.client.deployment import get_deployment
from nnsight_dask.errors import InterventionError
from nnsight_dask.worker import tasks

from .cluster import local_cluster
from .test_cotenancy import assert_matches_solo

pytestmark = pytest.mark.cluster
torch.set_num_threads(1)

PROMPTS = ["The Eiffel Tower is in the city of", "The capital of Italy is", "Hello world",
           "Once upon a time there was a", "The capital of France is"]


@pytest.fixture(scope="module")
def cluster(model_dir: str) -> Any:
    """Two worker processes with four Dask threads each (stages wait in the shard's queue) and the
    4-layer tiny Llama deployed in two shards."""
    with local_cluster(2, threads=4) as client:
        nd.serve(client, model_dir, shards=2, name="shared")
        yield client


def trace(model: Any, prompt: str, scale: float, store: str | None = None) -> dict[str, Any]:
    """Reads, an in-place write and a replacement, scaled per user (so members differ)."""
    with model.trace(prompt, verbose=False, store=store, persist_threshold=0 if store else None):
        model.model.layers[1].output[:, -1] *= scale
        model.model.layers[2].output = model.model.layers[2].output + scale
        h3 = model.model.layers[3].output.save()
        logits = model.output.logits.save()
    return {"h3": h3, "logits": logits}


def generate(model: Any, prompt: str, scale: float, store: str | None = None) -> dict[str, Any]:
    """Per-step interventions over a number of steps that differs per user."""
    with model.generate(prompt, max_new_tokens=2 + int(scale) % 4, verbose=False) as tracer:
        with tracer.all():
            model.model.layers[1].output[:, -1] *= scale
            h3 = model.model.layers[3].output[:, -1].save()
        ids = model.generator.output.save()
    return {"h3": h3, "ids": ids}


def gradient(model: Any, prompt: str, scale: float, store: str | None = None) -> dict[str, Any]:
    with model.trace(prompt, verbose=False):
        grad = model.model.layers[1].output.grad.save()
        (model.output.logits[0, -1].max() * scale).backward()
    return {"grad": grad}


def failing(model: Any, prompt: str, scale: float, store: str | None = None) -> dict[str, Any]:
    with model.trace(prompt, verbose=False):
        model.model.layers[1].output[7 + int(scale)].save()  # a batch of one has no such row
    raise AssertionError("the trace should have failed")


KINDS = [trace, generate, gradient, failing, trace]


def shard_status(client: Client, name: str, field: str) -> list[Any]:
    record = get_deployment(client, name)
    return [client.submit(tasks.shard_status, name, s.index, workers=[s.worker], pure=False).result()[field]
            for s in record.shards]


def batch_sizes(client: Client, name: str) -> list[dict[int, int]]:
    return shard_status(client, name, "batch_sizes")


def in_flight(client: Client, name: str) -> list[int]:
    return shard_status(client, name, "in_flight")


def test_experiments_of_separate_clients_share_passes_and_equal_their_solo_runs(cluster: Client, local: Any,
                                                                              tmp_path: Any) -> None:
    users, rounds = 6, 5
    results: dict[tuple[int, int], Any] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(users)

    def store_of(index: int, turn: int) -> str | None:
        return str(tmp_path / f"u{index}-t{turn}") if turn == len(KINDS) - 1 else None

    def user(index: int) -> None:
        try:
            with Client(cluster.scheduler.address, set_as_default=False) as own:
                model = nd.RemoteModel(own, "shared")
                start.wait(30)
                for turn in range(rounds):
                    kind = KINDS[(index + turn) % len(KINDS)]
                    try:
                        results[index, turn] = kind(model, PROMPTS[(index + turn) % len(PROMPTS)], 1.0 + index,
                                                    store_of(index, turn))
                    except InterventionError as exc:
                        results[index, turn] = exc
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    assert not errors, errors
    assert len(results) == users * rounds
    assert any(hasattr(v, "compute") for got in results.values() if isinstance(got, dict) for v in got.values())
    for (index, turn), got in results.items():
        kind = KINDS[(index + turn) % len(KINDS)]
        prompt = PROMPTS[(index + turn) % len(PROMPTS)]
        if kind is failing:
            assert isinstance(got, InterventionError) and "test_cotenancy_cluster.py:" in str(got), got
            assert "IndexError" in str(got)
            continue
        expected = kind(local, prompt, 1.0 + index)
        for key, value in expected.items():
            if isinstance(value, list):
                assert len(got[key]) == len(value)
                for step_got, step_expected in zip(got[key], value):
                    assert_matches_solo(torch.as_tensor(step_got), step_expected)
            elif key == "ids":
                assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(value))
            else:
                assert_matches_solo(materialize(got[key]), torch.as_tensor(value))
    sizes = batch_sizes(cluster, "shared")
    assert all(max(per_shard) > 1 for per_shard in sizes), sizes  # passes were shared on both shards
    # the scheduler's monitor saw it too (the shards' events are fire-and-forget: they may trail the
    # results a little): the Experiments page's co-tenants and shared-pass counts
    expected = [{size: count for size, count in per_shard.items() if size > 1} for per_shard in sizes]
    deadline = time.monotonic() + 10
    while True:
        snapshot = cluster.run_on_scheduler(_snapshot)
        counted = [{int(size): count for size, count in row["batch_sizes"].items()}
                   for row in snapshot["shards"] if row["deployment"] == "shared"]
        if counted == expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert counted == expected
    shared = [row for row in snapshot["experiments"] if row["deployment"] == "shared" and row["shared_with"]]
    assert shared and all(set(row["cotenants"].split()) <= {r["experiment"] for r in snapshot["experiments"]}
                          for row in shared)


def materialize(value: Any) -> torch.Tensor:
    """A saved value as a tensor (a persisted save comes back lazy: read it)."""
    return value.compute() if hasattr(value, "compute") else torch.as_tensor(value)


def _snapshot(dask_scheduler: Any) -> dict[str, Any]:
    from nnsight_dask.scheduler.monitor import monitor_of

    return monitor_of(dask_scheduler).snapshot()  # type: ignore[union-attr]



def test_a_cancelled_member_leaves_and_the_others_finish(cluster: Client, local: Any) -> None:
    clients = [Client(cluster.scheduler.address, set_as_default=False) for _ in range(3)]
    try:
        tracers = []
        for index, own in enumerate(clients):
            model = nd.RemoteModel(own, "shared")
            with model.generate(PROMPTS[index], max_new_tokens=30, blocking=False, verbose=False) as tracer:
                with tracer.all():
                    model.model.layers[1].output[:, -1] *= 1.0 + index
                model.generator.output.save(name="ids")
            tracers.append(tracer)
        assert tracers[1].future.cancel()
        for index in (0, 2):
            got = tracers[index].future.result(timeout=120)["ids"]
            with local.generate(PROMPTS[index], max_new_tokens=30) as tracer:
                with tracer.all():
                    local.model.layers[1].output[:, -1] *= 1.0 + index
                expected = local.generator.output.save()
            assert torch.equal(torch.as_tensor(got), torch.as_tensor(expected))
        assert tracers[1].future.cancelled()
        deadline = time.monotonic() + 10  # and no shard still holds its state (KV caches)
        while any(in_flight(cluster, "shared")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(in_flight(cluster, "shared"))
    finally:
        for own in clients:
            own.close()


def test_remote_sampling_repeats_the_local_draws_among_co_tenants(cluster: Client, local: Any) -> None:
    """Sampled generations run alone on the shards (their draws see a solo run's logits): with the same
    seed they give the local tokens, while other users' experiments share passes around them."""
    options = {"do_sample": True, "seed": 11, "temperature": 1.3, "top_k": 30, "top_p": 0.9}

    def sample(model: Any, prompts: list[str]) -> torch.Tensor:
        with model.generate(prompts, max_new_tokens=8, verbose=False, **options):
            ids = model.generator.output.save()
        return torch.as_tensor(ids)

    expected = sample(local, PROMPTS[:2])
    remote = nd.RemoteModel(cluster, "shared")
    others: list[Any] = []
    busy = threading.Thread(target=lambda: others.extend(trace(remote, p, 2.0) for p in PROMPTS * 2))
    busy.start()
    got = [sample(remote, PROMPTS[:2]) for _ in range(3)]
    busy.join(120)
    assert all(torch.equal(g, expected) for g in got), (got, expected)
    assert len(others) == 2 * len(PROMPTS)


def test_gradients_through_a_remote_generation_equal_the_local_ones(cluster: Client, local: Any) -> None:
    """A backward at step 2 reaches step 0's activations on shard 0 through both shards' KV caches."""
    def run(model: Any) -> dict[str, torch.Tensor]:
        with model.generate(PROMPTS[0], max_new_tokens=3, verbose=False) as tracer:
            first = model.model.layers[1].output.grad.save()
            with tracer.iter[2]:
                model.output.logits[0, -1].max().backward()
            ids = model.generator.output.save()
        return {"first": torch.as_tensor(first), "ids": torch.as_tensor(ids)}

    got, expected = run(nd.RemoteModel(cluster, "shared")), run(local)
    assert torch.equal(got["ids"], expected["ids"])
    assert expected["first"].abs().sum() > 0
    assert torch.allclose(got["first"], expected["first"], atol=1e-6)


def test_serve_mounts_the_experiments_page_on_a_plain_cluster(cluster: Client) -> None:
    """This cluster was started without the dashboard preload: nd.serve added the page and its data."""
    import urllib.request

    base = cluster.dashboard_link.rsplit("/", 1)[0]
    with urllib.request.urlopen(f"{base}/experiments", timeout=30) as page:
        assert page.status == 200 and b"bokeh" in page.read().lower()
    with urllib.request.urlopen(f"{base}/nnsight/experiments.json", timeout=30) as rows:
        assert rows.status == 200
