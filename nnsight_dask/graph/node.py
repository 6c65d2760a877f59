"""A node of the intervention graph and the reference one node's argument makes to another."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import GraphValidationError


class Ref:
    """An argument that stands for the value of node ``id``."""

    __slots__ = ("id",)

    def __init__(self, id: int) -> None:
        self.id = id

    def __repr__(self) -> str:
        return f"%{self.id}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("Ref", self.id))


class Kind:
    """Node kinds. Event-bound kinds run when their module (or gradient) fires; the rest are free."""

    GETTER = "getter"            # read a module's input/inputs/output at one call
    SETTER = "setter"            # replace a module's input/inputs/output at one call
    SKIP = "skip"                # do not run the module at one call; use the given value as its output
    OP = "op"                    # a whitelisted function applied to arguments
    MODULE_CALL = "module_call"  # call a module of the model on arguments (e.g. the logit lens)
    MODULE_ATTR = "module_attr"  # read a parameter/buffer/attribute of a module (e.g. lm_head.weight)
    GRAD = "grad"                # the gradient flowing into a tensor during backward
    GRAD_SETTER = "grad_setter"  # replace that gradient
    BACKWARD = "backward"        # run backward from a (loss) tensor
    SAVE = "save"                # keep a value for the user
    LOG = "log"                  # print a value when it is computed
    APPLY = "apply"              # a user's own Python function: local only
    RESULT = "result"            # the pass's final result (generated ids / model output)
    STOP = "stop"                # stop the forward pass once every earlier node ran (with an argument: once it exists)

    EVENT_BOUND = frozenset({GETTER, SETTER, SKIP, GRAD, GRAD_SETTER, RESULT})
    GRADIENTS = frozenset({GRAD, GRAD_SETTER})             # reads and writes of a gradient
    AUTOGRAD = frozenset({GRAD, GRAD_SETTER, BACKWARD})    # what needs autograd while the graph runs
    MODULE_BOUND = frozenset({GETTER, SETTER, SKIP, MODULE_CALL, MODULE_ATTR})
    ALL = frozenset({GETTER, SETTER, SKIP, OP, MODULE_CALL, MODULE_ATTR, GRAD, GRAD_SETTER,
                     BACKWARD, SAVE, LOG, APPLY, RESULT, STOP})


#: What a getter or setter touches on a module call.
ACCESSES = ("output", "input", "inputs")
#: The access of a module call made with the trace's hooks live (nnsight's ``module(x, hook=True)``):
#: interventions on the module and its submodules apply to that call, which counts as one of theirs.
HOOKED_CALL = "hooks"


@dataclass(slots=True)
class Node:
    """One recorded step of an experiment.

    ``module`` is the dotted path of the module the node is bound to (``None``: free, it runs
    wherever its arguments exist). ``call`` counts calls of that module within the pass (the
    generation step for decoder modules); in an iteration block it is an offset from the step.
    ``invoke`` names the batch rows the node sees (``None``: the whole batch).
    """

    id: int
    kind: str
    target: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    module: str | None = None
    access: str | None = None
    invoke: int | None = None
    call: int = 0
    pass_index: int = 0
    iteration: int | None = None
    cond: int | None = None
    location: str | None = None

    def deps(self) -> list[int]:
        """Ids of the nodes whose values this node needs (its condition included)."""
        found: list[int] = []
        _collect_refs(self.args, found)
        _collect_refs(self.kwargs, found)
        if self.cond is not None:
            found.append(self.cond)
        return found

    def describe(self) -> str:
        """Short human description, used in error messages."""
        if self.kind in (Kind.GETTER, Kind.SETTER):
            verb = "read of" if self.kind == Kind.GETTER else "write to"
            step = f" (call {self.call})" if self.call else ""
            return f"{verb} {display_path(self.module)}.{self.access}{step}"
        if self.kind == Kind.OP:
            return f"operation {self.target}"
        if self.kind in (Kind.MODULE_CALL, Kind.SKIP, Kind.MODULE_ATTR):
            return f"{self.kind} {display_path(self.module)}" + (f".{self.target}" if self.target else "")
        if self.kind == Kind.SAVE:
            return f"save {self.target!r}"
        return self.kind


#: The scalar fields of a node by wire name (``pass`` is :attr:`Node.pass_index`): optional strings,
#: optional integers, integers.
OPTIONAL_STR_FIELDS = ("target", "module", "access", "location")
OPTIONAL_INT_FIELDS = ("invoke", "iteration", "cond")
INT_FIELDS = ("call", "pass")


def check_fields(node: Node) -> None:
    """Raise :class:`GraphValidationError` naming the first scalar field of ``node`` of the wrong type.

    Integers are Python ``int`` (``True`` and ``1.0`` are refused); strings are ``str``.

    >>> check_fields(Node(id=3, kind="getter", call=1.0))
    Traceback (most recent call last):
    nnsight_dask.errors.GraphValidationError: node %3, field 'call': expected an integer, got 1.0 (float)
    """
    for name in OPTIONAL_STR_FIELDS:
        value = getattr(node, name)
        if value is not None and type(value) is not str:
            raise field_error(node.id, name, f"expected a string or null, got {short(value)} ({type(value).__name__})")
    for name in OPTIONAL_INT_FIELDS:
        value = getattr(node, name)
        if value is not None and type(value) is not int:
            raise field_error(node.id, name,
                              f"expected an integer or null, got {short(value)} ({type(value).__name__})")
    for name in INT_FIELDS:
        value = getattr(node, "pass_index" if name == "pass" else name)
        if type(value) is not int:
            raise field_error(node.id, name, f"expected an integer, got {short(value)} ({type(value).__name__})")


def field_error(node_id: int, field_name: str, problem: str, cls: type[GraphValidationError] = GraphValidationError,
                **fields: Any) -> GraphValidationError:
    """``node %3, field 'call': <problem>``, carrying ``node`` and ``field``."""
    return cls(f"node %{node_id}, field {field_name!r}: {problem}", node=node_id, field=field_name, **fields)


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about values from anyone."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _collect_refs(obj: Any, out: list[int]) -> None:
    if isinstance(obj, Ref):
        out.append(obj.id)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _collect_refs(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _collect_refs(item, out)
    elif isinstance(obj, slice):
        _collect_refs((obj.start, obj.stop, obj.step), out)


def display_path(module_path: str | None) -> str:
    """``"model.layers.5.mlp"`` -> ``"model.layers[5].mlp"`` (how the user wrote it)."""
    if module_path is None:
        return "<free>"
    if module_path == "":
        return "<model>"
    parts = []
    for part in module_path.split("."):
        if part.isdigit() or (part.startswith("-") and part[1:].isdigit()):
            parts[-1] = f"{parts[-1]}[{part}]" if parts else f"[{part}]"
        else:
            parts.append(part)
    return ".".join(parts)
