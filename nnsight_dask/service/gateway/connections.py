"""Connections that have not shown a key yet: bounded in number and in time.

Each connection costs a file descriptor. Connections that open and then send nothing, or headers
that never end, would otherwise hold descriptors until the process has none left for anyone (the
red team's 300 such connections locked out every user of a gateway limited to 256). Two bounds:

- **Time.** The request line and headers must arrive within ``header_timeout`` seconds of the
  connection's turn to send them (tornado's header timeout; it is also how long an idle keep-alive
  connection stays open), a body within ``body_timeout``.
- **Number.** At most ``max_unauthenticated`` connections that have not yet made a request with a
  valid key are open at once; a new one beyond that closes the oldest of them. A real client sends
  its headers right after connecting and is authenticated within milliseconds, so the connections
  that go are those that have idled longest without a key.

A connection counts as authenticated from its first request with a valid key (any route) on.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from tornado import httpserver, iostream


def default_max_unauthenticated() -> int:
    """A quarter of this process's file descriptor limit, between 16 and 1024 (256 where unknown)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 4))


class ConnectionGuard:
    """The open connections without a key, oldest first (used on the event loop only)."""

    def __init__(self, max_unauthenticated: int) -> None:
        self.max_unauthenticated = max(1, int(max_unauthenticated))
        self._waiting: OrderedDict[int, iostream.IOStream] = OrderedDict()
        #: Connections closed to make room (for tests and metrics).
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def opened(self, stream: iostream.IOStream) -> None:
        """A connection was accepted: count it, closing the oldest waiting ones beyond the bound."""
        self._waiting[id(stream)] = stream
        if len(self._waiting) <= self.max_unauthenticated:
            return
        for key in [key for key, waiting in self._waiting.items() if waiting.closed()]:
            del self._waiting[key]
        while len(self._waiting) > self.max_unauthenticated:
            _, oldest = self._waiting.popitem(last=False)
            self.evicted += 1
            oldest.close()

    def authenticated(self, stream: Any) -> None:
        """A request on ``stream`` carried a valid key: the connection no longer counts."""
        if stream is not None:
            self._waiting.pop(id(stream), None)


class GuardedHTTPServer(httpserver.HTTPServer):
    """Tornado's HTTP server with a header timeout of its own and a :class:`ConnectionGuard`.

    Tornado waits for headers as long as for an idle connection (``idle_connection_timeout``); here
    both are ``header_timeout``.
    """

    def initialize(self, *args: Any, guard: ConnectionGuard, header_timeout: float,  # type: ignore[override]
                   **kwargs: Any) -> None:
        # tornado servers are Configurable: construction arguments arrive here, not in __init__
        super().initialize(*args, idle_connection_timeout=header_timeout, **kwargs)
        self.guard = guard

    def handle_stream(self, stream: iostream.IOStream, address: tuple[Any, ...]) -> None:
        super().handle_stream(stream, address)
        self.guard.opened(stream)


__all__ = ["ConnectionGuard", "GuardedHTTPServer", "default_max_unauthenticated"]
