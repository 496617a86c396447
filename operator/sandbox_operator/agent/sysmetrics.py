"""Resource usage from cgroups (v2, then v1) and /proc, in envd's JSON shape and Prometheus text."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .limits import DURATION_BUCKETS, ExecutionStats

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
# Where the agent reads its cgroup's limits and counters (tests point it at a cgroup of their own).
CGROUP_ROOT_ENV: Final = "SANDBOX_CGROUP_ROOT"
# cgroup v1 reports "no limit" as a huge page-aligned number.
UNLIMITED_THRESHOLD: Final = 1 << 60
PROMETHEUS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def parse_key_values(text: str) -> dict[str, int]:
    """'key value' lines (memory.stat, cpu.stat) → dict."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            values[key] = int(value.strip())
        except ValueError:
            continue
    return values


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo → bytes per field."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return values


def parse_net_dev(text: str) -> tuple[int, int]:
    """/proc/net/dev → (rx bytes, tx bytes) summed over all interfaces except loopback."""
    received = transmitted = 0
    for line in text.splitlines()[2:]:
        name, _, counters = line.partition(":")
        fields = counters.split()
        if name.strip() == "lo" or len(fields) < 9:
            continue
        received += int(fields[0])
        transmitted += int(fields[8])
    return received, transmitted


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 cpu.max ('quota period' or 'max period') → cores, None when unlimited."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        return int(parts[0]) / int(parts[1])
    except (ValueError, ZeroDivisionError):
        return None


def default_cgroup_root(env: Mapping[str, str] | None = None) -> Path:
    """SANDBOX_CGROUP_ROOT, else /sys/fs/cgroup."""
    configured = (os.environ if env is None else env).get(CGROUP_ROOT_ENV, "").strip()
    return Path(configured) if configured else CGROUP_ROOT


def is_v2(root: Path) -> bool:
    return (root / "cgroup.controllers").exists()


# A file every cgroup v1 directory of the controller has.
V1_PROBES: Final[Mapping[str, str]] = {"memory": "memory.limit_in_bytes", "pids": "pids.max"}


def v1_controller_dir(root: Path, controller: str) -> Path:
    """cgroup v1: `root/<controller>` (the hierarchies mounted side by side, as in a container), or
    `root` itself when it is already a cgroup directory of that controller."""
    nested = root / controller
    if not nested.is_dir() and (root / V1_PROBES[controller]).exists():
        return root
    return nested


def oom_events_file(root: Path) -> Path:
    """The file with the cgroup's `oom_kill` counter: memory.events (v2) or memory.oom_control (v1)."""
    events = root / "memory.events"
    if events.exists():
        return events
    return v1_controller_dir(root, "memory") / "memory.oom_control"


def read_oom_kills(events_file: Path) -> int | None:
    """How many processes the OOM killer killed in the cgroup; None when the kernel does not say
    (v1 before Linux 4.13) or there is no memory cgroup."""
    text = _read(events_file)
    return None if text is None else parse_key_values(text).get("oom_kill")


def memory_limit(root: Path) -> int | None:
    """The cgroup's memory limit in bytes, None when unlimited or unknown."""
    if is_v2(root):
        limit = _read_int(root / "memory.max")
    else:
        limit = _read_int(v1_controller_dir(root, "memory") / "memory.limit_in_bytes")
    return None if limit is None or limit >= UNLIMITED_THRESHOLD else limit


def pids_usage(root: Path) -> tuple[int | None, int | None]:
    """(pids.current, pids.max) of the cgroup; None where unknown or unlimited."""
    directory = root if is_v2(root) else v1_controller_dir(root, "pids")
    return _read_int(directory / "pids.current"), _read_int(directory / "pids.max")


@dataclass(frozen=True)
class ResourceSample:
    timestamp: float
    cpu_seconds: float
    cpu_limit_cores: float
    memory_used: int
    memory_limit: int
    memory_cache: int
    disk_used: int
    disk_total: int
    net_rx: int
    net_tx: int
    processes: int


