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
from .codec import decode, encode
from .node import Kind, Node

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
    #: Experiment options (JSON-able): ``store`` (fsspec URL of persisted saves), ``persist_threshold``
    #: (bytes; saves above it are persisted when a store is set), ``storage_options`` (fsspec options).
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
        return any(n.kind in (Kind.GRAD, Kind.GRAD_SETTER, Kind.BACKWARD) for n in self.nodes)

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
    def from_dict(cls, data: dict[str, Any]) -> InterventionGraph:
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise GraphValidationError(
                f"not an intervention graph of format version {FORMAT_VERSION} "
                f"(got version {data.get('version') if isinstance(data, dict) else type(data).__name__})")
        try:
            options = data.get("options") or {}
            if not isinstance(options, dict):
                raise GraphValidationError("graph options must be an object")
            graph = cls(model=data.get("model"), options=dict(options))
            graph.passes = [Pass(kind=p["kind"], invokes=[decode(i) for i in p["invokes"]],
                                 kwargs=decode(p.get("kwargs", {})))
                            for p in data["passes"]]
            graph.iterations = [Iteration(*it) for it in data.get("iterations", [])]
            graph.nodes = [_node_from_dict(i, n) for i, n in enumerate(data["nodes"])]
        except GraphValidationError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise GraphValidationError(f"malformed intervention graph: {type(exc).__name__}: {exc}") from exc
        return graph

    @classmethod
    def from_json(cls, text: str | bytes) -> InterventionGraph:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GraphValidationError(f"intervention graph is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


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


def _node_from_dict(position: int, data: dict[str, Any]) -> Node:
    if data.get("id") != position:
        raise GraphValidationError(f"node at position {position} has id {data.get('id')!r}; ids must be 0, 1, 2, ...")
    kind = data.get("kind")
    if kind not in Kind.ALL:
        raise GraphValidationError(f"node {position} has unknown kind {kind!r}; known: {sorted(Kind.ALL)}")
    kwargs = data.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise GraphValidationError(f"node {position}: kwargs must be an object")
    return Node(
        id=position,
        kind=kind,
        args=tuple(decode(a) for a in data.get("args", [])),
        kwargs={str(k): decode(v) for k, v in kwargs.items()},
        call=int(data.get("call", 0)),
        pass_index=int(data.get("pass", 0)),
        **{name: data.get(name) for name in _NODE_FIELDS},
    )
