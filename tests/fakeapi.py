"""An in-memory API server for the controller's unit tests, and a harness that runs a real Runtime
on it pass by pass.

`FakeApi` is a `KubeClient` whose one HTTP entry point, `request`, is answered from a dict of
objects instead of the network, so `create` / `get` / `patch` / `delete` keep the client's own
error mapping (409 AlreadyExists -> None, 404 -> None/False). It behaves like the API server for the
requests the controller makes:

- POST: 409 AlreadyExists on a duplicate; assigns uid, resourceVersion, generation and
  creationTimestamp (and a name for ``generateName``); ignores status (pods and claims start
  Pending).
- GET: one object (404 when missing) or a collection (equality label selectors).
- PATCH: merge patch (RFC 7386) of the object, or of ``/status`` only through the status
  subresource (the main path ignores status, like every resource with that subresource); 404 when
  missing; ``metadata.resourceVersion`` in the body is a precondition (409 Conflict); a spec change
  bumps ``metadata.generation``; a no-op patch changes nothing, not even the resourceVersion.
- DELETE: ``preconditions`` (uid, resourceVersion -> 409 Conflict), 404 when gone; an object with
  finalizers only gets a deletionTimestamp and goes when the last finalizer is removed.

Every write the client sends is recorded in order (`log`, `take`), failed ones included, and any
write can be made to fail (`fail`). Every change is also kept as a watch event; `deliver` feeds the
ones a Runtime has not seen to its `on_*_event` methods, as kopf would (children only when they
carry the operator's managed-by label, like the watches' label selector).

Changes made by others (a user, the kubelet, time) go through `add`, `edit`, `remove`, `rewrite`
and `set_pod_status`: they are not the controller's writes and are not recorded in `log`.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import aiohttp

from sandbox_operator.api.names import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NETWORK_POLICIES,
    PODS,
    SANDBOX_POOLS,
    SANDBOX_TEMPLATES,
    SANDBOXES,
    ApiResource,
)
from sandbox_operator.controller.config import OperatorConfig
from sandbox_operator.controller.pools import reconcile_pool
from sandbox_operator.controller.reconcile import reconcile_sandbox
from sandbox_operator.controller.runtime import Runtime
from sandbox_operator.kube import ApiError, Credentials, KubeClient

JSON = dict[str, Any]
Key = tuple[str, str]

WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MERGE_PATCH = "application/merge-patch+json"
# Resources whose status is a subresource: a create or a patch of the object leaves status alone.
STATUS_ON_CREATE: dict[str, JSON] = {"pods": {"phase": "Pending"}, "persistentvolumeclaims": {"phase": "Pending"}}
# Watched children reach the operator only with its label (the watches' label selector).
CHILD_PLURALS = frozenset({"pods", "persistentvolumeclaims", "services", "networkpolicies"})


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def merge_patch(into: JSON, patch: Mapping[str, Any]) -> None:
    """RFC 7386: null removes a key, objects merge, anything else (lists too) replaces."""
    for key, value in patch.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(into.get(key), dict):
            merge_patch(into[key], value)
        elif isinstance(value, Mapping):
            into[key] = {}
            merge_patch(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


@dataclass(frozen=True)
class Target:
    """A request path taken apart: /api/v1/namespaces/ns/pods/name/status."""

    prefix: str  # /api/v1 or /apis/group/version
    namespace: str | None
    plural: str
    name: str | None
    subresource: str | None

    @classmethod
    def parse(cls, path: str) -> Target:
        parts = [p for p in path.split("?")[0].split("/") if p]
        size = 2 if parts[0] == "api" else 3
        prefix, rest = "/" + "/".join(parts[:size]), parts[size:]
        namespace = None
        if rest[0] == "namespaces" and len(rest) > 2:
            namespace, rest = rest[1], rest[2:]
        return cls(prefix, namespace, rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None)

    @property
    def collection(self) -> str:
        scope = f"/namespaces/{self.namespace}" if self.namespace is not None else ""
        return f"{self.prefix}{scope}/{self.plural}"

    def object_path(self, name: str | None = None) -> str:
        return f"{self.collection}/{name or self.name}"

    @property
    def resource(self) -> str:
        """`pods`, `sandboxes/status`: what a write is counted under (as KubeClient.writes does)."""
        return f"{self.plural}/{self.subresource}" if self.subresource else self.plural


class Write(NamedTuple):
    verb: str
    path: str
    body: Any
    status: int  # the HTTP status the fake answered

    @property
    def resource(self) -> str:
        return Target.parse(self.path).resource


class WatchEvent(NamedTuple):
    type: str  # ADDED, MODIFIED, DELETED
    plural: str
    body: JSON


def api_error(status: int, reason: str, method: str, path: str, message: str = "") -> ApiError:
    body = {"kind": "Status", "status": "Failure", "reason": reason, "code": status, "message": message or reason}
    return ApiError(status, body, method, path)


class FakeApi(KubeClient):
    def __init__(self) -> None:
        super().__init__(Credentials(server="https://fake-api.invalid"))
        self.objects: dict[str, JSON] = {}  # object path -> object
        self.log: list[Write] = []  # every write the client sent, in order
        self.events: list[WatchEvent] = []  # every change, in order (what a watch would deliver)
        self.failures: dict[tuple[str, str], ApiError] = {}
        self._taken = 0
        self._delivered = 0
        self._rv = itertools.count(100)
        self._uid = itertools.count(1)
        self._generated = itertools.count(1)

    # --- what the controller calls ---------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> Any:
        if method in WRITE_VERBS:
            self.writes[(method, Target.parse(path).resource)] += 1
        # What goes over the wire is JSON: enums become strings, a datetime would fail here as it would there.
        body = json.loads(json.dumps(body)) if body is not None else None
        # A request is I/O: other tasks (the concurrent child writes of a reconcile) run meanwhile.
        await asyncio.sleep(0)
        status = 200
        try:
            failure = self.failures.get((method, path))
            if failure is not None:
                raise failure
            return self.handle(method, path, body, content_type=content_type, params=params)
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            if method in WRITE_VERBS:
                self.log.append(Write(method, path, body, status))

    def handle(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = MERGE_PATCH,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """Answer one request as the API server would (nothing recorded in `log`)."""
        target = Target.parse(path)
        if method == "POST" and target.name is None:
            return self._create(target, path, body)
        if method == "GET":
            return self._get(target, path, params or {})
        if method == "PATCH" and target.name is not None:
            if content_type != MERGE_PATCH:
                raise api_error(415, "UnsupportedMediaType", method, path, "the fake speaks merge patches only")
            return self._patch(target, path, body)
        if method == "DELETE" and target.name is not None:
            return self._delete(target, path, body or {})
        raise api_error(405, "MethodNotAllowed", method, path)

    # --- failures and the record of writes --------------------------------------------------------

    def fail(self, verb: str, path: str, status: int = 500, reason: str = "InternalError") -> None:
        """Answer `verb` on `path` (a collection for POST) with an error until `heal`."""
        self.failures[(verb, path)] = api_error(status, reason, verb, path, f"injected {status}")

    def heal(self, verb: str, path: str) -> None:
        self.failures.pop((verb, path), None)

    def take(self) -> list[tuple[str, str]]:
        """The writes since the last take, as (verb, resource): ("POST", "pods"), ("PATCH", "sandboxes/status")."""
        new = self.log[self._taken :]
        self._taken = len(self.log)
        return [(w.verb, w.resource) for w in new]

    # --- changes by others (users, the kubelet, time): not recorded as writes ----------------------

    def add(self, resource: ApiResource, body: JSON, namespace: str | None = None) -> JSON:
        """Create an object as a user would (kubectl create)."""
        meta = body.get("metadata") or {}
        ns = namespace if namespace is not None else meta.get("namespace")
        result: JSON = self.handle("POST", resource.collection(ns), body)
        return result

    def edit(self, path: str, patch: JSON) -> JSON:
        """A merge patch by someone else (the path may end in /status)."""
        result: JSON = self.handle("PATCH", path, patch)
        return result

    def remove(self, path: str) -> None:
        """kubectl delete: the object goes, or gets a deletionTimestamp while it has finalizers."""
        self.handle("DELETE", path, {})

    def rewrite(self, path: str, change: Callable[[JSON], None]) -> JSON:
        """Change an object in ways no client can (creationTimestamp, ...): a new resourceVersion."""
        obj = self.objects[path]
        change(obj)
        return self._modified(Target.parse(path), obj)

    def set_pod_status(
        self, namespace: str, name: str, phase: str, ready: bool, pod_ip: str | None = "127.3.0.9"
    ) -> JSON:
        """What the kubelet reports."""
        status: JSON = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
        if pod_ip and phase == "Running":
            status["podIP"] = pod_ip

        def report(pod: JSON) -> None:
            pod["status"] = status

        return self.rewrite(PODS.path(namespace, name), report)

    # --- reading ------------------------------------------------------------------------------------

    def of_kind(self, resource: ApiResource, namespace: str | None) -> dict[str, JSON]:
        """The objects of one collection, by name."""
        prefix = resource.collection(namespace) + "/"
        return {p.removeprefix(prefix): o for p, o in self.objects.items() if p.startswith(prefix)}

    def names(self, resource: ApiResource, namespace: str | None) -> set[str]:
        return set(self.of_kind(resource, namespace))

    def written(self, verb: str, resource: str) -> list[Write]:
        return [w for w in self.log if w.verb == verb and w.resource == resource]

    # --- watch --------------------------------------------------------------------------------------

    def deliver(self, rt: Runtime) -> int:
        """Feed every change `rt` has not seen to its event methods, in order; how many were fed."""
        handlers: dict[str, Callable[[str, JSON], None]] = {
            SANDBOXES.plural: rt.on_sandbox_event,
            SANDBOX_TEMPLATES.plural: rt.on_template_event,
            SANDBOX_POOLS.plural: rt.on_pool_event,
            PODS.plural: rt.on_pod_event,
            "persistentvolumeclaims": rt.on_pvc_event,
            "services": lambda kind, body: rt.on_child_event("service", kind, body),
            NETWORK_POLICIES.plural: lambda kind, body: rt.on_child_event("networkpolicy", kind, body),
        }
        fed = 0
        for event in self.events[self._delivered :]:
            handler = handlers.get(event.plural)
            labels = event.body.get("metadata", {}).get("labels") or {}
            if handler is None or (event.plural in CHILD_PLURALS and labels.get(MANAGED_BY_LABEL) != MANAGED_BY):
                continue
            handler(event.type, copy.deepcopy(event.body))  # a watch hands over its own copy
            fed += 1
        self._delivered = len(self.events)
        return fed

    # --- the server ---------------------------------------------------------------------------------

    def _next_rv(self) -> str:
        return str(next(self._rv))

    def _emit(self, kind: str, target: Target, obj: JSON) -> None:
        self.events.append(WatchEvent(kind, target.plural, copy.deepcopy(obj)))

    def _modified(self, target: Target, obj: JSON) -> JSON:
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._emit("MODIFIED", target, obj)
        return copy.deepcopy(obj)

    def _create(self, target: Target, path: str, body: JSON) -> JSON:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise api_error(422, "Invalid", "POST", path, "name or generateName is required")
            meta["name"] = f"{meta['generateName']}{next(self._generated):05d}"
        if meta.get("namespace") not in (None, target.namespace):
            raise api_error(400, "BadRequest", "POST", path, "the namespace of the object does not match")
        if target.namespace is not None:
            meta["namespace"] = target.namespace
        object_path = target.object_path(meta["name"])
        if object_path in self.objects:
            raise api_error(409, "AlreadyExists", "POST", path, f"{target.plural} {meta['name']} already exists")
        meta["uid"] = f"uid-{next(self._uid)}"
        meta["resourceVersion"] = self._next_rv()
        meta["generation"] = 1
        meta["creationTimestamp"] = format_time(datetime.now(UTC))
        for ignored in ("deletionTimestamp", "managedFields"):
            meta.pop(ignored, None)
        obj.pop("status", None)
        if target.plural in STATUS_ON_CREATE:
            obj["status"] = copy.deepcopy(STATUS_ON_CREATE[target.plural])
        self.objects[object_path] = obj
        self._emit("ADDED", target, obj)
        return copy.deepcopy(obj)

    def _get(self, target: Target, path: str, params: Mapping[str, str]) -> JSON:
        if target.name is not None:
            obj = self.objects.get(target.object_path())
            if obj is None:
                raise api_error(404, "NotFound", "GET", path)
            return copy.deepcopy(obj)
        wanted = dict(
            pair.split("=", 1) for pair in (params.get("labelSelector") or "").split(",") if pair and "=" in pair
        )
        items = [
            copy.deepcopy(o)
            for name, o in sorted(self.of_collection(target.collection).items())
            if all((o["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())
        ]
        return {"kind": "List", "metadata": {"resourceVersion": str(next(self._rv))}, "items": items}

    def of_collection(self, collection: str) -> dict[str, JSON]:
        prefix = collection + "/"
        return {p.removeprefix(prefix): o for p, o in self.objects.items() if p.startswith(prefix)}

    def _patch(self, target: Target, path: str, body: JSON) -> JSON:
        object_path = target.object_path()
        obj = self.objects.get(object_path)
        if obj is None:
            raise api_error(404, "NotFound", "PATCH", path)
        patch = copy.deepcopy(body)
        meta_patch = patch.get("metadata") or {}
        wanted = meta_patch.pop("resourceVersion", None)
        if wanted is not None and wanted != obj["metadata"]["resourceVersion"]:
            raise api_error(409, "Conflict", "PATCH", path, "the object has been modified")
        for immutable in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "generation"):
            meta_patch.pop(immutable, None)
        if target.subresource == "status":
            patch = {"status": patch.get("status")} if patch.get("status") is not None else {}
        elif target.subresource is None:
            patch.pop("status", None)
        else:
            raise api_error(404, "NotFound", "PATCH", path, f"no subresource {target.subresource}")
        before = copy.deepcopy(obj)
        merge_patch(obj, patch)
        if obj == before:
            return copy.deepcopy(obj)  # a no-op: no new resourceVersion, no watch event
        if obj.get("spec") != before.get("spec"):
            obj["metadata"]["generation"] = int(obj["metadata"].get("generation") or 0) + 1
        if obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers"):
            result = self._modified(target, obj)
            self._gone(target, object_path)
            return result
        return self._modified(target, obj)

    def _delete(self, target: Target, path: str, options: Mapping[str, Any]) -> JSON:
        object_path = target.object_path()
        obj = self.objects.get(object_path)
        if obj is None:
            raise api_error(404, "NotFound", "DELETE", path)
        for key, value in (options.get("preconditions") or {}).items():
            if obj["metadata"].get(key) != value:
                raise api_error(409, "Conflict", "DELETE", path, f"precondition failed: {key}")
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = format_time(datetime.now(UTC))
                return self._modified(target, obj)
            return copy.deepcopy(obj)
        self._gone(target, object_path)
        return {"kind": "Status", "status": "Success"}

    def _gone(self, target: Target, object_path: str) -> None:
        obj = self.objects.pop(object_path)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._emit("DELETED", target, obj)


class AgentlessRuntime(Runtime):
    """The Runtime, with the one call that would reach a sandbox's agent over HTTP (its last
    activity, asked at the idle deadline) answered from `agent_last_activity` instead."""

    def __init__(self, client: KubeClient, config: OperatorConfig) -> None:
        super().__init__(client, config)
        self.agent_last_activity: dict[str, datetime] = {}  # pod IP -> what its agent reports
        self.agents_asked: list[str] = []  # pod IPs, in the order they were asked
        self.tokens_presented: list[str | None] = []  # the access token of each ask

    async def agent_activity(self, pod_ip: str, token: str | None) -> datetime | None:
        self.agents_asked.append(pod_ip)
        self.tokens_presented.append(token)
        return self.agent_last_activity.get(pod_ip)


@dataclass
class Harness:
    """A real Runtime on a FakeApi, driven one reconcile pass at a time (its workers never start)."""

    api: FakeApi = field(default_factory=FakeApi)
    config: OperatorConfig = field(default_factory=OperatorConfig)
    rt: AgentlessRuntime = field(init=False)
    last_pass: list[tuple[str, str]] = field(default_factory=list)  # the writes of the latest pass

    def __post_init__(self) -> None:
        self.rt = AgentlessRuntime(self.api, self.config)

    def deliver(self) -> int:
        return self.api.deliver(self.rt)

    async def settle(self) -> None:
        """Let the best-effort writes a pass spawned (Events) finish: the fake answers at once, so
        this takes a bounded number of loop turns, never a timer."""
        current = asyncio.current_task()
        for _ in range(100):
            pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
            if not pending:
                return
            await asyncio.gather(*pending, return_exceptions=True)
        raise AssertionError("background tasks keep spawning more tasks")

    async def sandbox_pass(self, key: Key) -> list[tuple[str, str]]:
        """Deliver what changed, reconcile the sandbox once, wait for its Events; its writes. A pass
        that raises leaves its writes in `last_pass`."""
        return await self._pass(reconcile_sandbox(self.rt, key))

    async def pool_pass(self, key: Key) -> list[tuple[str, str]]:
        return await self._pass(reconcile_pool(self.rt, key))

    async def _pass(self, reconcile: Coroutine[Any, Any, None]) -> list[tuple[str, str]]:
        self.api.take()  # the pass's own writes only (anything earlier was a test's doing)
        self.deliver()
        try:
            await reconcile
        finally:
            await self.settle()
            self.last_pass = self.api.take()
        return self.last_pass

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """A sample of the Runtime's registry (0 when the series does not exist yet)."""
        value = self.rt.metrics.registry.get_sample_value(name, dict(labels or {}))
        return 0.0 if value is None else value

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every non-zero series of one sample name: sorted label pairs -> value."""
        return {
            tuple(sorted(s.labels.items())): s.value
            for family in self.rt.metrics.registry.collect()
            for s in family.samples
            if s.name == name and s.value
        }


def upstream_to(port: int | None) -> aiohttp.ClientSession:
    """A client for the gateway's upstream (`Gateway._upstream`) that sends every request, whatever
    pod IP it names, to 127.0.0.1:`port` (a started test server's): one fake agent stands in for
    every pod."""
    assert port is not None, "start the fake agent's server first"

    async def to_the_fake_agent(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        request.url = request.url.with_host("127.0.0.1").with_port(port)
        return await handler(request)

    return aiohttp.ClientSession(auto_decompress=False, middlewares=(to_the_fake_agent,))
