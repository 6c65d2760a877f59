"""``ExperimentFuture``: a remote experiment running in the background (``blocking=False`` traces)."""
from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

from distributed import Client

from ..graph.graph import InterventionGraph
from ..worker.results import Results
from .experiment import run_experiment


class ExperimentFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """A remote experiment running in the background; ``result()`` gives its :class:`Results`."""

    def __init__(self, client: Client, name: str, graph: InterventionGraph,
                 deliver: Callable[[Results], None] | None = None, **options: Any) -> None:
        super().__init__()
        self._cancel_event = threading.Event()
        self.set_running_or_notify_cancel()
        self._thread = threading.Thread(target=self._drive, args=(client, name, graph, deliver, options),
                                        name="nnsight-dask-experiment", daemon=True)
        self._thread.start()

    def _drive(self, client: Client, name: str, graph: InterventionGraph,
               deliver: Callable[[Results], None] | None, options: dict[str, Any]) -> None:
        """Run the experiment; ``deliver`` gets the results before anyone waiting wakes up."""
        try:
            result = run_experiment(client, name, graph, cancelled=self._cancel_event, **options)
            if deliver is not None:
                deliver(result)
        except concurrent.futures.CancelledError:
            with self._condition:
                self._state = "CANCELLED_AND_NOTIFIED"
                self._condition.notify_all()
            self._invoke_callbacks()
        except BaseException as exc:
            self.set_exception(exc)
        else:
            self.set_result(result)

    def cancel(self) -> bool:
        """Stop the experiment: its queued and running stages are cancelled on the cluster."""
        if self.done():
            return False
        self._cancel_event.set()
        self._thread.join(timeout=10)
        return self.cancelled()
