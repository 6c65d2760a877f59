"""Deployments: a model's shards in actors on chosen workers, registered on the scheduler by name.

The registry lives in the scheduler's metadata (small JSON: shard placement, layer ranges) so any
client of the cluster finds a deployment by name; the actors' futures are published as a dataset
so the shards outlive the client that served them. Recovery re-creates shards whose worker died.
"""
from __future__ import annotations

import time
import uuid
import warnings
from typing import Any

import torch
from distributed import Client, Lock

from ..errors import DeploymentError
from ..graph.policy import Policy
from ..scheduler.monitor import ExperimentMonitor
from ..worker import tasks
from ..worker.plugin import ShardWorkerPlugin
from ..worker.shard_actor import ModelSource, ShardActor
from .record import Deployment, ShardPlacement

_ROOT = "nnsight-dask-deployments"
#: How long recovery waits for a replacement worker to appear (the Nanny restarts a dead one).
WORKER_WAIT_SECONDS = 60.0


def _key(name: str) -> list[str]:
    return [_ROOT, name]


def _dataset(name: str) -> str:
    return f"nnsight-dask-shards-{name}"


def serve(client: Client, model: ModelSource, shards: int = 1, name: str | None = None, *,
          workers: list[str] | None = None, dtype: torch.dtype | str | None = None, device: str | None = None,
          gguf_file: str | None = None, policy: Policy | None = None) -> Deployment:
    """Load ``model`` once, split into ``shards`` shards of consecutive layers, one actor each.

    ``model`` is a local HF directory or hub id (read by the workers), ``"smollm2"``, or a
    callable returning ``(model, tokenizer)``. ``workers`` chooses the workers (default: spread
    over the cluster, one shard per worker while there are enough). ``policy`` (a :class:`Policy`,
    default ``Policy()``) bounds what experiments may do; it is stored with the deployment and
    enforced by every shard. Returns the deployment record.
    """
    name = name or _default_name(model)
    if client.get_metadata(_key(name), None) is not None:
        raise DeploymentError(
            f"a deployment named {name!r} already exists on this cluster; use it with "
            f"nd.RemoteModel(client, {name!r}), or free it first with nd.undeploy(client, {name!r})", name=name)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    placement = _place(client, shards, workers)
    client.register_plugin(ShardWorkerPlugin())
    policy = policy or Policy()
    futures = [_start_shard(client, name, i, shards, model, dtype, device, gguf_file, placement[i], policy)
               for i in range(shards)]
    try:
        actors = [f.result() for f in futures]
    except Exception as exc:
        client.cancel(futures)
        raise DeploymentError(f"deploying {name!r} failed while loading a shard: {type(exc).__name__}: {exc}",
                              name=name) from exc
    client.publish_dataset(**{_dataset(name): futures}, override=True)
    monitored = install_monitor(client)
    specs = actors[0].shard_plan().result()
    record = Deployment(
        name=name, source=model if isinstance(model, str) else getattr(model, "__qualname__", repr(model)),
        shards=tuple(ShardPlacement.of(spec, placement[spec.index]) for spec in specs), created=time.time(),
        options={"dtype": str(dtype).removeprefix("torch.") if dtype else None, "device": device, "gguf_file": gguf_file},
        monitor=monitored, policy=policy)
    client.set_metadata(_key(name), record.to_metadata())
    _remember_source(client, name, model)
    return record


