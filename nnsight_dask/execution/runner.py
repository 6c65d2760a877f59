"""Run a whole intervention graph on a local torch module: batch the invokes, hook, run, collect.

This is the local backend's engine and the reference every remote result is checked against.
"""
from __future__ import annotations

import functools
import inspect
import re
import weakref
from contextlib import ExitStack
from typing import Any

import torch

from ..backends.base import RunResult
from ..errors import InterventionError, ModuleNotFoundInModelError
from ..graph.graph import InterventionGraph, Pass
from ..graph.node import Kind, Node, display_path
from .batching import (
    batch_module_inputs,
    batch_token_inputs,
    forward_position_ids,
    resolve_inputs,
)
from .interleaver import SKIPPED, Interleaver, Key, StopForward
from .sampling import SAMPLING_OPTIONS, SeededSampler


def run_graph(model: torch.nn.Module, graph: InterventionGraph, *, pad_token_id: int | None = None,
              fake: bool = False) -> RunResult:
    """Run every pass of ``graph`` on ``model``; ``fake=True`` runs on fake tensors (shapes only)."""
    modules = _modules(model, graph)
    values: dict[Key, Any] = {}
    logs: list[str] = []
    with ExitStack() as stack:
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(torch.enable_grad() if graph.needs_grad else torch.no_grad())
        for index, run in enumerate(graph.passes):
            _run_pass(model, graph, index, run, modules, values, logs, pad_token_id, fake)
    return RunResult(saves=collect_saves(graph, values), logs=logs)


def _generator(model: torch.nn.Module, needs_grad: bool) -> Any:
    """``model.generate``; for a graph that reads gradients, the same function without the
    ``torch.no_grad()`` transformers decorates it with, so a backward can reach earlier steps
    through the KV cache (the pass runs under ``torch.enable_grad()``)."""
    if not needs_grad:
        return model.generate  # type: ignore[operator]
    import inspect

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
    inter = Interleaver(graph, index, layout, values, steps, modules, logs)
    handles = []
    step_counter = [0]
    try:
        for path in inter.module_paths():
            handles.extend(inter.watch_module(modules[path], path))
        handles.append(model.register_forward_pre_hook(lambda *_: step_counter.__setitem__(0, step_counter[0] + 1)))
        output: Any = None
        try:
            inter.drain()
            if generate:
                output = _generator(model, graph.needs_grad)(*args, **kwargs,
                                                             **generate_options(run.kwargs, pad_token_id))
            else:
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
    _check_reached(inter, step_counter[0])


def _check_reached(inter: Interleaver, steps_run: int) -> None:
    missing = inter.unreached(steps_run)
    effects = [n for n in missing if n.kind in (Kind.SAVE, Kind.SETTER, Kind.GRAD_SETTER, Kind.BACKWARD, Kind.LOG, Kind.SKIP)]
    if not effects:
        return
    first = effects[0]
    cause = _root_cause(inter, first, missing)
    if cause is not None and cause.kind in (Kind.GRAD, Kind.GRAD_SETTER):
        why = f"{cause.describe()} (.grad) was never computed: call .backward() on a loss inside the trace"
    elif cause is not None and cause.module is not None:
        state = inter.states.get(cause.module)
        ran = state.calls if state is not None else 0
        why = (f"{display_path(cause.module)}.{cause.access} at call {cause.call} was never reached: the "
               f"module ran {ran} time(s) in this pass")
    else:
        why = "its inputs were never computed"
    raise InterventionError(f"{first.location or '<graph>'}: {first.describe()} never ran: {why}",
                            location=first.location, module=first.module, node=first.id)


def _root_cause(inter: Interleaver, node: Node, missing: list[Node]) -> Node | None:
    missing_ids = {n.id for n in missing}
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current.kind in (Kind.GETTER, Kind.GRAD, Kind.GRAD_SETTER, Kind.SETTER, Kind.SKIP) and current is not node:
            return current
        for dep in current.deps():
            if dep in missing_ids and dep not in seen:
                seen.add(dep)
                stack.append(inter.graph.nodes[dep])
    return node if node.module is not None else None


def collect_saves(graph: InterventionGraph, values: dict[Key, Any]) -> dict[str, Any]:
    """Saved values by name; a save inside an iteration block gives a list, one value a step."""
    saves: dict[str, Any] = {}
    for node in graph.nodes:
        if node.kind != Kind.SAVE:
            continue
        if node.iteration is None:
            value = values.get(node.id, SKIPPED)
            saves[node.target] = None if value is SKIPPED else value  # type: ignore[index]
        else:
            steps = sorted(k[1] for k in values if isinstance(k, tuple) and k[0] == node.id)
            saves[node.target] = [values[(node.id, s)] for s in steps  # type: ignore[index]
                                  if values[(node.id, s)] is not SKIPPED]
    return saves


def persisted_name(target: str, key: Key) -> str:
    """The array name of a saved value in its experiment's group (``h``, ``hs[3]``, ``logits.2`` a step)."""
    name = re.sub(r"[^A-Za-z0-9_.\-\[\]]", "_", target)
    if not name or not name[0].isalnum():
        name = "v" + name
    return f"{name}.{key[1]}" if isinstance(key, tuple) else name


_MODULE_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.nn.Module]] = weakref.WeakKeyDictionary()


def _modules(model: torch.nn.Module, graph: InterventionGraph, paths: set[str] | None = None) -> dict[str, torch.nn.Module]:
    """The graph's modules by path (``paths``: only those), with a clear error for unknown ones."""
    cache = _MODULE_CACHE.setdefault(model, {})
    for path in graph.module_paths() if paths is None else paths:
        if path not in cache:
            try:
                cache[path] = model.get_submodule(path)
            except AttributeError:
                node = next(n for n in graph.nodes if n.module == path)
                raise ModuleNotFoundInModelError(
                    f"{node.location or '<graph>'}: the model has no module {display_path(path)!r}",
                    module=path, location=node.location) from None
    return cache


_ACCEPTS: dict[tuple[type, str], bool] = {}


def _accepts(model: torch.nn.Module, name: str) -> bool:
    key = (type(model), name)
    if key not in _ACCEPTS:
        try:
            _ACCEPTS[key] = name in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            _ACCEPTS[key] = False
    return _ACCEPTS[key]
