"""``with tracer.cond(x):`` (and ``session.cond``, and a Python ``if`` on a traced value): the nodes
recorded inside run only when the condition is true; nested conditions combine with ``all``.

Kept apart from :mod:`.tracer` so :mod:`.control_flow` and its torch-free check
(``tests/control_flow_check``) use this very class. It knows the recorder only as a
:class:`~.recording.Recording`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..graph.node import Kind, Ref
from .proxy import Proxy
from .recording import Recording


class CondBlock:
    """Nodes recorded inside run only when the condition's value is true (``tracer.cond``, and
    ``session.cond`` around whole traces)."""

    def __init__(self, recorder: Callable[[], Recording], condition: Any) -> None:
        self._recorder = recorder
        self.condition = condition
        self._previous: int | None = None

    def __enter__(self) -> CondBlock:
        recorder = self._recorder()
        self._previous = recorder.cond
        condition = self.condition
        if self._previous is not None:
            condition = recorder.add(Kind.OP, ([Ref(self._previous), condition],), target="builtins.all")
        if not isinstance(condition, Proxy):
            condition = recorder.add(Kind.OP, (condition,), target="builtins.bool")
        recorder.cond = condition._node
        return self

    def __exit__(self, *exc: Any) -> None:
        self._recorder().cond = self._previous
