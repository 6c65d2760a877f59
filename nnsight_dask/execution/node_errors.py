"""The errors a node raises while its pass runs, each naming the user's line, the node and the module."""
from __future__ import annotations

from ..errors import ForbiddenOperationError, InterventionError, NNsightDaskError
from ..graph.node import Kind, Node, display_path


def forbidden(node: Node, exc: ForbiddenOperationError) -> ForbiddenOperationError:
    """The refusal with the user's line and the node, keeping its fields (what was refused)."""
    if getattr(exc, "node", None) is not None:
        return exc
    fields = {**exc.fields, "location": node.location, "module": node.module, "node": node.id}
    return ForbiddenOperationError(f"{node.location or '<graph>'}: {node.describe()}: {exc.message}", **fields)


def failed(node: Node, exc: Exception) -> InterventionError:
    """``node`` raised ``exc`` while it ran (its type name kept for the user)."""
    where = node.location or "<graph>"
    module = f" on {display_path(node.module)}" if node.module is not None and node.kind == Kind.MODULE_CALL else ""
    return InterventionError(
        f"{where}: {node.describe()}{module} failed: {type(exc).__name__}: {exc}",
        location=node.location, module=node.module, node=node.id, original_type=type(exc).__name__)


def cycle(node: Node, late: Node | None) -> InterventionError:
    """A write that needs a value the forward pass produces only later (``late``, when known)."""
    source = f" from {late.describe()}, which the forward pass produces later" if late else ""
    return InterventionError(
        f"{node.location or '<graph>'}: {node.describe()} needs a value computed{source}. A module's "
        "input or output can only be set from values available when that module runs.",
        location=node.location, module=node.module, node=node.id)


def no_positional_input(node: Node) -> NNsightDaskError:
    """``.input`` of a module called with keyword arguments only."""
    return NNsightDaskError(f"{display_path(node.module)} was called without positional arguments; "
                            "read .inputs to see its keyword arguments")


def never_ran(node: Node, cause: Node | None, calls: int) -> InterventionError:
    """``node`` never ran because of ``cause`` (the module event it waited for, which ran ``calls``
    times in the pass; or the gradient never computed)."""
    if cause is not None and cause.kind in Kind.GRADIENTS:
        why = f"{cause.describe()} (.grad) was never computed: call .backward() on a loss inside the trace"
    elif cause is not None and cause.module is not None:
        why = (f"{display_path(cause.module)}.{cause.access} at call {cause.call} was never reached: the "
               f"module ran {calls} time(s) in this pass")
    else:
        why = "its inputs were never computed"
    return InterventionError(f"{node.location or '<graph>'}: {node.describe()} never ran: {why}",
                             location=node.location, module=node.module, node=node.id)
