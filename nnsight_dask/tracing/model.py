"""Model wrappers: :class:`ModuleWrapper` for any ``torch.nn.Module``, :class:`LanguageModelWrapper` for causal LMs.

They record and hand the graph to a :class:`~nnsight_dask.backends.base.Backend`, and know no backend
of their own: the classes users hold add one. ``nd.NNsight`` and ``nd.LanguageModel``
(:mod:`nnsight_dask.api`) run locally (and load models from a path); ``nd.RemoteModel``
(:mod:`nnsight_dask.client`) runs on a deployment. Tracers and envoys reach a wrapper only through
the :class:`~.traceable.Traceable` protocol.
"""
from __future__ import annotations

import secrets
import threading
from typing import Any

import torch

from ..backends.base import Backend
from ..errors import TracingError
from ..graph.graph import InterventionGraph
from ..graph.node import Kind, Node
from ..graph.options import ExperimentOptions
from .envoy import Envoy
from .proxy import Proxy
from .recorder import Recorder, active_recorders
from .tokenizing import direct_ids
from .tracer import Session, Tracer
from .unroll import remap


class ModuleWrapper:
    """Wrap any module so its internals can be read and rewritten inside ``with model.trace(...)``.

    Inputs given to ``trace``/``invoke`` are the module's positional and keyword arguments;
    several invokes are concatenated along the first (batch) dimension.

    Examples
    --------
    >>> import torch, nnsight_dask as nd
    >>> net = nd.NNsight(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    >>> with net.trace(torch.ones(2, 4)):
    ...     hidden = net[0].output.save()
    >>> hidden.shape
    torch.Size([2, 3])
    """

    def __init__(self, module: torch.nn.Module, *, model_id: str | None = None,
                 backend: Backend | None = None) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_envoy", Envoy(module, "", self))
        object.__setattr__(self, "_threads", threading.local())
        object.__setattr__(self, "_edits", None)
        object.__setattr__(self, "_model_id", model_id or _default_id(module))
        object.__setattr__(self, "_backend", backend)

    # -- entry points ----------------------------------------------------------------------------
    def trace(self, *inputs: Any, trace: bool = True, remote: Any = None, execute: bool = True,
              validate: bool = False, scan: bool = False, blocking: bool = True, store: Any = None,
              persist_threshold: int | None = None, storage_options: dict[str, Any] | None = None,
              verbose: bool | None = None, positions: str | None = None, batching: bool | None = None,
              **kwargs: Any) -> Any:
        """Record interventions on one forward pass over ``inputs`` (run when the block exits).

        Several prompts are left-padded and run as the model's own batched forward (nnsight's rule:
        what ``model(**tokenizer(prompts, padding=True))`` gives). On a model with absolute position
        embeddings (GPT-2) a padded prompt then differs from its solo run; ``positions="solo"`` passes
        position ids from the attention mask, so each prompt computes what it would alone.

        ``scan=True`` (or ``validate=True``) first runs the graph on fake tensors, so shape errors
        surface with their original type and the user's line before the model runs for real;
        under ``scan=True`` ``x.shape`` is also concrete while recording.

        ``trace=False`` runs the model at once on ``inputs`` and returns its output (no ``with`` block).

        ``verbose`` shows a remote experiment's progress (default ``config.verbose``).

        ``batching=False`` keeps a remote experiment out of co-tenant batches on the shards: it runs
        alone, bit-exact with a solo run (batched, values differ by float rounding: up to 4e-7 relative on
        the tests' tiny models, 2e-5 on SmolLM2-135M).

        ``store=`` (an fsspec URL or local path) persists saved tensors above ``persist_threshold``
        bytes (default ``config.persist_threshold``) to Zarr; they come back as lazy tensors.
        """
        options = ExperimentOptions.from_keywords(store=store, persist_threshold=persist_threshold,
                                                  storage_options=storage_options, positions=positions,
                                                  batching=batching)
        tracer = Tracer(self, inputs, kind="trace", remote=remote, execute=execute, validate=validate,
                        scan=scan, blocking=blocking, encode_kwargs=kwargs, options=options,
                        backend_options=_verbosity(verbose))
        if trace:
            return tracer
        return tracer.run_now()

    def scan(self, *inputs: Any, **kwargs: Any) -> Tracer:
        """Like ``trace`` but on fake tensors only: shapes are computed (and concrete while recording),
        errors surface, the model never runs; saves come back as fake tensors."""
        tracer = self.trace(*inputs, **kwargs)
        tracer.fake = tracer.scan = True
        return tracer

    def session(self, *, remote: Any = None, blocking: bool = True, store: Any = None,
                persist_threshold: int | None = None, storage_options: dict[str, Any] | None = None) -> Session:
        """Group several traces into one graph whose values flow between traces."""
        return Session(self, remote=remote, blocking=blocking, options=ExperimentOptions.from_keywords(
            store=store, persist_threshold=persist_threshold, storage_options=storage_options))

    def edit(self, *inputs: Any, inplace: bool = False, **kwargs: Any) -> _EditContext:
        """Record interventions applied to every later trace (of a copy, or of this model if inplace).

        ``with lm.edit() as edited:`` gives a copy sharing this model's module tree: ``lm.*`` and
        ``edited.*`` name the same modules, inside the edit and in ``edited.trace(...)`` alike.
        With ``inputs`` (and tokenizer ``kwargs``) the edit is recorded as ``lm.scan(inputs)`` records:
        shapes are concrete inside the block, and the edit (on top of earlier ones) is checked on fake
        tensors when the block ends, so its errors surface there with their type and the user's line.
        """
        return _EditContext(self, inplace, inputs, kwargs)

    # -- the module tree ----------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        return getattr(self._envoy, name)

    def __getitem__(self, key: Any) -> Any:
        return self._envoy[key]

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._envoy, name, value)

    def __repr__(self) -> str:
        return repr(self._module)

    @property
    def model_id(self) -> str:
        """The model's name: its hub id or directory, a deployment's name, or the module's class."""
        return self._model_id

    @property
    def output(self) -> Proxy:
        return self._envoy.output

    @property
    def input(self) -> Proxy:
        return self._envoy.input

    @property
    def inputs(self) -> Proxy:
        return self._envoy.inputs

    # -- what tracers and envoys use (the Traceable protocol) -------------------------------------------
    def active_recorder(self) -> Recorder | None:
        recorders = getattr(self._threads, "recorders", None)  # (every envoy access asks: no property call)
        return recorders[-1] if recorders else None

    def open_recording(self, recorder: Recorder) -> None:
        self._recorders.append(recorder)
        active_recorders().append(recorder)

    def close_recording(self, recorder: Recorder) -> None:
        if self._recorders and self._recorders[-1] is recorder:
            self._recorders.pop()
        stack = active_recorders()
        if stack and stack[-1] is recorder:
            stack.pop()

    def current_session(self) -> Session | None:
        return getattr(self._threads, "session", None)

    def set_current_session(self, session: Session | None) -> None:
        self._threads.session = session

    def encode_invoke(self, inputs: tuple[Any, ...], **kwargs: Any) -> dict[str, Any]:
        return {"args": list(inputs), "kwargs": kwargs}

    def apply_edits(self, recorder: Recorder) -> None:
        if self._edits is not None:
            copy_nodes(self._edits, recorder.graph, recorder.pass_index)

    def backend_for(self, remote: Any) -> Backend:
        return self._remote_backend(remote) if remote else self._local_backend()

    # -- what subclasses provide ---------------------------------------------------------------------
    @property
    def _recorders(self) -> list[Recorder]:
        """Recording contexts open on this model in this thread (threads trace independently)."""
        threads = self._threads
        if not hasattr(threads, "recorders"):
            threads.recorders = []
        return threads.recorders

    def _local_backend(self) -> Backend:
        if self._backend is None:
            object.__setattr__(self, "_backend", self._make_local_backend())
        return self._backend  # type: ignore[return-value]

    def _make_local_backend(self) -> Backend:
        """The backend of local runs, made on first use (once the tokenizer's pad token is known)."""
        raise TracingError(f"{type(self).__name__} has no local backend; wrap the model with nd.NNsight or "
                           "nd.LanguageModel, or pass backend=")

    def _pad_token_id(self) -> int | None:
        return None

    def _remote_backend(self, remote: Any) -> Backend:
        raise TracingError(f"{type(self).__name__} runs locally; use nd.RemoteModel for remote=...")


