"""Wiring: credentials, the runtime, kopf settings and handlers, the metrics and liveness servers.

kopf supplies the watch streams (re-listing, bookmarks, inactivity detection); every handler only
updates the store and enqueues a key. Reconciles run in our own worker pool over a deduplicating
work queue (controller.workqueue), which is also the single deadline scheduler for timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kopf
from prometheus_client import start_http_server

from sandbox_operator import eventloop
from sandbox_operator.api.names import (
    FINALIZER,
    KOPF_ANNOTATION_PREFIX,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NETWORK_POLICIES,
    OPERATOR_FIELD_MANAGER,
    PERSISTENT_VOLUME_CLAIMS,
    PODS,
    SANDBOX_POOLS,
    SANDBOX_TEMPLATES,
    SANDBOXES,
    SERVICES,
    ApiResource,
)
from sandbox_operator.controller.config import OperatorConfig
from sandbox_operator.controller.leader import LeaderElector, LostLease, while_standing_by
from sandbox_operator.controller.runtime import Runtime
from sandbox_operator.kube import Credentials, KubeClient

log = logging.getLogger(__name__)


CHILD_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
NOTHING_INDEXED: dict[str, Any] = {}


@dataclass(frozen=True)
class Feed:
    """One watched resource: what its initial list puts in the store (``index``), what each event
    does (``on_event``), and whether only the operator's own children are watched."""

    resource: ApiResource
    index: Callable[[Runtime, kopf.Body], object]
    on_event: Callable[[Runtime, str | None, kopf.RawBody], None]
    children_only: bool = False

    @property
    def reference(self) -> tuple[str, ...]:
        """kopf's resource reference: (group, version, plural), or (version, plural) for the core group."""
        resource = self.resource
        return (
            (resource.group, resource.version, resource.plural)
            if resource.group
            else (resource.version, resource.plural)
        )


FEEDS = (
    Feed(
        SANDBOXES, lambda rt, body: rt.store.put_sandbox(body), lambda rt, kind, body: rt.on_sandbox_event(kind, body)
    ),
    Feed(
        SANDBOX_TEMPLATES,
        lambda rt, body: rt.store.put_template(body),
        lambda rt, kind, body: rt.on_template_event(kind, body),
    ),
    Feed(SANDBOX_POOLS, lambda rt, body: rt.store.put_pool(body), lambda rt, kind, body: rt.on_pool_event(kind, body)),
    Feed(PODS, lambda rt, body: rt.store.put_pod(body), lambda rt, kind, body: rt.on_pod_event(kind, body), True),
    Feed(
        PERSISTENT_VOLUME_CLAIMS,
        lambda rt, body: rt.store.put_pvc(body),
        lambda rt, kind, body: rt.on_pvc_event(kind, body),
        True,
    ),
    Feed(
        SERVICES,
        lambda rt, body: rt.store.put_child_hash("service", body),
        lambda rt, kind, body: rt.on_child_event("service", kind, body),
        True,
    ),
    Feed(
        NETWORK_POLICIES,
        lambda rt, body: rt.store.put_child_hash("networkpolicy", body),
        lambda rt, kind, body: rt.on_child_event("networkpolicy", kind, body),
        True,
    ),
)


def _register_feed(registry: kopf.OperatorRegistry, feed: Feed) -> None:
    labels = {MANAGED_BY_LABEL: MANAGED_BY} if feed.children_only else None
    plural = feed.resource.plural

    async def index(body: kopf.Body, memo: Any, **_: Any) -> dict[str, Any]:
        feed.index(memo.runtime, body)
        return NOTHING_INDEXED

    # Low-level event handlers: no diff-base annotation, no progress storage, no PATCH per event.
    # Both are async, though neither awaits: kopf runs sync handlers in a thread pool, a thread hop
    # per event and handler that cost a quarter of the operator's CPU in a burst.
    async def on_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
        feed.on_event(memo.runtime, event["type"], event["object"])

    kopf.index(*feed.reference, registry=registry, labels=labels, id=f"{plural}_index")(index)
    kopf.on.event(*feed.reference, registry=registry, labels=labels, id=f"{plural}_event")(on_event)


