"""Per-sandbox resource usage: one collector task polls every running sandbox's agent.

The agent serves Prometheus text at `/agent/metrics` on its envd port (docs/agent.md). The operator
re-exports the numbers labelled by namespace, sandbox, template and an allow-list of
`spec.metadata` keys; limits come from the sandbox's resolved resources, not from the agent. A
sandbox whose agent does not answer shows `sandbox_up 0` and no other series (no stale numbers);
a deleted or stopped sandbox's series are dropped at once (no cardinality leak).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

AGENT_PREFIX = "sandbox_agent_"
PREFIX = "sandbox"
BASE_LABELS = ("namespace", "sandbox", "template")
_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")


@dataclass(frozen=True)
class AgentSample:
    """One scrape of an agent's /agent/metrics, in base units."""

    cpu_seconds: float = 0.0
    memory_used_bytes: float = 0.0
    disk_used_bytes: float = 0.0
    disk_quota_bytes: float = 0.0
    rx_bytes: float = 0.0
    tx_bytes: float = 0.0
    processes: float = 0.0
    last_activity: float = 0.0  # unix seconds
    executions_running: float = 0.0
    executions_total: Mapping[str, float] = field(default_factory=dict)
    execution_timeouts_total: Mapping[str, float] = field(default_factory=dict)
    execution_seconds_sum: Mapping[str, float] = field(default_factory=dict)
    execution_seconds_count: Mapping[str, float] = field(default_factory=dict)


_SCALARS = {
    "cpu_seconds_total": "cpu_seconds",
    "memory_used_bytes": "memory_used_bytes",
    "disk_used_bytes": "disk_used_bytes",
    "disk_quota_bytes": "disk_quota_bytes",
    "network_receive_bytes_total": "rx_bytes",
    "network_transmit_bytes_total": "tx_bytes",
    "processes": "processes",
    "last_activity_timestamp_seconds": "last_activity",
    "executions_running": "executions_running",
}
_BY_KIND = {
    "executions_total": "executions_total",
    "execution_timeouts_total": "execution_timeouts_total",
    "execution_duration_seconds_sum": "execution_seconds_sum",
    "execution_duration_seconds_count": "execution_seconds_count",
}


