"""Deployments: a model's shards in actors on chosen workers, registered on the scheduler by name.

The registry lives in the scheduler's metadata (small JSON: shard placement, layer ranges) so any
client of the cluster finds a deployment by name; the actors' futures are published as a dataset
so the shards outlive the client that served them. Recovery re-creates shards whose worker died.

Lifecycle rules:

- **One deployment per name.** ``serve``, ``undeploy`` and ``recover`` of a name run under one
  cluster-wide ``distributed.Lock``: of two concurrent ``serve`` calls of one name, one creates the
  deployment and the other raises :class:`~nnsight_dask.errors.DeploymentError` naming it.
- **Undeploy ends what is in flight.** The registry entry goes first (new experiments and retries
  find no deployment), then every worker closes its shards of the deployment without waiting for a
  running stage: experiments running or queued on them end with a ``DeploymentError`` saying the
  deployment was undeployed.
- **Placement** (:func:`plan_placement`). A deployment served without ``workers=`` keeps one shard per
  worker while the cluster has enough. Recovery puts a lost shard on a live worker that holds no shard
  of the deployment; when none exists it waits up to ``RESPREAD_WAIT_SECONDS`` for one if the cluster
  shrank below the workers the deployment used (a Nanny restarting the dead worker), then shares the
  least loaded live worker. When workers return, the next ``recover`` (which every experiment of
  a client runs, at most every ``REBALANCE_CHECK_SECONDS``, while its cached placement shares a
  worker) moves shards off shared workers onto free ones, one generation on: experiments in flight
  on the old copy finish there; the old copy then leaves (``ShardActor.retire``). A deployment
  served with ``workers=`` is placed where asked and only lost shards move.
"""
from __future__ import annotations

import functools
import threading
import time
import uuid
import weakref
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import torch
from distributed import Client, Lock

from ..errors import DeploymentError
from ..graph.policy import Policy
from ..models.loading import LoadOptionError, check_shard_load_options, split_dtype
from ..scheduler.monitor import ExperimentMonitor
from ..worker.plugin import CLOSE_HANDLER, ShardWorkerPlugin
from ..worker.shard_actor import ModelSource, ShardActor
from .record import Deployment, ShardPlacement

_ROOT = "nnsight-dask-deployments"
#: How long recovery waits for a replacement worker to appear (the Nanny restarts a dead one).
WORKER_WAIT_SECONDS = 60.0
#: How long recovery waits for a re-created shard to load before giving up.
SHARD_LOAD_SECONDS = 600.0
#: When a lost shard would have to share a worker and the cluster has fewer workers than the
#: deployment used (a Nanny may be restarting the dead one), recovery waits this long for a free one.
RESPREAD_WAIT_SECONDS = 15.0

_F = TypeVar("_F", bound=Callable[..., Any])


def _lock(client: Client, name: str) -> Lock:
    """The cluster-wide lock of deployment ``name`` (serve, undeploy and recover take it)."""
    return Lock(f"nnsight-dask-deployment-{name}", scheduler_rpc=client.scheduler, loop=client.loop)


def _one_at_a_time(serve: _F) -> _F:
    """Run ``serve`` under the deployment's lock, so its check that the name is free and its
    registration are one step: of two concurrent calls for one name, the second sees the first's."""
    @functools.wraps(serve)
    def locked(client: Client, model: ModelSource, shards: int = 1, name: str | None = None, **options: Any) -> Any:
        name = name or _default_name(model)
        with _lock(client, name):
            return serve(client, model, shards, name, **options)
    return locked  # type: ignore[return-value]


def _key(name: str) -> list[str]:
    return [_ROOT, name]


def _dataset(name: str) -> str:
    return f"nnsight-dask-shards-{name}"


