"""The worker side of a deployment, installed on every worker (new and restarted ones too).

Why a plugin: a worker the Nanny restarts after a crash comes back as a fresh process. Dask runs
registered worker plugins there before it takes tasks, so our carry serializer is in place before
the first carry reaches it. ``serve`` registers the plugin each time; registering again replaces
the old instance (Dask tears it down first), so the plugin holds no state and its teardown does
nothing: the shards of other deployments on the worker must live on.
"""
from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from .serialization import register as register_serializers

#: Name of the plugin on the workers (registering again replaces it).
NAME = "nnsight-dask-shards"


class ShardWorkerPlugin(WorkerPlugin):
    """Registers our serializers on every worker that joins or restarts."""

    name = NAME

    def setup(self, worker: Any) -> None:
        register_serializers()
