"""Status events of experiments, from the threads that run them to the connections that watch them.

Experiments run in threads; websockets and waiting requests live on the gateway's event loop. The
hub keeps each unfinished experiment's events so far (numbered, so a watcher that connects late is
first replayed the history, then gets live events exactly once) and hands every new event to the
loop, where the listeners run.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

Listener = Callable[[dict[str, Any]], None]
#: Events kept per experiment (queue positions may change often; the first and the latest matter).
MAX_HISTORY = 200


class EventHub:
    """Per-experiment event history and listeners (``publish`` from any thread; the rest on ``loop``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._history: dict[str, list[dict[str, Any]]] = {}
        self._listeners: dict[str, set[Listener]] = {}

    def publish(self, experiment: str, event: dict[str, Any]) -> None:
        """Record ``event`` (adds its sequence number ``seq``) and deliver it on the loop."""
        with self._lock:
            history = self._history.setdefault(experiment, [])
            event = {**event, "seq": history[-1]["seq"] + 1 if history else 0}
            history.append(event)
            if len(history) > MAX_HISTORY:
                del history[1:len(history) - MAX_HISTORY + 1]
            if event.get("status") in ("COMPLETED", "FAILED", "CANCELLED"):
                del self._history[experiment]  # final: the state store has it from now on
        try:
            self.loop.call_soon_threadsafe(self._deliver, experiment, event)
        except RuntimeError:  # the gateway stopped: nobody is watching any more
            pass

    def history(self, experiment: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._history.get(experiment, ()))

    def listen(self, experiment: str, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` on the loop for each new event; returns the function that stops it."""
        self._listeners.setdefault(experiment, set()).add(listener)

        def stop() -> None:
            listeners = self._listeners.get(experiment)
            if listeners is not None:
                listeners.discard(listener)
                if not listeners:
                    del self._listeners[experiment]
        return stop

    def _deliver(self, experiment: str, event: dict[str, Any]) -> None:
        for listener in list(self._listeners.get(experiment, ())):
            listener(event)
