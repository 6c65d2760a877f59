"""``ExperimentFuture``: a remote experiment running in the background (``blocking=False`` traces)."""
from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

#: Longest ``cancel()`` waits for the run to confirm the stop; it normally takes one of the run's
#: checks (``POLL_SECONDS`` of :mod:`.experiment`, 0.2 s) and one message to the shards' workers.
CANCEL_WAIT = 1.0


class ExperimentFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """A remote experiment running in the background; ``result()`` gives its results.

    ``run(cancelled)`` runs the experiment to its end, whichever way it reaches the cluster (a Dask
    client, or the HTTP gateway), and raises ``CancelledError`` soon after the ``cancelled`` event is
    set, having stopped the experiment on the cluster; ``deliver`` gets the results before anyone
    waiting on the future wakes up.
    """

    def __init__(self, run: Callable[[threading.Event], Any], deliver: Callable[[Any], None] | None = None, *,
                 cancel_wait: float = CANCEL_WAIT) -> None:
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
            if deliver is not None and not self._cancel_event.is_set():
                deliver(result)
        except concurrent.futures.CancelledError:
            self._end_cancelled()
        except BaseException as exc:
            self._end(lambda: self.set_exception(exc))
        else:
            self._end(lambda: self.set_result(result))

    def _end(self, settle: Callable[[], None]) -> None:
        """Settle the future with the run's outcome, unless ``cancel()`` already ended it cancelled."""
        with self._condition:
            if self._cancel_event.is_set() or self._state != "RUNNING":
                return
            settle()

    def _end_cancelled(self) -> bool:
        """End the future cancelled (once); False if it had finished with a result or an error."""
        with self._condition:
            if self._state == "FINISHED":
                return False
            if self._state == "CANCELLED_AND_NOTIFIED":
                return True
            self._state = "CANCELLED_AND_NOTIFIED"
            self._condition.notify_all()
        self._invoke_callbacks()
        return True

    def cancel(self) -> bool:
        """Stop the experiment: its queued and running stages are stopped on the cluster (a running
        stage before its next decoder layer) and its state there is freed.

        Returns once the run has confirmed the stop, normally within one of its checks, and at most
        after ``cancel_wait`` seconds: the future is cancelled then whatever the run is doing (a
        run busy elsewhere, e.g. re-creating a lost shard, stops the experiment at its next check).
        False if the experiment had already finished.
        """
        with self._condition:
            if self._state == "FINISHED":
                return False
        self._cancel_event.set()
        self._thread.join(timeout=self._cancel_wait)
        return self._end_cancelled()