class ResourceSampler:
    def __init__(self, workdir: Path, cgroup_root: Path | None = None) -> None:
        self.workdir = workdir
        self.root = default_cgroup_root() if cgroup_root is None else cgroup_root
        self.v2 = is_v2(self.root)
        self._previous: ResourceSample | None = None
        self._first = self.sample()

    def _cpu_seconds(self) -> float:
        if self.v2:
            stat = parse_key_values(_read(self.root / "cpu.stat") or "")
            if "usage_usec" in stat:
                return stat["usage_usec"] / 1e6
        else:
            usage = _read_int(self.root / "cpuacct" / "cpuacct.usage")
            if usage is not None:
                return usage / 1e9
        fields = (_read(Path("/proc/stat")) or "cpu 0").splitlines()[0].split()[1:]
        ticks = [int(value) for value in fields[:8]]
        busy = sum(ticks) - (ticks[3] if len(ticks) > 3 else 0) - (ticks[4] if len(ticks) > 4 else 0)
        return busy / os.sysconf("SC_CLK_TCK")

    def _cpu_limit(self) -> float:
        host_cpus = float(len(os.sched_getaffinity(0)))
        if self.v2:
            limit = parse_cpu_max(_read(self.root / "cpu.max") or "")
        else:
            quota = _read_int(self.root / "cpu" / "cpu.cfs_quota_us")
            period = _read_int(self.root / "cpu" / "cpu.cfs_period_us")
            limit = quota / period if quota and quota > 0 and period else None
        return min(limit, host_cpus) if limit else host_cpus

    def _memory(self) -> tuple[int, int, int]:
        meminfo = parse_meminfo(_read(Path("/proc/meminfo")) or "")
        host_total = meminfo.get("MemTotal", 0)
        if self.v2:
            used = _read_int(self.root / "memory.current")
            limit = _read_int(self.root / "memory.max")
            cache = parse_key_values(_read(self.root / "memory.stat") or "").get("file", 0)
        else:
            memory = v1_controller_dir(self.root, "memory")
            used = _read_int(memory / "memory.usage_in_bytes")
            limit = _read_int(memory / "memory.limit_in_bytes")
            stat = parse_key_values(_read(memory / "memory.stat") or "")
            cache = stat.get("total_cache", stat.get("cache", 0))
        if used is None:
            used = host_total - meminfo.get("MemAvailable", 0)
            cache = meminfo.get("Cached", 0)
        if limit is None or limit >= UNLIMITED_THRESHOLD or (host_total and limit > host_total):
            limit = host_total
        return used, limit, cache

    def _processes(self) -> int:
        current = _read_int(self.root / "pids.current" if self.v2 else self.root / "pids" / "pids.current")
        if current is not None:
            return current
        return sum(1 for name in os.listdir("/proc") if name.isdigit())

    def sample(self) -> ResourceSample:
        used, limit, cache = self._memory()
        try:
            disk = os.statvfs(self.workdir)
            disk_total = disk.f_blocks * disk.f_frsize
            disk_used = (disk.f_blocks - disk.f_bfree) * disk.f_frsize
        except OSError:
            disk_total = disk_used = 0
        rx, tx = parse_net_dev(_read(Path("/proc/net/dev")) or "")
        return ResourceSample(
            timestamp=time.time(),
            cpu_seconds=self._cpu_seconds(),
            cpu_limit_cores=self._cpu_limit(),
            memory_used=used,
            memory_limit=limit,
            memory_cache=cache,
            disk_used=disk_used,
            disk_total=disk_total,
            net_rx=rx,
            net_tx=tx,
            processes=self._processes(),
        )

    def cpu_used_percent(self, current: ResourceSample) -> float:
        """Share of the CPU allotment used since the previous /metrics call (or since start)."""
        previous = self._previous or self._first
        self._previous = current
        elapsed = current.timestamp - previous.timestamp
        if elapsed <= 0 or current.cpu_limit_cores <= 0:
            return 0.0
        used = (current.cpu_seconds - previous.cpu_seconds) / elapsed / current.cpu_limit_cores
        return round(max(0.0, min(used, 1.0)) * 100, 2)


def envd_metrics(sample: ResourceSample, cpu_used_pct: float, stats: ExecutionStats) -> dict[str, float | int]:
    """envd GET /metrics JSON (plus the agent's activity fields, which envd clients ignore)."""
    mib = 1024 * 1024
    return {
        "ts": int(sample.timestamp),
        "cpu_count": max(1, round(sample.cpu_limit_cores)),
        "cpu_used_pct": cpu_used_pct,
        "mem_total": sample.memory_limit,
        "mem_used": sample.memory_used,
        "mem_cache": sample.memory_cache,
        "mem_total_mib": sample.memory_limit // mib,
        "mem_used_mib": sample.memory_used // mib,
        "disk_used": sample.disk_used,
        "disk_total": sample.disk_total,
        "last_activity_ts": round(stats.activity_at(sample.timestamp), 3),
        "executions_running": stats.running,
        "executions_total": sum(stats.executions_total.values()),
    }


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape_label(value)}"' for key, value in sorted(labels.items())) + "}"


