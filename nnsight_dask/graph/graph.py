"""The intervention graph: passes (forward runs with their inputs), nodes, iterations, saves.

A graph is plain data. It is recorded by a tracer, checked by :mod:`.validate`, serialized to
JSON for the wire, and run by :mod:`nnsight_dask.execution` locally or shard by shard.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ForbiddenOperationError, GraphValidationError
from .codec import MAX_NESTING, Decoder, encode
from .node import Kind, Node, check_fields, field_error, short
from .options import OPTION_FIELDS, OPTION_RULES, option_problem

FORMAT_VERSION = 1

#: Runs a graph that a Dask task called (``client.submit(graph)``). Installed by the layer that knows
#: the cluster (:mod:`nnsight_dask.api` installs :func:`nnsight_dask.client.submit.run_graph_task`),
#: so this data module stays free of it.
_task_runner: Callable[[InterventionGraph], Any] | None = None


def set_task_runner(runner: Callable[[InterventionGraph], Any]) -> None:
    """Install what ``InterventionGraph.__call__`` runs (see :data:`_task_runner`)."""
    global _task_runner
    _task_runner = runner


@dataclass(slots=True)
class Pass:
    """One run of the model: a forward pass (``"trace"``) or a generation (``"generate"``).

    ``invokes`` holds each invoke's already-encoded inputs (for a language model a dict with
    ``input_ids`` and ``attention_mask`` tensors; for any other module ``{"args": [...], "kwargs": {...}}``);
    they are batched together into one run.
    """

    kind: str = "trace"
    invokes: list[dict[str, Any]] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """How many forward passes this run makes (generation: one per new token)."""
        if self.kind == "generate":
            return int(self.kwargs.get("max_new_tokens", 1))
        return 1


@dataclass(slots=True)
class Iteration:
    """A block of nodes repeated at generation steps ``range(start, stop, step)``; stop None: all."""

    id: int
    pass_index: int
    start: int = 0
    stop: int | None = None
    step: int = 1

    def steps(self, available: int) -> range:
        stop = available if self.stop is None else min(self.stop, available)
        return range(self.start, stop, self.step)


@dataclass
class InterventionGraph:
    """Everything needed to run an experiment: inputs, interventions, and what to return."""

    nodes: list[Node] = field(default_factory=list)
    passes: list[Pass] = field(default_factory=list)
    iterations: list[Iteration] = field(default_factory=list)
    model: str | None = None
    #: Experiment options (JSON-able; the fields and their rules are :mod:`.options`): ``store`` (fsspec
    #: URL of persisted saves), ``persist_threshold`` (bytes; saves above it are persisted when a store
    #: is set), ``storage_options`` (fsspec options), ``positions``, ``batching``, ``store_scope``.
    options: dict[str, Any] = field(default_factory=dict)
    #: Python callables of ``apply`` nodes, by node id. Never serialized: such graphs are local only.
    local_functions: dict[int, Callable[..., Any]] = field(default_factory=dict)

    # -- building -------------------------------------------------------------------------
    def add(self, kind: str, **fields: Any) -> Node:
        node = Node(id=len(self.nodes), kind=kind, **fields)
        self.nodes.append(node)
        return node

    @property
    def local_only(self) -> bool:
        """True when the graph calls a user's own Python function (``nd.apply``)."""
        return any(node.kind == Kind.APPLY for node in self.nodes)

    @property
    def saves(self) -> dict[str, Node]:
        return {node.target: node for node in self.nodes if node.kind == Kind.SAVE}

    @property
    def needs_grad(self) -> bool:
        for node in self.nodes:  # (asked at every local run: a loop, no generator)
            if node.kind in Kind.AUTOGRAD:
                return True
        return False

    def module_paths(self) -> set[str]:
        return {n.module for n in self.nodes if n.module is not None}

    def __call__(self) -> Any:
        """Run on the deployment named ``self.model``, so that ``client.submit(graph)`` works.

        This executes inside a Dask task on a worker of the cluster, through the installed task
        runner, and returns the saved values by name.
        """
        if not self.model:
            raise GraphValidationError("the graph names no deployment; record it on a RemoteModel")
        if _task_runner is None:
            raise GraphValidationError("no task runner is installed to run graphs as Dask tasks; "
                                       "import nnsight_dask (it installs one) before calling a graph")
        return _task_runner(self)

    def __repr__(self) -> str:
        return (f"InterventionGraph({len(self.nodes)} nodes, {len(self.passes)} pass(es), "
                f"saves={sorted(self.saves)})")

    def pretty(self) -> str:
        """One line a node, for reading a graph while debugging."""
        lines = []
        for n in self.nodes:
            where = f" @{n.location}" if n.location else ""
            it = f" iter{n.iteration}" if n.iteration is not None else ""
            lines.append(f"%{n.id} = {n.describe()} args={n.args} kwargs={n.kwargs}{it}{where}")
        return "\n".join(lines)

    # -- wire format ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        if self.local_functions or self.local_only:
            names = ", ".join(sorted({n.target or "?" for n in self.nodes if n.kind == Kind.APPLY}))
            raise ForbiddenOperationError(
                f"this graph calls local Python function(s) {names} through nd.apply; such a graph "
                "runs only locally and cannot be serialized or sent to a server",
                functions=names,
            )
        return {
            "version": FORMAT_VERSION,
            "model": self.model,
            "passes": [{"kind": p.kind, "invokes": [encode(i) for i in p.invokes], "kwargs": encode(p.kwargs)}
                       for p in self.passes],
            "iterations": [[it.id, it.pass_index, it.start, it.stop, it.step] for it in self.iterations],
            "nodes": [_node_to_dict(n) for n in self.nodes],
            **({"options": dict(self.options)} if self.options else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any, *, max_depth: int = MAX_NESTING, max_nodes: int | None = None,
                  max_constant_bytes: int | None = None) -> InterventionGraph:
        """Decode a graph from JSON-able data sent by anyone.

        Every field's type is checked, nesting is bounded by ``max_depth``, the number of nodes by
        ``max_nodes`` and the bytes of all tensors by ``max_constant_bytes`` (checked before they
        are allocated). Anything wrong raises :class:`GraphValidationError` naming the node
        (``node %3``) or pass and the field; :func:`.validate.validate_graph` then checks meaning.
        """
        if not isinstance(data, dict):
            raise GraphValidationError(f"an intervention graph is a JSON object, not {type(data).__name__}",
                                       field="graph")
        version = data.get("version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise GraphValidationError(
                f"not an intervention graph of format version {FORMAT_VERSION} (got version {short(version)})",
                field="version")
        _no_unknown(data, GRAPH_FIELDS, "the graph")
        model = data.get("model")
        if model is not None and type(model) is not str:
            raise GraphValidationError(f"graph field 'model': must be a deployment name or null, got {short(model)}",
                                       field="model")
        graph = cls(model=model, options=_options(data.get("options", {})))
        raw_passes = _list(data, "passes", "the graph", required=True)
        raw_iterations = _list(data, "iterations", "the graph")
        raw_nodes = _list(data, "nodes", "the graph", required=True)
        if max_nodes is not None and len(raw_nodes) > max_nodes:
            raise GraphValidationError(f"the graph has {len(raw_nodes)} nodes; the limit is {max_nodes}",
                                       field="nodes", nodes=len(raw_nodes), limit=max_nodes)
        decoder = Decoder(max_depth=max_depth, max_bytes=max_constant_bytes)
        graph.passes = [_pass_from_dict(i, p, decoder) for i, p in enumerate(raw_passes)]
        graph.iterations = [_iteration_from_list(i, it) for i, it in enumerate(raw_iterations)]
        graph.nodes = [_node_from_dict(i, n, decoder) for i, n in enumerate(raw_nodes)]
        return graph

    @classmethod
    def from_json(cls, text: str | bytes, **limits: Any) -> InterventionGraph:
        """Decode a graph from JSON text sent by anyone; ``limits`` as :meth:`from_dict`."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise GraphValidationError(f"an intervention graph is JSON text, not {type(text).__name__}")
        try:
            data = json.loads(text)
        except RecursionError:
            raise GraphValidationError("intervention graph JSON nests too deeply to read") from None
        except ValueError as exc:  # JSONDecodeError, bad UTF-8, integers of over 4300 digits
            raise GraphValidationError(f"intervention graph is not valid JSON: {exc}") from None
        return cls.from_dict(data, **limits)


#: The fields of a graph and of one pass (its options: :data:`~.options.OPTION_FIELDS`).
GRAPH_FIELDS = ("version", "model", "passes", "iterations", "nodes", "options")
PASS_FIELDS = ("kind", "invokes", "kwargs")
_NODE_FIELDS = ("target", "module", "access", "invoke", "iteration", "cond", "location")


def _node_to_dict(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {"id": node.id, "kind": node.kind}
    for name in _NODE_FIELDS:
        value = getattr(node, name)
        if value is not None:
            out[name] = value
    if node.args:
        out["args"] = [encode(a) for a in node.args]
    if node.kwargs:
        out["kwargs"] = {k: encode(v) for k, v in node.kwargs.items()}
    if node.call:
        out["call"] = node.call
    if node.pass_index:
        out["pass"] = node.pass_index
    return out


def _node_from_dict(position: int, data: Any, decoder: Decoder) -> Node:
    if not isinstance(data, dict):
        raise field_error(position, "node", f"a node is a JSON object, not {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _NODE_KEYS)
    if unknown:
        raise field_error(position, unknown[0][:60],
                          f"unknown node field(s) {short(unknown)}; known: {list(_NODE_KEYS)}")
    node_id = data.get("id")
    if type(node_id) is not int or node_id != position:
        raise field_error(position, "id",
                          f"node at position {position} has id {short(node_id)}; ids must be 0, 1, 2, ...")
    kind = data.get("kind")
    if type(kind) is not str or kind not in Kind.ALL:
        raise field_error(position, "kind", f"unknown kind {short(kind)}; known: {sorted(Kind.ALL)}")
    node = Node(id=position, kind=kind, call=data.get("call", 0), pass_index=data.get("pass", 0),
                **{name: data.get(name) for name in _NODE_FIELDS})
    check_fields(node)
    args = data.get("args", [])
    if type(args) is not list:
        raise field_error(position, "args", f"expected a list, got {type(args).__name__}")
    kwargs = data.get("kwargs", {})
    if type(kwargs) is not dict:
        raise field_error(position, "kwargs", f"expected an object, got {type(kwargs).__name__}")
    where = f"node %{position}"
    node.args = tuple(decoder.decode(a, where=where, field=f"args[{i}]", node=position) for i, a in enumerate(args))
    node.kwargs = {}
    for key, value in kwargs.items():
        if type(key) is not str:
            raise field_error(position, "kwargs", f"keyword names are strings, got {short(key)}")
        node.kwargs[key] = decoder.decode(value, where=where, field=f"kwargs[{key!r}]", node=position)
    return node


_NODE_KEYS = ("id", "kind", *_NODE_FIELDS, "args", "kwargs", "call", "pass")


def _pass_from_dict(index: int, data: Any, decoder: Decoder) -> Pass:
    where = f"pass {index}"
    if not isinstance(data, dict):
        raise GraphValidationError(f"{where} is a JSON object, not {type(data).__name__}", field=f"passes[{index}]")
    _no_unknown(data, PASS_FIELDS, where)
    kind = data.get("kind")
    if type(kind) is not str:
        raise GraphValidationError(f"{where}, field 'kind': expected a string, got {short(kind)}", field="kind")
    invokes = []
    for i, raw in enumerate(_list(data, "invokes", where, required=True)):
        invoke = decoder.decode(raw, where=where, field=f"invokes[{i}]")
        if not isinstance(invoke, dict) or not all(type(k) is str for k in invoke):
            raise GraphValidationError(f"{where}, field 'invokes[{i}]': an invoke's inputs are a dict with string "
                                       f"keys, got {short(invoke)}", field=f"invokes[{i}]")
        invokes.append(invoke)
    kwargs = decoder.decode(data["kwargs"], where=where, field="kwargs") if "kwargs" in data else {}
    if not isinstance(kwargs, dict) or not all(type(k) is str for k in kwargs):
        raise GraphValidationError(f"{where}, field 'kwargs': the run's options are a dict with string keys, got "
                                   f"{short(kwargs)}", field="kwargs")
    return Pass(kind=kind, invokes=invokes, kwargs=kwargs)


def _iteration_from_list(index: int, data: Any) -> Iteration:
    field = f"iterations[{index}]"
    if type(data) is not list or len(data) != 5:
        raise GraphValidationError(f"graph field {field!r}: an iteration is [id, pass, start, stop, step], got "
                                   f"{short(data)}", field=field)
    for name, value in zip(("id", "pass", "start", "stop", "step"), data):
        if type(value) is not int and not (name == "stop" and value is None):
            raise GraphValidationError(f"graph field {field!r}: {name} must be an integer"
                                       f"{' or null' if name == 'stop' else ''}, got {short(value)}", field=field)
    return Iteration(*data)


def _options(options: Any) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise GraphValidationError(f"graph field 'options' must be an object, got {type(options).__name__}",
                                   field="options")
    _no_unknown(options, OPTION_FIELDS, "graph field 'options'")
    for name in OPTION_RULES:
        value = options.get(name)
        problem = None if value is None else option_problem(name, value)
        if problem is not None:
            raise GraphValidationError(f"graph field 'options.{name}': {problem}, got {short(value)}",
                                       field=f"options.{name}")
    scope = options.get("store_scope")
    if scope is not None and not (type(scope) is dict and set(scope) == {"user", "stores"}
                                  and type(scope["user"]) is str and type(scope["stores"]) is list
                                  and all(type(prefix) is str for prefix in scope["stores"])):
        raise GraphValidationError(f"graph field 'options.store_scope': must be {{\"user\": name, \"stores\": "
                                   f"[URL, ...]}}, got {short(scope)}", field="options.store_scope")
    storage = options.get("storage_options")
    if storage is not None:
        _check_json(storage, "options.storage_options")
    return dict(options)


def _check_json(value: Any, field: str, max_depth: int = 8) -> None:
    """Plain JSON (no tags) of bounded depth, walked without recursion."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise GraphValidationError(f"graph field {field!r}: nests more than {max_depth} levels deep", field=field)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif not (item is None or type(item) in (bool, int, float, str)):
            raise GraphValidationError(f"graph field {field!r}: holds a {type(item).__name__}, which is not JSON",
                                       field=field)


def _list(data: dict[str, Any], name: str, where: str, *, required: bool = False) -> list[Any]:
    if name not in data and not required:
        return []
    value = data.get(name)
    if type(value) is not list:
        raise GraphValidationError(f"{where}, field {name!r}: expected a list, got {type(value).__name__}", field=name)
    return value


def _no_unknown(data: dict[Any, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(str(k)[:60] for k in data if k not in known)
    if unknown:
        raise GraphValidationError(f"{where}, field {unknown[0]!r}: unknown field; known: {list(known)}",
                                   field=unknown[0])
