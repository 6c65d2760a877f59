"""The fixed part of one pass of a graph: which node instances run, what each waits for, which
module call or gradient each event-bound node belongs to.

A :class:`PassPlan` depends only on the graph, the pass, the number of steps and the nodes a shard
owns, never on values, so it is built once and read by every stage of the pass: the
:class:`~.schedule.Schedule` counts down from it, the module hooks look events up in it.

Keys: a node outside an iteration block has one instance, keyed by its id; inside one it has one
instance per generation step, keyed ``(node id, step)``. Program order is node id, then step.
"""
from __future__ import annotations

import bisect
import weakref
from collections.abc import Collection
from typing import Any

from ..errors import NNsightDaskError
from ..graph.graph import InterventionGraph
from ..graph.node import Kind, Node

Key = Any  # int for plain nodes, (node id, step) for nodes of an iteration block

#: An event of a module call: ``(module path, "in" or "out", call index within the pass)``.
Event = tuple[str, str, int]


def node_id(key: Key) -> int:
    """The node an instance key belongs to."""
    return key[0] if isinstance(key, tuple) else key


def order(key: Key) -> tuple[int, int]:
    """Program order: node id first, then generation step."""
    return key if isinstance(key, tuple) else (key, -1)


def dep_key(dep: Node, step: int | None) -> Key:
    """The instance of ``dep`` that a node at ``step`` (None: outside any block) reads."""
    if dep.iteration is None:
        return dep.id
    if step is None:
        raise NNsightDaskError(
            f"a value from an iteration block ({dep.describe()}) is used outside the block without "
            "being iterated; save it inside the block instead")
    return (dep.id, step)


#: Per live graph (by id; an entry leaves with its graph): its node count then, and its nodes' deps.
_DEPS: dict[int, tuple[weakref.ref[InterventionGraph], int, list[list[int]]]] = {}


def dependencies(graph: InterventionGraph) -> list[list[int]]:
    """``result[i]`` is ``graph.nodes[i].deps()``, walked once per graph (partitioning, the shard's
    exports and every pass's plan read them; a session that adds nodes gets them walked again)."""
    key = id(graph)
    cached = _DEPS.get(key)
    if cached is not None and cached[0]() is graph and cached[1] == len(graph.nodes):
        return cached[2]
    deps = [node.deps() for node in graph.nodes]
    _DEPS[key] = (weakref.ref(graph, lambda _ref: _DEPS.pop(key, None)), len(graph.nodes), deps)
    return deps


class PassPlan:
    """Instances of one pass's nodes (of the ``owned`` ones, on a shard) and their wiring.

    * ``deps[key]``: the instance keys it reads; ``dependents`` the reverse;
    * ``free``: instances run by the schedule when their arguments exist (the rest wait for an event);
    * ``events``: per module call event, the instances bound to it, skips apart in ``skips``;
    * ``grad_events``: per tensor instance, the gradient nodes hooked on it, and ``grad_backward``
      the backward each of those belongs to (the first after it in program order; None: none);
    * ``result_keys``, ``stop_key``, ``stop_id``: the pass's result and ``stop()``.
    """

    def __init__(self, graph: InterventionGraph, pass_index: int, steps: int,
                 owned: Collection[int] | None = None) -> None:
        self.graph = graph
        self.pass_index = pass_index
        self.instances: list[Key] = []
        self.deps: dict[Key, list[Key]] = {}
        self.dependents: dict[Key, list[Key]] = {}
        self.free: set[Key] = set()
        self.events: dict[Event, list[Key]] = {}
        self.skips: dict[tuple[str, int], list[Key]] = {}
        self.grad_events: dict[Key, list[Key]] = {}
        self.grad_backward: dict[Key, Key | None] = {}
        self.result_keys: list[Key] = []
        self.stop_key: Key | None = None
        self.skip_paths: set[str] = set()
        self._build(steps, owned)
        #: Modules whose calls carry events of this pass: the only ones worth a hook.
        self.module_paths = frozenset({path for (path, _phase, _call) in self.events}
                                      | {path for (path, _call) in self.skips})
        stops = [n.id for n in graph.nodes if n.kind == Kind.STOP and n.pass_index == pass_index]
        self.stop_id: int | None = stops[0] if stops else None

    def _build(self, steps: int, owned: Collection[int] | None) -> None:
        graph, pass_index = self.graph, self.pass_index
        nodes = graph.nodes
        all_deps = dependencies(graph)
        ranges = {it.id: it.steps(steps) for it in graph.iterations if it.pass_index == pass_index}
        backwards = [n.id for n in nodes if n.kind == Kind.BACKWARD and n.pass_index == pass_index]
        for node in nodes:
            if node.pass_index != pass_index or (owned is not None and node.id not in owned):
                continue
            kind = node.kind
            for step in ((None,) if node.iteration is None else ranges.get(node.iteration, ())):
                key = node.id if step is None else (node.id, step)
                call = node.call + (step or 0)
                self.instances.append(key)
                deps = [dep_key(nodes[dep], step) for dep in all_deps[node.id]]
                self.deps[key] = deps
                for dep in deps:
                    self.dependents.setdefault(dep, []).append(key)
                if kind == Kind.SKIP:
                    self.skip_paths.add(node.module)  # type: ignore[arg-type]
                    self.skips.setdefault((node.module, call), []).append(key)  # type: ignore[arg-type]
                elif kind in (Kind.GETTER, Kind.SETTER):
                    phase = "out" if node.access == "output" else "in"
                    self.events.setdefault((node.module, phase, call), []).append(key)  # type: ignore[arg-type]
                elif kind in (Kind.GRAD, Kind.GRAD_SETTER):
                    self.grad_events.setdefault(dep_key(nodes[node.args[0].id], step), []).append(key)
                    self.grad_backward[key] = _next_backward(nodes, backwards, node.id, step)
                elif kind == Kind.RESULT:
                    self.result_keys.append(key)
                elif kind == Kind.STOP:
                    self.stop_key = key
                else:
                    self.free.add(key)
        for keys in (*self.events.values(), *self.skips.values(), *self.grad_events.values()):
            keys.sort(key=order)


def _next_backward(nodes: list[Node], backwards: list[int], of: int, step: int | None) -> Key | None:
    """The key of the first backward node after node ``of`` (program order), None if there is none."""
    index = bisect.bisect_right(backwards, of)
    if index == len(backwards):
        return None
    backward = nodes[backwards[index]]
    if backward.iteration is None:
        return backward.id
    return None if step is None else (backward.id, step)
