"""The gateway's view of the cluster: Sandboxes (by sandbox ID), SandboxTemplates and API keys, each
kept by a list + watch loop. Waiters are woken on every change, so "until Running" needs no polling.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from sandbox_operator.api.names import (
    API_KEY_LABEL,
    API_KEY_NAMESPACES_ANNOTATION,
    AUTO_RESUME_ANNOTATION,
    CREATED_BY_ANNOTATION,
    PAUSED_ANNOTATION,
    PUBLIC_TRAFFIC_ANNOTATION,
    SANDBOX_TEMPLATES,
    SANDBOXES,
    SECRETS,
    SESSION_TYPE_ANNOTATION,
    TOKEN_EPOCH_ANNOTATION,
)
from sandbox_operator.gateway.e2b import api_key_digest, sandbox_id_of
from sandbox_operator.kube import ApiError, KubeClient

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Key = tuple[str, str]

RELIST_BACKOFF_S = (0.2, 1.0, 5.0)
# The annotations of a Sandbox the gateway reads (the rest is not kept: thousands of sandboxes are).
# PAUSED_ANNOTATION: a start waiting for Running ends (409) when another client pauses the sandbox
# (e2b.settled); without it the wait ran into the create timeout (504).
KEPT_ANNOTATIONS = (
    TOKEN_EPOCH_ANNOTATION,
    SESSION_TYPE_ANNOTATION,
    CREATED_BY_ANNOTATION,
    PUBLIC_TRAFFIC_ANNOTATION,
    PAUSED_ANNOTATION,
    AUTO_RESUME_ANNOTATION,  # traffic wakes the sandbox (e2b.wakes_on_traffic)
)


class Cache:
    def __init__(self, client: KubeClient, keys_namespace: str) -> None:
        self.client = client
        self.keys_namespace = keys_namespace
        self.sandboxes: dict[Key, JSON] = {}
        self.by_id: dict[str, Key] = {}
        self.templates: dict[str, JSON] = {}
        self.api_keys: dict[str, str] = {}  # sha256 of the key -> namespace it grants
        self._key_of_secret: dict[str, str] = {}  # secret name -> digest of its key
        self._changed = asyncio.Condition()
        self._synced: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        feeds: list[tuple[str, str, dict[str, str], Callable[[str, JSON], None]]] = [
            ("sandboxes", SANDBOXES.collection(), {}, self._on_sandbox),
            ("templates", SANDBOX_TEMPLATES.collection(), {}, self._on_template),
            (
                "api-keys",
                SECRETS.collection(self.keys_namespace),
                {"labelSelector": f"{API_KEY_LABEL}=true"},
                self._on_secret,
            ),
        ]
        for name, path, params, apply in feeds:
            self._synced[name] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._follow(name, path, params, apply), name=f"watch-{name}"))

    async def synced(self, within: float) -> None:
        async with asyncio.timeout(within):
            await asyncio.gather(*(event.wait() for event in self._synced.values()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self, name: str, path: str, params: dict[str, str], apply: Callable[[str, JSON], None]) -> None:
        """List, then watch from the list's resourceVersion; re-list when the watch expires (410)."""
        failures = 0
        while True:
            try:
                listing = await self.client.request("GET", path, params=params)
                await self._replace(apply, listing.get("items") or [], name)
                version = listing["metadata"]["resourceVersion"]
                self._synced[name].set()
                failures = 0
                while True:
                    watch = {
                        **params,
                        "watch": "1",
                        "resourceVersion": version,
                        "allowWatchBookmarks": "true",
                        "timeoutSeconds": "300",
                    }
                    async for event in self.client.watch_lines(path, watch):
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            raise ApiError(int(obj.get("code") or 500), obj, "WATCH", path)
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        if kind != "BOOKMARK":
                            apply(str(kind), obj)
                            await self._notify()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                expired = isinstance(exc, ApiError) and exc.status == 410
                delay = 0.0 if expired else RELIST_BACKOFF_S[min(failures, len(RELIST_BACKOFF_S) - 1)]
                failures += 0 if expired else 1
                log.log(
                    logging.DEBUG if expired else logging.WARNING,
                    "watch of %s: %s; re-listing in %.1fs",
                    name,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _replace(self, apply: Callable[[str, JSON], None], items: list[JSON], name: str) -> None:
        # A re-list replaces the whole kind: objects deleted while the watch was down disappear.
        if name == "sandboxes":
            self.sandboxes.clear()
            self.by_id.clear()
        elif name == "templates":
            self.templates.clear()
        else:
            self.api_keys.clear()
            self._key_of_secret.clear()
        for item in items:
            apply("ADDED", item)
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- the kinds -------------------------------------------------------------------------------

    def _on_sandbox(self, kind: str, body: JSON) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        old = self.sandboxes.pop(key, None)
        if old is not None:
            self.by_id.pop(sandbox_id_of(old), None)
        if kind != "DELETED":
            annotations = meta.get("annotations") or {}
            slim = {
                "metadata": {
                    k: meta.get(k)
                    for k in (
                        "name",
                        "namespace",
                        "uid",
                        "creationTimestamp",
                        "deletionTimestamp",
                        "resourceVersion",
                        "generation",
                    )
                }
                | {"annotations": {k: annotations[k] for k in KEPT_ANNOTATIONS if k in annotations}},
                "spec": body.get("spec") or {},
                "status": body.get("status") or {},
            }
            self.sandboxes[key] = slim
            self.by_id[sandbox_id_of(slim)] = key

    def _on_template(self, kind: str, body: JSON) -> None:
        name = str((body.get("metadata") or {}).get("name"))
        if kind == "DELETED":
            self.templates.pop(name, None)
        else:
            self.templates[name] = {"metadata": {"name": name}, "spec": body.get("spec") or {}}

    def _on_secret(self, kind: str, body: JSON) -> None:
        meta = body.get("metadata") or {}
        name = str(meta.get("name"))
        previous = self._key_of_secret.pop(name, None)
        if previous is not None:
            self.api_keys.pop(previous, None)
        if kind == "DELETED":
            return
        namespace = (meta.get("annotations") or {}).get(API_KEY_NAMESPACES_ANNOTATION)
        raw = (body.get("data") or {}).get("key")
        if not namespace or not raw:
            log.warning(
                "API key secret %s/%s needs data.key and the %s annotation; ignored",
                self.keys_namespace,
                name,
                API_KEY_NAMESPACES_ANNOTATION,
            )
            return
        try:
            key = base64.b64decode(raw).decode().strip()
        except (binascii.Error, UnicodeDecodeError):
            log.warning("API key secret %s/%s: data.key is not valid base64 text; ignored", self.keys_namespace, name)
            return
        digest = api_key_digest(key)
        self.api_keys[digest] = namespace
        self._key_of_secret[name] = digest

    # --- queries ---------------------------------------------------------------------------------

    def namespace_for_key(self, api_key: str | None) -> str | None:
        if not api_key:
            return None
        return self.api_keys.get(api_key_digest(api_key))

    def find(self, sandbox_id: str, namespace: str | None = None) -> JSON | None:
        """The sandbox with this E2B ID (in `namespace`, when given: keys never see other namespaces)."""
        key = self.by_id.get(sandbox_id)
        if key is None or (namespace is not None and key[0] != namespace):
            return None
        return self.sandboxes.get(key)

    def sandbox(self, key: Key) -> JSON | None:
        """The Sandbox (namespace, name) as the watch last saw it."""
        return self.sandboxes.get(key)

    def in_namespace(self, namespace: str) -> list[JSON]:
        return [body for (ns, _), body in self.sandboxes.items() if ns == namespace]

    def template(self, name: str) -> JSON | None:
        return self.templates.get(name)

    async def wait_for(self, key: Key, ready: Callable[[JSON | None], bool], within: float) -> JSON | None:
        """Wait until `ready(the sandbox's latest version, or None when gone)`; returns it."""
        async with asyncio.timeout(within), self._changed:
            while True:
                body = self.sandboxes.get(key)
                if ready(body):
                    return body
                await self._changed.wait()

    def observe(self, body: Mapping[str, Any]) -> None:
        """An object the gateway itself just wrote: visible at once, before its watch event."""
        meta = body.get("metadata") or {}
        current = self.sandboxes.get((str(meta.get("namespace")), str(meta.get("name"))))
        if current is None or int(current["metadata"].get("resourceVersion") or 0) < int(
            meta.get("resourceVersion") or 0
        ):
            self._on_sandbox("MODIFIED", dict(body))
