"""The gateway's public listener: aiohttp's HTTP server behind a guard for what aiohttp does not bound.

aiohttp closes a connection that is idle between requests (keep-alive timeout) but lets a client take
as long as it likes to send a request's headers, and accepts any number of connections. The guard
wraps each connection's protocol: a request whose headers have not all arrived `header_timeout`
seconds after its first byte is cut, and a client IP with `max_connections_per_ip` connections open
gets 429 on the next one. (Request bodies are bounded by server.BodyWatch.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REFUSED_LINGER_S = 1.0  # a refused connection reads (and drops) what the client sends for this long
_TOO_MANY = json.dumps({"code": 429, "message": "too many connections from this address"}).encode()
TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Should-Retry: false\r\nContent-Length: %d\r\n\r\n%s" % (len(_TOO_MANY), _TOO_MANY)
)


@dataclass(frozen=True)
class ListenerLimits:
    header_timeout: float = 10.0  # from a request's first byte to the end of its headers
    keepalive_timeout: float = 30.0  # an idle connection between requests (aiohttp's own timer)
    max_connections_per_ip: int = 256  # open connections per client IP; 0: no cap


class ConnectionGuard:
    """Per-connection limits around the protocol aiohttp makes for each connection (`factory`, set by
    `listen`); `middleware` must be the app's first."""

    def __init__(self, limits: ListenerLimits) -> None:
        self.factory: Callable[[], asyncio.Protocol] | None = None
        self.limits = limits
        self.open: dict[str, int] = {}  # client IP -> connections open
        self._connections: dict[asyncio.BaseTransport, _Guarded] = {}

    def protocol(self) -> asyncio.Protocol:
        """The protocol factory for loop.create_server."""
        return _Guarded(self)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks a connection busy while a request runs: its headers are in, and until it is answered
        its bytes are its body (bounded elsewhere), not the next request's headers."""
        connection = self._connections.get(request.transport) if request.transport is not None else None
        if connection is None:
            return await handler(request)
        connection.busy(True)
        try:
            return await handler(request)
        finally:
            connection.busy(False)


class _Guarded(asyncio.Protocol):
    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.inner: asyncio.Protocol | None = None  # None: refused
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.requests = 0  # running (pipelining aside, at most one)
        self.clock: asyncio.TimerHandle | None = None  # the header deadline, from a request's first byte

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        cap = self.guard.limits.max_connections_per_ip
        if cap and self.guard.open.get(self.address, 0) >= cap:
            # Answered and half-closed, then closed once the client is done (or after a moment): closing
            # with its request unread would reset the connection before it reads the 429.
            self.transport.write(TOO_MANY_CONNECTIONS)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.clock = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, self.transport.close)
            return
        assert self.guard.factory is not None, "the guard serves connections only through listen()"
        self.guard.open[self.address] = self.guard.open.get(self.address, 0) + 1
        self.guard._connections[self.transport] = self
        self.inner = self.guard.factory()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return  # refused: what the client sends meanwhile is not read
        if self.requests == 0 and self.clock is None:
            self.clock = asyncio.get_running_loop().call_later(self.guard.limits.header_timeout, self._expired)
        self.inner.data_received(data)

    def busy(self, started: bool) -> None:
        self.requests += 1 if started else -1
        if started and self.clock is not None:
            self.clock.cancel()
            self.clock = None

    def _expired(self) -> None:
        # The headers did not all arrive in time: nothing is answered yet, so nothing can be said.
        self.clock = None
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None  # refused: close now

    def connection_lost(self, exc: Exception | None) -> None:
        if self.clock is not None:
            self.clock.cancel()
        if self.inner is None or self.transport is None:
            return
        self.guard._connections.pop(self.transport, None)
        left = self.guard.open.get(self.address, 1) - 1
        if left > 0:
            self.guard.open[self.address] = left
        else:
            self.guard.open.pop(self.address, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


def guarded_runner(app: web.Application, limits: ListenerLimits) -> tuple[web.AppRunner, ConnectionGuard]:
    """An AppRunner for `app` with the guard's middleware first and aiohttp's keep-alive timeout (no
    access log; a handler is cancelled when its client goes away). Request bodies are not decoded: a
    proxied body reaches the sandbox's agent as sent, with its Content-Encoding (the agent decodes it,
    bounded by its upload cap), and the gateway itself never inflates what a client compressed."""
    guard = ConnectionGuard(limits)
    app.middlewares.insert(0, guard.middleware)
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        keepalive_timeout=limits.keepalive_timeout,
        auto_decompress=False,
    )
    return runner, guard


async def listen(runner: web.AppRunner, guard: ConnectionGuard, host: str, port: int) -> asyncio.Server:
    """Accept connections on host:port for `runner` (set up), each behind the guard. Close the server
    before runner.cleanup()."""
    assert runner.server is not None, "set the runner up first"
    guard.factory = runner.server
    return await asyncio.get_running_loop().create_server(guard.protocol, host, port, backlog=1024)
