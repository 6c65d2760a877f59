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

The lengths of a known list's items are followed too, so a list of lists iterates at both levels
(``for item in l: for x in item:``): an item put in as a Python list or tuple, or as a traced list of
known length, has a known length, and so has ``l[k]`` read with a constant ``k`` (inside a
``session.iter`` block, whose item's index changes per copy, only when every item has the same
length). A change to any such item, or to the list otherwise than above, forgets the items'
lengths (of every list: an item may sit in several).
"""
from __future__ import annotations

from typing import Any

from ..graph.node import Kind, Node, Ref

_CHANGES = {"append": 1, "insert": 1, "pop": -1, "remove": -1}
_READS = frozenset({"operator.getitem", "builtins.len", "Tensor.size"})


class KnownLengths:
    """The lengths known while recording, by node id, for one recorder."""

    def __init__(self) -> None:
        #: The lengths known now, by node id (to read: while it is empty, only an operation can matter
        #: to :meth:`note`, so the recorder asks for nothing else).
        self.known: dict[int, int] = {}
        self._methods: dict[int, tuple[int, str]] = {}  # getattr node -> (list node, method name)
        #: per list of known length, the length of each item (None: unknown)
        self._items: dict[int, list[int | None]] = {}
        #: nodes whose length is an item's (``l[k]``, a traced list put into a list): a change to one
        #: forgets every list's items
        self._item_nodes: set[int] = set()

    def get(self, node_id: int) -> int | None:
        return self.known.get(node_id)

    def forget_from(self, first: int) -> None:
        """Forget what is known about nodes ``first`` and later (renumbered by an unrolled block)."""
        for table in (self.known, self._methods, self._items):
            for node_id in [n for n in table if n >= first]:
                del table[node_id]
        self._item_nodes = {n for n in self._item_nodes if n < first}

    def note(self, node: Node, unconditional: bool, in_block: bool = False) -> None:
        """Follow ``node``, just recorded (``unconditional``: outside any condition, generation-step
        block or ``session.iter`` block; ``in_block``: inside a ``session.iter`` block): a new list, a
        change to a known one, an item read from one, or another use of it."""
        if node.kind == Kind.OP and node.target == "builtins.list":
            self._new_list(node, unconditional)
            return
        if not self.known:
            return
        if node.kind == Kind.OP and node.target == "getattr" and _ref(node.args[0]) in self.known:
            name = node.args[1]
            if name in _CHANGES or name in ("extend", "clear"):
                self._methods[node.id] = (_ref(node.args[0]), name)
            return
        if node.kind == Kind.OP and node.target == "call" and _ref(node.args[0]) in self._methods:
            list_id, name = self._methods.pop(_ref(node.args[0]))
            length = self.known.get(list_id)
            if length is not None and unconditional:
                changed = _changed_length(length, name, node.args[1:])
                if changed is not None:
                    self.known[list_id] = changed
                    if list_id in self._item_nodes:
                        self._items.clear()
                    self._change_items(list_id, name, node.args[1:])
                    return
            self._forget([list_id])
            return
        if node.kind == Kind.OP and node.target == "operator.getitem":
            self._read_item(node, in_block)
            return
        if node.kind == Kind.SAVE or (node.kind == Kind.OP and node.target in _READS):
            return
        self._forget(node.deps())  # handed somewhere that may change it

    def _new_list(self, node: Node, unconditional: bool) -> None:
        """``nd.list(a, b)``, or a copy of a known list (``session.iter`` copies its traced list)."""
        items = node.args[0] if node.args else []
        if isinstance(items, list) and unconditional:
            self.known[node.id] = len(items)
            self._items[node.id] = [self._length_of(item) for item in items]
        elif isinstance(items, Ref) and items.id in self.known:
            self.known[node.id] = self.known[items.id]
            if items.id in self._items:
                self._items[node.id] = list(self._items[items.id])

    def _length_of(self, value: Any) -> int | None:
        """The length of a value put into a list: a Python list or tuple, or a traced list of known length."""
        if isinstance(value, (list, tuple)):
            return len(value)
        if isinstance(value, Ref) and value.id in self.known:
            self._item_nodes.add(value.id)  # changed later, it changes this item too
            return self.known[value.id]
        return None

    def _change_items(self, list_id: int, name: str, args: tuple[Any, ...]) -> None:
        items = self._items.get(list_id)
        if items is None:
            return
        if name == "append":
            items.append(self._length_of(args[0]))
        elif name == "extend":
            items.extend(self._length_of(item) for item in args[0])
        elif name == "clear":
            items.clear()
        elif name == "insert" and len(args) == 2 and type(args[0]) is int:
            items.insert(args[0], self._length_of(args[1]))
        elif name == "pop" and (not args or (type(args[0]) is int and -len(items) <= args[0] < len(items))):
            items.pop(args[0] if args else -1)
        else:  # an index or an item known only when the model runs
            del self._items[list_id]

    def _read_item(self, node: Node, in_block: bool) -> None:
        """``l[k]``: a read, which changes nothing; with a constant ``k``, the item's length if known."""
        list_id, index = _ref(node.args[0]), node.args[1]
        items = self._items.get(list_id)  # type: ignore[arg-type]
        if items is None or type(index) is not int or not -len(items) <= index < len(items):
            return
        length = items[index]
        if in_block and any(other != length for other in items):
            return  # a session.iter block's item reads a different index in each copy
        if length is not None:
            self.known[node.id] = length
            self._item_nodes.add(node.id)

    def _forget(self, refs: list[int]) -> None:
        for ref in refs:
            self.known.pop(ref, None)
            self._items.pop(ref, None)
            if ref in self._item_nodes:
                self._items.clear()  # an item changed through another name


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