@_one_at_a_time
def serve(client: Client, model: ModelSource, shards: int = 1, name: str | None = None, *,
          workers: list[str] | None = None, dtype: torch.dtype | str | None = None, device: str | None = None,
          gguf_file: str | None = None, policy: Policy | None = None,
          load_options: Mapping[str, Any] | None = None) -> Deployment:
    """Load ``model`` once, split into ``shards`` shards of consecutive layers, one actor each.

    ``model`` is a local HF directory or hub id (read by the workers), ``"smollm2"``, or a
    callable returning ``(model, tokenizer)``. ``workers`` chooses the workers (default: spread
    over the cluster, one shard per worker while there are enough). ``policy`` (a :class:`Policy`,
    default ``Policy()``) bounds what experiments may do; it is stored with the deployment and
    enforced by every shard. ``load_options`` go to every shard's ``from_pretrained``
    (``{"attn_implementation": "eager", "revision": ...}``, see
    :data:`~nnsight_dask.models.loading.SHARD_LOAD_OPTIONS`); each shard checks them with its worker's
    settings (``trust_remote_code`` only where ``nnsight-dask.trust-remote-code`` allows it). Returns
    the deployment record.
    """
    name = name or _default_name(model)
    dtype, load_options = split_dtype(load_options, dtype)
    load_options = check_shard_load_options(load_options, trust_remote_code=None)  # fail fast; shards decide
    if load_options and callable(model):
        raise LoadOptionError(f"load options {sorted(load_options)} apply to a model path or 'smollm2'; a callable "
                              "source builds its own model (pass the options to from_pretrained inside it)",
                              option=sorted(load_options)[0])
    existing = client.get_metadata(_key(name), None)
    if existing is not None:
        raise DeploymentError(f"a deployment named {name!r} already exists on this cluster "
                              f"({_describe(existing)}); use it with nd.RemoteModel(client, {name!r}), or "
                              f"free it first with nd.undeploy(client, {name!r})", name=name)
    placement = _place(client, shards, workers)
    client.register_plugin(ShardWorkerPlugin())
    policy = policy or Policy()
    futures = [_start_shard(client, name, i, shards, model, dtype, device, gguf_file, placement[i], policy,
                            load_options) for i in range(shards)]
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
        options={"dtype": str(dtype).removeprefix("torch.") if dtype else None, "device": device, "gguf_file": gguf_file,
                 "spread": workers is None, "load_options": load_options},
        monitor=monitored, policy=policy)
    client.set_metadata(_key(name), record.to_metadata())
    _remember_source(client, name, model)
    return record


