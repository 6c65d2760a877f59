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
import threading
import weakref
from collections.abc import Collection
from typing import Any

from ..errors import NNsightDaskError
from ..graph.graph import InterventionGraph
from ..graph.node import Kind, Node, Ref

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
#: Per graph (by id, checked against a weak reference): its node count then, and its nodes' deps.
#: The last few graphs are kept: an experiment's, while its shard starts and plans it.
_DEPS: dict[int, tuple[weakref.ref[InterventionGraph], int, list[list[int]]]] = {}
_DEPS_KEPT = 64
_DEPS_LOCK = threading.Lock()


def dependencies(graph: InterventionGraph) -> list[list[int]]:
    """``result[i]`` is ``graph.nodes[i].deps()``, walked once per graph (partitioning, the shard's
    exports and every pass's plan read them; a session that adds nodes gets them walked again)."""
    key, count = id(graph), len(graph.nodes)
    cached = _DEPS.get(key)
    if cached is not None and cached[1] == count and cached[0]() is graph:
        return cached[2]
    deps = [_deps(node) for node in graph.nodes]
    with _DEPS_LOCK:
        if len(_DEPS) >= _DEPS_KEPT:
            del _DEPS[next(iter(_DEPS))]
        _DEPS[key] = (weakref.ref(graph), count, deps)
    return deps


def _deps(node: Node) -> list[int]:
    """``node.deps()``, without its walk for the common node whose arguments are references and
    constants only (getters, saves, most operations): the same ids in the same order."""
    found: list[int] = []
    for arg in node.args:
        kind = type(arg)
        if kind is Ref:
            found.append(arg.id)
        elif isinstance(arg, (Ref, tuple, list, dict, slice)):  # a nested or subclassed argument
            return node.deps()
    if node.kwargs or node.cond is not None:
        return node.deps()
    return found


