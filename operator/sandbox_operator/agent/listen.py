"""The agent's listening sockets, bound first thing (standard library only, nothing heavy imported).

Bound and listening before asyncio and aiohttp are imported, a connection that arrives while the
agent still starts (the kubelet's readiness probe, the gateway's health poll) waits in the kernel's
backlog and is answered as soon as the event loop serves, instead of being refused and retried a
poll interval later. The sockets are set up as asyncio's `create_server(host, port,
reuse_address=True)` sets them up; `server.Agent` serves them with `create_server(sock=...)`.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .config import AgentConfig

BACKLOG: Final = 1024


@dataclass(frozen=True)
class BoundPort:
    port: int
    sockets: Sequence[socket.socket]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def bind_port(host: str, port: int) -> BoundPort:
    """Listening sockets on every address `host` resolves to ("" = all interfaces), like asyncio's:
    SO_REUSEADDR (connections in TIME_WAIT do not hold the port), IPv6 sockets IPv6-only. The error
    of a port in use reads as asyncio's."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned empty list")
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue  # a family this machine lacks (asyncio skips it as well)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as error:
                reason = (error.strerror or str(error)).lower()
                raise OSError(error.errno, f"error while attempting to bind on address {address!r}: {reason}") from None
            sock.listen(BACKLOG)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return BoundPort(port, tuple(sockets))


def bind_listeners(config: AgentConfig) -> list[BoundPort]:
    """The envd port, then the code interpreter's unless it is 0 (served on the envd port then)."""
    ports = [config.envd_port] + ([config.interpreter_port] if config.interpreter_port else [])
    bound: list[BoundPort] = []
    try:
        for port in ports:
            bound.append(bind_port(config.host, port))
    except BaseException:
        for done in bound:
            done.close()
        raise
    return bound
