"""The gateway's readiness route (the chart's readinessProbe): 503 until the watch caches have
listed once, 200 after; /health (the livenessProbe) answers regardless."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import make_mocked_request

from sandbox_operator.gateway import server
from sandbox_operator.gateway.server import Gateway, GatewayConfig


def _gateway() -> Gateway:
    return Gateway(client=None, config=GatewayConfig(token_key=b"k" * 32))  # type: ignore[arg-type]  # no API calls


async def test_ready_waits_for_every_watch_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "READY_WAIT_S", 0.05)
    gateway = _gateway()
    feeds = {name: asyncio.Event() for name in ("sandboxes", "templates", "api-keys")}
    gateway.cache._synced = feeds  # what Cache.start() sets up, without its watches
    request = make_mocked_request("GET", "/ready")

    feeds["sandboxes"].set()
    feeds["templates"].set()
    syncing = await gateway.ready(request)
    assert syncing.status == 503
    assert json.loads(syncing.body) == {"status": "syncing"}  # type: ignore[attr-defined]
    # Liveness is not readiness: a gateway still syncing is alive.
    assert (await gateway.health(request)).status == 200

    feeds["api-keys"].set()
    ready = await gateway.ready(request)
    assert ready.status == 200
    assert json.loads(ready.body) == {"status": "ready"}  # type: ignore[attr-defined]


def test_ready_is_routed_apart_from_health() -> None:
    routes = {(route.method, route.resource.canonical) for route in _gateway().app().router.routes() if route.resource}
    assert {("GET", "/health"), ("GET", "/ready")} <= routes