def install_monitor(client: Client) -> bool:
    """Register the experiment monitor on the scheduler (idempotent); False if the scheduler can't load it."""
    try:
        client.register_plugin(ExperimentMonitor())
    except Exception as exc:  # e.g. nnsight_dask is not installed where the scheduler runs
        warnings.warn(f"the nnsight-dask experiment monitor could not be installed on the scheduler "
                      f"({type(exc).__name__}: {exc}); experiments run, but the dashboard page stays empty",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def _start_shard(client: Client, name: str, index: int, n_shards: int, model: ModelSource, dtype: Any,
                 device: str | None, gguf_file: str | None, worker: str, policy: Policy) -> Any:
    return client.submit(ShardActor, name, index, n_shards, model, dtype, device, gguf_file, policy.to_dict(),
                         actor=True,
                         workers=[worker], allow_other_workers=False,
                         key=f"nnsight-dask-shard-{name}-{index}-{uuid.uuid4().hex[:8]}")


def _place(client: Client, shards: int, workers: list[str] | None) -> list[str]:
    available = list(workers or client.scheduler_info(n_workers=-1)["workers"])
    if not available:
        raise DeploymentError("the cluster has no workers to hold the shards")
    alive = set(client.scheduler_info(n_workers=-1)["workers"])
    unknown = [w for w in available if w not in alive]
    if unknown:
        raise DeploymentError(f"unknown worker(s) {unknown}; known: {sorted(alive)}")
    return [available[i % len(available)] for i in range(shards)]


def _default_name(model: ModelSource) -> str:
    if isinstance(model, str):
        return model.rstrip("/").rsplit("/", 1)[-1]
    return getattr(model, "__name__", "model")


def _remember_source(client: Client, name: str, model: ModelSource) -> None:
    """Keep the model source on the scheduler, so recovery can rebuild a shard from any client."""
    client.publish_dataset(**{f"nnsight-dask-source-{name}": model}, override=True)


def get_deployment(client: Client, name: str) -> Deployment:
    """The deployment record; a clear error listing the deployments when ``name`` is unknown."""
    record = client.get_metadata(_key(name), None)
    if record is None:
        known = sorted(deployments(client))
        raise DeploymentError(f"no deployment named {name!r} on this cluster; deployed: {known or 'none'}. "
                              "Deploy one with nd.serve(client, model, shards=k, name=...)", name=name)
    return Deployment.from_metadata(record)


def deployments(client: Client) -> dict[str, Deployment]:
    """All deployments on the cluster, by name."""
    return {name: Deployment.from_metadata(record) for name, record in (client.get_metadata(_ROOT, {}) or {}).items()}


def undeploy(client: Client, name: str) -> None:
    """Free a deployment: close its shards, drop its actors and its registry entry."""
    record = get_deployment(client, name)
    alive = set(client.scheduler_info(n_workers=-1)["workers"])
    closing = [client.submit(tasks.close_shard, name, s.index, workers=[s.worker], pure=False)
               for s in record.shards if s.worker in alive]
    client.gather(closing, errors="skip")
    for dataset in (_dataset(name), f"nnsight-dask-source-{name}"):
        try:
            client.unpublish_dataset(dataset)
        except KeyError:
            pass
    registry = dict(client.get_metadata(_ROOT, {}) or {})
    registry.pop(name, None)
    client.set_metadata(_ROOT, registry)


def dead_shards(client: Client, record: Deployment) -> list[int]:
    """Shards whose worker has left the cluster."""
    alive = set(client.scheduler_info(n_workers=-1)["workers"])
    return [s.index for s in record.shards if s.worker not in alive]


def recover(client: Client, name: str) -> Deployment:
    """Re-create shards whose worker died, on live workers; returns the updated record.

    Runs under a cluster-wide lock, so several clients noticing the same loss recover it once.
    """
    with Lock(f"nnsight-dask-recover-{name}"):
        record = get_deployment(client, name)
        lost = dead_shards(client, record)
        if not lost:
            return record
        source = client.get_dataset(f"nnsight-dask-source-{name}")
        futures = list(client.get_dataset(_dataset(name)))
        deadline = time.monotonic() + WORKER_WAIT_SECONDS
        while True:
            alive = list(client.scheduler_info(n_workers=-1)["workers"])
            if alive or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if not alive:
            raise DeploymentError(f"deployment {name!r} lost shard(s) {lost} and no worker is left to hold them")
        options = record.options
        dtype = getattr(torch, options["dtype"]) if options.get("dtype") else None
        moves: dict[int, str] = {}
        for index in lost:
            used = {s.worker for s in record.shards if s.index not in lost}
            worker = next((w for w in alive if w not in used), alive[index % len(alive)])
            future = _start_shard(client, name, index, record.n_shards, source, dtype, options.get("device"),
                                  options.get("gguf_file"), worker, record.policy)
            future.result()
            futures[index] = future
            moves[index] = worker
        record = record.moved(moves)
        client.publish_dataset(**{_dataset(name): futures}, override=True)
        client.set_metadata(_key(name), record.to_metadata())
        return record
