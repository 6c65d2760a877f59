"""``RemoteModel``: a deployed model seen from a client, whatever carries its experiments there.

A deployment is reached over a Dask ``Client`` (:class:`~.remote.DaskRemoteModel`) or through the
HTTP gateway (:class:`~.http_remote.HttpRemoteModel`). Both hold the same thing on the client: the
model's module tree on the meta device (no weights), built from the description shard 0 gives, and
its tokenizer; both trace remotely by default and refuse to run locally. This module holds that
common part and the choice between them, so that neither transport imports the other.

``nd.RemoteModel(target, name, ...)`` returns the transport whose :meth:`RemoteModel.reaches` accepts
``target``: each transport subclass is listed in :data:`RemoteModel.transports` as it is defined (the
package ``nnsight_dask.client`` imports both before anyone can call this).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..backends.base import Backend
from ..backends.local import LocalBackend
from ..errors import TracingError
from ..tracing.model import LanguageModelWrapper
from ..tracing.tracer import Session, Tracer


class RemoteModel(LanguageModelWrapper):
    """A deployed model seen from a client: ``with lm.trace(prompt): ...`` runs on the cluster.

    Examples
    --------
    >>> nd.serve(client, "path/to/model", shards=2, name="smol")        # doctest: +SKIP
    >>> lm = nd.RemoteModel(client, "smol")                              # doctest: +SKIP  (a Dask client)
    >>> with lm.trace("The capital of France is"):                       # doctest: +SKIP
    ...     out = lm.output.logits[:, -1].argmax(-1).save()
    >>> lm = nd.RemoteModel("http://head:8000", "smol", api_key=key)    # doctest: +SKIP  (through the gateway)
    """

    #: The transport subclasses, in the order they were defined (:meth:`__init_subclass__`).
    transports: ClassVar[list[type[RemoteModel]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        RemoteModel.transports.append(cls)

    @classmethod
    def reaches(cls, target: Any) -> bool:
        """Whether this transport reaches a deployment through ``target`` (what the user passed first)."""
        return False

    def __new__(cls, target: Any = None, name: str | None = None, **kwargs: Any) -> RemoteModel:
        """``RemoteModel(target, ...)`` itself builds the transport that reaches ``target``: a Dask
        ``Client``, or a gateway URL (none: ``NNSIGHT_DASK_URL``)."""
        if cls is RemoteModel:
            chosen = next((t for t in RemoteModel.transports if t.reaches(target)), None)
            if chosen is None:
                raise TracingError(f"RemoteModel reaches a deployment through a distributed.Client or a gateway "
                                   f"URL, not {type(target).__name__}")
            cls = chosen
        return super().__new__(cls)

    def __init__(self, description: dict[str, Any], name: str) -> None:
        """The module tree and tokenizer of ``description`` (what shard 0 tells of its model, see
        :func:`nnsight_dask.worker.tasks.describe`), traced as deployment ``name``."""
        super().__init__(meta_model(description["config"]), tokenizer=tokenizer_from(description["tokenizer"]),
                         model_id=name)

    def trace(self, *inputs: Any, remote: Any = True, **kwargs: Any) -> Tracer:
        return super().trace(*inputs, remote=remote, **kwargs)

    def generate(self, *inputs: Any, remote: Any = True, **kwargs: Any) -> Tracer:
        return super().generate(*inputs, remote=remote, **kwargs)

    def session(self, *, remote: Any = True, blocking: bool = True, **options: Any) -> Session:
        return super().session(remote=remote, blocking=blocking, **options)

    def _scanner(self) -> Backend:
        """Where scans of this deployment run: in this process, on fake tensors over the meta-device
        module tree (each transport's backend is given one when the model builds it)."""
        return LocalBackend(self._module, self._pad_token_id())

    def _local_backend(self) -> Backend:
        raise TracingError(f"{self._model_id!r} is a remote deployment: its weights are on the cluster. "
                           "Run traces with remote=True (the default for RemoteModel).")


def meta_model(config: dict[str, Any]) -> torch.nn.Module:
    """The model of a Hugging Face config (``model_type`` and its settings) on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(config)
    model_type = settings.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **settings)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config).eval()


def tokenizer_from(description: dict[str, Any] | None) -> Any:
    """The fast tokenizer of a deployment's description (its JSON, padding side and special tokens);
    ``None`` for a model served without one."""
    if description is None:
        return None
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(description["json"]),
                                   padding_side=description["padding_side"], **description["special"])
