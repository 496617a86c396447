"""What aiohttp does not bound on its own: how a request path may be spelled, how long a client may
take over a request's headers and body, and how much of a body is read into memory.

- `canonical_path`: the one spelling of a path every allow/deny decision uses (`/./init`, `/a/../init`
  and `//init` are `/init`).
- `ConnectionGuard` wraps the protocol aiohttp makes for each connection: a request whose headers
  have not all arrived `header_timeout` seconds after its first byte is cut (aiohttp's keep-alive
  timer bounds the wait for a first byte: from the connection's start and after every response).
- `read_body` / `read_chunk` / `read_exactly`: every request body read with a deadline and a cap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from aiohttp import StreamReader, web

from .config import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_RPC_BODY_BYTES,
)

READ_CHUNK: Final = 256 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


@dataclass(frozen=True)
class ListenerLimits:
    """Per-listener bounds (config.AgentConfig sets them; docs/agent.md lists the defaults)."""

    # From a request's first byte to the end of its headers.
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    # An idle connection: no request begun since it opened or since the last response (aiohttp's timer).
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    # A body read whole (RPC, JSON) must be in within this; a streamed one (uploads, client streams)
    # may not pause longer than this between two reads.
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    # A body read whole is refused above this (aiohttp's client_max_size as well).
    max_body_bytes: int = DEFAULT_MAX_RPC_BODY_BYTES


LIMITS: Final = web.AppKey("sandbox_agent_limits", ListenerLimits)
_DEFAULT_LIMITS: Final = ListenerLimits()


def limits_of(request: web.Request) -> ListenerLimits:
    return request.app.get(LIMITS, _DEFAULT_LIMITS)


# -- paths -------------------------------------------------------------------------------------------


def canonical_path(path: str) -> str:
    """The decoded request path with empty and `.` segments dropped and `..` applied (never above
    the root), without a trailing slash: the path every check of the agent compares."""
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


HEALTH_PATH: Final = "/health"


def is_open_route(method: str, path: str) -> bool:
    """The one route any caller may use, token or not (`path` canonical): the health probe."""
    return path == HEALTH_PATH and method in ("GET", "HEAD")


def canonical_redirect(request: web.Request, canonical: str) -> web.Response:
    """308 to the canonical spelling (query kept): a route is served under one name only, so what
    stands in front of the agent (the gateway) sees the name it checks."""
    location = request.rel_url.with_path(canonical, keep_query=True)
    return web.Response(status=308, headers={"Location": str(location)})


# -- bodies ------------------------------------------------------------------------------------------


class BodyTimeout(Exception):
    """The client did not send (the rest of) a body in time."""


class BodyTooLarge(Exception):
    """A body read whole is larger than the listener allows."""


async def body_timeout_response(request: web.Request, code: int | str = 408) -> web.StreamResponse:
    """Answer 408 with the E2B error body (`code`: a Connect code on RPC paths) and close the
    connection at once: the rest of a body that stalled is not waited for (aiohttp would linger)."""
    seconds = limits_of(request).body_timeout
    body = {"code": code, "message": f"the request body did not arrive in time (within {seconds:g}s)"}
    response = web.json_response(body, status=408)
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # the transport sends what it holds, then closes
    return response


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """`awaitable`'s result; BodyTimeout when it takes longer than `seconds` (0: no limit)."""
    try:
        async with asyncio.timeout(seconds if seconds > 0 else None):
            return await awaitable
    except TimeoutError as error:
        raise BodyTimeout from error


async def read_chunk(content: StreamReader, idle: float, size: int = READ_CHUNK) -> bytes:
    """Up to `size` bytes of a body (b"" at its end); BodyTimeout after `idle` s without any."""
    return await within(content.read(size), idle)


async def read_exactly(content: StreamReader, count: int, seconds: float) -> bytes:
    """Exactly `count` bytes (asyncio.IncompleteReadError at an early end); BodyTimeout after `seconds`."""
    return await within(content.readexactly(count), seconds)


async def read_body(request: web.Request) -> bytes:
    """The whole body, in within the body timeout and at most max_body_bytes (BodyTimeout,
    BodyTooLarge). aiohttp has undone a Content-Encoding already: the cap counts decoded bytes."""
    limits = limits_of(request)
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise BodyTooLarge
    body = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout if limits.body_timeout > 0 else None):
            while True:
                chunk = await request.content.read(READ_CHUNK)
                if not chunk:
                    return bytes(body)
                if len(body) + len(chunk) > limits.max_body_bytes:
                    raise BodyTooLarge
                body.extend(chunk)
    except TimeoutError as error:
        raise BodyTimeout from error


# -- connections -------------------------------------------------------------------------------------


class ConnectionGuard:
    """The header deadline around the protocol aiohttp makes for each connection (`factory`)."""

    def __init__(self, header_timeout: float) -> None:
        self.header_timeout = header_timeout
        self.factory: Callable[[], asyncio.Protocol] | None = None  # aiohttp's, once its runner is set up
        self._connections: dict[asyncio.BaseTransport, _Guarded] = {}

    def protocol(self) -> asyncio.Protocol:
        """The protocol factory for loop.create_server."""
        assert self.factory is not None, "the guard has no aiohttp server to wrap yet"
        return _Guarded(self, self.factory())

    def abort_all(self) -> None:
        """Drop every open connection at once (no response end, no FIN handshake wait)."""
        for transport in list(self._connections):
            transport.abort()  # type: ignore[attr-defined]  # the loop's transports are TCP ones

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the connection busy while a request runs: its headers are in, and until it is answered
        the bytes that arrive are its body (bounded by the body timeout), not the next request's."""
        connection = self._connections.get(request.transport) if request.transport is not None else None
        if connection is None:
            return await handler(request)
        connection.busy(True)
        try:
            return await handler(request)
        finally:
            connection.busy(False)


class _Guarded(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol; closes the connection at a missed header deadline."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.BaseTransport | None = None
        self.requests = 0  # running (pipelining aside, at most one)
        self.clock: asyncio.TimerHandle | None = None  # the header deadline, from a request's first byte

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.guard._connections[transport] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.requests == 0 and self.clock is None and self.guard.header_timeout > 0:
            self.clock = asyncio.get_running_loop().call_later(self.guard.header_timeout, self._expired)
        self.inner.data_received(data)

    def busy(self, started: bool) -> None:
        self.requests += 1 if started else -1
        if self.clock is not None:
            self.clock.cancel()
            self.clock = None

    def _expired(self) -> None:
        # The headers did not all arrive in time: nothing was answered, so nothing can be said.
        self.clock = None
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()  # flow control: aiohttp's writer waits until the peer reads

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.clock is not None:
            self.clock.cancel()
            self.clock = None
        if self.transport is not None:
            self.guard._connections.pop(self.transport, None)
        self.inner.connection_lost(exc)
