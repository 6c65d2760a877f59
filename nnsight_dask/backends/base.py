"""The contracts between recording and running: :class:`Backend`, :class:`RunResult`, :class:`SaveSink`.

Tracing records a graph and hands it to a Backend; it knows nothing of how or where the graph runs.
The local backend runs it in this process; the remote one sends it to a deployment. Both return a
:class:`RunResult`, and both persist large saves through a :class:`SaveSink` with the same
write / commit / abort lifecycle.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from concurrent.futures import Future

    from ..graph.graph import InterventionGraph


@dataclass
class RunResult:
    """What an experiment returns: saved values by name, and lines logged with ``tracer.log``."""

    saves: dict[str, Any] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)


class SaveSink(Protocol):
    """Where saved values above a size threshold go instead of travelling inline.

    ``write`` is called by whoever produced the value (the local runner, or the shard that computed
    it) and returns what travels on: the value itself, or a reference to where it was written.
    ``commit`` (every stage succeeded: make the values visible; returns the bytes persisted) or
    ``abort`` (nothing may look whole) is called once, by whoever ran the experiment.
    """

    def write(self, name: str, value: Any) -> Any: ...

    def commit(self, saves: Mapping[str, Any]) -> int: ...

    def abort(self) -> None: ...


class Backend(abc.ABC):
    """Runs graphs: :meth:`run` blocks and returns the result; :meth:`submit` returns a future of it."""

    @abc.abstractmethod
    def run(self, graph: InterventionGraph, **options: Any) -> RunResult:
        """Run ``graph`` and return its saved values and logs."""

    @abc.abstractmethod
    def submit(self, graph: InterventionGraph, deliver: Callable[[RunResult], None] | None = None,
               **options: Any) -> Future[Any]:
        """A future of the run; ``deliver(result)`` is called before the future is done, so whoever
        wakes on it finds the saved values already handed out."""

    @abc.abstractmethod
    def scan(self, graph: InterventionGraph) -> RunResult:
        """Run ``graph`` on fake tensors: shapes and errors, nothing heavy (``trace(scan=True)``)."""
