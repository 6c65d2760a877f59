"""``Gateway``: the authenticated HTTP front door of a Dask cluster's deployments.

The gateway is the one Dask client of the shared service: it holds the cluster connection, and users
hold only API keys. It runs a tornado HTTP server on an event loop of its own thread, so it starts
the same way from the CLI (``nnsight-dask gateway``), a test or a notebook::

    with Gateway("tcp://head:8786", "keys.toml", port=8000) as gateway:
        ...                                   # http://127.0.0.1:8000/v1/...

Hostile and slow clients are bounded before they cost anyone else (docs/gateway.md, Robustness):
headers must arrive within ``header_timeout`` seconds (also how long an idle connection stays) and a
body within ``body_timeout``; connections without a key are capped (:mod:`.connections`); a
submission is admitted per user from its headers, and parsed and validated in a pool users take in
turn (:mod:`.admission`, :mod:`.bodies`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path
from typing import Any

from distributed import Client
from tornado import netutil, web
from tornado.ioloop import PeriodicCallback

from ... import config
from ...client.deployment import install_monitor
from ...scheduler import monitor
from ...storage.location import normalize_url
from .admission import Admission, FairPool
from .connections import ConnectionGuard, GuardedHTTPServer, default_max_unauthenticated
from .core import GatewayCore
from .deployments import DeploymentCache
from .dispatch import Dispatcher
from .events import EventHub
from .handlers import NotFound, routes
from .keys import KeyRing
from .state import StateStore

#: How often (ms) lapsed keepalives are looked for.
EXPIRE_EVERY_MS = 500


class Gateway:
    """The HTTP gateway (see the module docstring and docs/gateway.md).

    Parameters
    ----------
    scheduler
        The cluster: a scheduler address (the gateway opens its own client) or a ``Client``. A
        ``Client`` counts as the gateway's while it serves: experiments sent through it directly are
        then shown as the gateway's too (``via``), and no longer once the gateway stops.
    keys
        The users: a path to ``keys.toml`` or a :class:`~.keys.KeyRing`.
    host, port
        Where to listen (``port=0``: any free port; see :attr:`url`).
    state_dir
        Where statuses (sqlite) and inline results live (default ``nnsight-dask.gateway-state-dir``).
    result_store
        Where users' persisted saves go, each under ``<result_store>/<user>/`` (default
        ``nnsight-dask.gateway-result-store``, else ``<state_dir>/store``: only right when the workers
        share the gateway's disk).
    max_in_flight, max_in_flight_per_user, max_body_bytes, max_json_values, header_timeout, body_timeout,
    max_unauthenticated, max_submitting_per_user, refusals_per_minute, validation_threads
        Default to the ``nnsight-dask.gateway-*`` settings (docs/gateway.md lists them).

    Attributes
    ----------
    interrupted
        Experiments a previous run left unfinished (a crash), marked FAILED when this one started.
    core
        The parts the handlers serve with (:class:`~.core.GatewayCore`), once started.
    """

    def __init__(self, scheduler: str | Client, keys: KeyRing | str | Path, *, host: str = "127.0.0.1",
                 port: int = 8000, state_dir: str | Path | None = None, result_store: str | None = None,
                 max_in_flight: int | None = None, max_in_flight_per_user: int | None = None,
                 max_body_bytes: int | None = None, max_json_values: int | None = None,
                 header_timeout: float | None = None, body_timeout: float | None = None,
                 max_unauthenticated: int | None = None, max_submitting_per_user: int | None = None,
                 refusals_per_minute: float | None = None, validation_threads: int | None = None) -> None:
        self.scheduler = scheduler
        self.keys = keys if isinstance(keys, KeyRing) else KeyRing.from_toml(keys)
        self.host, self.port = host, port
        self.state_dir = Path(state_dir or config.gateway_state_dir or config.cache_dir / "gateway")
        self.result_store = normalize_url(result_store or config.gateway_result_store or self.state_dir / "store")
        self.max_in_flight = max_in_flight or config.gateway_max_in_flight
        self.max_in_flight_per_user = max_in_flight_per_user or config.gateway_max_in_flight_per_user
        self.max_body_bytes = max_body_bytes or config.gateway_max_body_bytes
        self.max_json_values = max_json_values or config.gateway_max_json_values
        self.header_timeout = header_timeout or config.gateway_header_timeout
        self.body_timeout = body_timeout or config.gateway_body_timeout
        self.max_unauthenticated = (max_unauthenticated or config.gateway_max_unauthenticated
                                    or default_max_unauthenticated())
        self.max_submitting_per_user = max_submitting_per_user or config.gateway_max_submitting_per_user
        self.refusals_per_minute = refusals_per_minute or config.gateway_refusals_per_minute
        self.validation_threads = validation_threads or config.gateway_validation_threads
        self.client: Client | None = None
        self.core: GatewayCore | None = None
        self._own_client = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: httpserver.HTTPServer | None = None
        self.interrupted = 0

    @property
    def url(self) -> str:
        """The gateway's base URL (``http://host:port``)."""
        return f"http://{self.host}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Gateway:
        """Connect to the cluster, recover the state directory and listen; returns once serving."""
        if isinstance(self.scheduler, Client):
            self.client = self.scheduler
        else:
            self.client = Client(self.scheduler, set_as_default=False)
            self._own_client = True
        state = StateStore(self.state_dir)
        self.interrupted = state.fail_unfinished(
            "the gateway restarted before the experiment finished; submit it again")
        deployments = DeploymentCache(self.client)
        self.connections = ConnectionGuard(self.max_unauthenticated, self.keys.authenticate)
        self._loop = asyncio.new_event_loop()
        events = EventHub(self._loop)
        self.core = GatewayCore(
            keys=self.keys, state=state, deployments=deployments, events=events,
            dispatcher=Dispatcher(self.client, deployments, state, events.publish,
                                  self.max_in_flight, self.max_in_flight_per_user),
            admission=Admission(self.max_submitting_per_user, self.refusals_per_minute),
            io_pool=FairPool(8, per_user=4, name="nnsight-gateway-io"),
            validation_pool=FairPool(self.validation_threads, per_user=1),
            result_store=self.result_store, max_body_bytes=self.max_body_bytes, max_json_values=self.max_json_values)
        install_monitor(self.client)  # before the first experiment, so that its users show as checked
        self.client.run_on_scheduler(_on_scheduler, gateway=self.client.id)
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="nnsight-gateway", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout=30)
        except BaseException:  # e.g. the port is taken: release what was opened
            self._thread.join(timeout=30)
            self._thread = None
            self._release()
            raise
        return self

    def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        loop, core = self._loop, self.core
        assert loop is not None and core is not None
        asyncio.set_event_loop(loop)
        try:
            application = web.Application(routes(core), default_handler_class=NotFound,
                                          default_handler_args={"core": core}, websocket_max_message_size=1 << 16)
            # the handlers answer 413 past max_body_bytes; tornado itself drops connections past 4x
            self._server = GuardedHTTPServer(application, max_body_size=4 * self.max_body_bytes,
                                             body_timeout=self.body_timeout, header_timeout=self.header_timeout,
                                             guard=self.connections)
            sockets = netutil.bind_sockets(self.port, self.host)
            self._server.listen_on(sockets)
            self.port = sockets[0].getsockname()[1]  # the one chosen when port=0
            expire = PeriodicCallback(core.dispatcher.expire, EXPIRE_EVERY_MS)
            expire.start()
        except BaseException as exc:
            ready.set_exception(exc)
            loop.close()
            return
        ready.set_result(None)
        loop.run_forever()
        expire.stop()
        loop.run_until_complete(self._server.close_all_connections())
        loop.close()

    def stop(self) -> None:
        """Stop serving; experiments not finished end FAILED with the reason (shards freed)."""
        if self._thread is None or self.core is None:
            return
        self.core.dispatcher.stop()
        loop = self._loop
        assert loop is not None and self._server is not None
        loop.call_soon_threadsafe(self._server.stop)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=30)
        self._thread = None
        self._release()

    def _release(self) -> None:
        assert self.core is not None
        self.core.validation_pool.shutdown()
        self.core.io_pool.shutdown()
        self.core.state.close()
        if self.client is not None and self._own_client:
            self.client.close()  # the monitor forgets a client that leaves
        elif self.client is not None:  # the caller's client, still in use: no longer a gateway's
            self.client.run_on_scheduler(_on_scheduler, gateway=self.client.id, trusted=False)
        self.client = None

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _on_scheduler(dask_scheduler: Any, gateway: str, trusted: bool = True) -> None:
    """Run on the scheduler (Dask passes it by this parameter's name): tell the experiment monitor
    that Dask client ``gateway`` stamps authenticated users (the monitor, registered by then, has
    mounted the Experiments page), or, ``trusted=False``, that it no longer serves as a gateway."""
    found = monitor.monitor_of(dask_scheduler)
    if found is not None and trusted:
        found.trust_gateway(gateway)
    elif found is not None:
        found.gateways.discard(gateway)
