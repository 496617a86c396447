"""KubeClient against a real HTTP server on loopback: expired credentials are reloaded once."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sandbox_operator.kube import ApiError, Credentials, KubeClient


async def test_a_401_reloads_the_credentials_and_retries_once() -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "")
        seen.append(token)
        if token != "Bearer fresh":
            return web.json_response({"kind": "Status", "reason": "Unauthorized", "message": "expired"}, status=401)
        return web.json_response({"kind": "Pod", "metadata": {"name": "p"}})

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ns/pods/p", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    reloads: list[int] = []

    def reload() -> Credentials:
        reloads.append(1)
        return Credentials(server=base, headers={"Authorization": "Bearer fresh"}, ssl_context=False)

    client = KubeClient(
        Credentials(server=base, headers={"Authorization": "Bearer stale"}, ssl_context=False), reload=reload
    )
    try:
        body = await client.get("/api/v1/namespaces/ns/pods/p")
        assert body == {"kind": "Pod", "metadata": {"name": "p"}}
        assert seen == ["Bearer stale", "Bearer fresh"] and len(reloads) == 1
        await client.get("/api/v1/namespaces/ns/pods/p")
        assert len(reloads) == 1  # the fresh token keeps working: no reload per request
    finally:
        await client.close()
        await server.close()


async def test_without_a_reloader_a_401_is_an_error() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"reason": "Unauthorized", "message": "no"}, status=401)

    app = web.Application()
    app.router.add_get("/x", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    client = KubeClient(Credentials(server=str(server.make_url("")).rstrip("/"), ssl_context=False))
    try:
        with pytest.raises(ApiError) as raised:
            await client.get("/x")
        assert raised.value.status == 401 and raised.value.reason == "Unauthorized"
    finally:
        await client.close()
        await server.close()