def install_monitor(client: Client) -> bool:
    """Register the experiment monitor on the scheduler and mount the dashboard's Experiments page
    there if the scheduler was started without our preload (both idempotent); False if the scheduler
    can't load them."""
    try:
        client.register_plugin(ExperimentMonitor())
        client.run_on_scheduler(_mount_experiments_page)
    except Exception as exc:  # e.g. nnsight_dask is not installed where the scheduler runs
        warnings.warn(f"the nnsight-dask experiment monitor could not be installed on the scheduler "
                      f"({type(exc).__name__}: {exc}); experiments run, but the dashboard page stays empty",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def _mount_experiments_page(dask_scheduler: Any) -> bool:
    """Run on the scheduler (Dask passes it by this parameter's name)."""
    from ..scheduler.pages import add_page

    return add_page(dask_scheduler)


def _start_shard(client: Client, name: str, index: int, n_shards: int, model: ModelSource, dtype: Any,
                 device: str | None, gguf_file: str | None, worker: str, policy: Policy,
                 load_options: Mapping[str, Any] | None) -> Any:
    return client.submit(ShardActor, name, index, n_shards, model, dtype, device, gguf_file, policy.to_dict(),
                         dict(load_options or {}), actor=True,
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


def _describe(metadata: Any) -> str:
    """``model 'path' in 2 shard(s) on [workers], served 2026-01-31 12:03:11`` from a stored record."""
    try:
        record = Deployment.from_metadata(metadata)
    except DeploymentError:
        return "a record this version cannot read"
    served = datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S")
    return f"model {record.source!r} in {record.n_shards} shard(s) on {record.workers}, served {served}"


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
    return {name: Deployment.from_metadata(record)
            for name, record in (client.get_metadata(_ROOT, {}) or {}).items() if record is not None}


def undeployed_message(name: str) -> str:
    """What an experiment in flight hears when its deployment is undeployed."""
    return (f"deployment {name!r} was undeployed (nd.undeploy) while this experiment was in flight; it was "
            f"stopped. Serve the model again with nd.serve(client, model, name={name!r}) and resubmit")


def undeploy(client: Client, name: str) -> None:
    """Free a deployment: drop its registry entry, close its shards, drop its actors.

    Experiments in flight on it end with a :class:`~nnsight_dask.errors.DeploymentError` saying it
    was undeployed: the shards close without waiting for a running stage, which stops before its
    next decoder layer, and stages still queued are refused with the same reason.
    """
    with _lock(client, name):
        record = get_deployment(client, name)
        # the entry goes first: its experiments' owners, hearing of the closed shards, find it gone
        # (metadata cannot be deleted: an empty entry is what "no deployment" reads)
        client.set_metadata(_key(name), None)
        alive = list(client.scheduler_info(n_workers=-1)["workers"])
        if alive:  # every worker: copies retired by rebalancing may still live on others
            client.sync(client.scheduler.broadcast, msg={
                "op": CLOSE_HANDLER, "deployment": name, "reason": undeployed_message(name),
                "shards": list(range(record.n_shards))}, workers=alive, on_error="ignore")
        for dataset in (_dataset(name), f"nnsight-dask-source-{name}"):
            try:
                client.unpublish_dataset(dataset)
            except KeyError:
                pass


#: How long a client trusts its last view of which workers are alive, when it shows every shard's
#: worker alive (every waiting experiment asks every 0.2 s: many threads of one process share one view).
LIVENESS_SECONDS = 0.5


class _Liveness:
    """One client's view of the live workers, refreshed by one thread at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.when = -LIVENESS_SECONDS
        self.alive: frozenset[str] = frozenset()

    def fresh(self) -> bool:
        return time.monotonic() - self.when < LIVENESS_SECONDS

    def refresh(self, client: Client) -> frozenset[str]:
        self.alive = frozenset(client.scheduler_info(n_workers=-1)["workers"])
        self.when = time.monotonic()
        return self.alive


_liveness: weakref.WeakKeyDictionary[Client, _Liveness] = weakref.WeakKeyDictionary()
_liveness_lock = threading.Lock()


def dead_shards(client: Client, record: Deployment) -> list[int]:
    """Shards whose worker has left the cluster.

    Asking the scheduler costs it and the client an RPC (the identity of every worker); a recent view
    that has every shard's worker alive is trusted for ``LIVENESS_SECONDS`` (a death is seen that much
    later at most), and while one thread refreshes it the others wait for that answer instead of
    asking too. A view missing a shard's worker is checked with the scheduler at once (a shard
    re-created on a new worker is not dead).
    """
    with _liveness_lock:
        view = _liveness.setdefault(client, _Liveness())
    with view.lock:
        if view.fresh() and all(s.worker in view.alive for s in record.shards):
            return []
        alive = view.refresh(client)
    return [s.index for s in record.shards if s.worker not in alive]


def crowded(record: Deployment) -> bool:
    """Whether a deployment that should spread has shards sharing a worker (free to check: no round trip)."""
    return bool(record.options.get("spread", True)) and len(set(record.workers)) < record.n_shards


def plan_placement(record: Deployment, alive: list[str]) -> dict[int, str]:
    """Where shards must go, ``{index: worker}``, given the live workers (in the order to prefer them).

    A lost shard (its worker is not alive) goes to a live worker holding no shard of the deployment,
    else to the least loaded one. Then, for a deployment that spreads (served without ``workers=``),
    while a worker holds several shards and another holds none, the highest shard of the most
    loaded worker moves to the free one. Nothing else moves.
    """
    if not alive:
        return {}
    placement = {s.index: s.worker for s in record.shards}
    load = Counter(w for w in placement.values() if w in alive)
    moves: dict[int, str] = {}
    for index in sorted(i for i, w in placement.items() if w not in alive):
        worker = min(alive, key=lambda w: (load[w], alive.index(w)))
        moves[index] = worker
        load[worker] += 1
    if record.options.get("spread", True):
        while True:
            free = [w for w in alive if load[w] == 0]
            busiest = max(alive, key=lambda w: (load[w], -alive.index(w)))
            if not free or load[busiest] < 2:
                break
            index = max(i for i in placement if moves.get(i, placement[i]) == busiest)
            moves[index] = free[0]
            load[busiest] -= 1
            load[free[0]] += 1
    return {i: w for i, w in moves.items() if w != placement[i]}


def _shares(record: Deployment, moves: dict[int, str]) -> bool:
    """Whether a spreading deployment, moved as planned, still has shards sharing a worker."""
    return crowded(record.moved(moves))


def _alive(client: Client) -> list[str]:
    return list(client.scheduler_info(n_workers=-1)["workers"])


def recover(client: Client, name: str) -> Deployment:
    """Re-create shards whose worker died and spread shards that share a worker when a free one has
    joined (see :func:`plan_placement`); returns the current record.

    Runs under the deployment's cluster-wide lock, so several clients noticing the same loss
    recover it once; a call with nothing to move takes no lock.
    """
    record, alive = get_deployment(client, name), _alive(client)
    if alive and not plan_placement(record, alive):
        return record
    with _lock(client, name):
        record = get_deployment(client, name)
        deadline = time.monotonic() + WORKER_WAIT_SECONDS
        while not (alive := _alive(client)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not alive:
            raise DeploymentError(f"deployment {name!r} lost shard(s) {dead_shards(client, record)} and no worker "
                                  f"joined within {WORKER_WAIT_SECONDS:.0f} s to hold them", name=name)
        moves = plan_placement(record, alive)
        if _shares(record, moves) and len(alive) < len(set(record.workers)):
            respread = time.monotonic() + RESPREAD_WAIT_SECONDS
            while _shares(record, moves) and time.monotonic() < respread:
                time.sleep(0.25)
                alive = _alive(client) or alive
                moves = plan_placement(record, alive)
        if not moves:
            return record
        source = client.get_dataset(f"nnsight-dask-source-{name}")
        futures = list(client.get_dataset(_dataset(name)))
        options = record.options
        dtype = getattr(torch, options["dtype"]) if options.get("dtype") else None
        started = {index: _start_shard(client, name, index, record.n_shards, source, dtype, options.get("device"),
                                       options.get("gguf_file"), worker, record.policy, options.get("load_options"))
                   for index, worker in moves.items()}
        for index, future in started.items():
            _loaded(client, name, index, future, moves[index])
            futures[index] = future
        retiring = {s.index: s.worker for s in record.shards if s.index in moves and s.worker in alive}
        record = record.moved(moves)
        client.publish_dataset(**{_dataset(name): futures}, override=True)
        client.set_metadata(_key(name), record.to_metadata())
        for index, worker in retiring.items():  # the copies left behind finish what they hold, then leave
            client.sync(client.scheduler.broadcast, msg={"op": CLOSE_HANDLER, "deployment": name, "retire": True,
                                                         "shards": [index]}, workers=[worker], on_error="ignore")
        return record


def _loaded(client: Client, name: str, index: int, future: Any, worker: str) -> None:
    """Wait for a re-created shard; a clear error if its worker dies meanwhile or it takes too long."""
    deadline = time.monotonic() + SHARD_LOAD_SECONDS
    while True:
        try:
            future.result(timeout=1.0)
            return
        except TimeoutError:
            if worker not in _alive(client) or time.monotonic() > deadline:
                client.cancel([future])
                why = "its worker died meanwhile" if worker not in _alive(client) else \
                    f"it did not load within {SHARD_LOAD_SECONDS:.0f} s"
                raise DeploymentError(f"re-creating shard {index} of {name!r} on {worker} failed: {why}",
                                      name=name) from None
