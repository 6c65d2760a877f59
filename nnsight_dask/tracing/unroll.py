"""``with session.iter(items) as item:``: a block of whole traces recorded once and run once per item.

A ``with`` block's body runs once, so the traces inside it are recorded once, with ``item`` standing
for the current item: a node reading ``items[k]`` from one constant list node. When the block closes
it is unrolled: its nodes, passes and iteration blocks are copied once per item, every reference
renumbered, and each copy's ``item`` node reads its own index. The graph stays the plain graph any
session makes (no new node kinds; shards see ordinary passes), and its size grows with the number of
items, which therefore must be known while recording (a Python sequence, or a traced list whose
length is known while recording).

As after a Python ``for`` loop, every proxy recorded inside the block stands afterwards for its value
in the last iteration; saves inside the block are kept for the last iteration only. A trace whose
input is ``item`` itself (``with lm.trace(item):``) gets each item's encoded input in its copy.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import TracingError
from ..graph.graph import Iteration, Pass
from ..graph.node import Kind, Node, Ref
from .proxy import Proxy, map_proxies

if TYPE_CHECKING:
    from .recorder import Recorder


@dataclass
class DeferredInput:
    """An invoke's inputs that hold a ``session.iter`` item: encoded once the item is known."""

    inputs: tuple[Any, ...]
    encode_kwargs: dict[str, Any]
    encode: Callable[..., dict[str, Any]]

    def with_item(self, item: Proxy, value: Any) -> DeferredInput:
        inputs = map_proxies(self.inputs, lambda proxy: value if proxy is item else proxy)
        return DeferredInput(inputs, self.encode_kwargs, self.encode)

    @property
    def ready(self) -> bool:
        found: list[Proxy] = []
        map_proxies(self.inputs, found.append)
        return not found


@dataclass
class SessionBlock:
    """Where an open ``session.iter`` block starts in its recorder's graph, and its item."""

    items: list[Any]
    item: Proxy
    first_node: int
    first_pass: int
    first_iteration: int
    items_node: int
    #: every proxy recorded inside the block (renumbered to the last copy when it is unrolled)
    proxies: list[weakref.ref[Proxy]] = field(default_factory=list)


def unroll(recorder: Recorder, block: SessionBlock, deferred: dict[tuple[int, int], DeferredInput]) -> None:
    """Replace the block's recorded nodes, passes and iteration blocks by one copy per item.

    ``deferred`` holds the inputs of invokes waiting for an item, by ``(pass, invoke)``; entries of
    the block's passes are encoded for each item (or stay deferred, renumbered, while they still
    wait for an enclosing block's item).
    """
    graph = recorder.graph
    body = graph.nodes[block.first_node:]
    passes = graph.passes[block.first_pass:]
    iterations = graph.iterations[block.first_iteration:]
    del graph.nodes[block.first_node:], graph.passes[block.first_pass:], graph.iterations[block.first_iteration:]
    session_level = {i for i in recorder.session_level if i >= block.first_node}
    recorder.session_level = [i for i in recorder.session_level if i < block.first_node]
    functions = {i: graph.local_functions.pop(i) for i in list(graph.local_functions) if i >= block.first_node}
    waiting = {key: deferred.pop(key) for key in list(deferred) if key[0] >= block.first_pass}
    ids: dict[int, int] = {}
    for k, value in enumerate(block.items):
        last = k == len(block.items) - 1
        pass_ids = {block.first_pass + j: len(graph.passes) + j for j in range(len(passes))}
        graph.passes.extend(Pass(kind=run.kind, invokes=list(run.invokes), kwargs=dict(run.kwargs)) for run in passes)
        iteration_ids: dict[int, int] = {}
        for it in iterations:
            iteration_ids[it.id] = len(graph.iterations)
            graph.iterations.append(Iteration(id=len(graph.iterations), pass_index=pass_ids[it.pass_index],
                                              start=it.start, stop=it.stop, step=it.step))
        ids = {}
        for node in body:
            if node.kind == Kind.SAVE and not last:
                continue  # nothing refers to a save; only the last iteration's value is handed out
            new_id = ids[node.id] = len(graph.nodes)
            args = (Ref(block.items_node), k) if node.id == block.item._node else remap(node.args, ids)
            graph.nodes.append(Node(
                id=new_id, kind=node.kind, target=node.target, args=args, kwargs=remap(node.kwargs, ids),
                module=node.module, access=node.access, invoke=node.invoke, call=node.call,
                pass_index=pass_ids.get(node.pass_index, node.pass_index),
                iteration=None if node.iteration is None else iteration_ids.get(node.iteration, node.iteration),
                cond=None if node.cond is None else ids.get(node.cond, node.cond), location=node.location))
            if node.id in session_level:
                recorder.session_level.append(new_id)
            if node.id in functions:
                graph.local_functions[new_id] = functions[node.id]
        for (pass_index, invoke), entry in waiting.items():
            entry = entry.with_item(block.item, value)
            new_pass = pass_ids[pass_index]
            if entry.ready:
                graph.passes[new_pass].invokes[invoke] = entry.encode(entry.inputs, **entry.encode_kwargs)
            else:
                deferred[(new_pass, invoke)] = entry
    _renumber_proxies(recorder, block, ids)
    recorder.forget_passes_from(block.first_pass)
    recorder.lengths.forget_from(block.first_node)
    recorder.pass_index = len(graph.passes) - 1