def restrict_child_watches(settings: kopf.OperatorSettings) -> None:
    """Only our pods and claims reach memory: server-side label selectors on their list/watch.

    kopf keys these by resource reference: ("v1", "pods") matches the core pods; a "v1/pods"
    string would be read as group "v1" and match nothing, silently watching every pod.
    """
    for feed in FEEDS:
        if feed.children_only:
            group_or_version = feed.resource.group or feed.resource.version
            settings.watching.label_selectors[group_or_version, feed.resource.plural] = CHILD_SELECTOR


class NoDiffBase(kopf.DiffBaseStorage):
    """Keeps no diff base. Our handlers are indexes and raw event handlers, which never look at
    a diff, yet kopf deep-copies every event's body to build one: ~8% of the operator's CPU in a
    burst. Nothing is ever stored on the objects either. (A kopf on.create/update/field handler
    added to this registry would need a real diff base back: with none, every event is a creation.)"""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def build_registry() -> kopf.OperatorRegistry:
    """All handlers on an explicit registry, so several operators can run in one test process."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
        runtime: Runtime = memo.runtime
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_ANNOTATION_PREFIX)
        settings.persistence.diffbase_storage = NoDiffBase()
        # Events: we post our own transition Events; never mirror logs as Events.
        settings.posting.level = logging.WARNING
        settings.posting.loggers = False
        restrict_child_watches(settings)
        settings.watching.chunk_size = 500
        settings.networking.request_timeout = 30
        settings.networking.connect_timeout = 10
        settings.queueing.worker_limit = None
        runtime.start()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: Any, **_: Any) -> None:
        await memo.runtime.stop()

    # Indexes fill the store: kopf runs every indexing function over the initial lists of all
    # indexed resources before it delivers any event to the handlers below, so no reconcile (which
    # starts from an event) ever sees a partial store. Without this, a restarted operator could
    # reconcile a sandbox before its pod, claim or template arrived: a duplicate pod, a spent
    # recreate attempt, or a TemplateNotFound over a final reason. The indexes keep nothing
    # (an empty mapping; None would be stored as a value per object).
    for feed in FEEDS:
        _register_feed(registry, feed)
    return registry


async def operate(
    config: OperatorConfig, stop_flag: asyncio.Event | None = None, ready_flag: asyncio.Event | None = None
) -> Runtime:
    """Run the operator until stopped; returns the runtime (for tests and benchmarks)."""
    credentials = await asyncio.to_thread(Credentials.load, config.kubeconfig)
    client = KubeClient(
        credentials,
        max_in_flight=config.max_in_flight,
        reload=functools.partial(Credentials.load, config.kubeconfig),
        field_manager=OPERATOR_FIELD_MANAGER,
    )
    runtime = Runtime(client, config)
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.bind_address, registry=runtime.metrics.registry)
        log.info("serving /metrics on %s:%d", config.bind_address, config.metrics_port)
    liveness = f"http://{config.bind_address}:{config.liveness_port}/healthz" if config.liveness_port else None
    elector: LeaderElector | None = None
    if config.leader_election:
        elector = LeaderElector(
            client,
            namespace=config.leader_election_namespace,
            name=config.leader_election_name,
            identity=config.leader_identity,
            timings=config.lease_timings,
            registry=runtime.metrics.registry,
        )
        await while_standing_by(config.bind_address, config.liveness_port, elector.acquire())
    stop = stop_flag or asyncio.Event()
    holding = asyncio.create_task(elector.hold()) if elector is not None else None
    if holding is not None:
        holding.add_done_callback(lambda task: None if task.cancelled() else stop.set())  # lost: stop acting
    try:
        await kopf.operator(
            registry=build_registry(),
            memo=kopf.Memo(runtime=runtime),
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            liveness_endpoint=liveness,
            standalone=True,
            stop_flag=stop,
            ready_flag=ready_flag,
        )
    finally:
        lost = holding is not None and holding.done() and not holding.cancelled() and holding.exception() is not None
        if holding is not None:
            holding.cancel()
            with contextlib.suppress(asyncio.CancelledError, LostLease):
                await holding
        await runtime.stop()
        if elector is not None and not lost:
            await elector.release()  # only once nothing acts any more
    if lost:
        raise LostLease(f"{config.leader_identity} lost the leader Lease")
    return runtime


def run_operator(config: OperatorConfig) -> int:
    try:
        eventloop.run(operate(config))
    except KeyboardInterrupt:
        pass
    except LostLease as exc:
        log.error("%s: exiting so that the standby takes over", exc)
        return 1
    return 0