class _Generator:
    """``lm.generator.output``: the generated token ids of a ``generate`` run (of the current invoke's
    rows when read inside an invoke)."""

    def __init__(self, model: ModuleWrapper) -> None:
        self._model = model

    @property
    def output(self) -> Proxy:
        recorder = self._model.active_recorder()
        if recorder is None:
            raise TracingError("lm.generator.output can only be used inside `with lm.generate(...)`")
        return recorder.add(Kind.RESULT)  # inside an invoke: that invoke's rows only, as in nnsight


class LanguageModelWrapper(ModuleWrapper):
    """A causal language model plus its tokenizer; inputs may be text, token ids or encodings.

    Parameters
    ----------
    model:
        The model (``nd.LanguageModel`` also takes an HF directory or hub id, see :mod:`nnsight_dask.api`).
    tokenizer:
        Its tokenizer, already padding on the left with a pad token (``models.prepare_tokenizer``).

    Examples
    --------
    >>> lm = nd.LanguageModel(model, tokenizer=tok)                     # doctest: +SKIP
    >>> with lm.trace("The Eiffel Tower is in the city of"):            # doctest: +SKIP
    ...     hidden = lm.model.layers[5].output.save()
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, model_id: str | None = None,
                 backend: Backend | None = None) -> None:
        super().__init__(model, model_id=model_id, backend=backend)
        object.__setattr__(self, "tokenizer", tokenizer)

    def generate(self, *inputs: Any, max_new_tokens: int = 1, remote: Any = None, blocking: bool = True,
                 scan: bool = False, validate: bool = False, execute: bool = True, store: Any = None,
                 persist_threshold: int | None = None, storage_options: dict[str, Any] | None = None,
                 verbose: bool | None = None, batching: bool | None = None, **kwargs: Any) -> Tracer:
        """Record interventions on a generation; they apply to the first step unless inside ``tracer.iter``.

        ``batching=False``: run alone on shared shards, never in a co-tenant batch (see :meth:`trace`).

        ``do_sample=True`` samples (with ``temperature``, ``top_k``, ``top_p``) from draws seeded by
        ``seed=`` (a random one when not given): the same seed gives the same tokens locally and remotely.
        """
        if kwargs.get("do_sample") and kwargs.get("seed") is None:
            kwargs["seed"] = secrets.randbits(62)  # the draws' seed travels with the graph
        options = ExperimentOptions.from_keywords(store=store, persist_threshold=persist_threshold,
                                                  storage_options=storage_options, batching=batching)
        return Tracer(self, inputs, kind="generate", remote=remote, execute=execute, validate=validate,
                      scan=scan, blocking=blocking, run_kwargs={"max_new_tokens": max_new_tokens, **kwargs},
                      options=options, backend_options=_verbosity(verbose))

    @property
    def generator(self) -> _Generator:
        return _Generator(self)

    @property
    def config(self) -> Any:
        return getattr(self._module, "config", None)

    def _pad_token_id(self) -> int | None:
        tokenizer = self.tokenizer
        if tokenizer is not None and tokenizer.pad_token_id is not None:
            return int(tokenizer.pad_token_id)
        config = self.config
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return 0

    def encode(self, prompt: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """What one invoke's input becomes: ``input_ids`` and ``attention_mask`` (left-padded, ``[rows, length]``).

        Takes what ``trace``/``invoke`` take: a text, a list of texts, token ids (tensor or lists)
        or an encoding; ``kwargs`` go to the tokenizer.
        """
        return encode_prompt(prompt, self.tokenizer, **kwargs)

    def encode_invoke(self, inputs: tuple[Any, ...], **kwargs: Any) -> dict[str, Any]:
        if len(inputs) != 1:
            raise TracingError(f"a language model takes one input per invoke (text, list of texts, token "
                               f"ids or an encoding), got {len(inputs)}")
        return encode_prompt(inputs[0], self.tokenizer, **kwargs)


def encode_prompt(value: Any, tokenizer: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Text, lists of texts, token ids (tensor or lists) or an encoding -> ``input_ids``/``attention_mask``."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        if tokenizer is None:
            raise TracingError("text inputs need a tokenizer: LanguageModel(model, tokenizer=...)")
        direct = direct_ids(tokenizer, value) if isinstance(value, str) and not kwargs else None
        if direct is not None:
            return {"input_ids": torch.tensor([direct[0]], dtype=torch.long),
                    "attention_mask": torch.tensor([direct[1]], dtype=torch.long)}
        # lists from the tokenizer, tensors made here: a third cheaper than its return_tensors="pt" (same values)
        encoded = tokenizer(value if isinstance(value, list) else [value], padding=True, **kwargs)
        return {"input_ids": torch.tensor(encoded["input_ids"], dtype=torch.long),
                "attention_mask": torch.tensor(encoded["attention_mask"], dtype=torch.long)}
    if hasattr(value, "keys") and "input_ids" in value:
        ids = torch.as_tensor(value["input_ids"])
        mask = value.get("attention_mask")
        ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        return {"input_ids": ids.long(), "attention_mask": mask.long()}
    if isinstance(value, torch.Tensor):
        ids = value if value.dim() == 2 else value.unsqueeze(0)
        return {"input_ids": ids.long(), "attention_mask": torch.ones_like(ids, dtype=torch.long)}
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        ids = torch.tensor([value])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        length = max(len(v) for v in value)
        pad = (tokenizer.pad_token_id if tokenizer is not None else 0) or 0
        ids = torch.tensor([[pad] * (length - len(v)) + v for v in value])
        mask = torch.tensor([[0] * (length - len(v)) + [1] * len(v) for v in value])
        return {"input_ids": ids, "attention_mask": mask}
    raise TracingError(f"cannot use {type(value).__name__} as language-model input; pass text, a list of "
                       "texts, token ids (tensor or lists of ints) or a dict with input_ids")


def _verbosity(verbose: bool | None) -> dict[str, Any]:
    return {} if verbose is None else {"verbose": verbose}


def _default_id(module: torch.nn.Module) -> str:
    config = getattr(module, "config", None)
    name = getattr(config, "_name_or_path", None)
    return name or type(module).__name__


class _EditContext:
    """``with model.edit() as edited:`` interventions recorded once, applied to every later trace."""

    def __init__(self, model: ModuleWrapper, inplace: bool, inputs: tuple[Any, ...] = (),
                 encode_kwargs: dict[str, Any] | None = None) -> None:
        self.model = model
        self.inplace = inplace
        self.inputs = inputs
        self.encode_kwargs = encode_kwargs or {}
        self.recorder = Recorder()
        self.target: ModuleWrapper = model
        self._scan: Tracer | None = None
        self._first = 0  # the edit's own nodes start here (a scan first applies the earlier edits)

    def __enter__(self) -> ModuleWrapper:
        self.target = self.model if self.inplace else _copy_wrapper(self.model)
        if self.inputs:
            self._scan = self.target.scan(*self.inputs, **self.encode_kwargs)
            self._scan.__enter__()
            self.recorder = self._scan.recorder
            self._first = len(self.recorder.graph.nodes)
        else:
            self.recorder.new_pass("trace", {})
            self.model.open_recording(self.recorder)  # the copy shares the model's recording stack
        return self.target

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        graph = self.recorder.graph
        refused = None
        if exc_type is None and any(n.kind == Kind.SAVE for n in graph.nodes[self._first:]):
            refused = TracingError("edits cannot .save() values; save them in the traces that use the edit")
            exc_type, exc = TracingError, refused
        if self._scan is not None:
            self._scan.__exit__(exc_type, exc, tb)  # without an error: the fake run, raising what the edit would
        else:
            self.model.close_recording(self.recorder)
        self.recorder.close()
        if refused is not None:
            raise refused
        if exc_type is not None:
            return
        merged = InterventionGraph()
        if self.target._edits is not None:
            copy_nodes(self.target._edits, merged, 0)
        copy_nodes(graph, merged, 0, first=self._first)
        object.__setattr__(self.target, "_edits", merged)


def _copy_wrapper(model: ModuleWrapper) -> ModuleWrapper:
    """A wrapper of the same module with its own edits, sharing the envoy tree and the recording
    stack (so ``lm.layer`` and ``edited.layer`` record into whichever of the two is tracing)."""
    clone = object.__new__(type(model))
    for name, value in model.__dict__.items():
        object.__setattr__(clone, name, value)
    return clone


def copy_nodes(source: InterventionGraph, target: InterventionGraph, pass_index: int, *, first: int = 0) -> None:
    """Append ``source``'s nodes from id ``first`` on to ``target`` in pass ``pass_index``, renumbering
    references (the copied nodes refer only to each other)."""
    offset = len(target.nodes) - first
    mapping = {node.id: node.id + offset for node in source.nodes[first:]}
    for node in source.nodes[first:]:
        target.nodes.append(Node(
            id=node.id + offset, kind=node.kind, target=node.target, args=remap(node.args, mapping),
            kwargs=remap(node.kwargs, mapping), module=node.module, access=node.access, invoke=None,
            call=node.call, pass_index=pass_index, iteration=None, cond=mapping.get(node.cond) if node.cond is not None else None,
            location=node.location))
        if node.id in source.local_functions:
            target.local_functions[node.id + offset] = source.local_functions[node.id]

