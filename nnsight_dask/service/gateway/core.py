"""``GatewayCore``: what the HTTP handlers serve with, the parts of a running gateway.

:class:`~.server.Gateway` owns the lifecycle (the cluster client, the HTTP server and its thread,
the settings); once started, it hands this to every handler (:func:`.handlers.routes`). The
handlers see only these parts, so they do not import the server that builds them.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from .admission import Admission, FairPool
from .deployments import DeploymentCache
from .dispatch import Dispatcher
from .events import EventHub
from .keys import KeyRing
from .state import FINAL, StateStore


@dataclass(frozen=True)
class GatewayCore:
    """The running gateway's parts, as the handlers use them.

    Attributes
    ----------
    keys
        Who may call, and as which user.
    state
        Every experiment's status and result (sqlite, in the gateway's state directory).
    deployments
        What the cluster serves, cached.
    dispatcher
        Runs admitted experiments on the cluster, fairly between users.
    events
        Status events, for ``wait=`` and the event streams.
    admission
        Bounds each user's submissions in progress and refusals.
    io_pool, validation_pool
        Threads for blocking reads and for parsing and validating submissions (users take turns).
    result_store
        Where users' persisted saves go, each under ``<result_store>/<user>/``.
    max_body_bytes, max_json_values
        A request body's limits.
    """

    keys: KeyRing
    state: StateStore
    deployments: DeploymentCache
    dispatcher: Dispatcher
    events: EventHub
    admission: Admission
    io_pool: FairPool
    validation_pool: FairPool
    result_store: str
    max_body_bytes: int
    max_json_values: int

    async def wait_final(self, experiment: str, seconds: float) -> None:
        """Return when ``experiment`` ends, or after ``seconds``."""
        done = asyncio.get_running_loop().create_future()

        def on_event(event: dict[str, Any]) -> None:
            if event.get("status") in FINAL and not done.done():
                done.set_result(None)
        stop = self.events.listen(experiment, on_event)
        try:
            row = self.state.get(experiment)
            if row is not None and row["status"] not in FINAL:  # it may have ended before we listened
                await asyncio.wait_for(done, seconds)
        except asyncio.TimeoutError:
            pass
        finally:
            stop()