def prometheus_text(sample: ResourceSample, stats: ExecutionStats, sandbox_id: str) -> str:
    """Prometheus text exposition (0.0.4) of resource usage and execution statistics."""
    lines: list[str] = []
    base = {"sandbox_id": sandbox_id} if sandbox_id else {}

    def metric(name: str, kind: str, help_text: str, values: list[tuple[Mapping[str, str], float]]) -> None:
        lines.append(f"# HELP sandbox_agent_{name} {help_text}")
        lines.append(f"# TYPE sandbox_agent_{name} {kind}")
        for labels, value in values:
            lines.append(f"sandbox_agent_{name}{_labels({**base, **labels})} {value:.17g}")

    metric("cpu_seconds_total", "counter", "CPU time used by the sandbox.", [({}, sample.cpu_seconds)])
    metric("cpu_limit_cores", "gauge", "CPU cores the sandbox may use.", [({}, sample.cpu_limit_cores)])
    metric("memory_used_bytes", "gauge", "Memory used by the sandbox.", [({}, sample.memory_used)])
    metric("memory_limit_bytes", "gauge", "Memory limit of the sandbox.", [({}, sample.memory_limit)])
    metric("memory_cache_bytes", "gauge", "Page cache charged to the sandbox.", [({}, sample.memory_cache)])
    metric("disk_used_bytes", "gauge", "Used bytes on the workspace filesystem.", [({}, sample.disk_used)])
    metric("disk_quota_bytes", "gauge", "Size of the workspace filesystem.", [({}, sample.disk_total)])
    metric("network_receive_bytes_total", "counter", "Bytes received (all but loopback).", [({}, sample.net_rx)])
    metric("network_transmit_bytes_total", "counter", "Bytes sent (all but loopback).", [({}, sample.net_tx)])
    metric("processes", "gauge", "Processes in the sandbox.", [({}, sample.processes)])
    metric(
        "last_activity_timestamp_seconds",
        "gauge",
        "Unix time of the last API request or execution event (now while an execution runs).",
        [({}, stats.activity_at(sample.timestamp))],
    )
    metric("start_time_seconds", "gauge", "Unix time the agent started.", [({}, stats.started_at)])
    metric("executions_running", "gauge", "Executions running now.", [({}, stats.running)])
    kinds = sorted(set(stats.executions_total) | {"command", "code"})
    metric(
        "executions_total",
        "counter",
        "Finished executions by kind (command, pty, code).",
        [({"kind": kind}, stats.executions_total.get(kind, 0)) for kind in kinds],
    )
    metric(
        "execution_timeouts_total",
        "counter",
        "Executions stopped by SANDBOX_EXECUTION_TIMEOUT.",
        [({"kind": kind}, stats.timeouts_total.get(kind, 0)) for kind in kinds],
    )
    metric(
        "executions_rejected_total",
        "counter",
        "Executions refused by SANDBOX_MAX_CONCURRENT_EXECUTIONS.",
        [({}, stats.rejected_total)],
    )
    lines.append("# HELP sandbox_agent_execution_duration_seconds Duration of finished executions.")
    lines.append("# TYPE sandbox_agent_execution_duration_seconds histogram")
    for kind in kinds:
        counts = stats.duration_buckets.get(kind, [0] * len(DURATION_BUCKETS))
        cumulative = 0
        for bound, count in zip(DURATION_BUCKETS, counts, strict=True):
            cumulative += count
            labels = _labels({**base, "kind": kind, "le": f"{bound:g}"})
            lines.append(f"sandbox_agent_execution_duration_seconds_bucket{labels} {cumulative}")
        total = stats.executions_total.get(kind, 0)
        inf_labels = _labels({**base, "kind": kind, "le": "+Inf"})
        lines.append(f"sandbox_agent_execution_duration_seconds_bucket{inf_labels} {total}")
        kind_labels = _labels({**base, "kind": kind})
        duration_sum = stats.duration_sum.get(kind, 0.0)
        lines.append(f"sandbox_agent_execution_duration_seconds_sum{kind_labels} {duration_sum:.17g}")
        lines.append(f"sandbox_agent_execution_duration_seconds_count{kind_labels} {total}")
    return "\n".join(lines) + "\n"