def _renumber_proxies(recorder: Recorder, block: SessionBlock, ids: dict[int, int]) -> None:
    """Point every proxy recorded inside the block at its node in the last copy (as after a ``for``),
    and every saved proxy (an earlier one may be saved inside the block) at its save there."""
    proxies = {id(proxy): proxy for proxy in (ref() for ref in block.proxies) if proxy is not None}
    proxies.update((id(proxy), proxy) for proxy in recorder.saved.values())
    for proxy in proxies.values():
        object.__setattr__(proxy, "_node", ids.get(proxy._node, proxy._node))
        if proxy._save_node is not None:
            object.__setattr__(proxy, "_save_node", ids.get(proxy._save_node, proxy._save_node))
    recorder.saved = {ids.get(node, node): proxy for node, proxy in recorder.saved.items()}


def remap(obj: Any, ids: dict[int, int]) -> Any:
    """``obj`` with each reference to a node in ``ids`` renumbered (others kept)."""
    if isinstance(obj, Ref):
        return Ref(ids.get(obj.id, obj.id))
    if isinstance(obj, tuple):
        return tuple(remap(o, ids) for o in obj)
    if isinstance(obj, list):
        return [remap(o, ids) for o in obj]
    if isinstance(obj, dict):
        return {k: remap(v, ids) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(remap(obj.start, ids), remap(obj.stop, ids), remap(obj.step, ids))
    return obj


class TracedItem:
    """Stands for an item of a traced list in :attr:`SessionBlock.items`: its value exists only at run time."""

    def __repr__(self) -> str:
        return "<item of a traced list>"


def sequence_of(items: Any) -> list[Any]:
    """``session.iter``'s items as a list; its length must be known while recording (a traced list's
    may be, see :mod:`.lengths`: its items are then :class:`TracedItem` placeholders)."""
    if isinstance(items, Proxy):
        length = items._recorder.known_length(items._node) if items._live() else None
        if length is None:
            raise TracingError(
                "session.iter needs a Python sequence (list, tuple, range) or a traced list whose length is "
                "known while recording (nd.list() changed only by unconditional append/insert/pop/remove/"
                "extend/clear calls): the traces inside are recorded once per item, so the number of items "
                "must be known while recording")
        values: list[Any] = [TracedItem() for _ in range(length)]
    else:
        try:
            values = list(items)
        except TypeError:
            raise TracingError(f"session.iter takes a sequence of items, not {type(items).__name__}") from None
    if not values:
        raise TracingError("session.iter got no items: the block inside would never run")
    return values
