"""Run a whole intervention graph on a local torch module: batch the invokes, hook, run, collect.

This is the local backend's engine and the reference every remote result is checked against
(a shard runs its part of a graph with :class:`~.shard_runner.ShardRunner`).
"""
from __future__ import annotations

import functools
import inspect
from contextlib import nullcontext
from typing import Any

import torch

from ..backends.base import RunResult
from ..graph.graph import InterventionGraph, Pass
from .batching import (
    batch_module_inputs,
    batch_token_inputs,
    forward_position_ids,
    resolve_inputs,
)
from .executor import Quiet
from .interleaver import Interleaver, StopForward
from .module_hooks import Seat, graph_modules, hook_modules
from .plan import Key
from .sampling import SAMPLING_OPTIONS, SeededSampler
from .saves import collect_saves


def run_graph(model: torch.nn.Module, graph: InterventionGraph, *, pad_token_id: int | None = None,
              fake: bool = False) -> RunResult:
    """Run every pass of ``graph`` on ``model``; ``fake=True`` runs on fake tensors (shapes only)."""
    modules = graph_modules(model, graph)
    values: dict[Key, Any] = {}
    logs: list[str] = []
    with _fake_tensors() if fake else nullcontext(), torch.set_grad_enabled(graph.needs_grad):
        for index, run in enumerate(graph.passes):
            _run_pass(model, graph, index, run, modules, values, logs, pad_token_id, fake)
        if not graph.passes:
            _run_session_code(graph, values, logs)
    return RunResult(saves=collect_saves(graph, values), logs=logs)


def _fake_tensors() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _run_session_code(graph: InterventionGraph, values: dict[Key, Any], logs: list[str]) -> None:
    """A session without a trace: what it recorded (``nd.list()``, operations on them) runs alone,
    without the model. Its nodes have no pass (index -1), so the interleaver of "pass -1" runs them."""
    inter = Interleaver(graph, -1, [], values, 1, {}, logs, quiet=Quiet())
    inter.drain()
    inter.check_reached(1)


def _generator(model: torch.nn.Module, needs_grad: bool) -> Any:
    """``model.generate``; for a graph that reads gradients, the same function without the
    ``torch.no_grad()`` transformers decorates it with, so a backward can reach earlier steps
    through the KV cache (the pass runs under ``torch.enable_grad()``)."""
    if not needs_grad:
        return model.generate  # type: ignore[operator]
    return functools.partial(inspect.unwrap(type(model).generate), model)


def generate_options(options: dict[str, Any], pad_token_id: int | None) -> dict[str, Any]:
    """What ``model.generate`` gets for a generation's options: greedy decoding, with sampling done
    by a :class:`~.sampling.SeededSampler` logits processor (the draw the shards make too)."""
    out = {k: v for k, v in options.items() if k not in ("do_sample", *SAMPLING_OPTIONS)}
    out.update(do_sample=False, pad_token_id=pad_token_id)
    sampler = SeededSampler.from_options(options)
    if sampler is not None:
        out["logits_processor"] = [sampler]
    return out


def _run_pass(model: torch.nn.Module, graph: InterventionGraph, index: int, run: Pass,
              modules: dict[str, torch.nn.Module], values: dict[Key, Any], logs: list[str],
              pad_token_id: int | None, fake: bool) -> None:
    generate = run.kind == "generate" and not fake
    steps = run.steps if generate else 1
    token_inputs = bool(run.invokes) and "input_ids" in run.invokes[0]
    if token_inputs:
        invokes = resolve_inputs(run.invokes, values, index, vocab_size=getattr(getattr(model, "config", None),
                                                                                  "vocab_size", None))
        batch, layout = batch_token_inputs(invokes, pad_token_id if pad_token_id is not None else 0)
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = dict(batch)
        positions = forward_position_ids(batch, graph.options)  # default None: the model's own rule
        if not generate and positions is not None and _accepts(model, "position_ids"):
            kwargs["position_ids"] = positions
    else:
        args, kwargs, layout = batch_module_inputs(run.invokes or [{}])
    quiet = Quiet()
    inter = Interleaver(graph, index, layout, values, steps, modules, logs, quiet=quiet)
    steps_run = [0]  # forward passes begun: a generation counts them with a hook on the model
    handles = hook_modules([Seat(inter)], quiet)
    try:
        if generate:
            handles.append(model.register_forward_pre_hook(lambda *_: steps_run.__setitem__(0, steps_run[0] + 1)))
        output: Any = None
        try:
            inter.drain()
            if generate:
                output = _generator(model, graph.needs_grad)(*args, **kwargs,
                                                             **generate_options(run.kwargs, pad_token_id))
            else:
                steps_run[0] = 1
                output = model(*args, **kwargs)
        except StopForward:
            output = None
        try:
            inter.finish(output)
        except StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    inter.check_reached(steps_run[0])


_ACCEPTS: dict[tuple[type, str], bool] = {}


def _accepts(model: torch.nn.Module, name: str) -> bool:
    key = (type(model), name)
    if key not in _ACCEPTS:
        try:
            _ACCEPTS[key] = name in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            _ACCEPTS[key] = False
    return _ACCEPTS[key]
