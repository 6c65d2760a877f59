"""What proxies, conditions and ``if`` branches need of the recorder that records them.

:class:`~.recorder.Recorder` is the one implementation. The modules below it (:mod:`.proxy`,
:mod:`.conditions`, :mod:`.control_flow`) name this protocol instead of importing the recorder,
which itself creates proxies and opens branches: so files import one way.
"""
from __future__ import annotations

from types import FrameType
from typing import Any, Protocol

from ..graph.node import Node


class Recording(Protocol):
    """A recorder as seen from the values and blocks it recorded."""

    #: False once the trace has finished (its proxies then hold values, or explain why not)
    recording: bool
    #: the condition node new nodes are recorded under (``None``: unconditional)
    cond: int | None
    #: saves recorded after a stop of their pass, which never ran, by the saved node's id
    never_ran: dict[int, Node]

    def add(self, kind: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *,
            iteration: int | None = None, **fields: Any) -> Any:
        """Record a node; returns the proxy standing for its value."""

    def node(self, node_id: int) -> Node:
        """The recorded node ``node_id``."""

    def save(self, proxy: Any, name: str | None) -> None:
        """Keep ``proxy``'s value after the trace, under ``name`` (default: the variable's name)."""

    def retain_grad(self, proxy: Any) -> None:
        """Keep ``proxy``'s gradient in the next backward as its saved value's ``.grad``."""

    def known_length(self, node_id: int) -> int | None:
        """The length of a traced list while recording, when known (see :mod:`.lengths`)."""

    def enter_branch(self, proxy: Any, frame: FrameType) -> bool | None:
        """A truth test on ``proxy`` in ``frame``: record the ``if`` it decides (True) or ``None``."""
