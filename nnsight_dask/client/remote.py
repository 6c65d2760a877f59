"""A deployment reached over a Dask ``Client``: ``nd.RemoteModel(client, name)``.

No weights reach the client: the config and the tokenizer come from shard 0 (the common part of a
remote model is :mod:`.remote_model`), and every trace is sent to the deployment as a graph by
:class:`RemoteBackend`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distributed import Client

from ..backends.base import Backend, RunResult
from ..errors import TracingError
from ..graph.graph import InterventionGraph
from ..storage.results import open_refs
from ..worker import tasks
from ..worker.results import Results
from ..worker.serialization import register as register_serializers
from .deployment import get_deployment
from .experiment import run_experiment
from .futures import ExperimentFuture
from .progress import ExperimentProgress
from .record import Deployment
from .remote_model import RemoteModel


class RemoteBackend(Backend):
    """Runs graphs on deployment ``name`` through ``client``.

    ``model`` (the :class:`DaskRemoteModel`) caches the deployment record, so an experiment needs no
    scheduler round trip to find its shards; a recovery elsewhere refreshes the cache. Scans run
    on ``scanner``, in this process (on fake tensors over the model's meta-device module tree).
    """

    def __init__(self, client: Client, name: str, model: DaskRemoteModel, scanner: Backend) -> None:
        self.client = client
        self.name = name
        self.model = model
        self.scanner = scanner

    def scan(self, graph: InterventionGraph) -> RunResult:
        return self.scanner.scan(graph)

    def _options(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"module_paths": self.model._module_paths, "record": self.model.deployment,
                "on_record": self.model._set_deployment, **options}

    def run(self, graph: InterventionGraph, **options: Any) -> RunResult:
        progress = ExperimentProgress(self.name, options.pop("verbose", None))
        try:
            results = run_experiment(self.client, self.name, graph, on_status=progress if progress.enabled else None,
                                     **self._options(options))
        finally:
            progress.close()
        return as_run_result(results)

    def submit(self, graph: InterventionGraph, deliver: Callable[[RunResult], None] | None = None,
               **options: Any) -> ExperimentFuture:
        """The running experiment; its ``result()`` is the :class:`Results` (saved values by name)."""
        options.pop("verbose", None)
        hand_out = None if deliver is None else (lambda results: deliver(as_run_result(results)))
        settings = self._options(options)
        return ExperimentFuture(
            lambda cancelled: run_experiment(self.client, self.name, graph, cancelled=cancelled, **settings),
            deliver=hand_out)


def as_run_result(results: Results) -> RunResult:
    """What tracers hand to their proxies: persisted saves opened as lazy tensors, and the logs."""
    return RunResult(saves=open_refs(dict(results)), logs=results.logs)


class DaskRemoteModel(RemoteModel):
    """A :class:`~.remote_model.RemoteModel` over a Dask ``Client`` (what ``nd.RemoteModel(client, name)``
    builds): experiments go to the shards by the direct route, results come back as Dask hands them."""

    @classmethod
    def reaches(cls, target: Any) -> bool:
        return isinstance(target, Client)

    def __init__(self, client: Client, name: str) -> None:
        register_serializers()
        record = get_deployment(client, name)
        description = client.submit(tasks.describe, name, workers=[record.shards[0].worker],
                                    pure=False).result()
        super().__init__(description, name)
        object.__setattr__(self, "_module_paths", description["module_paths"])
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "deployment", record)

    def _set_deployment(self, record: Deployment) -> None:
        object.__setattr__(self, "deployment", record)

    def _remote_backend(self, remote: Any) -> Backend:
        client = self._client if remote is True else remote
        if not isinstance(client, Client):
            raise TracingError(f"remote= takes True or a distributed.Client, not {type(remote).__name__}")
        return RemoteBackend(client, self.model_id, self, self._scanner())
