"""The pieces behind test_apiserver_unreachable, without a cluster: the client's ApiUnreachable
against a loopback server that accepts and never answers (what a stopped API server does) and one
that refuses, the gateway's 503 for it, its deletion of a create that got no answer but may still
land, and /ready's report."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from fakeapi import FakeApi
from sandbox_operator.api.names import SANDBOXES
from sandbox_operator.gateway import e2b, server
from sandbox_operator.gateway.server import Gateway, GatewayConfig
from sandbox_operator.kube import Credentials, KubeClient
from sandbox_operator.kube.client import ApiUnreachable

API_KEY = "e2b_" + "a" * 40
NAMESPACE = "team-a"


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A loopback port that takes connections into its backlog and never answers a byte."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once closed


async def until(check: Callable[[], bool], message: str, within: float = 30) -> None:
    """Poll `check` on the event loop (the gateway's tasks run meanwhile) until it holds."""
    try:
        async with asyncio.timeout(within):
            while not check():  # noqa: ASYNC110 - the conditions are other tasks' side effects, no event to wait on
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {within}s waiting for {message}") from None


async def test_a_silent_api_server_is_unreachable_within_the_write_timeout() -> None:
    with silent_server() as url:
        client = KubeClient(Credentials(server=url, ssl_context=False), timeout=0.6, write_timeout=0.3)
        try:
            with pytest.raises(ApiUnreachable) as raised:
                await client.request("POST", "/api/v1/namespaces/ns/pods", {"kind": "Pod"})
            assert raised.value.maybe_applied  # sent, unanswered: the server may still apply it
            assert "did not answer POST /api/v1/namespaces/ns/pods within 0.3 s" in str(raised.value)
            assert client.unreachable is raised.value
            with pytest.raises(ApiUnreachable) as read:
                await client.request("GET", "/version")
            assert not read.value.maybe_applied and isinstance(read.value, OSError)
            assert "did not answer GET /version within 0.6 s" in str(read.value)  # a read's own timeout
        finally:
            await client.close()


async def test_a_refused_connection_is_unreachable_and_not_applied_then_an_answer_clears_it() -> None:
    client = KubeClient(Credentials(server=closed_port(), ssl_context=False))
    try:
        with pytest.raises(ApiUnreachable) as raised:
            await client.request("POST", "/api/v1/namespaces/ns/pods", {"kind": "Pod"})
        assert not raised.value.maybe_applied and "could not be reached" in str(raised.value)

        async def version(request: web.Request) -> web.Response:
            return web.json_response({"major": "1"})

        app = web.Application()
        app.router.add_get("/version", version)
        async with TestServer(app, host="127.0.0.1") as answering:
            client.credentials = Credentials(server=str(answering.make_url("")).rstrip("/"), ssl_context=False)
            assert await client.request("GET", "/version") == {"major": "1"}
        assert client.unreachable is None
    finally:
        await client.close()


class UnansweredCreates(FakeApi):
    """The fake API server, except that a Sandbox create gets no answer: with `lands`, the server
    applies it anyway (as a resumed API server does with a request it read late)."""

    def __init__(self, *, sent: bool, lands: bool) -> None:
        super().__init__()
        self.sent, self.lands = sent, lands
        self.unanswered: list[str] = []

    async def request(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
        if method == "POST" and path.endswith("/sandboxes"):
            if self.lands:
                await super().request(method, path, body)
            self.unanswered.append(body["metadata"]["name"])
            cause = TimeoutError() if self.sent else ConnectionRefusedError()
            raise ApiUnreachable(method, path, cause, sent=self.sent, timeout=15)
        return await super().request(method, path, body, **options)


@contextlib.asynccontextmanager
async def serving(api: FakeApi) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], Gateway]]:
    gateway = Gateway(api, GatewayConfig(token_key=b"k" * 32, create_timeout=5))
    gateway.cache.api_keys[e2b.api_key_digest(API_KEY)] = NAMESPACE
    gateway.cache.templates["base"] = {"metadata": {"name": "base"}, "spec": {"image": "i"}}
    app = gateway.app()
    app.on_startup.clear()  # no watches: the cache is filled above
    async with TestClient(TestServer(app)) as client:
        yield client, gateway


