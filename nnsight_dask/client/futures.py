"""``ExperimentFuture``: a remote experiment running in the background (``blocking=False`` traces)."""
from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any


class ExperimentFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """A remote experiment running in the background; ``result()`` gives its results.

    ``run(cancelled)`` runs the experiment to its end, whichever way it reaches the cluster (a Dask
    client, or the HTTP gateway), and raises ``CancelledError`` soon after the ``cancelled`` event is
    set; ``deliver`` gets the results before anyone waiting on the future wakes up.
    """

    def __init__(self, run: Callable[[threading.Event], Any], deliver: Callable[[Any], None] | None = None, *,
                 cancel_wait: float = 10.0) -> None:
        super().__init__()
        self._cancel_event = threading.Event()
        self._cancel_wait = cancel_wait
        self.set_running_or_notify_cancel()
        self._thread = threading.Thread(target=self._drive, args=(run, deliver), name="nnsight-dask-experiment",
                                        daemon=True)
        self._thread.start()

    def _drive(self, run: Callable[[threading.Event], Any], deliver: Callable[[Any], None] | None) -> None:
        try:
            result = run(self._cancel_event)
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
        """Stop the experiment: its queued and running stages are cancelled on the cluster (waits up
        to ``cancel_wait`` seconds for that to be confirmed)."""
        if self.done():
            return False
        self._cancel_event.set()
        self._thread.join(timeout=self._cancel_wait)
        return self.cancelled()