class PassPlan:
    """Instances of one pass's nodes (of the ``owned`` ones, on a shard) and their wiring.

    * ``deps[key]``: the instance keys it reads; ``dependents`` the reverse;
    * ``free``: instances run by the schedule when their arguments exist (the rest wait for an event),
      ``ready`` those that read nothing, in program order;
    * ``events``: per module call event, the instances bound to it, skips apart in ``skips``, each
      list in program order;
    * ``grad_events``: per tensor instance, the gradient nodes hooked on it, and ``grad_backward``
      the backward each of those belongs to (the first after it in program order; None: none);
    * ``result_keys``, ``stop_key``, ``stop_id``: the pass's result and ``stop()``; ``stop_on_value``:
      the stop is a value's (``proxy.stop()``: due once that value exists) rather than a line's
      (``tracer.stop()``: due once every instance before it has a value);
    * ``module_paths``: modules whose calls carry events of this pass, the only ones worth a hook
      (``input_paths`` those with events on a call's inputs, ``skip_paths`` those with skips);
    * ``saves_of``: per instance, the saves that only keep its value (most nodes of most graphs):
      they take the value when it is set instead of waiting their turn as free nodes (see
      :func:`_plain_save`). The value is the same object either way; what is saved never changes.
    """

    def __init__(self, graph: InterventionGraph, pass_index: int, steps: int,
                 owned: Collection[int] | None = None) -> None:
        self.graph = graph
        self.pass_index = pass_index
        self.instances: list[Key] = []
        self.deps: dict[Key, list[Key]] = {}
        self.dependents: dict[Key, list[Key]] = {}
        self.free: set[Key] = set()
        self.ready: list[Key] = []
        self.events: dict[Event, list[Key]] = {}
        self.skips: dict[tuple[str, int], list[Key]] = {}
        self.grad_events: dict[Key, list[Key]] = {}
        self.grad_backward: dict[Key, Key | None] = {}
        self.result_keys: list[Key] = []
        self.stop_key: Key | None = None
        self.stop_id: int | None = None
        self.stop_on_value = False
        self.skip_paths: set[str] = set()
        self.module_paths: set[str] = set()
        #: modules with events on their inputs (the rest need no look-up when a call begins)
        self.input_paths: set[str] = set()
        #: reads of a module's output without a condition: at an event of these alone, nothing runs
        #: between them (see :meth:`~.interleaver.Interleaver.fire`)
        self.plain_reads: set[Key] = set()
        self.saves_of: dict[Key, list[Key]] = {}
        self._build(steps, owned)
        stop = self.stop_key
        #: How many instances come before a line's ``stop()`` in program order.
        self.before_stop = 0 if stop is None or self.stop_on_value else sum(
            1 for k in self.instances if node_id(k) < node_id(stop))

    def _build(self, steps: int, owned: Collection[int] | None) -> None:
        """One walk over the nodes, in id order: every list it fills is in program order."""
        graph, pass_index = self.graph, self.pass_index
        nodes = graph.nodes
        all_deps = dependencies(graph)
        blocks = [it for it in graph.iterations if it.pass_index == pass_index]
        ranges = {it.id: it.steps(steps) for it in blocks}
        in_blocks = bool(graph.iterations)  # else every instance reads its deps' only instances
        backwards: list[int] = []
        grads: list[tuple[Key, int, int | None]] = []
        for node in nodes:
            if node.pass_index != pass_index:
                continue
            kind = node.kind
            if kind == Kind.BACKWARD:
                backwards.append(node.id)
            elif kind == Kind.STOP and self.stop_id is None:
                self.stop_id = node.id
            if owned is not None and node.id not in owned:
                continue
            for step in ((None,) if node.iteration is None else ranges.get(node.iteration, ())):
                key = node.id if step is None else (node.id, step)
                self.instances.append(key)
                deps = [dep_key(nodes[dep], step) for dep in all_deps[node.id]] if in_blocks else all_deps[node.id]
                self.deps[key] = deps
                for dep in deps:
                    self.dependents.setdefault(dep, []).append(key)
                if kind in (Kind.GETTER, Kind.SETTER):
                    self.module_paths.add(node.module)  # type: ignore[arg-type]
                    if node.access != "output":
                        self.input_paths.add(node.module)  # type: ignore[arg-type]
                    elif kind == Kind.GETTER and node.cond is None:
                        self.plain_reads.add(key)
                    event = (node.module, "out" if node.access == "output" else "in", node.call + (step or 0))
                    self.events.setdefault(event, []).append(key)  # type: ignore[arg-type]
                elif kind == Kind.SKIP:
                    self.skip_paths.add(node.module)  # type: ignore[arg-type]
                    self.module_paths.add(node.module)  # type: ignore[arg-type]
                    self.skips.setdefault((node.module, node.call + (step or 0)), []).append(key)  # type: ignore[arg-type]
                elif kind in Kind.GRADIENTS:
                    self.grad_events.setdefault(dep_key(nodes[node.args[0].id], step), []).append(key)
                    grads.append((key, node.id, step))
                elif kind == Kind.RESULT:
                    self.result_keys.append(key)
                elif kind == Kind.STOP:
                    self.stop_key = key
                    self.stop_on_value = bool(node.args)
                elif kind == Kind.SAVE and self.stop_id is None and _plain_save(node, nodes, pass_index):
                    self.saves_of.setdefault(deps[0], []).append(key)
                else:
                    self.free.add(key)
                    if not deps:
                        self.ready.append(key)
        for key, of, step in grads:
            self.grad_backward[key] = _next_backward(nodes, backwards, of, step)


def _plain_save(node: Node, nodes: list[Node], pass_index: int) -> bool:
    """Whether save ``node`` only keeps one value of its own pass, unconditionally, outside any
    iteration block: nothing but that value decides what it keeps, so it can be set with it. Saves
    of gradients wait their turn (a backward's order is kept), as do saves after a ``stop()`` (which
    never run; the plan's walk stops fusing at the first stop)."""
    if len(node.args) != 1 or type(node.args[0]) is not Ref or node.kwargs or node.cond is not None \
            or node.iteration is not None:
        return False
    dep = nodes[node.args[0].id]
    return dep.pass_index == pass_index and dep.iteration is None and dep.kind not in Kind.GRADIENTS


def _next_backward(nodes: list[Node], backwards: list[int], of: int, step: int | None) -> Key | None:
    """The key of the first backward node after node ``of`` (program order), None if there is none."""
    index = bisect.bisect_right(backwards, of)
    if index == len(backwards):
        return None
    backward = nodes[backwards[index]]
    if backward.iteration is None:
        return backward.id
    return None if step is None else (backward.id, step)
