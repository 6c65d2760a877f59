"""Static checks of a graph before anything runs: structure, whitelist, module paths, limits.

The submitting client runs these before queueing a graph (to fail fast), and every shard runs them
again at the experiment's first stage there, with the worker's own limits (the cluster decides), so a
malformed or forbidden graph is refused with a message naming the node's line before it touches the model.
"""
from __future__ import annotations

from collections.abc import Collection

from ..errors import ForbiddenOperationError, GraphValidationError
from ..tensors import nbytes
from .graph import InterventionGraph
from .node import ACCESSES, Kind, Node, Ref, display_path
from .ops import registry

PASS_KINDS = ("trace", "generate")


def validate_graph(graph: InterventionGraph, *, module_paths: Collection[str] | None = None,
                   remote: bool = False, max_new_tokens: int | None = None,
                   max_constant_bytes: int | None = None) -> None:
    """Raise :class:`GraphValidationError` (or :class:`ForbiddenOperationError`) on the first problem.

    ``module_paths`` are the model's module paths (``""`` for the root); ``remote`` also refuses
    local-only functions; limits bound generation length and the bytes of constants sent along.
    """
    if not graph.passes:
        raise GraphValidationError("the graph has no passes (no inputs to run the model on)")
    for index, run in enumerate(graph.passes):
        if run.kind not in PASS_KINDS:
            raise GraphValidationError(f"pass {index} has unknown kind {run.kind!r}; known: {PASS_KINDS}")
        if not run.invokes:
            raise GraphValidationError(f"pass {index} has no inputs")
        if run.kind == "generate" and max_new_tokens is not None and run.steps > max_new_tokens:
            raise GraphValidationError(
                f"pass {index} asks for max_new_tokens={run.steps}; this server allows at most {max_new_tokens}")
    iterations = {it.id: it for it in graph.iterations}
    ops = registry()
    constant_bytes = 0
    for node in graph.nodes:
        where = f"node %{node.id} ({node.describe()}{', at ' + node.location if node.location else ''})"
        _check_refs(node, where)
        if not 0 <= node.pass_index < len(graph.passes):
            raise GraphValidationError(f"{where} belongs to pass {node.pass_index}, which does not exist")
        invokes = len(graph.passes[node.pass_index].invokes)
        if node.invoke is not None and not 0 <= node.invoke < invokes:
            raise GraphValidationError(f"{where} names invoke {node.invoke}; its pass has {invokes} invoke(s)")
        if node.iteration is not None:
            it = iterations.get(node.iteration)
            if it is None or it.pass_index != node.pass_index:
                raise GraphValidationError(f"{where} names iteration {node.iteration}, which is not in its pass")
        if node.kind in Kind.MODULE_BOUND:
            if node.module is None:
                raise GraphValidationError(f"{where} must name a module")
            if module_paths is not None and node.module not in module_paths:
                raise GraphValidationError(
                    f"{where}: the model has no module {display_path(node.module)!r}", module=node.module,
                    location=node.location)
        if node.kind in (Kind.GETTER, Kind.SETTER) and node.access not in ACCESSES:
            raise GraphValidationError(f"{where} has access {node.access!r}; known: {ACCESSES}")
        if node.kind == Kind.OP:
            if node.target not in ops:
                raise ForbiddenOperationError(
                    f"{where} uses {node.target!r}, which is not in the operation whitelist", op=node.target,
                    location=node.location)
            if node.target == "getattr" and (len(node.args) != 2 or not isinstance(node.args[1], str)
                                              or node.args[1].startswith("_")):
                raise ForbiddenOperationError(f"{where}: getattr must name a public attribute", location=node.location)
        if node.kind == Kind.MODULE_ATTR and (not node.target or node.target.startswith("_")):
            raise ForbiddenOperationError(f"{where}: module attributes must be public", location=node.location)
        if node.kind == Kind.APPLY and (remote or node.id not in graph.local_functions):
            raise ForbiddenOperationError(
                f"{where} calls the local Python function {node.target!r} through nd.apply; graphs with local "
                "functions run only locally. Rewrite it with torch operations to run it remotely.",
                function=node.target, location=node.location)
        if node.kind in (Kind.SETTER, Kind.SKIP, Kind.GRAD_SETTER, Kind.SAVE, Kind.GRAD, Kind.BACKWARD) and not node.args:
            raise GraphValidationError(f"{where} needs an argument")
        if max_constant_bytes is not None:
            constant_bytes += nbytes(list(node.args)) + nbytes(node.kwargs)
    if max_constant_bytes is not None:
        constant_bytes += sum(nbytes(p.invokes) for p in graph.passes)
        if constant_bytes > max_constant_bytes:
            raise GraphValidationError(
                f"the graph carries {constant_bytes} bytes of tensors; the limit is {max_constant_bytes}. "
                "Send smaller inputs or constants.")
    names = [n.target for n in graph.nodes if n.kind == Kind.SAVE]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise GraphValidationError(f"two saves share the name(s) {duplicates}; save names must be unique")


def _check_refs(node: Node, where: str) -> None:
    for dep in node.deps():
        if not 0 <= dep < node.id:
            raise GraphValidationError(f"{where} refers to %{dep}; a node may only use values of earlier nodes")
    if node.kind in (Kind.GRAD, Kind.GRAD_SETTER, Kind.BACKWARD) and not isinstance(node.args[0] if node.args else None, Ref):
        raise GraphValidationError(f"{where} must refer to a traced tensor")
