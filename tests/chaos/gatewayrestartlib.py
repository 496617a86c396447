"""Helpers of test_gateway_restart.py: a gateway SIGKILLed and started again on its own port, a second
replica of a gateway, and a TCP forwarder spreading connections over replicas round-robin (what a
Service or a load balancer in front of several gateway pods does)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from chaoslib import Gateway, gateway_process, start_gateway

from testlib import Cluster, free_port


def kill(gateway: Gateway) -> int:
    """SIGKILL the gateway (no shutdown: its connections are cut, what a node or OOM kill does); its
    exit code."""
    gateway.process.send_signal(signal.SIGKILL)
    return gateway.process.wait(timeout=30)


def restart(cluster: Cluster, gateway: Gateway) -> None:
    """A new gateway process where the dead one was: the same port, API key Secret and token key
    (the cluster's), its output appended to the same log. `gateway.process` is the new one."""
    assert gateway.process.poll() is not None, "the gateway to restart still runs"
    port = int(gateway.url.rsplit(":", 1)[1])
    gateway.process = start_gateway(cluster, gateway.namespace, port, gateway.log)


@contextlib.contextmanager
def replica(cluster: Cluster, of: Gateway, workdir: Path) -> Iterator[Gateway]:
    """Another gateway process serving what `of` serves (its keys namespace: the same API key Secret;
    the cluster's token key, as the operator's) on a port of its own; stopped afterwards."""
    port = free_port()
    with gateway_process(cluster, of.namespace, of.api_key, port, workdir / f"gateway-{port}.log") as handle:
        yield handle


class RoundRobin:
    """A loopback TCP address whose connections go to the backend ports in turn (1st to the first,
    2nd to the second, ...), bytes piped both ways as they come; one event loop in a thread of its own.
    `connections[i]` counts the connections handed to backend i."""

    def __init__(self, backend_ports: list[int]) -> None:
        self.backend_ports = backend_ports
        self.connections = [0] * len(backend_ports)
        self.port = 0
        self._turn = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="round-robin", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RoundRobin:
        self._thread.start()
        started = asyncio.start_server(self._forward, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(started, self._loop).result(timeout=10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._open):
                writer.transport.abort()
            await self._server.wait_closed()

        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        index, self._turn = self._turn, (self._turn + 1) % len(self.backend_ports)
        self.connections[index] += 1
        self._open.add(client_writer)
        try:
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", self.backend_ports[index])
        except OSError:
            client_writer.transport.abort()  # a refused backend: the client's connection is reset
            self._open.discard(client_writer)
            return
        self._open.add(backend_writer)
        try:
            await asyncio.gather(_pipe(client_reader, backend_writer), _pipe(backend_reader, client_writer))
        finally:
            for writer in (client_writer, backend_writer):
                self._open.discard(writer)
                writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until end of stream, then half-close `sink`; a reset on either side resets the other."""
    try:
        while chunk := await source.read(64 * 1024):
            sink.write(chunk)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except OSError:
        sink.transport.abort()
