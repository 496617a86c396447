"""The operator's runtime: store + work queue + reconcile workers.

Handlers (controller.main) call the `on_*_event` methods; workers take keys from the queue and run
`reconcile.reconcile_sandbox` / `pools.reconcile_pool`, which hold the I/O around the pure core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterator, Mapping
from datetime import datetime
from typing import Any, Literal

from sandbox_operator.api.names import (
    CLAIMED_FROM_POOL_ANNOTATION,
    EGRESS_CLASS_LABEL,
    NODES,
    POOL_LABEL,
    SANDBOX_LABEL,
    TEMPLATE_LABEL,
)
from sandbox_operator.controller.agents import AgentClient
from sandbox_operator.controller.config import OperatorConfig
from sandbox_operator.controller.context import QueueKey
from sandbox_operator.controller.inflight import ChildKind, InFlight
from sandbox_operator.controller.store import Key, Store, key_of
from sandbox_operator.controller.usage import UsageCollector
from sandbox_operator.controller.workqueue import QueueClosed, WorkQueue
from sandbox_operator.kube import ApiError, KubeClient
from sandbox_operator.lifecycle import NodeObservation
from sandbox_operator.lifecycle.observe import node_observation
from sandbox_operator.metrics.lifecycle import LifecycleMetrics, PhaseCount, PoolCount
from sandbox_operator.metrics.usage import UsageExporter
from sandbox_operator.resources.names import label_value

log = logging.getLogger(__name__)

BACKGROUND_LIMIT = 32  # best-effort writes (Events) in flight at once
BACKGROUND_DRAIN_S = 2.0  # how long a stopping operator lets them finish
NODE_CACHE_S = 5.0  # how long a node's readiness, once read, answers for every sandbox on it


class Runtime:
    """The operator process: it is the ReconcileContext every reconcile runs in."""

    def __init__(self, client: KubeClient, config: OperatorConfig) -> None:
        self.client = client
        self.config = config
        self.store = Store()
        self.queue: WorkQueue[QueueKey] = WorkQueue()
        self.metrics = LifecycleMetrics()
        self.metrics.attach_snapshot(
            self._phase_counts, self._pool_counts, lambda: client.writes, lambda: len(self.queue)
        )
        self._workers: list[asyncio.Task[None]] = []
        self._failures: dict[QueueKey, int] = {}
        self.in_flight = InFlight()
        self.started = False
        # Best-effort writes a reconcile does not wait for (Events): tracked so that none is
        # garbage-collected mid-flight; at most BACKGROUND_LIMIT of them hold a request slot.
        self._background: set[asyncio.Task[None]] = set()
        self._background_slots = asyncio.Semaphore(BACKGROUND_LIMIT)
        self.agents = AgentClient(config.agent_port)
        self._nodes: dict[str, tuple[float, NodeObservation | None]] = {}  # name -> (valid until, readiness)
        self._node_read_refused = False
        self.usage = UsageCollector(self.store, client, config, lambda key: self.requeue(("sandbox", *key)))
        self.metrics.registry.register(UsageExporter(self.usage.usage, config.metric_metadata_keys))

    # --- lifecycle of the runtime ----------------------------------------------------------------

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        self._workers = [
            asyncio.create_task(self._worker(i), name=f"reconcile-worker-{i}") for i in range(self.config.workers)
        ]
        self.usage.start()

    async def stop(self) -> None:
        self.queue.close()
        await self.usage.stop()
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
        if self._background:
            _, pending = await asyncio.wait(self._background, timeout=BACKGROUND_DRAIN_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.agents.close()
        await self.client.close()

    def requeue(self, key: QueueKey, delay: float = 0.0) -> None:
        if delay > 0:
            self.queue.add_after(key, delay)
        else:
            self.queue.add(key)

    async def agent_activity(self, pod_ip: str, token: str | None) -> datetime | None:
        return await self.agents.last_activity(pod_ip, token)

    async def node_status(self, name: str) -> NodeObservation | None:
        """The node's readiness, read at most every NODE_CACHE_S (sandboxes on a node that stopped
        reporting all ask at once); None when it cannot be read, which the lifecycle treats as a
        node that is fine: a GET refused by RBAC must not turn into lost sandboxes."""
        cached = self._nodes.get(name)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            body = await self.client.get(NODES.path(None, name))
        except ApiError as error:
            if not self._node_read_refused:
                log.warning("cannot read node %s (%s): node loss is not detected", name, error)
                self._node_read_refused = True
            return None
        observation = node_observation(body) if body is not None else None
        self._nodes[name] = (time.monotonic() + NODE_CACHE_S, observation)
        return observation

    def spawn(self, write: Coroutine[Any, Any, None]) -> None:
        """Run a best-effort write (it handles its own errors) without holding up the reconcile."""

        async def bounded() -> None:
            try:
                async with self._background_slots:
                    await write
            finally:
                write.close()  # cancelled while waiting for a slot: never started, never awaited

        task = asyncio.create_task(bounded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- events from the watch streams -----------------------------------------------------------

    def on_sandbox_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = key_of(body)
        qkey: QueueKey = ("sandbox", *key)
        if event_type == "DELETED":
            self.store.delete_sandbox(key)
            self.usage.forget(key)
            self.queue.forget(qkey)
            self._failures.pop(qkey, None)
            self.in_flight.forget_sandbox(str((body.get("metadata") or {}).get("uid")))
            return
        self.store.put_sandbox(body)
        if (body.get("status") or {}).get("phase") != "Running":
            self.usage.forget(key)  # stopped sandboxes have no usage series
        self.queue.add(qkey)

    def on_template_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        name = str(body["metadata"]["name"])
        if event_type == "DELETED":
            self.store.delete_template(name)
        else:
            self.store.put_template(body)
        # Sandboxes waiting for (or using) this template re-evaluate; pools refill with it.
        for key in self.store.sandboxes_using_template(name):
            self.queue.add(("sandbox", *key))
        for pool_key, pool in self.store.pools.items():
            if (pool.get("spec") or {}).get("template") == name:
                self.queue.add(("pool", *pool_key))

    def on_pool_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = key_of(body)
        if event_type == "DELETED":
            self.store.delete_pool(key)
            self.queue.forget(("pool", *key))
            return
        self.store.put_pool(body)
        self.queue.add(("pool", *key))

    def on_pod_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = key_of(body)
        if event_type == "DELETED":
            pod = self.store.delete_pod(key)
        else:
            pod = self.store.put_pod(body)
        if pod is None:
            return
        labels = pod["metadata"].get("labels") or {}
        if SANDBOX_LABEL in labels:
            self.queue.add(("sandbox", key[0], labels[SANDBOX_LABEL]))
        if POOL_LABEL in labels:
            self.queue.add(("pool", key[0], labels[POOL_LABEL]))
        # A pool pod just claimed by a sandbox: its pool refills.
        claimed_from = (pod["metadata"].get("annotations") or {}).get(CLAIMED_FROM_POOL_ANNOTATION)
        if claimed_from:
            self.queue.add(("pool", key[0], claimed_from))

    def on_child_event(self, kind: ChildKind, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A Service or NetworkPolicy of a sandbox: its digest tells reconcile whether it is current;
        a deletion (by anyone) makes the sandbox re-apply it."""
        key = key_of(body)
        meta = body.get("metadata") or {}
        if event_type == "DELETED":
            self.store.delete_child_hash(kind, key)
            for owner in meta.get("ownerReferences") or ():
                self.in_flight.forget_child(str(owner.get("uid")), kind)
        else:
            self.store.put_child_hash(kind, body)
        labels = meta.get("labels") or {}
        sandbox = labels.get(SANDBOX_LABEL)
        if sandbox:
            self.queue.add(("sandbox", key[0], sandbox))
        elif event_type == "DELETED" and EGRESS_CLASS_LABEL in labels:
            self._reapply_shared_policy(key[0], str(labels.get(TEMPLATE_LABEL, "")))

    def _reapply_shared_policy(self, namespace: str, template_label: str) -> None:
        """A shared NetworkPolicy was deleted (by anyone): every sandbox and pool of its template in
        the namespace writes it again on its next pass."""
        kinds: tuple[tuple[Literal["sandbox", "pool"], dict[Key, Any]], ...] = (
            ("sandbox", self.store.sandboxes),
            ("pool", self.store.pools),
        )
        for kind, bodies in kinds:
            for (body_namespace, name), body in list(bodies.items()):
                template = str((body.get("spec") or {}).get("template") or "")
                if body_namespace == namespace and label_value(template) == template_label:
                    self.queue.add((kind, namespace, name))

    def on_pvc_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = key_of(body)
        if event_type == "DELETED":
            self.store.delete_pvc(key)
        else:
            self.store.put_pvc(body)
        labels = (body.get("metadata") or {}).get("labels") or {}
        if labels.get(SANDBOX_LABEL):
            self.queue.add(("sandbox", key[0], labels[SANDBOX_LABEL]))
        elif labels.get(POOL_LABEL):
            self.queue.add(("pool", key[0], labels[POOL_LABEL]))  # a leaked warm claim gets swept

    # --- workers ---------------------------------------------------------------------------------

    async def _worker(self, index: int) -> None:
        from sandbox_operator.controller.pools import reconcile_pool
        from sandbox_operator.controller.reconcile import reconcile_sandbox

        while True:
            try:
                qkey = await self.queue.get()
            except QueueClosed:
                return
            kind, namespace, name = qkey
            started = time.perf_counter()
            try:
                if kind == "sandbox":
                    await reconcile_sandbox(self, (namespace, name))
                else:
                    await reconcile_pool(self, (namespace, name))
                self._failures.pop(qkey, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = exc.reason if isinstance(exc, ApiError) else type(exc).__name__
                self.metrics.reconcile_errors.labels(reason).inc()
                failures = self._failures.get(qkey, 0) + 1
                self._failures[qkey] = failures
                delay = min(0.1 * 2 ** (failures - 1), 30.0)  # exponential backoff, capped
                log.warning(
                    "reconcile %s/%s/%s failed (%s), retry in %.1fs: %s", kind, namespace, name, reason, delay, exc
                )
                self.queue.add_after(qkey, delay)
            finally:
                self.queue.done(qkey)
                if kind == "sandbox":
                    self.metrics.reconcile_duration.observe(time.perf_counter() - started)

    # --- metrics snapshots -----------------------------------------------------------------------

    def _phase_counts(self) -> Iterator[PhaseCount]:
        for (namespace, _), body in list(self.store.sandboxes.items()):
            phase = (body.get("status") or {}).get("phase") or "Pending"
            template = (body.get("spec") or {}).get("template") or ""
            yield PhaseCount(namespace=namespace, template=template, phase=phase)

    def _pool_counts(self) -> Iterator[PoolCount]:
        for (namespace, name), body in list(self.store.pools.items()):
            status = body.get("status") or {}
            yield PoolCount(
                namespace=namespace,
                pool=name,
                desired=int((body.get("spec") or {}).get("size") or 0),
                ready=int(status.get("ready") or 0),
                claimed=int(status.get("claimed") or 0),
            )
