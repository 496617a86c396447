"""The gateway: the E2B control-plane REST API and the data-plane proxy on one listener.

A request that names a sandbox (E2b-Sandbox-Id/-Port headers, or a Host of `{port}-{id}.{domain}`)
is proxied, streaming both ways, to the sandbox pod's IP (from the Sandbox's status: Services get
no endpoints for some pod networks, docs/design.md §6). Everything else is the control plane, which turns
E2B calls into Sandbox objects and waits on the watch for them to converge.

Auth: control-plane calls carry `X-API-KEY`; each key is a Secret in the gateway's namespace and
grants one namespace. Data-plane calls carry the sandbox's access token (returned by create and
connect as envdAccessToken and trafficAccessToken), which the gateway checks before proxying; a
sandbox created with allowPublicTraffic: false gets a traffic token of its own, which its user
ports require (E2B-Traffic-Access-Token).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from yarl import URL

from sandbox_operator.api.names import AGENT_TOKEN_HEADER, ENVD_PORT, SANDBOXES, TOKEN_EPOCH_ANNOTATION
from sandbox_operator.gateway import e2b, session_logic
from sandbox_operator.gateway.cache import Cache
from sandbox_operator.gateway.http import MAX_JSON_BYTES, agent_json, json_response, read_payload
from sandbox_operator.gateway.session import SESSION_PATH_PREFIX, SessionOps
from sandbox_operator.gateway.session import routes as session_routes
from sandbox_operator.kube import ApiError, KubeClient
from sandbox_operator.kube.client import ApiUnreachable
from sandbox_operator.metrics.process import register_process_metrics
from sandbox_operator.resources.tokens import agent_token

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

V1_LIST_PATH = "/sandboxes"  # the v1 list: everything at once, no pagination
CONNECT_RETRY_S = 3.0  # how long a refused connection to a Running sandbox is retried
CONNECT_RETRY_MAX_DELAY_S = 0.25
WEBSOCKET_CLOSE_S = 5.0  # how long a relayed WebSocket waits for the other end's close frame
READY_WAIT_S = 1.0  # how long /ready waits for the watch caches before answering 503
HEALTH_POLL_MAX_DELAY_S = 0.05  # an agent starting up is polled often: create latency waits on it
DELETE_SEEN_WITHIN_S = 5.0  # how long a delete waits for its watch event (read-your-writes)
END_SEEN_WITHIN_S = 10.0  # how long set_timeout waits for the operator to move status.expiresAt
API_PROBE_PATH = "/version"  # what watch_api asks the API server: the cheapest answer it gives
API_PROBE_INTERVAL_S = 5.0
API_PROBE_TIMEOUT_S = 5.0
UNANSWERED_CREATE_CLEANUP_S = 600.0  # how long the gateway tries to delete a create that got no answer
UNANSWERED_CREATE_GRACE_S = 30.0  # how long after a 404 it watches for that create still landing


@dataclass(frozen=True)
class GatewayConfig:
    token_key: bytes
    keys_namespace: str = "sandbox-system"
    domain: str | None = None
    create_timeout: float = 120.0
    body_timeout: float = 30.0  # seconds a request body may make no progress before the client gets 408
    max_body_bytes: int = 1 << 30  # one streamed session upload (JSON bodies: http.MAX_JSON_BYTES)
    session: session_logic.SessionLimits = field(default_factory=session_logic.SessionLimits)


class BodyTimeout(Exception):
    """A request body stopped arriving (GatewayConfig.body_timeout)."""


class BodyWatch:
    """Fails a request body that makes no progress for `timeout` seconds: whoever waits on it (a handler's
    read, the proxy's upload) gets BodyTimeout. Without it a create whose body never comes holds its
    handler and connection for ever. (An upload the sandbox stops taking counts too: stuck either way.)"""

    def __init__(self, content: aiohttp.StreamReader, timeout: float) -> None:
        self.content = content
        self.timeout = timeout
        self.fired = False
        self._seen = content.total_bytes
        self._since = time.monotonic()
        self._handle = asyncio.get_running_loop().call_later(timeout / 4, self._check)

    @classmethod
    def of(cls, request: web.Request, timeout: float) -> BodyWatch | None:
        """A watch on the request's body; None when it has none still to come."""
        if not request.body_exists or request.content.is_eof():
            return None
        return cls(request.content, timeout)

    def _check(self) -> None:
        if self.content.is_eof():
            return
        now = time.monotonic()
        if self.content.total_bytes != self._seen:
            self._seen, self._since = self.content.total_bytes, now
        elif now - self._since >= self.timeout:
            self.fired = True
            self.content.set_exception(BodyTimeout())
            return
        self._handle = asyncio.get_running_loop().call_later(self.timeout / 4, self._check)

    def stop(self) -> bool:
        """Stop watching; whether the body timed out."""
        self._handle.cancel()
        return self.fired


def error_response(request: web.Request, status: int, message: str) -> web.Response:
    """An error in the shape of the API the request is for: the session API's `{"detail"}`, else E2B's
    `{"code", "message"}`."""
    if request.path.startswith(SESSION_PATH_PREFIX):
        return json_response(*session_logic.error_body(status, message))
    return json_response(status, e2b.error_body(status, message))


class Gateway:
    def __init__(self, client: KubeClient, config: GatewayConfig) -> None:
        self.client = client
        self.config = config
        self.cache = Cache(client, config.keys_namespace)
        self.registry = CollectorRegistry()
        register_process_metrics(self.registry)
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
        self.wakeups = Counter(
            "sandbox_gateway_wakeups",
            "Paused sandboxes resumed by the gateway, by trigger (connect: an API resume; traffic: a "
            "data-plane request for an auto-resuming sandbox) and outcome (served, failed).",
            ["trigger", "outcome"],
            registry=self.registry,
        )
        self.wake_latency = Histogram(
            "sandbox_gateway_wake_duration_seconds",
            "From the resume request to the sandbox's agent serving, by trigger.",
            ["trigger"],
            registry=self.registry,
            buckets=(0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 30, 60),
        )
        self._waking: dict[tuple[str, str], asyncio.Task[JSON]] = {}  # one wake per sandbox at a time
        self._upstream: aiohttp.ClientSession | None = None
        self._tokens: dict[tuple[str, str, str], str] = {}  # (kind, sandbox uid, token epoch) -> token
        self._agent_tokens: dict[str, str] = {}  # status.agentTokenId -> agent token
        # Why the API server did not answer watch_api's last probe; None when it did (or none ran).
        self.api_failure: ApiUnreachable | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._websockets: set[web.WebSocketResponse] = set()  # relayed ones open now, closed at shutdown

    # --- application -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        # No handler reads a body whole but through read_payload (MAX_JSON_BYTES); uploads stream.
        app = web.Application(middlewares=[self._dispatch], client_max_size=MAX_JSON_BYTES)
        routes: list[tuple[str, str, Handler]] = [
            ("POST", "/v2/sandboxes", self.create),
            ("POST", "/sandboxes", self.create),
            ("GET", "/v2/sandboxes", self.list),
            ("GET", V1_LIST_PATH, self.list),
            ("GET", "/sandboxes/{id}", self.get_info),
            ("DELETE", "/sandboxes/{id}", self.kill),
            ("POST", "/sandboxes/{id}/timeout", self.set_timeout),
            ("POST", "/sandboxes/{id}/pause", self.pause),
            ("POST", "/v2/sandboxes/{id}/connect", self.connect),
            ("POST", "/sandboxes/{id}/connect", self.connect),
            ("POST", "/sandboxes/{id}/resume", self.connect),
            ("GET", "/sandboxes/{id}/metrics", self.metrics),
            ("GET", "/health", self.health),
            ("GET", "/ready", self.ready),
        ]
        routes += session_routes(self.session_ops())
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def session_ops(self) -> SessionOps:
        """The operations the session API may use: its handlers get these, not the gateway."""
        return SessionOps(
            namespace_of=self.namespace_of,
            sandbox=self.cache.sandbox,
            templates=self._templates,
            token_of=self.token_of,
            create_sandbox=self.create_sandbox,
            set_suspended=self.set_suspended,
            delete_sandbox=self.delete_sandbox,
            until_serving=self.until_serving,
            upstream=self.upstream,
            agent_headers=self.agent_headers,
            max_upload_bytes=self.config.max_body_bytes,
            limits=self.config.session,
        )

    async def _on_startup(self, _: web.Application) -> None:
        self.cache.start()
        self._upstream = aiohttp.ClientSession(
            auto_decompress=False,  # gzip bodies pass through untouched
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        )

    async def _on_shutdown(self, _: web.Application) -> None:
        # A relayed WebSocket never ends by itself: going away (1001) lets its client reconnect at once
        # instead of the shutdown waiting out aiohttp's timeout for its handler.
        await asyncio.gather(
            *(websocket.close(code=aiohttp.WSCloseCode.GOING_AWAY) for websocket in list(self._websockets)),
            return_exceptions=True,
        )

    async def _on_cleanup(self, _: web.Application) -> None:
        tasks = [*self._background, *self._waking.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.cache.stop()
        if self._upstream is not None:
            await self._upstream.close()

    @web.middleware
    async def _dispatch(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = e2b.route_of(request.headers, request.host)
        kind = "control" if route is None else "proxy"
        watch = BodyWatch.of(request, self.config.body_timeout)
        try:
            if isinstance(route, str):
                response: web.StreamResponse = error_response(request, 400, route)
            elif route is not None:
                response = await self.proxy(request, route)
            else:
                response = await handler(request)
        except e2b.Refused as refused:
            response = error_response(request, refused.status, str(refused))
        except web.HTTPException as exc:
            # Unknown paths and methods: JSON bodies, as the SDK expects for every status.
            response = error_response(request, exc.status, exc.reason)
        except e2b.BadRequest as exc:
            response = error_response(request, 400, str(exc))
        except ApiError as exc:
            status, body = e2b.kubernetes_error(exc.status, exc.body)
            response = error_response(request, status, body["message"])
        except ApiUnreachable as exc:
            # No answer (within the client's timeout): unavailable, not the gateway's fault (500) nor
            # the sandbox's (504), and never a hang.
            response = error_response(request, 503, str(exc))
        except TimeoutError:
            response = error_response(request, 504, "timed out waiting for the sandbox")
        except BodyTimeout:
            response = web.Response()  # answered below
        if watch is not None and watch.stop() and not response.prepared:
            # Whatever failed (a handler's read, the proxy's upload), the client's body is why.
            response = error_response(request, 408, f"the request body stopped arriving for {watch.timeout:g} s")
            response.force_close()
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
        return namespace, e2b.require_visible(self.cache.find(sandbox_id, namespace), sandbox_id)

    def _templates(self) -> Mapping[str, JSON]:
        return self.cache.templates

    def token_of(self, body: JSON) -> str:
        """The sandbox's envd access token (e2b.access_token)."""
        return self._derived_token("access", body)

    def traffic_token_of(self, body: JSON) -> str:
        """The sandbox's trafficAccessToken (e2b.traffic_token)."""
        return self._derived_token("access" if e2b.public_traffic(body) else "traffic", body)

    def _derived_token(self, kind: str, body: JSON) -> str:
        metadata = body["metadata"]
        epoch = str((metadata.get("annotations") or {}).get(TOKEN_EPOCH_ANNOTATION, ""))
        cache_key = (kind, str(metadata["uid"]), epoch)
        token = self._tokens.get(cache_key)
        if token is None:  # an HMAC per proxied request is measurable: computed once per sandbox and epoch
            if len(self._tokens) > 100_000:
                self._tokens.clear()
            derive = e2b.access_token if kind == "access" else e2b.traffic_token
            token = self._tokens[cache_key] = derive(self.config.token_key, body)
        return token

    def sandbox_response(self, body: JSON) -> JSON:
        """The E2B `Sandbox` (create / connect) of a serving sandbox, with its tokens."""
        return e2b.sandbox_response(body, self.token_of(body), self.traffic_token_of(body), self.config.domain)

    def agent_headers(self, body: JSON) -> dict[str, str]:
        """What every call to the sandbox's agent carries: the pod's agent token (derived from the token
        key and status.agentTokenId); nothing for a pod started without one."""
        token_id = (body.get("status") or {}).get("agentTokenId")
        if not token_id:
            return {}
        token = self._agent_tokens.get(token_id)
        if token is None:  # an HMAC per proxied request is measurable: computed once per pod
            if len(self._agent_tokens) > 100_000:
                self._agent_tokens.clear()
            token = self._agent_tokens[token_id] = agent_token(self.config.token_key, str(token_id))
        return {AGENT_TOKEN_HEADER: token}

    def upstream(self) -> aiohttp.ClientSession:
        assert self._upstream is not None, "the gateway application has not started"
        return self._upstream

    # Operations shared by the E2B API and the session API.

    async def create_sandbox(self, namespace: str, manifest: JSON) -> None:
        created = await self.client.request("POST", SANDBOXES.collection(namespace), manifest)
        self.cache.observe(created)

    async def set_suspended(self, namespace: str, name: str, suspended: bool, *, life_s: int | None = None) -> None:
        """E2B pause / resume, as requests on the Sandbox's annotations (spec.suspended is its author's).
        A resume with `life_s` asks for that many seconds of life in the same patch (only a longer end)."""
        now = datetime.now(UTC)
        if suspended:
            patch = e2b.pause_patch()
        else:
            body = self.cache.sandbox((namespace, name))
            end = e2b.requested_end(body, life_s, now, only_longer=True) if body and life_s is not None else None
            patch = e2b.resume_patch(now, end)
        patched = await self.client.patch(SANDBOXES.path(namespace, name), patch)
        if patched is not None:
            self.cache.observe(patched)

    async def delete_sandbox(self, namespace: str, name: str, *, wait: bool, uid: str | None = None) -> bool:
        """Delete a Sandbox (its children go with it); with `wait`, until the watch saw it go. Without,
        until the watch saw the delete begin, so this gateway's next read (a session's status, a list)
        does not show the sandbox as live."""
        deleted = await self.client.delete(SANDBOXES.path(namespace, name), uid=uid)
        if deleted and wait:
            await self.cache.wait_for((namespace, name), lambda body: body is None, self.config.create_timeout)
        elif deleted:
            with contextlib.suppress(TimeoutError):  # the delete was accepted; a slow watch only delays the read
                await self.cache.wait_for((namespace, name), e2b.gone_or_going, DELETE_SEEN_WITHIN_S)
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
        deadline = time.monotonic() + within
        while True:
            body = e2b.started(await self.cache.wait_for(key, e2b.settled, max(0.0, deadline - time.monotonic())))
            pod_ip = str(body["status"]["podIP"])
            if await self._agent_healthy(pod_ip, deadline, lambda: e2b.running_pod_ip(self.cache.sandbox(key))):
                return body
            # Its pod went meanwhile (another client suspended and resumed it): wait for the next.

    async def _agent_healthy(self, pod_ip: str, deadline: float, current_ip: Callable[[], str | None]) -> bool:
        """Poll the agent at `pod_ip` until it answers (True), or until the sandbox is no longer
        served there (False: `current_ip` moved on); TimeoutError at `deadline`."""
        delay = 0.02
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with self.upstream().get(
                    f"http://{pod_ip}:{ENVD_PORT}/health", timeout=aiohttp.ClientTimeout(total=2)
                ) as response:
                    if response.status < 300:
                        return True
            if current_ip() != pod_ip:
                return False
            if time.monotonic() + delay > deadline:
                raise TimeoutError
            await asyncio.sleep(delay)  # the agent is starting: poll its health with backoff
            delay = min(delay * 2, HEALTH_POLL_MAX_DELAY_S)

    async def _extend(self, namespace: str, body: JSON, seconds: int, *, only_longer: bool) -> None:
        end = e2b.requested_end(body, seconds, datetime.now(UTC), only_longer=only_longer)
        if end is None:
            return
        name = body["metadata"]["name"]
        before = (body.get("status") or {}).get("expiresAt")
        patched = await self.client.patch(SANDBOXES.path(namespace, name), e2b.end_patch(end))
        if patched is None:
            return
        self.cache.observe(patched)
        # In effect once the operator has seen it (status.expiresAt moved): get_info right after
        # must show the new end. A capped end may leave expiresAt where it was: then the wait is short.
        with contextlib.suppress(TimeoutError):
            await self.cache.wait_for((namespace, name), lambda b: e2b.end_in_effect(b, end, before), END_SEEN_WITHIN_S)

    async def health(self, request: web.Request) -> web.StreamResponse:
        return json_response(200, {"status": "ok"})

    async def ready(self, request: web.Request) -> web.StreamResponse:
        """Readiness (the chart's readinessProbe; /health is liveness): 503 until every watch cache
        (sandboxes, templates, API keys) has listed once. An API server that stopped answering keeps
        it 200: the caches still serve reads and every running sandbox's traffic, and what needs the
        API server is refused with 503 at once; the answer says so (`kubernetesApi`)."""
        try:
            await self.cache.synced(within=READY_WAIT_S)
        except TimeoutError:
            return json_response(503, {"status": "syncing"})
        if self.api_failure is not None:
            return json_response(
                200, {"status": "ready", "kubernetesApi": "unreachable", "kubernetesApiError": str(self.api_failure)}
            )
        return json_response(200, {"status": "ready"})

    async def watch_api(self) -> None:
        """Ask the API server for its version every few seconds, for /ready to tell whether it answers
        (the watches alone cannot: a stream from a hung server is just quiet). Runs until cancelled."""
        while True:
            failure: ApiUnreachable | None = None
            try:
                async with asyncio.timeout(API_PROBE_TIMEOUT_S):
                    await self.client.request("GET", API_PROBE_PATH)
            except ApiUnreachable as exc:
                failure = exc
            except TimeoutError as exc:
                failure = ApiUnreachable("GET", API_PROBE_PATH, exc, sent=True, timeout=API_PROBE_TIMEOUT_S)
            except ApiError:
                pass  # it answered, if only with an error
            if failure is not None and self.api_failure is None:
                log.warning("%s: /ready says so until it answers again", failure)
            elif failure is None and self.api_failure is not None:
                log.info("the Kubernetes API server answers the gateway's probe again")
            self.api_failure = failure
            await asyncio.sleep(API_PROBE_INTERVAL_S)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._background.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._background.discard)
        return task

    async def _delete_unanswered_create(self, namespace: str, name: str) -> None:
        """Delete the Sandbox of a create the API server did not answer, should it have applied it
        (once it answers again): the client was told 503, so nothing of it may stay behind."""
        deadline = time.monotonic() + UNANSWERED_CREATE_CLEANUP_S
        delay = 1.0
        while time.monotonic() < deadline:
            try:
                if await self.client.delete(SANDBOXES.path(namespace, name)):
                    log.info("deleted sandbox %s/%s, whose create got no answer in time", namespace, name)
                    return
            except (ApiUnreachable, ApiError) as exc:
                log.debug("deleting sandbox %s/%s (unanswered create) failed, retrying: %s", namespace, name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            # Not there (yet): the unanswered request may still be in the resumed server's hands.
            try:
                await self.cache.wait_for((namespace, name), lambda body: body is not None, UNANSWERED_CREATE_GRACE_S)
            except TimeoutError:
                return  # never created
        log.warning("gave up deleting sandbox %s/%s, whose create got no answer in time", namespace, name)

    async def create(self, request: web.Request) -> web.StreamResponse:
        namespace = self.namespace_of(request)
        payload = await read_payload(request)
        manifest = e2b.sandbox_for_create(payload, namespace=namespace, templates=self.cache.templates)
        name = manifest["metadata"]["name"]
        try:
            await self.create_sandbox(namespace, manifest)
        except ApiUnreachable as exc:
            if not exc.maybe_applied:
                raise
            self._spawn(self._delete_unanswered_create(namespace, name), f"delete-unanswered-{name}")
            raise e2b.Refused(503, f"{exc}; should it still create the sandbox, the gateway deletes it") from exc
        body = await self.until_serving((namespace, name), delete_on_failure=True)
        return json_response(201, self.sandbox_response(body))

    async def list(self, request: web.Request) -> web.StreamResponse:
        namespace = self.namespace_of(request)
        items, next_token = e2b.list_sandboxes(
            self.cache.in_namespace(namespace),
            self.cache.templates,
            e2b.parse_list_query(request.query),
            paginated=request.path != V1_LIST_PATH,
        )
        response = json_response(200, items)
        if next_token:
            response.headers["x-next-token"] = next_token
        return response

    async def get_info(self, request: web.Request) -> web.StreamResponse:
        _, body = self._sandbox(request)
        template = self.cache.template(body["spec"]["template"])
        return json_response(200, e2b.sandbox_detail(body, template, self.token_of(body), self.traffic_token_of(body)))

    async def kill(self, request: web.Request) -> web.StreamResponse:
        namespace, body = self._sandbox(request)
        if not await self.delete_sandbox(namespace, body["metadata"]["name"], wait=False, uid=body["metadata"]["uid"]):
            raise e2b.not_found(request.match_info["id"])
        return web.Response(status=204)

    async def set_timeout(self, request: web.Request) -> web.StreamResponse:
        namespace, body = self._sandbox(request)
        payload = await read_payload(request)
        await self._extend(namespace, body, e2b.seconds(payload.get("timeout"), "timeout"), only_longer=False)
        return web.Response(status=204)

    async def pause(self, request: web.Request) -> web.StreamResponse:
        namespace, body = self._sandbox(request)
        e2b.ensure_pausable(body, request.match_info["id"])
        name = body["metadata"]["name"]
        await self.set_suspended(namespace, name, True)
        await self.cache.wait_for((namespace, name), e2b.suspended_or_gone, self.config.create_timeout)
        return web.Response(status=204)

    async def connect(self, request: web.Request) -> web.StreamResponse:
        namespace, body = self._sandbox(request)
        payload = await read_payload(request)
        name = body["metadata"]["name"]
        timeout = e2b.seconds(payload["timeout"], "timeout") if payload.get("timeout") is not None else None
        resumed = e2b.state_of(body) == "paused"  # E2B answers a resume with 201
        if resumed:
            e2b.ensure_resumable(body, request.match_info["id"])
            # A resumed sandbox gets the timeout asked for, else E2B's default, from now on (a
            # sandbox its lifetime paused would otherwise be paused again at once).
            serving = await self._wake((namespace, name), "connect", timeout or e2b.DEFAULT_TIMEOUT_S)
            return json_response(201, self.sandbox_response(serving))
        if timeout is not None:
            await self._extend(namespace, body, timeout, only_longer=True)
        serving = await self.until_serving((namespace, name), delete_on_failure=False)
        return json_response(200, self.sandbox_response(serving))

    async def _wake(self, key: tuple[str, str], trigger: str, life_s: int) -> JSON:
        """Resume a paused sandbox and wait until its agent serves (bounded by the create timeout);
        concurrent wakes of one sandbox share the first one's resume and wait."""
        waking = self._waking.get(key)
        if waking is None:
            waking = asyncio.create_task(self._resume_until_serving(key, trigger, life_s), name=f"wake-{key[1]}")
            self._waking[key] = waking
            waking.add_done_callback(lambda _: self._waking.pop(key, None))
        return await asyncio.shield(waking)  # one waiter going away does not stop the others' wake

    async def _resume_until_serving(self, key: tuple[str, str], trigger: str, life_s: int) -> JSON:
        started = time.perf_counter()
        try:
            body = self.cache.sandbox(key)
            if body is not None and e2b.state_of(body) == "paused":
                await self.set_suspended(*key, False, life_s=life_s)
            serving = await self.until_serving(key, delete_on_failure=False)
        except BaseException:
            self.wakeups.labels(trigger, "failed").inc()
            raise
        self.wakeups.labels(trigger, "served").inc()
        self.wake_latency.labels(trigger).observe(time.perf_counter() - started)
        return serving

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        _, body = self._sandbox(request)
        start, end = e2b.metrics_window(request.query)
        pod_ip = e2b.metrics_pod_ip(body)
        if pod_ip is None:
            return json_response(200, [])
        try:
            async with self.upstream().get(
                f"http://{pod_ip}:{ENVD_PORT}/metrics",
                headers=self.agent_headers(body),
                timeout=aiohttp.ClientTimeout(total=5),
            ) as response:
                metric = e2b.metric_from_agent(await agent_json(response))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return json_response(200, [])  # the agent is down or answers nonsense: no sample
        return json_response(200, [metric] if e2b.in_window(metric, start, end) else [])

    # --- data plane ------------------------------------------------------------------------------

    async def proxy(self, request: web.Request, route: e2b.Route) -> web.StreamResponse:
        body = self.cache.find(route.sandbox_id)
        if body is None or (e2b.running_pod_ip(body) is None and not e2b.wakes_on_traffic(body)):
            return json_response(502, e2b.sandbox_gone_body(route.sandbox_id))
        # Checked as it is forwarded: the normalised path, never what the client spelled.
        path = e2b.proxy_path(request.rel_url.raw_path)
        admission = e2b.proxy_admission(
            route,
            method=request.method,
            path=path,
            headers=request.headers,
            query=request.query,
            token=self.token_of(body),
            now=time.time(),
            traffic=self.traffic_token_of(body),
            public=e2b.public_traffic(body),
        )
        if not e2b.declared_port(route.port, body, self.cache.template(body["spec"]["template"])):
            return json_response(502, e2b.port_not_open_body(route))
        if e2b.running_pod_ip(body) is None:
            # Paused and auto-resuming: this request (admitted above, so nobody else can wake it)
            # waits for the resume and is then forwarded (E2B's autoResume).
            key = (body["metadata"]["namespace"], body["metadata"]["name"])
            body = await self._wake(key, "traffic", e2b.own_timeout(body))
        if e2b.websocket_upgrade(request.method, request.headers):
            return await self._relay_websocket(request, route, body, path, admission)
        upstream = await self._open_upstream(request, route, body, path, admission)
        if isinstance(upstream, web.Response):
            return upstream
        return await self._relay(request, upstream)

    async def _open_upstream(
        self, request: web.Request, route: e2b.Route, body: JSON, path: str, admission: e2b.Admission
    ) -> aiohttp.ClientResponse | web.Response:
        """The sandbox's response headers; or the gateway's answer when the sandbox cannot be reached."""
        data = request.content if request.body_exists else None
        query = request.rel_url.raw_query_string
        target = f"{path}?{query}" if query else path
        deadline = time.monotonic() + CONNECT_RETRY_S
        delay = 0.02
        while True:
            headers = e2b.forwarded_headers(
                request.headers,
                request.content_length,
                port=route.port,
                agent_headers=self.agent_headers(body),
                admission=admission,
            )
            origin = URL.build(scheme="http", host=str(body["status"]["podIP"]), port=route.port)
            # Encoded: the path goes as it was checked, the HTTP client does not normalise it again.
            url = URL(f"{origin}{target}", encoded=True)
            try:
                return await self.upstream().request(
                    request.method, url, headers=headers, data=data, allow_redirects=False
                )
            except aiohttp.ClientConnectorError:
                # Refused before a byte was sent: the agent of a just (re)started pod is still coming
                # up. Retrying is safe, also for a request with a body (none of it was read yet).
                if time.monotonic() + delay > deadline:
                    return json_response(502, e2b.port_not_open_body(route))
                await asyncio.sleep(delay)
                delay = min(delay * 2, CONNECT_RETRY_MAX_DELAY_S)
                retried = self.cache.find(route.sandbox_id)  # a recreated pod: a new IP and agent token
                if retried is None or e2b.running_pod_ip(retried) is None:
                    return json_response(502, e2b.sandbox_gone_body(route.sandbox_id))
                body = retried
            except (aiohttp.ClientConnectionError, OSError):
                return json_response(502, e2b.port_not_open_body(route))

    async def _relay_websocket(
        self, request: web.Request, route: e2b.Route, body: JSON, path: str, admission: e2b.Admission
    ) -> web.StreamResponse:
        """A WebSocket to a sandbox port: the gateway opens its own to the sandbox first (so a refused
        handshake reaches the client as the sandbox's status), then accepts the client's with the
        subprotocol the sandbox chose and relays messages both ways until either side closes."""
        headers = {
            name: value
            for name, value in e2b.forwarded_headers(
                request.headers, None, port=route.port, agent_headers=self.agent_headers(body), admission=admission
            ).items()
            if name.lower() not in e2b.WEBSOCKET_HANDSHAKE_HEADERS and name.lower() != "accept-encoding"
        }
        query = request.rel_url.raw_query_string
        origin = URL.build(scheme="ws", host=str(body["status"]["podIP"]), port=route.port)
        url = URL(f"{origin}{path}?{query}" if query else f"{origin}{path}", encoded=True)
        try:
            sandbox_side = await self.upstream().ws_connect(
                url,
                headers=headers,
                protocols=e2b.websocket_protocols(request.headers),
                max_msg_size=e2b.WEBSOCKET_MAX_MESSAGE_BYTES,
                timeout=aiohttp.ClientWSTimeout(ws_close=WEBSOCKET_CLOSE_S),
            )
        except aiohttp.WSServerHandshakeError as refused:
            status = refused.status if 400 <= refused.status < 600 else 502
            return json_response(
                status, {"code": status, "message": f"the sandbox refused the WebSocket: {refused.message}"}
            )
        except (aiohttp.ClientError, OSError, TimeoutError):
            return json_response(502, e2b.port_not_open_body(route))
        client_side = web.WebSocketResponse(
            protocols=(sandbox_side.protocol,) if sandbox_side.protocol else (),
            max_msg_size=e2b.WEBSOCKET_MAX_MESSAGE_BYTES,
            timeout=WEBSOCKET_CLOSE_S,
        )
        try:
            await client_side.prepare(request)
        except BaseException:
            await sandbox_side.close(code=aiohttp.WSCloseCode.GOING_AWAY)
            raise
        # The relay runs as a task of its own: a client that goes away cancels this handler, and the
        # relay must still see that as the client's close and close the sandbox's side with it.
        self._websockets.add(client_side)
        relay = self._spawn(_relay_messages(client_side, sandbox_side), f"websocket-{route.sandbox_id}")
        relay.add_done_callback(lambda _: self._websockets.discard(client_side))
        await asyncio.shield(relay)
        return client_side

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """The sandbox's response, streamed to the client as it comes."""
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in e2b.returned_headers(upstream.headers):
                response.headers.add(name, value)
            if upstream.headers.get("Content-Length") is not None:
                response.content_length = int(upstream.headers["Content-Length"])
            await response.prepare(request)
            # Each chunk as it arrives: command output, watch events and /execute lines are streamed.
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        except aiohttp.ClientPayloadError:
            # The sandbox cut its response short (its agent stopped: kill, pause): cut the client's
            # too, as the sandbox did. Returning would end it cleanly, which the SDKs read as a
            # complete answer instead of raising their "sandbox was killed" error.
            if request.transport is not None:
                request.transport.abort()
            return response
        except (aiohttp.ClientError, ConnectionResetError):
            # The client or the sandbox went away mid-stream: nothing more can be said to either.
            return response
        finally:
            upstream.release()


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _relay_messages(client_side: web.WebSocketResponse, sandbox_side: aiohttp.ClientWebSocketResponse) -> None:
    """Both directions at once. Each pump ends when its source closes, closing its sink with the
    source's code, and that close ends the other pump's read; what a cancelled relay (the gateway
    stopping) left open is closed as going away (1001)."""
    try:
        await asyncio.gather(_pump_websocket(client_side, sandbox_side), _pump_websocket(sandbox_side, client_side))
    finally:
        for side in (sandbox_side, client_side):
            if not side.closed:
                with contextlib.suppress(Exception):
                    await side.close(code=aiohttp.WSCloseCode.GOING_AWAY)


async def _pump_websocket(source: WebSocket, sink: WebSocket) -> None:
    """Messages from `source` to `sink` as they come (sending waits for the sink to drain, so a slow
    reader slows the writer instead of growing a buffer); when `source` closes or fails, `sink` is
    closed with its code (a message over the bound: 1009)."""
    code = None
    try:
        async for message in source:
            if message.type is aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type is aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            else:  # ERROR: a message over the bound, a broken frame
                code = message.data.code if isinstance(message.data, aiohttp.WebSocketError) else None
                break
    finally:
        if not sink.closed:
            with contextlib.suppress(Exception):
                await sink.close(code=e2b.relayed_close_code(code or source.close_code))
