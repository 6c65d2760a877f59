"""Where a recorded graph runs. The local backend runs it in this process; a remote backend
(``remote=`` a Dask client or a deployment handle) plugs in through the same two calls."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..execution.runner import RunResult, run_graph
from ..graph.graph import InterventionGraph


class Backend(Protocol):
    """Runs graphs: ``run`` blocks and returns the result; ``submit`` returns a future of it."""

    def run(self, graph: InterventionGraph, **options: Any) -> RunResult: ...

    def submit(self, graph: InterventionGraph, deliver: Callable[[RunResult], None] | None = None,
               **options: Any) -> Any:
        """A future of the run; ``deliver(result)`` is called before the future is done, so whoever
        wakes on it finds the saved values already handed out."""


class LocalBackend:
    """Runs graphs on a torch module held in this process."""

    def __init__(self, module: torch.nn.Module, pad_token_id: int | None = None) -> None:
        self.module = module
        self.pad_token_id = pad_token_id

    def run(self, graph: InterventionGraph, *, fake: bool = False, **_options: Any) -> RunResult:
        return run_graph(self.module, graph, pad_token_id=self.pad_token_id, fake=fake)

    def submit(self, graph: InterventionGraph, deliver: Callable[[RunResult], None] | None = None,
               **options: Any) -> Any:
        from concurrent.futures import Future

        future: Future[RunResult] = Future()
        try:
            result = self.run(graph, **options)
            if deliver is not None:
                deliver(result)
            future.set_result(result)
        except Exception as exc:  # the future carries the failure to whoever waits on it
            future.set_exception(exc)
        return future
