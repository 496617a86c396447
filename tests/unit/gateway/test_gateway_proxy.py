"""The proxy and the public listener (docs/gateway.md "Threat model"): the real Gateway application on
the real listener (gateway.listener) over loopback, sandboxes put straight into its cache, and one
fake upstream every pod address and port is redirected to, recording what the gateway sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from fakeapi import FakeApi
from sandbox_operator.agent.signing import compute_signature
from sandbox_operator.api.names import (
    AGENT_TOKEN_HEADER,
    AUTO_RESUME_ANNOTATION,
    ENVD_PORT,
    INTERPRETER_PORT,
    SIGNED_PATH_HEADER,
)
from sandbox_operator.gateway import e2b
from sandbox_operator.gateway.listener import ConnectionGuard, ListenerLimits, guarded_runner, listen
from sandbox_operator.gateway.server import Gateway, GatewayConfig
from sandbox_operator.resources.tokens import agent_token

JSON = dict[str, Any]
TOKEN_KEY = b"k" * 32
API_KEY = "e2b_" + "b" * 40
SANDBOX_ID = "sbxproxy1"
OLD_SANDBOX_ID = "sbxproxyold"  # a pod from before agent tokens: no status.agentTokenId
TOKEN_ID = "0123456789abcdef0123456789abcdef"
USER_PORT = 8080  # declared by the template
SANDBOX_PORT = 9000  # declared by the sandbox
RELAXED = ListenerLimits(header_timeout=30, keepalive_timeout=30, max_connections_per_ip=0)


def sandbox(name: str, sandbox_id: str, token_id: str | None) -> JSON:
    status: JSON = {"phase": "Running", "podIP": "10.255.0.7", "sandboxID": sandbox_id}
    if token_id is not None:
        status["agentTokenId"] = token_id
    return {
        "metadata": {"name": name, "namespace": "team-a", "uid": f"uid-{name}", "resourceVersion": "1"},
        "spec": {"template": "web", "network": {"ports": [SANDBOX_PORT]}},
        "status": status,
    }


@dataclass
class Seen:
    port: int
    raw_path: str  # as it arrived, with the query
    headers: dict[str, str]
    body: bytes = b""  # as it arrived: the stand-in agent decodes nothing


@dataclass
class Upstream:
    """Every pod port: records what arrives and answers 200 (with `cookies`)."""

    seen: list[Seen] = field(default_factory=list)
    cookies: list[str] = field(default_factory=list)
    closed_with: list[int | None] = field(default_factory=list)  # the close codes its WebSockets saw

    async def handle(self, request: web.Request) -> web.StreamResponse:
        port = int(request.headers["X-Original-Port"])
        headers = {k: v for k, v in request.headers.items() if k != "X-Original-Port"}
        self.seen.append(Seen(port, request.raw_path, headers, await request.read()))
        if request.path == "/ws":
            return await self.websocket(request)
        response = web.Response(text="ok")
        for cookie in self.cookies:
            response.headers.add("Set-Cookie", cookie)
        return response

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """A WebSocket app: echoes text upper-cased and bytes reversed; `close <code>` closes with it."""
        socket = web.WebSocketResponse(protocols=("chat.v2",), max_msg_size=0)
        await socket.prepare(request)
        async for message in socket:
            if message.type is aiohttp.WSMsgType.TEXT and message.data.startswith("close "):
                await socket.close(code=int(message.data.split()[1]), message=b"asked to")
            elif message.type is aiohttp.WSMsgType.TEXT:
                await socket.send_str(message.data.upper())
            elif message.type is aiohttp.WSMsgType.BINARY:
                await socket.send_bytes(message.data[::-1])
        self.closed_with.append(socket.close_code)
        return socket


@dataclass
class Served:
    url: str
    port: int
    gateway: Gateway
    guard: ConnectionGuard
    upstream: Upstream

    def token(self, sandbox_id: str = SANDBOX_ID) -> str:
        body = self.gateway.cache.find(sandbox_id)
        assert body is not None
        return self.gateway.token_of(body)


@contextlib.asynccontextmanager
async def serve(limits: ListenerLimits = RELAXED, *, body_timeout: float = 30.0) -> AsyncIterator[Served]:
    gateway = Gateway(FakeApi(), GatewayConfig(token_key=TOKEN_KEY, body_timeout=body_timeout))
    gateway.cache.api_keys[e2b.api_key_digest(API_KEY)] = "team-a"
    gateway.cache.templates["web"] = {"metadata": {"name": "web"}, "spec": {"image": "i", "ports": [USER_PORT]}}
    gateway.cache.observe(sandbox("e2b-proxy", SANDBOX_ID, TOKEN_ID))
    gateway.cache.observe(sandbox("e2b-old", OLD_SANDBOX_ID, None))
    upstream = Upstream()
    agent = web.Application()
    agent.router.add_route("*", "/{tail:.*}", upstream.handle)
    agent_runner = web.AppRunner(agent, auto_decompress=False)
    await agent_runner.setup()
    agent_site = web.TCPSite(agent_runner, "127.0.0.1", 0)
    await agent_site.start()
    agent_port = agent_runner.addresses[0][1]

    async def to_the_upstream(request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> Any:
        request.headers["X-Original-Port"] = str(request.url.port)
        request.url = request.url.with_host("127.0.0.1").with_port(agent_port)
        return await handler(request)

    app = gateway.app()
    app.on_startup.clear()  # no watches: the cache is filled above
    app.on_cleanup.clear()
    runner, guard = guarded_runner(app, limits)
    await runner.setup()
    server = await listen(runner, guard, "127.0.0.1", 0)
    gateway._upstream = aiohttp.ClientSession(auto_decompress=False, middlewares=(to_the_upstream,))
    port = int(server.sockets[0].getsockname()[1])
    try:
        yield Served(f"http://127.0.0.1:{port}", port, gateway, guard, upstream)
    finally:
        server.close()
        await runner.cleanup()
        await gateway._upstream.close()
        await agent_runner.cleanup()


def route(port: int = ENVD_PORT, sandbox_id: str = SANDBOX_ID) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port)}


async def call(
    served: Served, method: str, target: str, headers: dict[str, str], data: bytes | None = None
) -> tuple[int, str, aiohttp.ClientResponse]:
    """One request, its path sent as spelled (no client-side normalisation)."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, URL(served.url + target, encoded=True), headers=headers, data=data) as response,
    ):
        return response.status, await response.text(), response


