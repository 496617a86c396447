"""A small asyncio Kubernetes REST client for the operator's hot path.

Why not `kubernetes.aio`: docs/design.md §7 measured it at roughly half the throughput and more memory
than a plain aiohttp session for the same creates. The kubernetes package is still used to load
credentials (kubeconfig or in-cluster), once, at start-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

JSON = dict[str, Any]


class ApiError(Exception):
    def __init__(self, status: int, body: Any, method: str, path: str) -> None:
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, Mapping) else str(body)
        super().__init__(f"{method} {path} -> {status}: {message}")

    @property
    def reason(self) -> str:
        if isinstance(self.body, Mapping):
            return str(self.body.get("reason") or self.status)
        return str(self.status)


class ApiUnreachable(ConnectionError):
    """The API server gave no answer: the connection failed, broke or timed out. A ConnectionError
    (so an OSError), like the aiohttp and timeout errors it stands for: callers that catch OSError
    still do, and only what maps failures to answers (the gateway's 503) needs to know it."""

    def __init__(self, method: str, path: str, cause: BaseException, *, sent: bool, timeout: float | None) -> None:
        self.method, self.path, self.cause = method, path, cause
        # A request that went out and got no answer may still be applied (a stopped API server reads
        # it when it resumes); one that never connected was not.
        self.maybe_applied = sent and method in KubeClient.WRITE_VERBS
        if isinstance(cause, TimeoutError) and timeout is not None:
            what = f"did not answer {method} {path} within {timeout:g} s"
        else:
            what = f"could not be reached for {method} {path} ({type(cause).__name__}: {cause})"
        super().__init__(f"the Kubernetes API server {what}")


@dataclass
class Credentials:
    server: str
    headers: dict[str, str] = field(default_factory=dict)
    ssl_context: ssl.SSLContext | bool = True

    @classmethod
    def load(cls, kubeconfig: str | None = None) -> Credentials:
        """In-cluster service account, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
        from kubernetes import client, config  # heavy import, start-up only

        configuration = client.Configuration()
        try:
            if kubeconfig:
                raise config.ConfigException("explicit kubeconfig")
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=configuration
            )
        headers: dict[str, str] = {}
        token = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
            "authorization"
        )
        if token:
            headers["Authorization"] = token if token.lower().startswith("bearer ") else f"Bearer {token}"
        context: ssl.SSLContext | bool
        if configuration.verify_ssl:
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        else:
            context = False
        if configuration.cert_file and isinstance(context, ssl.SSLContext):
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
        return cls(server=configuration.host.rstrip("/"), headers=headers, ssl_context=context)


class KubeClient:
    """JSON over HTTP to the API server with bounded concurrency and a count of writes."""

    WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
    MANAGED_VERBS = frozenset({"POST", "PUT", "PATCH"})  # the verbs that take a fieldManager

    def __init__(
        self,
        credentials: Credentials,
        max_in_flight: int = 64,
        timeout: float = 30.0,
        reload: Callable[[], Credentials] | None = None,
        field_manager: str | None = None,
        write_timeout: float | None = None,
    ) -> None:
        self.credentials = credentials
        # Every create/update/patch names its writer, so managedFields tell the operator's and the
        # gateway's fields from their authors' (a server-side apply of the user's manifest then
        # conflicts only over fields someone else really took); without it the API server names the
        # manager after the User-Agent ("Python").
        self.field_manager = field_manager
        # Tokens expire (projected service-account tokens, exec plugins such as EKS/GKE): on a 401
        # the credentials are loaded again, once, and the request retried.
        self._reload = reload
        self._reloading: asyncio.Lock = asyncio.Lock()
        self._retired_sessions: list[aiohttp.ClientSession] = []
        self._limit = asyncio.Semaphore(max_in_flight)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # Writes are single objects: a caller with someone waiting (the gateway) gives up on them
        # sooner than on reads, whose lists may be large.
        self._write_timeout = aiohttp.ClientTimeout(total=write_timeout) if write_timeout else self._timeout
        self._session: aiohttp.ClientSession | None = None
        self.writes: Counter[tuple[str, str]] = Counter()  # (verb, resource) -> count
        # The failure of the last request when it got no answer; None once one is answered. Changes
        # are logged once each way, so an outage is one warning (and one line when it ends), not one
        # per request.
        self.unreachable: ApiUnreachable | None = None
        self._unreachable_since = 0.0

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.credentials.ssl_context, limit=0)
            self._session = aiohttp.ClientSession(
                base_url=None,
                headers=self.credentials.headers,
                connector=connector,
                timeout=self._timeout,
                json_serialize=json.dumps,
            )
        return self._session

    async def close(self) -> None:
        for session in [*self._retired_sessions, self._session]:
            if session is not None:
                await session.close()
        self._retired_sessions.clear()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """The decoded answer; ApiError for an error status, ApiUnreachable when none came in time."""
        try:
            return await self._request(method, path, body, content_type=content_type, params=params)
        except ApiError as exc:
            if exc.status != 401 or self._reload is None:
                raise
            await self._refresh_credentials()
            return await self._request(method, path, body, content_type=content_type, params=params)

    async def _refresh_credentials(self) -> None:
        assert self._reload is not None
        stale = self.credentials
        async with self._reloading:
            if self.credentials is not stale:
                return  # another request already reloaded them
            log.info("the API server answered 401: reloading credentials")
            self.credentials = await asyncio.to_thread(self._reload)
            if self._session is not None:
                # Requests in flight on the old session finish there; it is closed with the client.
                self._retired_sessions.append(self._session)
                self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        body: Any,
        *,
        content_type: str,
        params: Mapping[str, str] | None,
    ) -> Any:
        session = await self._get_session()
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else None
        limit = self._write_timeout if method in self.WRITE_VERBS else self._timeout
        async with self._limit:
            if method in self.WRITE_VERBS:
                self.writes[(method, _resource_of(path))] += 1
            if self.field_manager and method in self.MANAGED_VERBS:
                params = {**(params or {}), "fieldManager": self.field_manager}
            try:
                async with session.request(
                    method, self.credentials.server + path, data=data, headers=headers, params=params, timeout=limit
                ) as response:
                    raw = await response.read()
                    status = response.status
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                raise self._no_answer(method, path, exc, sent=False, timeout=limit.total) from exc
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                raise self._no_answer(method, path, exc, sent=True, timeout=limit.total) from exc
        self._answered()
        payload: Any
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode(errors="replace")
        if status >= 400:
            raise ApiError(status, payload, method, path)
        return payload

    def _no_answer(
        self, method: str, path: str, cause: BaseException, *, sent: bool, timeout: float | None
    ) -> ApiUnreachable:
        failure = ApiUnreachable(method, path, cause, sent=sent, timeout=timeout)
        if self.unreachable is None:
            self._unreachable_since = time.monotonic()
            log.warning("%s; requests fail until it answers again", failure)
        self.unreachable = failure
        return failure

    def _answered(self) -> None:
        if self.unreachable is not None:
            log.info(
                "the Kubernetes API server answers again (unreachable for %.0f s)",
                time.monotonic() - self._unreachable_since,
            )
            self.unreachable = None

    async def watch_lines(self, path: str, params: Mapping[str, str]) -> AsyncIterator[JSON]:
        """The events of a watch request (`params` carries watch=1 and resourceVersion), one JSON
        object per line, until the server closes the stream. Outside the in-flight limit: a watch
        lasts minutes."""
        session = await self._get_session()
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=self._timeout.total)
        async with session.get(self.credentials.server + path, params=params, timeout=timeout) as response:
            self._answered()
            if response.status >= 400:
                raw = await response.read()
                try:
                    payload: Any = json.loads(raw)
                except ValueError:
                    payload = raw.decode(errors="replace")
                raise ApiError(response.status, payload, "GET", path)
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> JSON | None:
        try:
            result: JSON = await self.request("GET", path, params=params)
            return result
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, body: JSON) -> JSON | None:
        """POST; an object that already exists (409) counts as success and returns None."""
        try:
            result: JSON = await self.request("POST", path, body)
            return result
        except ApiError as exc:
            if exc.status == 409 and exc.reason == "AlreadyExists":
                return None
            raise

    async def patch(self, path: str, body: JSON, *, merge: bool = True) -> JSON | None:
        """Merge patch (or JSON patch with merge=False); None when the object is gone."""
        content_type = "application/merge-patch+json" if merge else "application/json-patch+json"
        try:
            result: JSON = await self.request("PATCH", path, body, content_type=content_type)
            return result
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def delete(self, path: str, *, uid: str | None = None, grace_seconds: int | None = None) -> bool:
        """DELETE; False when already gone. With uid, only that incarnation is deleted."""
        options: JSON = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if uid:
            options["preconditions"] = {"uid": uid}
        if grace_seconds is not None:
            options["gracePeriodSeconds"] = grace_seconds
        try:
            await self.request("DELETE", path, options)
            return True
        except ApiError as exc:
            if exc.status == 404 or (exc.status == 409 and uid):
                return False
            raise


def _resource_of(path: str) -> str:
    """`/api/v1/namespaces/ns/pods/x/status` -> `pods/status` (for write accounting)."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    if "namespaces" in parts:
        index = parts.index("namespaces")
        rest = parts[index + 2 :] if len(parts) > index + 2 else ["namespaces"]
    else:
        rest = parts[3:] if parts and parts[0] == "apis" else parts[2:]
    if not rest:
        return "unknown"
    resource = rest[0]
    if len(rest) >= 3:
        resource += "/" + rest[2]
    return resource