def parse_agent_metrics(text: str) -> AgentSample:
    """Parse the agent's exposition. Unknown series are ignored; malformed text raises ValueError."""
    scalars: dict[str, float] = {}
    by_kind: dict[str, dict[str, float]] = {field: {} for field in _BY_KIND.values()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(AGENT_PREFIX) or math.isnan(sample.value):
                continue
            name = sample.name.removeprefix(AGENT_PREFIX)
            if name in _SCALARS:
                scalars[_SCALARS[name]] = float(sample.value)
            elif name in _BY_KIND:
                by_kind[_BY_KIND[name]][sample.labels.get("kind", "")] = float(sample.value)
    return AgentSample(**scalars, **by_kind)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Limits:
    cpu_cores: float
    memory_bytes: float
    disk_bytes: float


@dataclass
class SandboxUsage:
    """What the operator knows about one running sandbox's usage."""

    labels: tuple[str, ...]  # values for BASE_LABELS + the allow-listed metadata keys
    limits: Limits
    up: bool = False
    sample: AgentSample | None = None
    cpu_cores: float | None = None  # rate over the last two samples
    sampled_at: float = 0.0  # unix seconds of `sample`

    def record(self, sample: AgentSample, at: float) -> None:
        previous, previous_at = self.sample, self.sampled_at
        if previous is not None and at > previous_at and sample.cpu_seconds >= previous.cpu_seconds:
            self.cpu_cores = (sample.cpu_seconds - previous.cpu_seconds) / (at - previous_at)
        self.sample, self.sampled_at, self.up = sample, at, True

    def record_unreachable(self) -> None:
        # Keep nothing that could be mistaken for current numbers.
        self.sample, self.cpu_cores, self.up = None, None, False


def metadata_label_names(keys: Sequence[str]) -> tuple[str, ...]:
    """Prometheus label names for allow-listed metadata keys: `team.io/owner` → `metadata_team_io_owner`."""
    return tuple("metadata_" + _LABEL_NAME.sub("_", key) for key in keys)


class UsageExporter(Collector):
    """Builds the per-sandbox families from the current usage table at scrape time."""

    def __init__(self, usage: Mapping[tuple[str, str], SandboxUsage], metadata_keys: Sequence[str]) -> None:
        self._usage = usage
        self._label_names = (*BASE_LABELS, *metadata_label_names(metadata_keys))

    def collect(self) -> Iterator[Metric]:
        names = list(self._label_names)
        entries = list(self._usage.values())

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=names)

        def counter(name: str, doc: str, extra: Iterable[str] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[*names, *extra])

        up = gauge("up", "1 when the sandbox's agent answered the last usage scrape, else 0.")
        cpu = gauge("cpu_usage_cores", "CPU in use, in cores, over the last scrape interval.")
        cpu_total = counter("cpu_seconds", "CPU time used by the sandbox, in seconds.")
        cpu_limit = gauge("cpu_limit_cores", "CPU limit of the sandbox, in cores.")
        memory = gauge("memory_used_bytes", "Memory used by the sandbox.")
        memory_limit = gauge("memory_limit_bytes", "Memory limit of the sandbox.")
        disk = gauge("disk_used_bytes", "Bytes used on the sandbox's workspace volume.")
        disk_quota = gauge("disk_quota_bytes", "Size of the sandbox's workspace (its disk quota).")
        rx = counter("network_receive_bytes", "Bytes received by the sandbox.")
        tx = counter("network_transmit_bytes", "Bytes sent by the sandbox.")
        processes = gauge("processes", "Processes running in the sandbox.")
        last_activity = gauge("last_activity_timestamp_seconds", "Unix time of the sandbox's last activity.")
        idle = gauge("idle_seconds", "Seconds since the sandbox's last activity, at the last scrape.")
        running = gauge("executions_running", "Commands and code executions running now.")
        executions = counter("executions", "Finished executions by kind (command, pty, code).", ["kind"])
        timeouts = counter("execution_timeouts", "Executions stopped by the execution timeout, by kind.", ["kind"])
        durations = SummaryMetricFamily(
            f"{PREFIX}_execution_duration_seconds",
            "Duration of finished executions, by kind.",
            labels=[*names, "kind"],
        )
        for entry in entries:
            labels = list(entry.labels)
            up.add_metric(labels, 1.0 if entry.up else 0.0)
            cpu_limit.add_metric(labels, entry.limits.cpu_cores)
            memory_limit.add_metric(labels, entry.limits.memory_bytes)
            sample = entry.sample
            if not entry.up or sample is None:
                continue
            if entry.cpu_cores is not None:
                cpu.add_metric(labels, entry.cpu_cores)
            cpu_total.add_metric(labels, sample.cpu_seconds)
            memory.add_metric(labels, sample.memory_used_bytes)
            disk.add_metric(labels, sample.disk_used_bytes)
            # The spec's disk is the quota (PVC size or ephemeral-storage limit); statvfs of an
            # emptyDir would report the node's whole filesystem.
            disk_quota.add_metric(labels, entry.limits.disk_bytes or sample.disk_quota_bytes)
            rx.add_metric(labels, sample.rx_bytes)
            tx.add_metric(labels, sample.tx_bytes)
            processes.add_metric(labels, sample.processes)
            running.add_metric(labels, sample.executions_running)
            if sample.last_activity:
                last_activity.add_metric(labels, sample.last_activity)
                idle.add_metric(labels, max(0.0, entry.sampled_at - sample.last_activity))
            for kind, value in sorted(sample.executions_total.items()):
                executions.add_metric([*labels, kind], value)
            for kind, value in sorted(sample.execution_timeouts_total.items()):
                timeouts.add_metric([*labels, kind], value)
            for kind, count in sorted(sample.execution_seconds_count.items()):
                durations.add_metric([*labels, kind], int(count), sample.execution_seconds_sum.get(kind, 0.0))
        yield from (
            up,
            cpu,
            cpu_total,
            cpu_limit,
            memory,
            memory_limit,
            disk,
            disk_quota,
            rx,
            tx,
            processes,
            last_activity,
            idle,
            running,
            executions,
            timeouts,
            durations,
        )