# --- the agent's token and signed paths ------------------------------------------------------------


async def test_the_agent_gets_its_own_token_never_the_clients() -> None:
    async with serve() as served:
        client = {"X-Access-Token": served.token(), "E2B-Traffic-Access-Token": served.token()}
        for port in (ENVD_PORT, INTERPRETER_PORT, USER_PORT):
            status, _, _ = await call(served, "POST", "/process.Process/List", {**route(port), **client})
            assert status == 200
        envd, interpreter, user = served.upstream.seen
        expected = agent_token(TOKEN_KEY, TOKEN_ID)
        assert envd.headers[AGENT_TOKEN_HEADER] == expected and interpreter.headers[AGENT_TOKEN_HEADER] == expected
        assert "E2B-Traffic-Access-Token" not in interpreter.headers
        # A user port's server is the tenant's: neither the client's token nor the agent's.
        assert AGENT_TOKEN_HEADER not in user.headers and "E2B-Traffic-Access-Token" not in user.headers


async def test_an_encoded_body_reaches_the_agent_as_sent() -> None:
    # The SDKs upload files gzip-encoded; the agent decodes them. The gateway forwards the bytes and
    # their Content-Encoding untouched (decoding them, and then forwarding the header, made every
    # gzip upload through the gateway a 400).
    payload = gzip.compress(b"line\n" * 10_000)
    async with serve() as served:
        headers = {**route(), "X-Access-Token": served.token(), "Content-Encoding": "gzip"}
        status, _, _ = await call(served, "POST", "/files?path=a.txt", headers, payload)
        assert status == 200
        (seen,) = served.upstream.seen
        assert seen.body == payload
        assert seen.headers["Content-Encoding"] == "gzip" and seen.headers["Content-Length"] == str(len(payload))


