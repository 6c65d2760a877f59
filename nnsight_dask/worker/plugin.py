"""The worker side of a deployment, installed on every worker (new and restarted ones too).

Why a plugin: a worker the Nanny restarts after a crash comes back as a fresh process. Dask runs
registered worker plugins there before it takes tasks, so our carry serializer is in place before
the first carry reaches it. ``serve`` registers the plugin each time; registering again replaces
the old instance (Dask tears it down first), so the plugin holds no state and its teardown leaves
the worker as it is (the shards of other deployments on the worker must live on), unless the worker
is closing: then it closes the worker's shards and sends their last telemetry (a process may outlive
its worker: a test's in-process cluster, whose shards would otherwise stay in the process's registry).

The plugin installs the worker's end of the direct route (:mod:`.routing`: the handlers experiments
travel by), sends the shards' telemetry every :data:`~.telemetry.FLUSH_SECONDS`
(:func:`.telemetry.flush`), and adds two worker handlers that reach the shards without waiting for
a running stage (a worker's handlers run on its event loop, stages in the shards' threads):

- :data:`CANCEL_HANDLER` (:func:`cancel_experiments`): stop experiments and free their state now;
  sent by a client that cancels or gives up waiting, and by the scheduler's monitor when a client
  leaves.
- :data:`CLOSE_HANDLER` (:func:`close_shards`): close a deployment's shards here (``undeploy``:
  running experiments end with the reason) or retire one that moved (rebalancing).

Both are reached through ``scheduler.broadcast(msg={"op": <handler>, ...}, workers=[...])``.
"""
from __future__ import annotations

from typing import Any

from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin
from tornado.ioloop import PeriodicCallback

from . import registry, routing, telemetry
from .serialization import register as register_serializers

#: Name of the plugin on the workers (registering again replaces it).
NAME = "nnsight-dask-shards"
#: Worker handler: stop experiments on every shard of the worker (``experiments``, ``reason``).
CANCEL_HANDLER = "nnsight_dask_cancel"
#: Worker handler: close (``reason``: undeploy) or retire (``retire=True``) shards of ``deployment``.
CLOSE_HANDLER = "nnsight_dask_close"
#: Name of the worker's periodic callback that sends the shards' telemetry.
FLUSH_CALLBACK = "nnsight-dask-telemetry"


class ShardWorkerPlugin(WorkerPlugin):
    """Registers our serializers and the shards' handlers on every worker that joins or restarts."""

    name = NAME

    def setup(self, worker: Any) -> None:
        register_serializers()
        worker.handlers[CANCEL_HANDLER] = cancel_experiments
        worker.handlers[CLOSE_HANDLER] = close_shards
        routing.router_of(worker)
        telemetry.PASSES.send_from(worker)
        if FLUSH_CALLBACK not in worker.periodic_callbacks:
            callback = PeriodicCallback(lambda: telemetry.flush(worker), telemetry.FLUSH_SECONDS * 1000)
            worker.periodic_callbacks[FLUSH_CALLBACK] = callback
            callback.start()

    def teardown(self, worker: Any) -> None:
        """A worker that closes closes the shards it holds (they leave the process's registry, their
        experiments end with the reason), sends the passes still buffered and stops keeping new
        ones. The teardown before a registration replaces this plugin (the worker running on) does
        nothing."""
        if worker.status not in (Status.closing, Status.closing_gracefully, Status.closed):
            return
        actors = list(worker.state.actors.values())
        for shard in registry.shards():
            if any(shard is actor for actor in actors):
                shard.close(f"its worker {worker.address} closed")
        telemetry.flush(worker)
        telemetry.PASSES.stop_sending(worker)


def cancel_experiments(experiments: list[str], reason: str = "cancelled") -> int:
    """Stop ``experiments`` on every shard of this worker without waiting for a running stage.

    The stop flag is set even where no shard holds them yet, so a stage still queued here is
    refused. Returns how many experiment states were freed.
    """
    experiments = [str(e) for e in experiments]
    error = registry.ExperimentCancelledError(
        f"experiment(s) {', '.join(experiments)} stopped on the deployment's shards: {reason}",
        experiments=experiments, reason=reason)
    registry.stop(experiments, error)
    routing.cancel_routes(experiments, error)
    return sum(shard.server.release_many(experiments) for shard in registry.shards())


def close_shards(deployment: str, reason: str = "", retire: bool = False,
                 shards: list[int] | None = None) -> list[int]:
    """Close the shards of ``deployment`` held here (``shards``: only those indices).

    ``reason`` (undeploy): the experiments running or queued on them end with it. ``retire``:
    a shard that moved to another worker finishes what it holds and then leaves. Returns the
    indices closed or retired.
    """
    done = []
    for shard in registry.shards(deployment):
        if shards is not None and shard.index not in shards:
            continue
        if retire:
            shard.retire()
        else:
            shard.close(reason or None)
        done.append(shard.index)
    if reason and not retire:  # tombstones where no shard is held (e.g. already closed), so queued stages hear why
        for index in shards or ():
            if index not in done:
                registry.unregister(deployment, index, reason=reason)
    return done