async def test_an_unanswered_create_is_a_503_and_its_sandbox_is_deleted_should_it_land() -> None:
    api = UnansweredCreates(sent=True, lands=True)
    async with serving(api) as (client, _):
        response = await client.post("/v2/sandboxes", json={"templateID": "base"}, headers={"X-API-KEY": API_KEY})
        assert response.status == 503
        assert response.headers["Should-Retry"] == "false"
        message = (await response.json())["message"]
        assert "Kubernetes API server did not answer POST" in message and "the gateway deletes it" in message
        (name,) = api.unanswered
        await until(lambda: SANDBOXES.path(NAMESPACE, name) not in api.objects, "the landed sandbox deleted")
        assert [(w.verb, w.path) for w in api.log if w.verb == "DELETE"] == [
            ("DELETE", SANDBOXES.path(NAMESPACE, name))
        ]


async def test_an_unanswered_create_that_lands_late_is_deleted_when_the_watch_shows_it() -> None:
    api = UnansweredCreates(sent=True, lands=False)
    async with serving(api) as (client, gateway):
        response = await client.post("/v2/sandboxes", json={"templateID": "base"}, headers={"X-API-KEY": API_KEY})
        assert response.status == 503
        (name,) = api.unanswered
        path = SANDBOXES.path(NAMESPACE, name)
        await until(lambda: any(w.verb == "DELETE" and w.status == 404 for w in api.log), "a first delete: 404")
        # Now the request lands: the watch delivers the Sandbox, and the gateway deletes it.
        landed = api.add(SANDBOXES, {"metadata": {"name": name}, "spec": {"template": "base"}}, NAMESPACE)
        gateway.cache._on_sandbox("ADDED", landed)
        await gateway.cache._notify()
        await until(lambda: path not in api.objects, "the late sandbox deleted")


async def test_a_create_that_never_connected_is_a_503_and_nothing_is_deleted() -> None:
    api = UnansweredCreates(sent=False, lands=False)
    async with serving(api) as (client, gateway):
        response = await client.post("/v2/sandboxes", json={"templateID": "base"}, headers={"X-API-KEY": API_KEY})
        assert response.status == 503
        assert "could not be reached" in (await response.json())["message"]
        assert not gateway._background and not [w for w in api.log if w.verb == "DELETE"]


class ProbedApi(FakeApi):
    """Answers GET /version while `answering`; else never (the gateway's probe times out)."""

    answering = False

    async def request(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
        assert (method, path) == ("GET", server.API_PROBE_PATH)
        if not self.answering:
            await asyncio.Event().wait()
        return {"major": "1"}


async def test_ready_says_whether_the_api_server_answers_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "API_PROBE_INTERVAL_S", 0.01)
    monkeypatch.setattr(server, "API_PROBE_TIMEOUT_S", 0.1)
    api = ProbedApi()
    gateway = Gateway(api, GatewayConfig(token_key=b"k" * 32))
    for name in ("sandboxes", "templates", "api-keys"):
        gateway.cache._synced[name] = asyncio.Event()
        gateway.cache._synced[name].set()
    request = make_mocked_request("GET", "/ready")

    async def ready() -> tuple[int, Any]:
        response = await gateway.ready(request)
        return response.status, json.loads(response.body)  # type: ignore[attr-defined]

    probing = asyncio.create_task(gateway.watch_api())
    try:
        await until(lambda: gateway.api_failure is not None, "a failed probe")
        status, body = await ready()
        assert status == 200 and body["status"] == "ready" and body["kubernetesApi"] == "unreachable"
        assert "did not answer GET /version" in body["kubernetesApiError"]
        api.answering = True
        await until(lambda: gateway.api_failure is None, "an answered probe")
        assert await ready() == (200, {"status": "ready"})
    finally:
        probing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probing