async def test_a_pod_without_a_token_id_gets_no_token() -> None:
    async with serve() as served:
        token = served.token(OLD_SANDBOX_ID)
        status, _, _ = await call(served, "GET", "/envs", {**route(sandbox_id=OLD_SANDBOX_ID), "X-Access-Token": token})
        assert status == 200
        (seen,) = served.upstream.seen
        assert AGENT_TOKEN_HEADER not in seen.headers


async def test_a_signed_url_carries_its_path_and_a_claimed_one_is_dropped() -> None:
    async with serve() as served:
        expiration = int(time.time()) + 60
        signature = compute_signature("/home/user/a.txt", "read", "user", served.token(), expiration)
        query = urlencode(
            {"path": "/home/user/a.txt", "username": "user", "signature": signature, "signature_expiration": expiration}
        )
        claim = {SIGNED_PATH_HEADER: "/etc/shadow"}
        status, _, _ = await call(served, "GET", f"/files?{query}", {**route(), **claim})
        assert status == 200
        # With the token: the token's request, any path; the client's claim still does not pass.
        status, _, _ = await call(
            served, "GET", "/files?path=/b", {**route(), **claim, "X-Access-Token": served.token()}
        )
        assert status == 200
        signed, by_token = served.upstream.seen
        assert signed.headers[SIGNED_PATH_HEADER] == "/home/user/a.txt"
        assert signed.headers[AGENT_TOKEN_HEADER] == agent_token(TOKEN_KEY, TOKEN_ID)
        assert signed.raw_path == f"/files?{query}"  # the query as the client sent it
        assert SIGNED_PATH_HEADER not in by_token.headers
        assert by_token.headers[AGENT_TOKEN_HEADER] == agent_token(TOKEN_KEY, TOKEN_ID)


# --- paths and ports -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["/./init", "/a/../init", "//init", "/%2e/init", "/%2E%2E/init", "/%69nit", "/files%2Fcompose", "/x/..//freeze"],
)
async def test_internal_paths_do_not_pass_however_spelled(target: str) -> None:
    async with serve() as served:
        status, _, _ = await call(served, "POST", target, {**route(), "X-Access-Token": served.token()}, b"{}")
        assert status == 403 and served.upstream.seen == []


async def test_the_normalised_path_is_what_is_forwarded() -> None:
    async with serve() as served:
        token = {"X-Access-Token": served.token()}
        for target in ("/a/../envs?x=%2e", "//process.Process/%4Cist", "/%2e/health"):
            status, _, _ = await call(served, "GET", target, {**route(), **token})
            assert status == 200
        assert [seen.raw_path for seen in served.upstream.seen] == ["/envs?x=%2e", "/process.Process/List", "/health"]


async def test_only_declared_ports_are_proxied() -> None:
    async with serve() as served:
        token = {"X-Access-Token": served.token()}
        for port in (22, 2375, 8081):
            status, text, _ = await call(served, "GET", "/", {**route(port), **token})
            assert status == 502 and "port is not open" in text
        assert served.upstream.seen == []
        for port in (USER_PORT, SANDBOX_PORT):
            assert (await call(served, "GET", "/", {**route(port), **token}))[0] == 200
        # A Host route names a port the same way.
        status, _, _ = await call(served, "GET", "/", {"Host": f"22-{SANDBOX_ID}.example.com", **token})
        assert status == 502
        status, _, _ = await call(served, "GET", "/", {"Host": f"22-{SANDBOX_ID}.example.com"})
        assert status == 401  # without the token, not even which ports are open


