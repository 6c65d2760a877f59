"""The recorder: turns what the user writes in a trace into nodes of one intervention graph.

One recorder serves a standalone trace, or a whole session (several traces sharing values).
It knows the current pass, invoke, iteration block and condition, so every node records them.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch

from ..errors import TracingError, UnsavedValueError
from ..graph.graph import InterventionGraph, Iteration, Pass
from ..graph.node import Kind, Node, Ref
from . import control_flow
from .lengths import KnownLengths
from .location import user_location
from .proxy import Proxy

_local = threading.local()
#: ``Recorder.add(invoke=...)``'s default: the invoke open now.
_CURRENT: Any = object()


def active_recorders() -> list[Recorder]:
    """Recorders currently recording in this thread, innermost last."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


class Recorder:
    """Builds one :class:`InterventionGraph` while ``recording`` is true."""

    def __init__(self, graph: InterventionGraph | None = None) -> None:
        self.graph = graph if graph is not None else InterventionGraph()
        self.recording = True
        self.pass_index = -1
        self.invoke: int | None = None
        self.iteration: int | None = None
        self.cond: int | None = None
        self.saved: dict[int, Proxy] = {}
        #: ``proxy.retain_grad()``: the saved gradient read of each value whose gradient is kept, by its node
        self.retained: dict[int, Proxy] = {}
        self._all_iteration: dict[tuple[int, int, int | None, int], int] = {}
        #: ``.next()`` calls of the current pass by envoy path; an envoy's call index adds its ancestors'
        self.envoy_steps: dict[str, int] = {}
        #: saves recorded after a stop of their pass that therefore never ran (filled by :meth:`finish`)
        self.never_ran: dict[int, Node] = {}
        #: Whether a trace is open. A session's recorder also records between its traces (``nd.list()``,
        #: operations on earlier traces' values); those nodes are listed in ``session_level`` and get
        #: their pass when the session ends (:meth:`place_session_nodes`).
        self.in_trace = False
        self.session_level: list[int] = []
        #: One list per open ``session.iter`` block: the proxies recorded inside it, renumbered when the
        #: block is unrolled (see :mod:`.unroll`).
        self.block_proxies: list[list[weakref.ref[Proxy]]] = []
        #: lengths of traced lists known while recording (``for x in l``, ``len(l)``)
        self.lengths = KnownLengths()

    # -- structure ------------------------------------------------------------------------------
    def new_pass(self, kind: str, kwargs: dict[str, Any]) -> int:
        self.graph.passes.append(Pass(kind=kind, invokes=[], kwargs=dict(kwargs)))
        self.pass_index = len(self.graph.passes) - 1
        self.invoke = None
        self.envoy_steps = {}  # `.next()` offsets last one trace
        self.in_trace = True
        return self.pass_index

    def end_pass(self) -> None:
        """A trace of a session has closed: what is recorded next is at session level."""
        self.in_trace = False
        self.invoke = None

    def place_session_nodes(self) -> None:
        """Give each node recorded between a session's traces the pass of the first trace recorded after
        it, so it runs once every earlier trace has run (program order across traces); nodes after the
        last trace join the last pass. Call when the session ends, with at least one pass recorded."""
        level = set(self.session_level)
        following = len(self.graph.passes) - 1
        for node in reversed(self.graph.nodes):
            if node.id in level:
                node.pass_index = following
            else:
                following = node.pass_index

    def add_invoke(self, encoded: dict[str, Any]) -> int:
        invokes = self.graph.passes[self.pass_index].invokes
        invokes.append(encoded)
        return len(invokes) - 1

    def open_iteration(self, start: int, stop: int | None, step: int) -> int:
        it = Iteration(id=len(self.graph.iterations), pass_index=self.pass_index, start=start, stop=stop, step=step)
        self.graph.iterations.append(it)
        return it.id

    @contextmanager
    def iteration_block(self, start: int, stop: int | None, step: int) -> Iterator[int]:
        """Nodes recorded inside run once per generation step of ``range(start, stop, step)``
        (``tracer.iter[...]``, ``tracer.all()``, ``envoy.iter[...]``, ``envoy.all()``)."""
        if self.iteration is not None:
            raise TracingError("iteration blocks cannot be nested")
        self.iteration = self.open_iteration(start, stop, step)
        try:
            yield self.iteration
        finally:
            self.iteration = None

    # -- `.next()` ---------------------------------------------------------------------------------
    def advance(self, path: str, steps: int) -> None:
        """``envoy.next(steps)``: the envoy at ``path`` and its children move ``steps`` calls on."""
        self.envoy_steps[path] = self.envoy_steps.get(path, 0) + steps

    def call_index(self, path: str) -> int:
        """Which call of the module at ``path`` an access means: its and its ancestors' ``.next()``s."""
        steps = self.envoy_steps
        if not steps:
            return 0
        total = steps.get("", 0)
        prefix = ""
        for part in path.split(".") if path else ():
            prefix = f"{prefix}.{part}" if prefix else part
            total += steps.get(prefix, 0)
        return total

    def steps_iteration(self, start: int, stop: int | None, step: int) -> int:
        """The iteration block of the current pass over ``range(start, stop, step)``, shared by every
        read through ``envoy.all()`` / ``envoy.iter[...]`` with that range (so they combine)."""
        key = (self.pass_index, start, stop, step)
        if key not in self._all_iteration:
            self._all_iteration[key] = self.open_iteration(start, stop, step)
        return self._all_iteration[key]

    def forget_passes_from(self, first: int) -> None:
        """Drop what is cached about passes ``first`` and later (renumbered by an unrolled block)."""
        self._all_iteration = {key: it for key, it in self._all_iteration.items() if key[0] < first}

    # -- nodes ------------------------------------------------------------------------------------
    def add(self, kind: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *,
            iteration: int | None = None, target: str | None = None, module: str | None = None,
            access: str | None = None, call: int = 0, invoke: Any = _CURRENT) -> Proxy:
        """Record a node and return the proxy that stands for its value (``invoke``: the open invoke's
        rows unless given; ``None`` is the whole batch).

        The hottest path of recording (every envoy access and save): the node is made here and appended
        at the graph's next id, without :meth:`InterventionGraph.add`'s second packing of the fields."""
        proxy = Proxy(self, self._record(kind, args, kwargs, iteration, target, module, access, call, invoke))
        for block in self.block_proxies:
            block.append(weakref.ref(proxy))
        return proxy

    def _record(self, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None, iteration: int | None,
                target: str | None, module: str | None, access: str | None, call: int, invoke: Any) -> int:
        """:meth:`add` without the proxy (a save's node needs none): the new node's id."""
        if not self.recording:
            raise TracingError("this trace has finished; values can no longer be recorded into it")
        found: list[int] = []
        if args:
            first = args[0]
            if len(args) == 1 and type(first) is Proxy and first._recorder is self and type(args) is tuple:
                # (a save, a backward, a .grad: one value of this trace, without to_arg's walk)
                found.append(first._node)
                args = (Ref(first._node),)
            else:
                args = self.to_arg(args, found)
        kwargs = self.to_arg(kwargs, found) if kwargs else {}
        graph = self.graph
        if iteration is None:
            iteration = self.iteration
            if iteration is None and found and graph.iterations:  # (no block in the graph: none to inherit)
                iteration = self._inherited_iteration(found)
        nodes = graph.nodes
        node_id = len(nodes)
        # (Node's fields in order: positional arguments cost less than keywords on this hottest path)
        node = Node(node_id, kind, target, args, kwargs, module, access, self.invoke if invoke is _CURRENT else invoke,
                    call, self.pass_index, iteration, self.cond, user_location())
        nodes.append(node)
        if not self.in_trace:
            self.session_level.append(node_id)
        lengths = self.lengths
        if kind == Kind.OP or lengths.known:  # (other nodes matter only while some length is known)
            lengths.note(node, self.cond is None and self.iteration is None and not self.block_proxies,
                         in_block=bool(self.block_proxies))
        return node_id

    def _inherited_iteration(self, refs: list[int]) -> int | None:
        nodes = self.graph.nodes
        found = {nodes[i].iteration for i in refs} - {None}
        if len(found) > 1:
            raise TracingError("one operation combines values from two different iteration blocks")
        return found.pop() if found else None

    def to_arg(self, obj: Any, found: list[int]) -> Any:
        """Replace proxies by references (this graph) or by their values (finished traces)."""
        kind = type(obj)
        if kind is Proxy:
            return self._proxy_arg(obj, found)
        if kind is tuple:
            return tuple([self.to_arg(o, found) for o in obj])
        if kind is list:
            return [self.to_arg(o, found) for o in obj]
        if kind is dict:
            return {k: self.to_arg(v, found) for k, v in obj.items()}
        if kind is slice:
            return slice(self.to_arg(obj.start, found), self.to_arg(obj.stop, found), self.to_arg(obj.step, found))
        return obj

    def _proxy_arg(self, proxy: Proxy, found: list[int]) -> Any:
        owner = proxy._recorder
        if owner is self:
            found.append(proxy._node)
            return Ref(proxy._node)
        if proxy._has_value():
            return proxy._value
        if owner.recording:
            raise TracingError(
                "a value from another trace that is still recording was used here; traces that share "
                "values must run inside one `with model.session():`")
        raise UnsavedValueError(
            f"{owner.graph.nodes[proxy._node].describe()} (recorded at "
            f"{owner.graph.nodes[proxy._node].location}) was not saved, so its value is gone; "
            "call .save() on it inside its trace")

    def node(self, node_id: int) -> Node:
        return self.graph.nodes[node_id]

    def known_length(self, node_id: int) -> int | None:
        return self.lengths.get(node_id)

    def enter_branch(self, proxy: Proxy, frame: FrameType) -> bool | None:
        """``if proxy:`` in ``frame``: recorded as conditionals (see :mod:`.control_flow`)."""
        return control_flow.branch(proxy, frame)

    def save(self, proxy: Proxy, name: str | None) -> None:
        if proxy._node in self.saved and name is None:
            return
        save = self._record(Kind.SAVE, (proxy,), None, None, name or f"save_{proxy._node}", None, None, 0, _CURRENT)
        self.saved[proxy._node] = proxy
        object.__setattr__(proxy, "_save_node", save)  # (past Proxy.__setattr__'s refusals)

    def retain_grad(self, proxy: Proxy) -> None:
        """``proxy.retain_grad()``: a saved ``.grad`` read of it, set as its value's ``.grad`` by :meth:`finish`."""
        if proxy._node not in self.retained:
            grad = self.add(Kind.GRAD, (proxy,))
            self.save(grad, None)
            self.retained[proxy._node] = grad

    def rename_saves(self, local_vars: dict[str, Any]) -> list[str]:
        """Name saves after the user's variables (``h = ....save()`` is returned as ``"h"``).

        Returns the local names bound to saved proxies of this recorder themselves (not inside a
        list or dict): those that frame injection (:mod:`.inject`) rebinds to their values."""
        taken = {n.target for n in self.graph.nodes if n.kind == Kind.SAVE}
        direct: list[str] = []
        for var, value in local_vars.items():
            if type(value) is Proxy and value._recorder is self and value._save_node is not None:
                direct.append(var)
            if var.startswith("_"):
                continue
            candidates: list[tuple[str, Any]] = [(var, value)]
            if isinstance(value, (list, tuple)):
                candidates = [(f"{var}[{i}]", v) for i, v in enumerate(value)]
            elif isinstance(value, dict):
                candidates = [(f"{var}[{k!r}]", v) for k, v in value.items()]
            for name, item in candidates:
                if type(item) is not Proxy or item._recorder is not self:
                    continue
                save_id = item._save_node
                if save_id is None:
                    continue
                node = self.graph.nodes[save_id]
                if node.target == f"save_{item._node}" and name not in taken:
                    taken.discard(node.target)
                    node.target = name
                    taken.add(name)
        return direct

    def finish(self, saves: dict[str, Any]) -> None:
        """Stop recording and hand each saved proxy its value.

        A save recorded after a ``tracer.stop()`` of its pass, or one a ``proxy.stop()`` left unreached
        (a later module's, wherever it is written), never ran; its proxy gets no value and says so
        when read.
        """
        self.recording = False
        stops = self._stops()
        for proxy in self.saved.values():
            node = self.graph.nodes[proxy._save_node]
            stop = stops.get(node.pass_index)
            if stop is not None and (node.id > stop.id or stop.args) and node.iteration is None \
                    and saves.get(node.target) is None:
                self.never_ran[proxy._node] = stop
                continue
            if node.target in saves:
                object.__setattr__(proxy, "_value", saves[node.target])
        for node_id, grad in self.retained.items():
            kept = self.saved.get(node_id)
            if kept is not None and kept._has_value() and grad._has_value():
                _attach_grad(kept._value, grad._value)
        self._let_go()

    def _stops(self) -> dict[int, Node]:
        """The first stop node of each pass (where that pass's run ends)."""
        stops: dict[int, Node] = {}
        for node in self.graph.nodes:
            if node.kind == Kind.STOP and node.pass_index not in stops:
                stops[node.pass_index] = node
        return stops

    def close(self) -> None:
        self.recording = False
        self._let_go()

    def _let_go(self) -> None:
        """Recording is over: keep no proxy. Each proxy holds its recorder, so proxies kept here would
        make every trace a reference cycle that only the garbage collector frees (0.3 collections a
        trace, 60 us of a 12-layer trace's overhead); without them, saves the user drops are freed at
        once, their values (activations) with them."""
        self.saved = {}
        self.retained = {}


def _attach_grad(value: Any, grad: Any) -> None:
    """``value.grad = grad``, as ``retain_grad()`` leaves it (a value still in autograd's graph
    retains it first, so reading ``.grad`` is what torch allows)."""
    if not isinstance(value, torch.Tensor) or not isinstance(grad, torch.Tensor):
        return  # a value read lazily from a store: its gradient is the saved read itself
    if value.grad_fn is not None:
        value.retain_grad()
    value.grad = grad
