"""The worker side of a deployment, installed on every worker (new and restarted ones too).

Why a plugin: a worker the Nanny restarts after a crash comes back as a fresh process. Dask
re-runs registered worker plugins there before it takes tasks, so our carry serializer is in place
before the first carry reaches it, and a worker that shuts down closes the shards it holds.
"""
from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from . import registry
from .serialization import register as register_serializers

#: Name of the plugin on the workers (registering again replaces it).
NAME = "nnsight-dask-shards"


class ShardWorkerPlugin(WorkerPlugin):
    """Registers our serializers on setup; closes this worker's shards on teardown."""

    name = NAME

    def setup(self, worker: Any) -> None:
        register_serializers()

    def teardown(self, worker: Any) -> None:
        for deployment, index in registry.held():
            registry.lookup(deployment, index).close()