async def test_sandbox_cookies_come_back_host_only() -> None:
    async with serve() as served:
        served.upstream.cookies = ["sid=1; Domain=example.com; Path=/; HttpOnly", "b=2"]
        headers = {"Host": f"{USER_PORT}-{SANDBOX_ID}.example.com", "X-Access-Token": served.token()}
        status, _, response = await call(served, "GET", "/", headers)
        assert status == 200
        assert response.headers.getall("Set-Cookie") == ["sid=1; Path=/; HttpOnly", "b=2"]


# --- wake on traffic --------------------------------------------------------------------------------


async def test_only_an_admitted_request_wakes_a_paused_sandbox() -> None:
    async with serve() as served:
        paused = sandbox("e2b-paused", "sbxpaused1", TOKEN_ID)
        paused["status"] = {"phase": "Suspended", "sandboxID": "sbxpaused1", "agentTokenId": TOKEN_ID}
        paused["metadata"]["annotations"] = {AUTO_RESUME_ANNOTATION: "true"}
        served.gateway.cache.observe(paused)
        token = {"X-Access-Token": served.token("sbxpaused1")}
        for headers, status in (
            (route(ENVD_PORT, "sbxpaused1"), 401),  # no token: nobody may wake what they may not reach
            ({**route(2375, "sbxpaused1"), **token}, 502),  # a port nobody declared
        ):
            assert (await call(served, "GET", "/health-not", headers))[0] == status, headers
        assert served.gateway.client.take() == []  # type: ignore[attr-defined]  # no resume was written
        assert served.gateway._waking == {}
        # Without auto-resume a paused sandbox is not running, whoever asks (the SDK's not-running error).
        paused["metadata"]["annotations"] = {}
        paused["metadata"]["resourceVersion"] = "2"
        served.gateway.cache.observe(paused)
        status, text, _ = await call(served, "GET", "/files", {**route(ENVD_PORT, "sbxpaused1"), **token})
        assert status == 502 and "was not found" in text
        assert served.gateway.client.take() == []  # type: ignore[attr-defined]


# --- WebSockets ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def websocket(
    served: Served, headers: dict[str, str], protocols: tuple[str, ...] = ()
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url + "/ws", headers=headers, protocols=protocols, max_msg_size=0) as socket,
    ):
        yield socket


async def test_a_websocket_to_a_sandbox_port_is_relayed_both_ways() -> None:
    async with serve() as served:
        headers = {**route(USER_PORT), "X-Access-Token": served.token(), "X-API-KEY": API_KEY}
        async with websocket(served, headers, protocols=("chat.v1", "chat.v2")) as socket:
            assert socket.protocol == "chat.v2"  # the sandbox's choice among the client's offers
            await socket.send_str("hello")
            assert await socket.receive_str(timeout=10) == "HELLO"
            await socket.send_bytes(b"\x00\x01\x02")
            assert await socket.receive_bytes(timeout=10) == b"\x02\x01\x00"
        (seen,) = served.upstream.seen
        assert seen.port == USER_PORT and seen.headers["Sec-WebSocket-Protocol"] == "chat.v1,chat.v2"
        assert "X-API-KEY" not in seen.headers and "X-Access-Token" not in seen.headers


async def test_close_codes_pass_through_in_both_directions() -> None:
    async with serve() as served:
        headers = {**route(USER_PORT), "X-Access-Token": served.token()}
        async with websocket(served, headers) as socket:
            await socket.send_str("close 4001")
            closing = await socket.receive(timeout=10)
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 4001
        async with websocket(served, headers) as socket:
            await socket.close(code=4002)

        async def sandbox_saw_it() -> bool:
            return 4002 in served.upstream.closed_with

        await until(sandbox_saw_it, 10, "the sandbox's side closed with the client's code")


