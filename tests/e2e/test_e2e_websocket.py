"""WebSockets to a sandbox's port through the real gateway (docs/gateway.md, "WebSockets"): a real
WebSocket server started in a sandbox with the SDK, reached at the address `get_host()` names, with a
subprotocol, text and binary messages and close codes in both directions."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import aiohttp
import pytest
from e2b import Sandbox
from e2elib import Gateway

from testlib import Cluster, wait_until

APP_PORT = 8080
TEMPLATE = "websocket-app"
# The sandbox's app (bound to the pod's IP: the local node's pods share the host's network namespace,
# where only loopback addresses are ours to use): echoes text upper-cased and bytes reversed, and
# closes with the code it is asked to.
APP = (
    """
import sys
from aiohttp import web, WSMsgType

async def chat(request):
    socket = web.WebSocketResponse(protocols=("chat.v2",))
    await socket.prepare(request)
    async for message in socket:
        if message.type is WSMsgType.TEXT and message.data.startswith("close "):
            await socket.close(code=int(message.data.split()[1]))
        elif message.type is WSMsgType.TEXT:
            await socket.send_str(message.data.upper())
        elif message.type is WSMsgType.BINARY:
            await socket.send_bytes(message.data[::-1])
    with open("closes.log", "a") as log:
        log.write(f"{socket.close_code}\\n")
    return socket

app = web.Application()
app.router.add_get("/chat", chat)
web.run_app(app, host=sys.argv[1], port=APP_PORT, print=None)
"""
).replace("APP_PORT", str(APP_PORT))


@pytest.fixture(scope="module")
def websocket_template(cluster: Cluster) -> Iterator[str]:
    cluster.apply(
        json.dumps(
            {
                "apiVersion": "sandbox.dev/v1alpha1",
                "kind": "SandboxTemplate",
                "metadata": {"name": TEMPLATE},
                "spec": {
                    "image": "ghcr.io/sandbox-operator/sandbox-base:dev",
                    "resources": {"default": {"cpu": "250m", "memory": "256Mi", "disk": "1Gi"}},
                    "ports": [APP_PORT],
                },
            }
        )
    )
    yield TEMPLATE
    cluster.kubectl("delete", "sandboxtemplate", TEMPLATE, "--wait=false", check=False)


async def open_chat(
    session: aiohttp.ClientSession, gateway: Gateway, sbx: Sandbox, within: float = 30
) -> aiohttp.ClientWebSocketResponse:
    """The app's WebSocket at the address get_host() names (routed by Host, as a domain would), once
    the app listens."""
    headers = {"Host": sbx.get_host(APP_PORT), "X-Access-Token": sbx._envd_access_token or ""}
    deadline = time.monotonic() + within
    while True:
        try:
            return await session.ws_connect(gateway.url + "/chat", headers=headers, protocols=("chat.v1", "chat.v2"))
        except aiohttp.WSServerHandshakeError as refused:
            # 502 "port is not open" while the app starts; anything else is an answer.
            if refused.status != 502 or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


def pod_ip(cluster: Cluster, namespace: str, sandbox_id: str) -> str:
    items = (cluster.get_json("sandboxes", "-n", namespace) or {}).get("items", [])
    (body,) = [item for item in items if item["status"].get("sandboxID") == sandbox_id]
    return str(body["status"]["podIP"])


def test_a_websocket_app_in_a_sandbox_is_reached_through_the_gateway(
    cluster: Cluster, gateway: Gateway, websocket_template: str
) -> None:
    sbx = Sandbox.create(template=websocket_template, timeout=120, **gateway.sdk())
    try:
        sbx.files.write("app.py", APP)
        sbx.commands.run(f"python3 app.py {pod_ip(cluster, gateway.namespace, sbx.sandbox_id)}", background=True)

        async def converse() -> int | None:
            async with aiohttp.ClientSession() as session:
                socket = await open_chat(session, gateway, sbx)
                assert socket.protocol == "chat.v2"
                await socket.send_str("hello sandbox")
                assert await socket.receive_str(timeout=30) == "HELLO SANDBOX"
                await socket.send_bytes(bytes(range(256)))
                assert await socket.receive_bytes(timeout=30) == bytes(range(256))[::-1]
                await socket.send_str("close 4321")  # the app closes: its code reaches the client
                closing = await socket.receive(timeout=30)
                app_closed = closing.data if closing.type is aiohttp.WSMsgType.CLOSE else None
                await socket.close()

                second = await open_chat(session, gateway, sbx)  # a new one works after a close
                await second.send_str("again")
                assert await second.receive_str(timeout=30) == "AGAIN"
                await second.close(code=4000)  # the client closes: its code reaches the app
                return app_closed

        assert asyncio.run(converse()) == 4321

        def app_saw_4000() -> bool:
            return "4000" in sbx.files.read("closes.log").split()

        wait_until(app_saw_4000, timeout=30, message="the app's side closed with the client's code")
    finally:
        sbx.kill()
