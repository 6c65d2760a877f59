"""Lengths of traced lists that are known while recording, so ``for x in l`` and ``len(l)`` work.

A traced list (``nd.list()``, ``nd.list(a, b)``) exists only when the model runs, but its length
often does not depend on the run: it was made with some items, then appended to a known number
of times. nnsight 0.4 iterates such a list at run time; here the graph is recorded ahead, so
``for x in l:`` records the loop body once per item (``l[0]``, ``l[1]``, ...) and ``session.iter(l)``
unrolls once per item, as over a Python list.

A length stays known while every change to the list is a method call recorded unconditionally
(``append``/``insert``/``pop``/``remove``/``clear``, ``extend`` with a Python sequence); a change
under a condition, a generation-step block or a ``session.iter`` block, or any other use that could
change the list (handing it to a function), makes it unknown, and iterating it is then refused.
"""
from __future__ import annotations

from typing import Any

from ..graph.node import Kind, Node, Ref

_CHANGES = {"append": 1, "insert": 1, "pop": -1, "remove": -1}
_READS = frozenset({"operator.getitem", "builtins.len", "Tensor.size"})


class KnownLengths:
    """The lengths known while recording, by node id, for one recorder."""

    def __init__(self) -> None:
        self._lengths: dict[int, int] = {}
        self._methods: dict[int, tuple[int, str]] = {}  # getattr node -> (list node, method name)

    def get(self, node_id: int) -> int | None:
        return self._lengths.get(node_id)

    def note(self, node: Node, unconditional: bool) -> None:
        """Follow ``node``, just recorded (``unconditional``: outside any condition, generation-step
        block or ``session.iter`` block): a new list, a change to a known one, or another use of it."""
        if node.kind == Kind.OP and node.target == "builtins.list" and unconditional:
            items = node.args[0] if node.args else []
            if isinstance(items, list):
                self._lengths[node.id] = len(items)
            return
        if not self._lengths:
            return
        if node.kind == Kind.OP and node.target == "getattr" and _ref(node.args[0]) in self._lengths:
            name = node.args[1]
            if name in _CHANGES or name in ("extend", "clear"):
                self._methods[node.id] = (_ref(node.args[0]), name)
            return
        if node.kind == Kind.OP and node.target == "call" and _ref(node.args[0]) in self._methods:
            list_id, name = self._methods.pop(_ref(node.args[0]))
            length = self._lengths.get(list_id)
            if length is not None and unconditional:
                changed = _changed_length(length, name, node.args[1:])
                if changed is not None:
                    self._lengths[list_id] = changed
                    return
            self._lengths.pop(list_id, None)
            return
        if node.kind == Kind.SAVE or (node.kind == Kind.OP and node.target in _READS):
            return
        for ref in node.deps():
            self._lengths.pop(ref, None)  # handed somewhere that may change it


def _changed_length(length: int, name: str, args: tuple[Any, ...]) -> int | None:
    if name == "clear":
        return 0
    if name == "extend":
        return length + len(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else None
    if name in ("pop", "remove") and length == 0:
        return None  # fails at run time; the error belongs there
    return length + _CHANGES[name]


def _ref(obj: Any) -> int | None:
    return obj.id if isinstance(obj, Ref) else None