async def test_a_websocket_is_admitted_as_any_proxied_request() -> None:
    async with serve() as served, aiohttp.ClientSession() as session:
        for headers, status in (
            (route(USER_PORT), 401),  # no token
            ({**route(2375), "X-Access-Token": served.token()}, 502),  # a port nobody declared
            ({**route(ENVD_PORT), "X-Access-Token": served.token()}, 200),  # the agent's port
        ):
            try:
                async with session.ws_connect(served.url + "/ws", headers=headers):
                    answered = 200
            except aiohttp.WSServerHandshakeError as refused:
                answered = refused.status
            assert answered == status, headers
        # The agent's port gets the agent's own token, as every proxied request to it does.
        assert served.upstream.seen[-1].headers[AGENT_TOKEN_HEADER] == agent_token(TOKEN_KEY, TOKEN_ID)


async def test_a_handshake_the_sandbox_refuses_answers_its_status() -> None:
    async with serve() as served, aiohttp.ClientSession() as session:
        headers = {**route(USER_PORT), "X-Access-Token": served.token()}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with session.ws_connect(served.url + "/not-a-socket", headers=headers):
                pass
        assert refused.value.status == 502  # a 200 that is no WebSocket: the sandbox's port is no WebSocket


async def test_a_message_over_the_bound_closes_both_sides_1009() -> None:
    async with serve() as served:
        headers = {**route(USER_PORT), "X-Access-Token": served.token()}
        async with websocket(served, headers) as socket:
            # The gateway closes as soon as the frame's length is over the bound: the client may still
            # be writing it then, and see the connection go instead of reading the close frame.
            with contextlib.suppress(ConnectionError):
                await socket.send_bytes(b"x" * (e2b.WEBSOCKET_MAX_MESSAGE_BYTES + 1))
            closing = await socket.receive(timeout=10)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
            assert closing.type is not aiohttp.WSMsgType.CLOSE or closing.data == 1009

        async def sandbox_side_closed() -> bool:
            return 1009 in served.upstream.closed_with

        await until(sandbox_side_closed, 10, "the sandbox's side closed with 1009")


async def test_a_gateway_shutdown_closes_relayed_websockets_going_away() -> None:
    async with serve() as served:
        headers = {**route(USER_PORT), "X-Access-Token": served.token()}
        async with websocket(served, headers) as socket:
            await socket.send_str("up")
            assert await socket.receive_str(timeout=10) == "UP"
            await served.gateway._on_shutdown(web.Application())
            closing = await socket.receive(timeout=10)
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1001


@pytest.mark.parametrize(
    ("method", "connection", "upgrade", "expected"),
    [
        ("GET", "Upgrade", "websocket", True),
        ("GET", "keep-alive, Upgrade", "WebSocket", True),
        ("POST", "Upgrade", "websocket", False),
        ("GET", "keep-alive", "websocket", False),
        ("GET", "Upgrade", "h2c", False),
    ],
)
def test_what_opens_a_websocket(method: str, connection: str, upgrade: str, expected: bool) -> None:
    assert e2b.websocket_upgrade(method, {"Connection": connection, "Upgrade": upgrade}) is expected


@pytest.mark.parametrize(
    ("code", "relayed"), [(None, 1000), (1000, 1000), (1005, 1000), (1006, 1011), (4001, 4001), (999, 1011)]
)
def test_close_codes_that_cannot_be_sent_are_replaced(code: int | None, relayed: int) -> None:
    assert e2b.relayed_close_code(code) == relayed


# --- slow clients ----------------------------------------------------------------------------------


