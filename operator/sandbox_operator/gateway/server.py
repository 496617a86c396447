"""The gateway: the E2B control-plane REST API and the data-plane proxy on one listener.

A request that names a sandbox (E2b-Sandbox-Id/-Port headers, or a Host of `{port}-{id}.{domain}`)
is proxied, streaming both ways, to the sandbox pod's IP (from the Sandbox's status: Services get
no endpoints for some pod networks, DESIGN.md §6). Everything else is the control plane, which turns
E2B calls into Sandbox objects and waits on the watch for them to converge.

Auth: control-plane calls carry `X-API-KEY`; each key is a Secret in the gateway's namespace and
grants one namespace. Data-plane calls carry the sandbox's access token (returned by create and
connect as envdAccessToken and trafficAccessToken), which the gateway checks before proxying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from sandbox_operator.agent.signing import tokens_equal, verify_signature
from sandbox_operator.api import Phase, parse_duration
from sandbox_operator.api.names import ENVD_PORT, SANDBOXES
from sandbox_operator.gateway import e2b
from sandbox_operator.gateway.cache import Cache
from sandbox_operator.gateway.http import json_response, read_payload
from sandbox_operator.gateway.session import routes as session_routes
from sandbox_operator.kube import ApiError, KubeClient

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Not forwarded in either direction (RFC 9110 §7.6.1), plus what the proxy sets itself.
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# The gateway's own credentials never reach a sandbox.
STRIPPED_HEADERS = frozenset({"x-api-key", "x-access-token", "e2b-traffic-access-token"})
NOT_FORWARDED = HOP_HEADERS | STRIPPED_HEADERS
CONNECT_RETRY_S = 3.0  # how long a refused connection to a Running sandbox is retried
HEALTH_POLL_MAX_DELAY_S = 0.05  # an agent starting up is polled often: create latency waits on it


@dataclass(frozen=True)
class GatewayConfig:
    token_key: bytes
    keys_namespace: str = "sandbox-system"
    domain: str | None = None
    create_timeout: float = 120.0
    max_body_bytes: int = 1 << 30  # uploads stream through; this bounds one request


class Gateway:
    def __init__(self, client: KubeClient, config: GatewayConfig) -> None:
        self.client = client
        self.config = config
        self.cache = Cache(client, config.keys_namespace)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sandbox_gateway_requests",
            "Requests answered, by kind and status code.",
            ["kind", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sandbox_gateway_request_duration_seconds",
            "Time to the response headers, by kind.",
            ["kind"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
        )
        self._upstream: aiohttp.ClientSession | None = None
        self._tokens: dict[str, str] = {}  # sandbox uid -> access token

    # --- application -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._dispatch], client_max_size=self.config.max_body_bytes)
        routes = [
            ("POST", "/v2/sandboxes", self.create),
            ("POST", "/sandboxes", self.create),
            ("GET", "/v2/sandboxes", self.list),
            ("GET", "/sandboxes", self.list),
            ("GET", "/sandboxes/{id}", self.get_info),
            ("DELETE", "/sandboxes/{id}", self.kill),
            ("POST", "/sandboxes/{id}/timeout", self.set_timeout),
            ("POST", "/sandboxes/{id}/pause", self.pause),
            ("POST", "/v2/sandboxes/{id}/connect", self.connect),
            ("POST", "/sandboxes/{id}/connect", self.connect),
            ("POST", "/sandboxes/{id}/resume", self.connect),
            ("GET", "/sandboxes/{id}/metrics", self.metrics),
            ("GET", "/health", self.health),
        ]
        routes += session_routes(self)
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _: web.Application) -> None:
        self.cache.start()
        self._upstream = aiohttp.ClientSession(
            auto_decompress=False,  # gzip bodies pass through untouched
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        )

    async def _on_cleanup(self, _: web.Application) -> None:
        await self.cache.stop()
        if self._upstream is not None:
            await self._upstream.close()

    @web.middleware
    async def _dispatch(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = e2b.route_of(request.headers, request.host)
        kind = "control" if route is None else "proxy"
        try:
            if isinstance(route, str):
                response: web.StreamResponse = json_response(400, e2b.error_body(400, route))
            elif route is not None:
                response = await self.proxy(request, route)
            else:
                response = await handler(request)
        except e2b.Refused as refused:
            response = json_response(refused.status, e2b.error_body(refused.status, str(refused)))
        except web.HTTPException as exc:
            # Unknown paths and methods: JSON bodies, as the SDK expects for every status.
            response = json_response(exc.status, e2b.error_body(exc.status, exc.reason))
        except e2b.BadRequest as exc:
            response = json_response(400, e2b.error_body(400, str(exc)))
        except ApiError as exc:
            response = _api_error(exc)
        except TimeoutError:
            response = json_response(504, e2b.error_body(504, "timed out waiting for the sandbox"))
        self.requests.labels(kind, str(response.status)).inc()
        self.latency.labels(kind).observe(time.perf_counter() - started)
        return response

    # --- control plane ---------------------------------------------------------------------------

    def namespace_of(self, request: web.Request) -> str:
        """The namespace the request's API key grants; 401 without a known key."""
        namespace = self.cache.namespace_for_key(request.headers.get("X-API-KEY"))
        if namespace is None:
            raise e2b.Refused(401, "missing or unknown API key (X-API-KEY)")
        return namespace

    def _sandbox(self, request: web.Request) -> tuple[str, JSON]:
        namespace = self.namespace_of(request)
        sandbox_id = request.match_info["id"]
        body = self.cache.find(sandbox_id, namespace)
        if body is None or e2b.state_of(body) is None or body["metadata"].get("deletionTimestamp"):
            raise e2b.Refused(404, f"sandbox {sandbox_id} not found")
        return namespace, body

    def token_of(self, body: JSON) -> str:
        uid = str(body["metadata"]["uid"])
        token = self._tokens.get(uid)
        if token is None:  # an HMAC per proxied request is measurable: computed once per sandbox
            if len(self._tokens) > 100_000:
                self._tokens.clear()
            token = self._tokens[uid] = e2b.access_token(self.config.token_key, body)
        return token

    def upstream(self) -> aiohttp.ClientSession:
        assert self._upstream is not None, "the gateway application has not started"
        return self._upstream

    def template_named(self, wanted: str) -> str | None:
        """The SandboxTemplate serving an E2B template name (exact, else its alias)."""
        for name in (wanted, e2b.TEMPLATE_ALIASES.get(wanted)):
            if name and self.cache.template(name) is not None:
                return name
        return None

    # Operations shared by the E2B API and the session API.

    async def create_sandbox(self, namespace: str, manifest: JSON) -> None:
        created = await self.client.request("POST", SANDBOXES.collection(namespace), manifest)
        self.cache.observe(created)

    async def set_suspended(self, namespace: str, name: str, suspended: bool) -> None:
        patched = await self.client.patch(SANDBOXES.path(namespace, name), {"spec": {"suspended": suspended}})
        if patched is not None:
            self.cache.observe(patched)

    async def delete_sandbox(self, namespace: str, name: str, *, wait: bool, uid: str | None = None) -> bool:
        """Delete a Sandbox (its children go with it); with `wait`, until the watch saw it go."""
        deleted = await self.client.delete(SANDBOXES.path(namespace, name), uid=uid)
        if deleted and wait:
            await self.cache.wait_for((namespace, name), lambda body: body is None, self.config.create_timeout)
        return deleted

    async def until_serving(self, key: tuple[str, str], *, delete_on_failure: bool) -> JSON:
        """Wait for Running with a pod IP and a healthy agent. A sandbox that fails, or does not come up
        in time, is deleted again when `delete_on_failure` (nothing half-created is left)."""
        try:
            return await self._until_serving(key, self.config.create_timeout)
        except BaseException:
            if delete_on_failure:
                with contextlib.suppress(ApiError, aiohttp.ClientError, OSError):
                    await self.delete_sandbox(*key, wait=False)
            raise

    async def _until_serving(self, key: tuple[str, str], within: float) -> JSON:
        def settled(body: JSON | None) -> bool:
            if body is None:
                return True
            status = body.get("status") or {}
            return status.get("phase") in (Phase.RUNNING, Phase.ERROR, Phase.TERMINATED) and (
                status.get("phase") != Phase.RUNNING or bool(status.get("podIP"))
            )

        deadline = time.monotonic() + within
        body = await self.cache.wait_for(key, settled, within)
        if body is None:
            raise e2b.Refused(409, "the sandbox was deleted while it was starting")
        status = body["status"]
        if status["phase"] != Phase.RUNNING:
            reason = status.get("reason") or status["phase"]
            raise e2b.Refused(500, f"the sandbox failed to start: {reason}: {status.get('message')}")
        await self._agent_healthy(status["podIP"], deadline)
        return body

    async def _agent_healthy(self, pod_ip: str, deadline: float) -> None:
        delay = 0.02
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with self.upstream().get(
                    f"http://{pod_ip}:{ENVD_PORT}/health", timeout=aiohttp.ClientTimeout(total=2)
                ) as response:
                    if response.status < 300:
                        return
            if time.monotonic() + delay > deadline:
                raise TimeoutError
            await asyncio.sleep(delay)  # the agent is starting: poll its health with backoff
            delay = min(delay * 2, HEALTH_POLL_MAX_DELAY_S)

    # E2B control-plane handlers.

    async def health(self, request: web.Request) -> web.StreamResponse:
        return json_response(200, {"status": "ok"})

    async def create(self, request: web.Request) -> web.StreamResponse:
        namespace = self.namespace_of(request)
        payload = await read_payload(request)
        wanted = e2b.template_name(payload.get("templateID"))
        template = self.template_named(wanted)
        if template is None:
            raise e2b.Refused(400, f"template {wanted!r} not found: no SandboxTemplate of that name")
        manifest = e2b.sandbox_from_request(payload, namespace=namespace, template=template)
        await self.create_sandbox(namespace, manifest)
        body = await self.until_serving((namespace, manifest["metadata"]["name"]), delete_on_failure=True)
        return json_response(201, e2b.sandbox_response(body, self.token_of(body), self.config.domain))

    async def list(self, request: web.Request) -> web.StreamResponse:
        namespace = self.namespace_of(request)
        query = e2b.parse_list_query(request.query)
        items = [
            e2b.sandbox_detail(body, self.cache.template(body["spec"]["template"]), None)
            for body in self.cache.in_namespace(namespace)
            if e2b.matches(body, query) and not body["metadata"].get("deletionTimestamp")
        ]
        if request.path == "/sandboxes":  # v1: no pagination
            return json_response(200, sorted(items, key=lambda item: str(item["sandboxID"])))
        chosen, next_token = e2b.page(items, query)
        response = json_response(200, chosen)
        if next_token:
            response.headers["x-next-token"] = next_token
        return response

    async def get_info(self, request: web.Request) -> web.StreamResponse:
        _, body = self._sandbox(request)
        template = self.cache.template(body["spec"]["template"])
        return json_response(200, e2b.sandbox_detail(body, template, self.token_of(body)))

    async def kill(self, request: web.Request) -> web.StreamResponse:
        namespace, body = self._sandbox(request)
        if not await self.delete_sandbox(namespace, body["metadata"]["name"], wait=False, uid=body["metadata"]["uid"]):
            raise e2b.Refused(404, f"sandbox {request.match_info['id']} not found")
        return web.Response(status=204)

    async def set_timeout(self, request: web.Request) -> web.StreamResponse:
        namespace, body = self._sandbox(request)
        payload = await read_payload(request)
        timeout = e2b.seconds(payload.get("timeout"), "timeout")
        await self._extend(namespace, body, timeout, only_longer=False)
        return web.Response(status=204)

    async def _extend(self, namespace: str, body: JSON, seconds: int, *, only_longer: bool) -> None:
        created = datetime.fromisoformat(str(body["metadata"]["creationTimestamp"]).replace("Z", "+00:00"))
        lifetime = e2b.lifetime_for_timeout(created, datetime.now(UTC), seconds)
        expires = (body.get("status") or {}).get("expiresAt")
        if only_longer and expires:
            current_end = datetime.fromisoformat(str(expires).replace("Z", "+00:00"))
            if (current_end - datetime.now(UTC)).total_seconds() >= seconds:
                return
        timeouts: JSON = {"maxLifetime": lifetime}
        # The CRD refuses an idle timeout longer than maxLifetime: one that no longer fits goes.
        idle = (body["spec"].get("timeouts") or {}).get("idle")
        if idle and parse_duration(idle) > parse_duration(lifetime):
            timeouts["idle"] = "0"
        name = body["metadata"]["name"]
        patched = await self.client.patch(SANDBOXES.path(namespace, name), {"spec": {"timeouts": timeouts}})
        if patched is None:
            return
        self.cache.observe(patched)
        # In effect once the operator has seen it (status.expiresAt moved): get_info right after
        # must show the new end.
        generation = int(patched["metadata"].get("generation") or 0)
        await self.cache.wait_for(
            (namespace, name),
            lambda b: b is None or int((b.get("status") or {}).get("observedGeneration") or 0) >= generation,
            self.config.create_timeout,
        )

    async def pause(self, request: web.Request) -> web.StreamResponse:
        namespace, body = self._sandbox(request)
        if e2b.state_of(body) == "paused":
            raise e2b.Refused(409, f"sandbox {request.match_info['id']} is already paused")
        name = body["metadata"]["name"]
        await self.set_suspended(namespace, name, True)
        await self.cache.wait_for(
            (namespace, name),
            lambda b: b is None or (b.get("status") or {}).get("phase") == Phase.SUSPENDED,
            self.config.create_timeout,
        )
        return web.Response(status=204)

    async def connect(self, request: web.Request) -> web.StreamResponse:
        namespace, body = self._sandbox(request)
        payload = await read_payload(request)
        name = body["metadata"]["name"]
        resumed = e2b.state_of(body) == "paused"
        if resumed:
            await self.set_suspended(namespace, name, False)
        if payload.get("timeout") is not None:
            await self._extend(namespace, body, e2b.seconds(payload["timeout"], "timeout"), only_longer=True)
        serving = await self.until_serving((namespace, name), delete_on_failure=False)
        response = e2b.sandbox_response(serving, self.token_of(serving), self.config.domain)
        return json_response(201 if resumed else 200, response)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        _, body = self._sandbox(request)
        pod_ip = (body.get("status") or {}).get("podIP")
        if not pod_ip or e2b.state_of(body) != "running":
            return json_response(200, [])
        try:
            async with self.upstream().get(
                f"http://{pod_ip}:{ENVD_PORT}/metrics", timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                sample = await response.json()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return json_response(200, [])
        return json_response(200, [e2b.metric_from_agent(sample)])

    # --- data plane ------------------------------------------------------------------------------

    async def proxy(self, request: web.Request, route: e2b.Route) -> web.StreamResponse:
        body = self.cache.find(route.sandbox_id)
        status = (body or {}).get("status") or {}
        if body is None or status.get("phase") != Phase.RUNNING or not status.get("podIP"):
            return json_response(
                502, {"sandboxId": route.sandbox_id, "message": "The sandbox was not found", "code": 502}
            )
        if route.port == ENVD_PORT and request.path in e2b.INTERNAL_PATHS:
            return json_response(403, e2b.error_body(403, f"{request.path} is internal to the sandbox"))
        refusal = self._check_token(request, route, self.token_of(body))
        if refusal:
            return json_response(401, e2b.error_body(401, refusal))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED}
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        # Only what the client accepts (else aiohttp would offer gzip on its behalf).
        headers["Accept-Encoding"] = request.headers.get("Accept-Encoding", "identity")
        data = request.content if request.body_exists else None
        deadline = time.monotonic() + CONNECT_RETRY_S
        delay = 0.02
        while True:
            url = f"http://{status['podIP']}:{route.port}{request.rel_url}"
            try:
                upstream = await self.upstream().request(
                    request.method, url, headers=headers, data=data, allow_redirects=False
                )
                break
            except aiohttp.ClientConnectorError:
                # Refused before a byte was sent: the agent of a just (re)started pod is still coming
                # up. Retrying is safe, also for a request with a body (none of it was read yet).
                if time.monotonic() + delay > deadline:
                    return _port_not_open(route)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
                body = self.cache.find(route.sandbox_id)
                status = (body or {}).get("status") or {}
                if body is None or status.get("phase") != Phase.RUNNING or not status.get("podIP"):
                    return json_response(
                        502, {"sandboxId": route.sandbox_id, "code": 502, "message": "The sandbox was not found"}
                    )
            except (aiohttp.ClientConnectionError, OSError):
                return _port_not_open(route)
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_HEADERS:
                    response.headers.add(name, value)
            if upstream.headers.get("Content-Length") is not None:
                response.content_length = int(upstream.headers["Content-Length"])
            await response.prepare(request)
            # Each chunk as it arrives: command output, watch events and /execute lines are streamed.
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        except (aiohttp.ClientError, ConnectionResetError):
            # The client or the sandbox went away mid-stream: nothing more can be said to either.
            return response
        finally:
            upstream.release()

    def _check_token(self, request: web.Request, route: e2b.Route, token: str) -> str | None:
        """None when the request may pass; else why not. /health is open (the SDK probes it
        without a token); /files may carry a signature instead (signed download/upload URLs)."""
        given = request.headers.get("X-Access-Token") or request.headers.get("E2B-Traffic-Access-Token")
        if tokens_equal(given, token):
            return None
        if route.port == ENVD_PORT and request.path == "/health":
            return None
        if route.port == ENVD_PORT and request.path == "/files" and request.query.get("signature"):
            refused = verify_signature(
                signature=request.query.get("signature"),
                expiration=request.query.get("signature_expiration"),
                path=request.query.get("path", ""),
                operation="read" if request.method == "GET" else "write",
                username=request.query.get("username", ""),
                access_token=token,
                now=time.time(),
            )
            return None if refused is None else f"file URL refused: {refused}"
        return "missing or invalid access token (X-Access-Token or E2B-Traffic-Access-Token)"


def _port_not_open(route: e2b.Route) -> web.Response:
    return json_response(
        502,
        {
            "sandboxId": route.sandbox_id,
            "port": route.port,
            "code": 502,
            "message": "The sandbox is running but port is not open",
        },
    )


def _api_error(exc: ApiError) -> web.Response:
    """Kubernetes' answer, in E2B's error shape; invalid specs keep the API server's message."""
    message = exc.body.get("message") if isinstance(exc.body, dict) else str(exc.body)
    status = exc.status if exc.status in (400, 403, 404, 409, 422, 429) else 502
    if status == 422:
        status = 400  # the CRD's validation: a bad request as far as E2B clients are concerned
    return json_response(status, e2b.error_body(status, f"kubernetes: {message}"))
