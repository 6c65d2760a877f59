"""Runs one free node on its (resolved) arguments: a table from node kind to handler.

What a shared shard enforces is here: every operation is checked
(:func:`~nnsight_dask.graph.ops.check_op_call`) before it runs and its value after (no callables);
with a budget (a shared shard's), every operation and module call is sized and weighed before it
runs; module attributes are copies, so nothing a graph does reaches the model's weights.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch

from ..errors import ForbiddenOperationError, NNsightDaskError
from ..graph.allocation import ExperimentBudget
from ..graph.graph import InterventionGraph
from ..graph.node import HOOKED_CALL, Kind, Node, display_path
from ..graph.ops import (
    MethodRef,
    check_arguments,
    check_op_call,
    check_result,
    method_op_name,
    module_attr,
    registry,
    safe_call,
    safe_getattr,
)
from .gradients import GradientHooks
from .plan import Key

#: What a graph's backward node may pass to ``torch.autograd.backward``.
BACKWARD_OPTIONS = frozenset({"grad_tensors", "retain_graph"})

Handler = Callable[["NodeExecutor", Node, Key, tuple[Any, ...], dict[str, Any]], Any]


class Quiet:
    """How deep the graph's own module calls are nested. One per model (a shard's runner holds it):
    a module one experiment's graph calls must fire nobody's hooks, not even another co-tenant's."""

    __slots__ = ("depth",)

    def __init__(self) -> None:
        self.depth = 0


class ModuleDevices(Collection[torch.device]):
    """The devices ``modules`` hold parameters or buffers on (where a graph's values may go),
    found on first use: only an operation that asks for a device needs them."""

    def __init__(self, modules: Collection[torch.nn.Module]) -> None:
        self._modules = modules
        self._found: frozenset[torch.device] | None = None

    def _devices(self) -> frozenset[torch.device]:
        if self._found is None:
            self._found = frozenset(tensor.device for module in self._modules
                                    for tensor in (*module.parameters(), *module.buffers()))
        return self._found

    def __contains__(self, device: object) -> bool:
        return device in self._devices()

    def __iter__(self) -> Iterator[torch.device]:
        return iter(self._devices())

    def __len__(self) -> int:
        return len(self._devices())


class NodeExecutor:
    """Runs free nodes of one graph on ``modules``; ``logs`` receives what ``log`` nodes print.

    ``budget`` (a shared shard's; None locally) bounds every operation before it runs; ``quiet`` is
    raised while the graph calls a module itself; ``gradients`` learns which backward runs.
    """

    def __init__(self, graph: InterventionGraph, modules: dict[str, torch.nn.Module], logs: list[str],
                 budget: ExperimentBudget | None, quiet: Quiet, gradients: GradientHooks) -> None:
        self.graph = graph
        self.modules = modules
        self.logs = logs
        self.budget = budget
        self.quiet = quiet
        self.gradients = gradients
        self.devices = ModuleDevices(modules.values())
        self.ops = registry()

    def run(self, node: Node, key: Key, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The value of ``node`` (instance ``key``) on these arguments."""
        handler = HANDLERS.get(node.kind)
        if handler is None:
            raise NNsightDaskError(f"node kind {node.kind!r} cannot run as a free node")
        return handler(self, node, key, args, kwargs)

    def _op(self, node: Node, _key: Key, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name: str = node.target  # type: ignore[assignment]
        check_op_call(name, args, kwargs, devices=self.devices)
        budget = self.budget
        cost = None
        if budget is not None:  # sized and weighed before it runs (a shared shard)
            where = node.location or f"node %{node.id}"
            if name == "call" and args and isinstance(args[0], MethodRef):
                cost = budget.check_op(method_op_name(args[0]), (args[0].owner, *args[1:]), kwargs, where)
            else:
                cost = budget.check_op(name, args, kwargs, where)
        if name == "getattr":
            value = safe_getattr(args[0], args[1])
        elif name == "call":
            value = safe_call(args[0], *args[1:], **kwargs)
        else:
            value = self.ops.resolve(name)(*args, **kwargs)
        if budget is not None and cost is not None:
            budget.account(value, (args, kwargs), cost)
        return check_result(value, name)

    def _module_call(self, node: Node, _key: Key, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        check_arguments(f"a call of {display_path(node.module)}", args, kwargs)
        module = self.modules[node.module]  # type: ignore[index]
        budget = self.budget
        cost = None
        if budget is not None:
            cost = budget.check_module_call(module, args, kwargs, node.location or f"node %{node.id}")
        if node.access == HOOKED_CALL:  # hooks live: interventions on it and its submodules apply
            value = module(*args, **kwargs)
        else:  # the graph's own call: nobody's hooks see it
            self.quiet.depth += 1
            try:
                value = module(*args, **kwargs)
            finally:
                self.quiet.depth -= 1
        if budget is not None and cost is not None:
            budget.account(value, (args, kwargs), cost)
        return check_result(value, f"a call of {display_path(node.module)}")

    def _module_attr(self, node: Node, _key: Key, _args: tuple[Any, ...], _kwargs: dict[str, Any]) -> Any:
        budget = self.budget
        where = node.location or f"node %{node.id}"
        check = (lambda raw: budget.check_copy(raw, node.target or "", where)) if budget is not None else None
        return module_attr(self.modules[node.module], node.target, before_copy=check)  # type: ignore[index,arg-type]

    def _backward(self, node: Node, key: Key, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        unknown = sorted(set(kwargs) - BACKWARD_OPTIONS)
        if unknown:
            raise ForbiddenOperationError(
                f"backward() takes {', '.join(sorted(BACKWARD_OPTIONS))} in a graph, not {', '.join(unknown)} "
                "(create_graph would tie gradients to the shared weights)", argument=unknown[0])
        check_arguments("backward", args, kwargs)
        if self.budget is not None:
            self.budget.check_backward(node.location or f"node %{node.id}")
        with self.gradients.during(key), torch.enable_grad():
            torch.autograd.backward(args[0], **kwargs)

    def _log(self, node: Node, _key: Key, args: tuple[Any, ...], _kwargs: dict[str, Any]) -> None:
        if self.budget is not None:
            for arg in args:
                self.budget.check_op("builtins.str", (arg,), {}, node.location or f"node %{node.id}")
        self.logs.append(" ".join(str(a) for a in args))

    def _apply(self, node: Node, _key: Key, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fn = self.graph.local_functions.get(node.id)
        if fn is None:
            raise NNsightDaskError(f"local function {node.target!r} is not available here")
        return fn(*args, **kwargs)


    def _save(self, _node: Node, _key: Key, args: tuple[Any, ...], _kwargs: dict[str, Any]) -> Any:
        return args[0]


#: The handler of each kind of free node.
HANDLERS: dict[str, Handler] = {
    Kind.OP: NodeExecutor._op,
    Kind.SAVE: NodeExecutor._save,
    Kind.MODULE_CALL: NodeExecutor._module_call,
    Kind.MODULE_ATTR: NodeExecutor._module_attr,
    Kind.BACKWARD: NodeExecutor._backward,
    Kind.LOG: NodeExecutor._log,
    Kind.APPLY: NodeExecutor._apply,
}