async def until(check: Callable[[], Awaitable[bool]], within: float, message: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"not within {within} s: {message}"
        await asyncio.sleep(0.05)


async def closed(reader: asyncio.StreamReader) -> bool:
    """The gateway closed the connection (all it sent before is read and dropped)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.01):
            while await reader.read(65536):
                pass
            return True
    return False


async def connect(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", served.port)


async def health(served: Served) -> int:
    return (await call(served, "GET", "/health", {}))[0]


async def test_headers_dribbled_in_are_cut_at_the_header_timeout() -> None:
    async with serve(ListenerLimits(header_timeout=0.5, keepalive_timeout=30, max_connections_per_ip=0)) as served:
        connections = [await connect(served) for _ in range(20)]
        started = time.monotonic()

        async def dribble(writer: asyncio.StreamWriter) -> None:
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            with contextlib.suppress(ConnectionError):
                for _ in range(100):  # a header byte every 0.1 s: each arrives well within any idle timer
                    writer.write(b"X")
                    await writer.drain()
                    await asyncio.sleep(0.1)

        dribblers = [asyncio.create_task(dribble(writer)) for _, writer in connections]
        try:

            async def all_closed() -> bool:
                return all([await closed(reader) for reader, _ in connections])

            await until(all_closed, 5, "dribbling connections closed")
            assert time.monotonic() - started >= 0.4
            assert await health(served) == 200  # a client that sends its request is served meanwhile
        finally:
            for task in dribblers:
                task.cancel()
            for _, writer in connections:
                writer.close()


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout() -> None:
    async with serve(ListenerLimits(header_timeout=30, keepalive_timeout=0.5, max_connections_per_ip=0)) as served:
        silent, silent_writer = await connect(served)
        used, used_writer = await connect(served)
        used_writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await used.readline()).startswith(b"HTTP/1.1 200")

        async def both_closed() -> bool:
            return await closed(silent) and await closed(used)

        await until(both_closed, 5, "idle connections closed")
        silent_writer.close()
        used_writer.close()


async def test_a_body_that_stops_arriving_is_answered_408() -> None:
    async with serve(body_timeout=0.4) as served:
        requests = [
            # A create whose body never comes, and a proxied upload.
            b'POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nX-API-KEY: %s\r\nContent-Length: 100\r\n\r\n{"templ'
            % API_KEY.encode(),
            b"POST /files?path=/a HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: %s\r\nE2b-Sandbox-Port: %d\r\n"
            b"X-Access-Token: %s\r\nContent-Length: 100000\r\n\r\n"
            % (SANDBOX_ID.encode(), ENVD_PORT, served.token().encode())
            + b"x" * 1000,
        ]
        for raw in requests:
            reader, writer = await connect(served)
            writer.write(raw)
            started = time.monotonic()
            async with asyncio.timeout(5):
                answer = await reader.read()  # to the end: the gateway closes the connection too
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"the request body stopped arriving" in answer
            assert 0.35 < time.monotonic() - started < 3
            writer.close()


async def test_a_slow_body_that_keeps_coming_is_not_cut() -> None:
    async with serve(body_timeout=0.4) as served:
        reader, writer = await connect(served)
        head = "POST /files?path=/a HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: {}\r\nE2b-Sandbox-Port: {}\r\n"
        head += "X-Access-Token: {}\r\nContent-Length: 10\r\n\r\n"
        writer.write(head.format(SANDBOX_ID, ENVD_PORT, served.token()).encode())
        for _ in range(10):  # 2 s for 10 bytes, never 0.4 s without one
            writer.write(b"x")
            await asyncio.sleep(0.2)
        async with asyncio.timeout(5):
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()


async def test_connections_per_client_ip_are_capped() -> None:
    async with serve(ListenerLimits(header_timeout=30, keepalive_timeout=30, max_connections_per_ip=5)) as served:
        held = [await connect(served) for _ in range(5)]

        async def accepted() -> bool:
            return served.guard.open.get("127.0.0.1") == 5

        await until(accepted, 5, "the held connections accepted")
        reader, writer = await connect(served)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            answer = await reader.read()  # answered, then closed
        assert answer.startswith(b"HTTP/1.1 429") and b"too many connections" in answer
        writer.close()
        # The held ones are served; once one goes, a new connection is too.
        held_reader, held_writer = held[0]
        held_writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await held_reader.read()).startswith(b"HTTP/1.1 200")
        held_writer.close()

        async def served_again() -> bool:
            return await health(served) == 200

        await until(served_again, 5, "a connection accepted again below the cap")
        for _, other in held[1:]:
            other.close()
