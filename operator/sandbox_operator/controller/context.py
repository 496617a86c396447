"""What one reconcile needs from the process around it, and nothing more.

reconcile_sandbox and reconcile_pool take a ``ReconcileContext``: the API client, the store, the
in-flight state, the metrics, the settings and three operations (wake a key later, run a best-effort
write in the background, read a node's readiness). The Runtime is one; the controller's unit tests build others.
"""

from __future__ import annotations

from collections.abc import Coroutine
from datetime import datetime
from typing import Any, Literal, Protocol

from sandbox_operator.controller.config import OperatorConfig
from sandbox_operator.controller.inflight import InFlight
from sandbox_operator.controller.store import Store
from sandbox_operator.kube import KubeClient
from sandbox_operator.lifecycle import NodeObservation
from sandbox_operator.metrics.lifecycle import LifecycleMetrics

Kind = Literal["sandbox", "pool"]
QueueKey = tuple[Kind, str, str]  # (kind, namespace, name)


class ReconcileContext(Protocol):
    @property
    def client(self) -> KubeClient: ...

    @property
    def store(self) -> Store: ...

    @property
    def in_flight(self) -> InFlight: ...

    @property
    def metrics(self) -> LifecycleMetrics: ...

    @property
    def config(self) -> OperatorConfig: ...

    def requeue(self, key: QueueKey, delay: float = 0.0) -> None:
        """Reconcile `key` again after `delay` seconds (0: as soon as a worker is free)."""

    def spawn(self, write: Coroutine[Any, Any, None]) -> None:
        """Run a best-effort write (it handles its own errors) without holding up the reconcile."""

    async def node_status(self, name: str) -> NodeObservation | None:
        """The readiness of the node `name` (recently read), None when it cannot be read."""

    async def agent_activity(self, pod_ip: str, token: str | None) -> datetime | None:
        """The sandbox agent's last activity, asked now (with its access token); None when it does
        not answer."""
