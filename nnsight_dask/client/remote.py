"""RemoteModel: the module tree of a deployed model on the meta device, tracing like a local one.

No weights reach the client: the config and the tokenizer come from shard 0, and every trace is
sent to the deployment as a graph.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from distributed import Client

from ..backends.base import Backend, RunResult
from ..backends.local import LocalBackend
from ..errors import TracingError
from ..graph.graph import InterventionGraph
from ..storage.results import open_refs
from ..tracing.model import LanguageModel
from ..tracing.tracer import Session, Tracer
from ..worker import tasks
from ..worker.results import Results
from ..worker.serialization import register as register_serializers
from .deployment import get_deployment
from .experiment import run_experiment
from .futures import ExperimentFuture
from .progress import ExperimentProgress
from .record import Deployment


class RemoteBackend(Backend):
    """Runs graphs on deployment ``name`` through ``client``.

    ``model`` (the :class:`RemoteModel`) caches the deployment record, so an experiment needs no
    scheduler round trip to find its shards; a recovery elsewhere refreshes the cache. Scans run
    here, on fake tensors over the model's meta-device module tree.
    """

    def __init__(self, client: Client, name: str, model: RemoteModel) -> None:
        self.client = client
        self.name = name
        self.model = model

    def scan(self, graph: InterventionGraph) -> RunResult:
        return LocalBackend(self.model._module, self.model._pad_token_id()).scan(graph)

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


class RemoteModel(LanguageModel):
    """A deployed model seen from a client: ``with lm.trace(prompt): ...`` runs on the cluster.

    Examples
    --------
    >>> nd.serve(client, "path/to/model", shards=2, name="smol")        # doctest: +SKIP
    >>> lm = nd.RemoteModel(client, "smol")                              # doctest: +SKIP
    >>> with lm.trace("The capital of France is", remote=True):          # doctest: +SKIP
    ...     out = lm.output.logits[:, -1].argmax(-1).save()
    >>> lm = nd.RemoteModel("http://head:8000", "smol", api_key=key)    # doctest: +SKIP  (through the gateway)
    """

    def __new__(cls, client: Client | str | None = None, name: str | None = None, **kwargs: Any) -> RemoteModel:
        """A URL (or none: ``NNSIGHT_DASK_URL``) instead of a Client reaches the deployment through
        the HTTP gateway: ``nd.RemoteModel("http://head:8000", "smol", api_key=...)``."""
        if cls is RemoteModel and (client is None or isinstance(client, str)):
            from .http_remote import HttpRemoteModel

            return super().__new__(HttpRemoteModel)
        return super().__new__(cls)

    def __init__(self, client: Client, name: str) -> None:
        register_serializers()
        record = get_deployment(client, name)
        description = client.submit(tasks.describe, name, workers=[record.shards[0].worker],
                                    pure=False).result()
        module = _meta_model(description["config"])
        tokenizer = _tokenizer(description["tokenizer"])
        super().__init__(module, tokenizer=tokenizer, model_id=name)
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_module_paths", description["module_paths"])
        object.__setattr__(self, "deployment", record)

    def _set_deployment(self, record: Deployment) -> None:
        object.__setattr__(self, "deployment", record)

    def trace(self, *inputs: Any, remote: Any = True, **kwargs: Any) -> Tracer:
        return super().trace(*inputs, remote=remote, **kwargs)

    def generate(self, *inputs: Any, remote: Any = True, **kwargs: Any) -> Tracer:
        return super().generate(*inputs, remote=remote, **kwargs)

    def session(self, *, remote: Any = True, blocking: bool = True, **options: Any) -> Session:
        return super().session(remote=remote, blocking=blocking, **options)

    def _local_backend(self) -> Backend:
        raise TracingError(f"{self._model_id!r} is a remote deployment: its weights are on the cluster. "
                           "Run traces with remote=True (the default for RemoteModel).")

    def _remote_backend(self, remote: Any) -> Backend:
        client = self._client if remote is True else remote
        if not isinstance(client, Client):
            raise TracingError(f"remote= takes True or a distributed.Client, not {type(remote).__name__}")
        return RemoteBackend(client, self._model_id, self)


def _meta_model(config: dict[str, Any]) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(config)
    model_type = settings.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **settings)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config).eval()


def _tokenizer(description: dict[str, Any] | None) -> Any:
    if description is None:
        return None
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(description["json"]),
                                   padding_side=description["padding_side"], **description["special"])
