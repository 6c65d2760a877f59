"""ShardActor: one shard of a deployed model, alive in a Dask actor on one worker.

The actor reads only its shard's weights (see :mod:`..models.shard_loading`), registers itself in
the worker's process registry, and answers the calls of a deployment's life (describe, status,
close, retire). Experiments reach its :class:`~.shard_server.ShardServer` by the direct
route (:mod:`.routing`), in-process.

Stopping never waits for a running stage: :meth:`~ShardActor.close`, :meth:`~ShardActor.retire` and
cancelling (:func:`.plugin.cancel_experiments`, for every shard of the worker) are called from the
worker's event loop (the handlers of :mod:`.plugin`) while a stage may be running; the running
stage sees the stop before its next decoder layer.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

import torch
from distributed import get_worker

from .. import config as settings
from ..execution.shard_runner import ShardRunner
from ..graph.policy import Policy
from ..models import (
    ShardSpec,
    load_causal_lm,
    load_smollm2,
    owner_of,
    prepare_tokenizer,
)
from ..models.loading import check_shard_load_options
from ..models.shard_loading import load_shard
from ..tensors import nbytes
from . import registry, telemetry
from .serialization import register as register_serializers
from .shard_server import ShardServer

ModelSource = Any  # a path or hub id, "smollm2", or a callable returning (model, tokenizer)

#: Shards of one worker process load one at a time: transformers resolves its lazy top-level names
#: without a lock (two threads importing ``LlamaConfig`` at once can fail), and one load at a time
#: also bounds the worker's peak memory.
_LOADING = threading.Lock()

#: A copy retired by rebalancing closes at the latest this long after, idle or not.
RETIRE_GRACE_SECONDS = 120.0


def load_source(source: ModelSource, dtype: torch.dtype | None = None, gguf_file: str | None = None,
                **options: Any) -> tuple[Any, Any]:
    """Build the whole ``(model, tokenizer)`` from a deployment's model source, on the worker
    (``options``: checked ``from_pretrained`` options; a callable source takes none).

    :func:`~nnsight_dask.models.shard_loading.load_shard` falls back to this when it cannot read a
    shard's weights alone (callables, GGUF files, hub ids).
    """
    if callable(source):
        return source()
    if source == "smollm2":
        return load_smollm2(dtype or torch.float32, **options)
    return load_causal_lm(str(source), gguf_file=gguf_file, dtype=dtype, **options)


def describe_model(model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    """What a client needs to trace without weights: config, module paths, the tokenizer (prepared
    here, on the worker, so every client pads the way the deployment does)."""
    config = getattr(model, "config", None)
    description: dict[str, Any] = {
        "config": _config_dict(config) if config is not None else None,
        "module_paths": [name for name, _ in model.named_modules()],
        "tokenizer": None,
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        prepare_tokenizer(tokenizer)
        description["tokenizer"] = {
            "padding_side": tokenizer.padding_side,
            "json": backend.to_str(),
            "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
        }
    return description


def _config_dict(config: Any) -> dict[str, Any]:
    """The model's config as a dict, with the attention implementation it was loaded with (``to_dict``
    leaves it out), so a client's weightless copy returns what the shards' modules return."""
    settings = config.to_dict()
    attention = getattr(config, "_attn_implementation", None)
    if isinstance(attention, str):
        settings["attn_implementation"] = attention
    return settings


def shard_runner(model: torch.nn.Module, plan: list[ShardSpec], index: int, pad_token_id: int) -> ShardRunner:
    """The runner of shard ``index`` of ``plan`` over ``model`` (already cut to that shard)."""
    spec = plan[index]
    layers = model.get_submodule(spec.layers_path)
    return ShardRunner(model, index, len(plan), lambda path: owner_of(plan, path),
                       layers[spec.layer_start], layers[spec.layer_stop - 1], pad_token_id)


class ShardActor:
    """Holds shard ``index`` of ``n_shards`` of a model for deployment ``deployment``: loads it, answers
    the actor calls of a deployment's life, and serves experiments through :attr:`server`."""

    def __init__(self, deployment: str, index: int, n_shards: int, source: ModelSource,
                 dtype: torch.dtype | None = None, device: str | None = None, gguf_file: str | None = None,
                 policy: dict[str, Any] | None = None, load_options: dict[str, Any] | None = None) -> None:
        register_serializers()  # also done by ShardWorkerPlugin; here for actors made without serve()
        torch.set_num_threads(int(os.environ.get("NNSIGHT_DASK_TORCH_THREADS", "1")))
        started = time.perf_counter()
        # the load options this worker takes, with its own settings (not the client's)
        options = check_shard_load_options(load_options, trust_remote_code=bool(settings.trust_remote_code))
        # Only this shard's weights are read when the source is a safetensors checkpoint; otherwise
        # the whole model is loaded (load_source) and cut.
        with _LOADING:
            shard = load_shard(source, n_shards, index, full_loader=functools.partial(load_source, **options),
                               dtype=dtype, gguf_file=gguf_file, describe=describe_model if index == 0 else None,
                               options=options)
        model, tokenizer, plan, self.description = shard.model, shard.tokenizer, shard.plan, shard.description
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(model, "config", None), "eos_token_id", None) or 0
        self.plan = plan
        self.deployment = deployment
        self.index = index
        config = getattr(model, "config", None)
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        vocab = getattr(config, "vocab_size", None)
        worker = _this_worker()
        # co-tenant batching and the limits: the worker's settings decide, whatever clients ask
        self.server = ShardServer(
            shard_runner(model, plan, index, int(pad)), deployment, index, Policy.from_dict(policy),
            context_length=int(context) if isinstance(context, int) else None,
            vocab_size=int(vocab) if isinstance(vocab, int) else None,
            # the worker's memory limit (stages run outside a task, where get_worker() knows none)
            memory_limit=getattr(getattr(worker, "memory_manager", None), "memory_limit", None),
            announcer=telemetry.RunningAnnouncer(worker, deployment, index),
            batching=bool(settings.cotenant_batching), max_batch=int(settings.cotenant_max_batch),
            max_batch_tokens=int(settings.cotenant_max_tokens), gather_s=float(settings.cotenant_gather_ms) / 1000,
            on_retired=lambda: registry.unregister(deployment, index, self))
        self.load_seconds = time.perf_counter() - started
        self.weight_bytes = nbytes(list({id(p): p for p in model.parameters()}.values()))
        registry.register(deployment, index, self)

    # -- actor methods (called through the Dask actor handle) -------------------------------------
    def describe(self) -> dict[str, Any] | None:
        return self.description

    def shard_plan(self) -> list[Any]:
        return list(self.plan)

    def status(self) -> dict[str, Any]:
        spec, server = self.plan[self.index], self.server
        return {
            "deployment": self.deployment, "shard": self.index,
            "layers": [spec.layer_start, spec.layer_stop],
            "in_flight": len(server.experiments), "busy_seconds": server.busy_seconds,
            "stages_run": server.stages_run, "weight_bytes": self.weight_bytes,
            "batch_sizes": dict(server.batch_sizes), "queued": len(server.queue),
            "load_seconds": self.load_seconds, "pid": os.getpid(),
        }

    def close(self, reason: str | None = None) -> None:
        """Leave the registry and free every experiment's state, without waiting for a running stage.

        With ``reason`` (undeploy), the running stage stops before its next decoder layer and every
        later stage sent here is refused, both with :class:`~.registry.ShardClosedError` (``reason``).
        """
        self.server.close(reason)
        registry.unregister(self.deployment, self.index, self, reason=reason or "")

    def retire(self) -> None:
        """This copy was replaced by one on another worker (rebalancing): the experiments it holds
        finish here, a new one is refused (its client resubmits to the new copy), and the copy
        leaves the registry once idle (at the latest after ``RETIRE_GRACE_SECONDS``)."""
        if self.server.retire():
            registry.unregister(self.deployment, self.index, self)
            return
        timer = threading.Timer(RETIRE_GRACE_SECONDS, self.close)
        timer.daemon = True
        timer.start()


def _this_worker() -> Any:
    """The Dask worker this shard lives in (``None`` outside one: unit tests build shards directly)."""
    try:
        return get_worker()
    except ValueError:
        return None
