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
- **Descriptors.** The server accepts connections itself (:class:`Listener`, a few per loop
  iteration) instead of through tornado's accept handler, which logs a traceback and spins when the
  process runs out of file descriptors; here that closes the oldest connections without a key at
  once and pauses accepting for a moment.

A connection counts as authenticated from its first request headers with a valid key (any route)
on, checked as soon as the headers are parsed.
"""
from __future__ import annotations

import asyncio
import errno
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from tornado import httpserver, httputil, iostream
from tornado.ioloop import IOLoop

#: Connections accepted per loop iteration (tornado takes up to 128): bounds how far the number of
#: connections without a key can pass the bound before the oldest are closed.
ACCEPT_BATCH = 16
#: Seconds accepting pauses when the process is out of file descriptors.
PAUSE_SECONDS = 0.1


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
    """The open connections without a key, oldest first (used on the event loop only).

    A connection over the bound is not closed at once: the oldest ones are closed one loop iteration
    later, after every connection accepted meanwhile has read the headers already waiting in its
    socket, so a client that sent its key with its first bytes is never the one closed.
    """

    def __init__(self, max_unauthenticated: int, authenticate: Callable[[str | None], object]) -> None:
        self.max_unauthenticated = max(1, int(max_unauthenticated))
        self.authenticate = authenticate
        self._waiting: OrderedDict[int, tuple[iostream.IOStream, int]] = OrderedDict()
        self._epoch = 0
        self._trimming = False
        #: Connections closed to make room (for tests and metrics).
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def opened(self, stream: iostream.IOStream) -> None:
        """A connection was accepted: count it; beyond the bound, close the oldest soon."""
        self._waiting[id(stream)] = (stream, self._epoch)
        if len(self._waiting) > self.max_unauthenticated and not self._trimming:
            self._trimming = True
            asyncio.get_running_loop().call_soon(self._trim)

    def headers(self, stream: Any, headers: httputil.HTTPHeaders) -> None:
        """A request's headers arrived on ``stream``: with a valid key, the connection no longer counts."""
        if stream is not None and id(stream) in self._waiting and self.authenticate(headers.get("Authorization")):
            del self._waiting[id(stream)]

    def shed(self) -> int:
        """Out of file descriptors: close the oldest quarter of the connections without a key now."""
        count = max(1, len(self._waiting) // 4) if self._waiting else 0
        for _ in range(count):
            _, (oldest, _) = self._waiting.popitem(last=False)
            oldest.close()
            self.evicted += 1
        return count

    def _trim(self) -> None:
        self._trimming = False
        epoch, self._epoch = self._epoch, self._epoch + 1
        for key in [key for key, (waiting, _) in self._waiting.items() if waiting.closed()]:
            del self._waiting[key]
        excess = len(self._waiting) - self.max_unauthenticated
        for key, (oldest, opened) in list(self._waiting.items()):
            if excess <= 0 or opened >= epoch:  # accepted since the trim was asked for: not read yet
                break
            del self._waiting[key]
            oldest.close()
            self.evicted += 1
            excess -= 1
        if excess > 0:
            self._trimming = True
            asyncio.get_running_loop().call_soon(self._trim)


class _KeyCheck(httputil.HTTPMessageDelegate):
    """Tells the guard about a request's headers as soon as they are parsed, then steps aside."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate, guard: ConnectionGuard, stream: Any) -> None:
        self.delegate, self.guard, self.stream = delegate, guard, stream

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        self.guard.headers(self.stream, headers)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.delegate.on_connection_close()


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

    def listen_on(self, sockets: list[socket.socket]) -> None:
        """Serve on bound ``sockets`` (instead of tornado's ``add_sockets``: see :class:`Listener`)."""
        self.listeners = [Listener(sock, self) for sock in sockets]

    def stop(self) -> None:
        for listener in getattr(self, "listeners", ()):
            listener.close()
        super().stop()

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        return _KeyCheck(delegate, self.guard, getattr(request_conn, "stream", None))


class Listener:
    """Accepts connections on a listening socket for a :class:`GuardedHTTPServer` (see the module
    docstring): at most :data:`ACCEPT_BATCH` per loop iteration; out of file descriptors, it sheds
    connections without a key and pauses for :data:`PAUSE_SECONDS`."""

    def __init__(self, sock: socket.socket, server: GuardedHTTPServer) -> None:
        self.sock, self.server = sock, server
        self.loop = IOLoop.current()
        self.loop.add_handler(sock, self._ready, IOLoop.READ)
        self._paused = False
        self._closed = False

    def _ready(self, fd: Any, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:  # reset before we took it
                continue
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                self.server.guard.shed()
                self._pause()
                return
            stream = iostream.IOStream(connection, max_buffer_size=self.server.max_buffer_size,
                                       read_chunk_size=self.server.read_chunk_size)
            self.server.handle_stream(stream, address)

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.loop.remove_handler(self.sock)
            self.loop.call_later(PAUSE_SECONDS, self._resume)

    def _resume(self) -> None:
        if self._paused and not self._closed:
            self._paused = False
            self.loop.add_handler(self.sock, self._ready, IOLoop.READ)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._paused:
                self.loop.remove_handler(self.sock)
            self.sock.close()


__all__ = ["ConnectionGuard", "GuardedHTTPServer", "Listener", "default_max_unauthenticated"]
