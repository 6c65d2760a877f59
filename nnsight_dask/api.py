"""The one place that wires tracing to models and backends: ``nd.NNsight``, ``nd.LanguageModel``, ``nd.smollm2``.

Tracing records graphs and knows no engine; models load weights and know no tracing; the local
backend runs graphs and knows no storage. Here a wrapper gets a loaded model, a prepared tokenizer
and a local backend whose large saves (``store=``) go through a Zarr sink. Importing this module
imports neither Dask nor Zarr: both load on first use.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from .backends.base import Backend, SaveSink
from .backends.local import LocalBackend
from .graph.graph import InterventionGraph, set_task_runner
from .models import load_causal_lm, load_smollm2, prepare_tokenizer
from .models.loading import LoadOptionError
from .tracing import inject
from .tracing import model as traced


class NNsight(traced.ModuleWrapper):
    """Wrap any ``torch.nn.Module``: see :class:`nnsight_dask.tracing.ModuleWrapper`. Runs locally."""

    def _make_local_backend(self) -> Backend:
        return local_backend(self._module, self._pad_token_id())


class LanguageModel(traced.LanguageModelWrapper):
    """A causal language model plus its tokenizer; see :class:`nnsight_dask.tracing.LanguageModelWrapper`.

    Parameters
    ----------
    model:
        An HF directory or hub id (loaded with ``AutoModelForCausalLM``), or an already built model.
    tokenizer:
        The tokenizer (loaded with the model when ``model`` is a path). It is made to pad on the
        left, with the end-of-sequence token as pad token if it has none.
    gguf_file:
        Load weights from this GGUF file inside the directory ``model``.
    load_options:
        Other keywords go to transformers' ``from_pretrained`` when ``model`` is a path:
        ``attn_implementation="eager"`` (attention modules then return their weights, read as
        ``self_attn.output[1]``), ``revision=``, ``low_cpu_mem_usage=``, ``trust_remote_code=``...

    Examples
    --------
    >>> lm = nd.LanguageModel(model, tokenizer=tok)                     # doctest: +SKIP
    >>> with lm.trace("The Eiffel Tower is in the city of"):            # doctest: +SKIP
    ...     hidden = lm.model.layers[5].output.save()
    """

    def __init__(self, model: torch.nn.Module | str | os.PathLike[str], tokenizer: Any = None, *,
                 gguf_file: str | None = None, dtype: torch.dtype | None = None, device: Any = None,
                 model_id: str | None = None, **load_options: Any) -> None:
        if isinstance(model, (str, os.PathLike)):
            module, loaded_tokenizer = load_causal_lm(str(model), gguf_file=gguf_file, dtype=dtype, device=device,
                                                      **load_options)
            tokenizer = tokenizer or loaded_tokenizer
            model_id = model_id or str(model)
        else:
            if load_options:
                raise LoadOptionError(f"load options {sorted(load_options)} apply when nd.LanguageModel loads a "
                                      f"model from a path; this {type(model).__name__} is already built",
                                      option=sorted(load_options)[0])
            module = model
            if dtype is not None or device is not None:
                module = module.to(dtype=dtype, device=device)
        if tokenizer is not None:
            prepare_tokenizer(tokenizer)
        super().__init__(module, tokenizer=tokenizer, model_id=model_id)

    def _make_local_backend(self) -> Backend:
        return local_backend(self._module, self._pad_token_id())


def smollm2(dtype: torch.dtype | None = None, **load_options: Any) -> LanguageModel:
    """SmolLM2-135M-Instruct as a ready :class:`LanguageModel` (converted once, then cached).

    ``load_options`` go to ``from_pretrained``: ``nd.smollm2(attn_implementation="eager")`` reads
    attention weights (``lm.model.layers[i].self_attn.output[1]``).

    >>> lm = nd.smollm2()                                         # doctest: +SKIP
    >>> with lm.generate("The capital of France is", max_new_tokens=2) as t:   # doctest: +SKIP
    ...     ids = t.result.save()
    """
    model, tokenizer = load_smollm2(dtype or torch.float32, **load_options)
    return LanguageModel(model, tokenizer=tokenizer, model_id="SmolLM2-135M-Instruct")


def local_backend(module: torch.nn.Module, pad_token_id: int | None) -> LocalBackend:
    """A backend running on ``module`` in this process, persisting ``store=`` saves to Zarr."""
    return LocalBackend(module, pad_token_id, sink_for=zarr_sink, open_saves=open_saves)


def zarr_sink(options: Mapping[str, Any]) -> SaveSink | None:
    """The Zarr sink an experiment's options ask for, under a new experiment name (None without
    ``store=``: then no name is drawn, which costs a system call)."""
    if not options.get("store"):
        return None
    from .storage.results import ZarrSink  # zarr loads only for runs that persist

    return ZarrSink.from_options(options, uuid.uuid4().hex[:12])


def open_saves(saves: Any) -> Any:
    """Persisted saves as lazy tensors."""
    from .storage.results import open_refs

    return open_refs(saves)


def run_graph_task(graph: InterventionGraph) -> Any:
    """What ``client.submit(graph)`` runs on a worker (see :func:`nnsight_dask.client.submit.run_graph_task`)."""
    from .client.submit import (
        run_graph_task as run,  # distributed loads only on a cluster
    )

    return run(graph)


def frame_injection_setting() -> bool:
    """``nnsight-dask.frame-injection``: saved proxies in a trace's caller's locals become their values."""
    from . import config

    return bool(config.get("frame_injection"))


set_task_runner(run_graph_task)
inject.set_setting_reader(frame_injection_setting)
