"""Operator lifecycle metrics.

Counts per phase are computed at scrape time from the operator's in-memory store (fed by the
watch), never by LISTing the API server per scrape. Each operator instance owns its registry, so
tests can run several in one process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sandbox_operator import __version__
from sandbox_operator.metrics.process import register_process_metrics

PREFIX = "sandbox_operator"
# Create → Running spans ~50 ms (pool claim) to minutes (image pulls on a real node).
TIME_TO_RUNNING_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class PhaseCount:
    namespace: str
    template: str
    phase: str


@dataclass(frozen=True)
class PoolCount:
    namespace: str
    pool: str
    desired: int
    ready: int
    claimed: int


class _SnapshotCollector(Collector):
    """Turns the store's current view (and the client's write count) into families at scrape time."""

    def __init__(
        self,
        phases: Callable[[], Iterable[PhaseCount]],
        pools: Callable[[], Iterable[PoolCount]],
        writes: Callable[[], Counter[tuple[str, str]]],
        queue_depth: Callable[[], int],
    ) -> None:
        self._phases = phases
        self._pools = pools
        self._writes = writes
        self._queue_depth = queue_depth

    def collect(self) -> Iterator[Metric]:
        sandboxes = GaugeMetricFamily(
            f"{PREFIX}_sandboxes",
            "Sandboxes known to the operator, by namespace, template and lifecycle phase.",
            labels=["namespace", "template", "phase"],
        )
        for (namespace, template, phase), count in Counter(
            (p.namespace, p.template, p.phase) for p in self._phases()
        ).items():
            sandboxes.add_metric([namespace, template, phase], count)
        yield sandboxes

        desired = GaugeMetricFamily(
            f"{PREFIX}_pool_desired", "Warm pods a SandboxPool asks for.", labels=["namespace", "pool"]
        )
        ready = GaugeMetricFamily(
            f"{PREFIX}_pool_ready", "Warm, unclaimed pods that are ready.", labels=["namespace", "pool"]
        )
        claimed = GaugeMetricFamily(
            f"{PREFIX}_pool_claimed", "Pods claimed from the pool by Sandboxes.", labels=["namespace", "pool"]
        )
        for pool in self._pools():
            desired.add_metric([pool.namespace, pool.pool], pool.desired)
            ready.add_metric([pool.namespace, pool.pool], pool.ready)
            claimed.add_metric([pool.namespace, pool.pool], pool.claimed)
        yield desired
        yield ready
        yield claimed

        # The client only ever adds to its count: a counter (exposed as ..._api_writes_total).
        writes = CounterMetricFamily(
            f"{PREFIX}_api_writes_total",
            "API write requests sent since start, by verb and resource.",
            labels=["verb", "resource"],
        )
        for (verb, resource), count in sorted(self._writes().items()):
            writes.add_metric([verb, resource], count)
        yield writes

        yield GaugeMetricFamily(
            f"{PREFIX}_workqueue_depth", "Sandboxes waiting for a reconcile worker.", value=self._queue_depth()
        )


class LifecycleMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        register_process_metrics(r)
        self.build_info = Gauge(f"{PREFIX}_build_info", "Operator build information.", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self.transitions = PromCounter(
            f"{PREFIX}_transitions_total",
            "Lifecycle phase transitions, by from-phase, to-phase and reason.",
            # `from`/`to` are valid label names (issue 6); set them positionally: `from` is a Python keyword.
            ["from", "to", "reason"],
            registry=r,
        )
        self.time_to_running = Histogram(
            f"{PREFIX}_time_to_running_seconds",
            "Seconds from Sandbox creation to phase Running, by pod source (cold start or pool claim).",
            ["source"],
            buckets=TIME_TO_RUNNING_BUCKETS,
            registry=r,
        )
        self.timeouts = PromCounter(
            f"{PREFIX}_timeouts_total",
            "Sandbox timeouts that fired, by kind (idle, max_lifetime).",
            ["kind"],
            registry=r,
        )
        self.reconcile_errors = PromCounter(
            f"{PREFIX}_reconcile_errors_total",
            "Reconciles that failed and were retried, by reason.",
            ["reason"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            f"{PREFIX}_reconcile_duration_seconds",
            "Seconds spent in one reconcile of one Sandbox, API calls included.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=r,
        )

    def attach_snapshot(
        self,
        phases: Callable[[], Iterable[PhaseCount]],
        pools: Callable[[], Iterable[PoolCount]],
        writes: Callable[[], Counter[tuple[str, str]]],
        queue_depth: Callable[[], int],
    ) -> None:
        self.registry.register(_SnapshotCollector(phases, pools, writes, queue_depth))
