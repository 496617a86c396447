"""Operator /metrics during real lifecycles, with real agents in the sandbox containers (the
container node), and the usage collector on its own against fake agents."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sandbox_operator.api.names import ENVD_PORT
from sandbox_operator.controller.config import OperatorConfig
from sandbox_operator.controller.store import Store
from sandbox_operator.controller.usage import UsageCollector
from sandbox_operator.kube import KubeClient
from sandbox_operator.metrics.usage import UsageExporter
from testlib import (
    Cluster,
    OperatorProcess,
    agent_headers,
    free_port,
    http_json,
    sandbox,
    sandbox_manifest,
    wait_phase,
    wait_until,
)


def test_phase_counts_and_lifecycle_series_match_the_cluster(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    for name in ("m1", "m2", "m3"):
        cluster.apply(sandbox_manifest(name), namespace)
    for name in ("m1", "m2", "m3"):
        wait_phase(cluster, namespace, name, "Running")
    cluster.kubectl("patch", "sandbox", "m3", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspended":true}}')
    wait_phase(cluster, namespace, "m3", "Suspended")

    def cluster_phases() -> Counter[str]:
        listing = cluster.get_json("sandboxes", "-n", namespace) or {}
        return Counter(str((s.get("status") or {}).get("phase")) for s in listing.get("items", []))

    def exported_phases() -> Counter[str]:
        return Counter(
            {
                s.labels["phase"]: int(s.value)
                for s in operator.samples("sandbox_operator_sandboxes", namespace=namespace)
            }
        )

    wait_until(lambda: exported_phases() == cluster_phases(), timeout=30, message="exported phases == cluster")
    assert exported_phases() == Counter({"Running": 2, "Suspended": 1})
    # Histograms and counters got observations from these lifecycles.
    cold = operator.value("sandbox_operator_time_to_running_seconds_count", source="cold")
    assert cold is not None and cold >= 3
    transitions = "sandbox_operator_transitions_total"
    # `from` is a Python keyword: the label filters go in as a dict.
    assert (operator.value(transitions, **{"from": "Creating", "to": "Running"}) or 0) >= 3
    assert (operator.value(transitions, **{"from": "Running", "to": "Suspending"}) or 0) >= 1
    writes = operator.samples("sandbox_operator_api_writes_total")
    assert writes and all(s.value >= 1 for s in writes), "API writes are exported as a counter (_total)"
    assert operator.value("sandbox_operator_build_info", version="0.1.0") == 1.0


def test_usage_comes_from_the_agent_and_moves(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    cluster.apply(
        json.dumps(
            {
                **json.loads(sandbox_manifest("u1")),
                "spec": {"template": "it-base", "metadata": {"team": "search", "owner": "not-exported"}},
            }
        ),
        namespace,
    )
    body = wait_phase(cluster, namespace, "u1", "Running")
    ip = body["status"]["podIP"]
    labels = {"namespace": namespace, "sandbox": "u1"}
    wait_until(lambda: operator.value("sandbox_up", **labels) == 1.0, timeout=60, message="sandbox_up 1")
    up = operator.samples("sandbox_up", **labels)[0]
    assert up.labels["template"] == "it-base" and up.labels["metadata_team"] == "search"
    assert "metadata_owner" not in up.labels, "only allow-listed metadata keys become labels"
    assert operator.value("sandbox_memory_limit_bytes", **labels) == 256 * 1024**2
    assert operator.value("sandbox_cpu_limit_cores", **labels) == 0.25
    assert operator.value("sandbox_disk_quota_bytes", **labels) == 1024**3  # the spec's disk, not statvfs

    cpu_before = operator.value("sandbox_cpu_seconds_total", **labels) or 0.0
    memory_before = operator.value("sandbox_memory_used_bytes", **labels) or 0.0
    # Resident (written) memory well inside the template's 256 MiB limit: the container is real.
    code = "hold = b'x' * (120 * 1024 * 1024)\nimport time\nt = time.time()\nwhile time.time() - t < 1.5: pass\n"
    http_json(
        f"http://{ip}:{ENVD_PORT}/execute",
        {"code": code},
        timeout=120,
        headers=agent_headers(cluster, namespace, body["status"]),
    )
    wait_until(
        lambda: (operator.value("sandbox_memory_used_bytes", **labels) or 0) > memory_before + 100 * 1024**2,
        timeout=30,
        message="memory usage to rise by the 120 MiB the sandbox holds",
    )
    wait_until(
        lambda: (operator.value("sandbox_cpu_seconds_total", **labels) or 0) >= cpu_before + 1.0,
        timeout=30,
        message="cpu seconds to rise by the 1.5 s the sandbox burned",
    )
    wait_until(
        lambda: (operator.value("sandbox_executions_total", kind="code", **labels) or 0) >= 1,
        timeout=30,
        message="an execution counted",
    )
    # The snapshot and the agent's activity reach the Sandbox status (the idle timeout reads it).
    status = wait_until(
        lambda: (
            (s := (cluster.get_json("sandbox", "u1", "-n", namespace) or {}).get("status", {}))
            .get("usage", {})
            .get("memoryBytes", 0)
            > memory_before + 100 * 1024**2
            and s
        ),
        timeout=30,
        message="status.usage with the new memory figure",
    )
    assert status["lastActivityAt"] >= status["startedAt"]


def test_deleted_sandbox_series_disappear(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    cluster.apply(sandbox_manifest("gone"), namespace)
    wait_phase(cluster, namespace, "gone", "Running")
    labels = {"namespace": namespace, "sandbox": "gone"}
    wait_until(lambda: operator.value("sandbox_up", **labels) == 1.0, timeout=60, message="sandbox_up 1")
    cluster.kubectl("delete", "sandbox", "gone", "-n", namespace)
    wait_until(
        lambda: (
            not any(
                s.labels.get("sandbox") == "gone" and s.labels.get("namespace") == namespace
                for f in text_string_to_metric_families(operator.metrics_text())
                for s in f.samples
            )
        ),
        timeout=30,
        message="every series of the deleted sandbox gone",
    )


def test_changed_metadata_relabels_the_series_without_leaving_the_old_ones(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    cluster.apply(
        json.dumps(
            {**json.loads(sandbox_manifest("relabel")), "spec": {"template": "it-base", "metadata": {"team": "search"}}}
        ),
        namespace,
    )
    wait_phase(cluster, namespace, "relabel", "Running")
    labels = {"namespace": namespace, "sandbox": "relabel"}
    wait_until(
        lambda: operator.value("sandbox_up", metadata_team="search", **labels) == 1.0,
        timeout=60,
        message="sandbox_up 1 labelled team=search",
    )
    cluster.kubectl(
        "patch", "sandbox", "relabel", "-n", namespace, "--type=merge", "-p", '{"spec":{"metadata":{"team":"ads"}}}'
    )

    def teams() -> set[str]:
        return {
            s.labels.get("metadata_team", "")
            for f in text_string_to_metric_families(operator.metrics_text())
            for s in f.samples
            if s.labels.get("namespace") == namespace and s.labels.get("sandbox") == "relabel"
        }

    # Every series of the sandbox moves to the new label value; none stays behind with the old one.
    wait_until(lambda: teams() == {"ads"}, timeout=30, message="only team=ads series for the sandbox")
    assert operator.value("sandbox_up", metadata_team="ads", **labels) == 1.0


# -- the collector on its own: fake agents on loopback, no cluster -------------------------------------

AGENT_TEXT = "sandbox_agent_cpu_seconds_total 1.5\nsandbox_agent_memory_used_bytes 1024\n"
TEMPLATE: dict[str, Any] = {
    "metadata": {"name": "t", "resourceVersion": "1"},
    "spec": {"image": "x", "resources": {"default": {"cpu": "250m", "memory": "256Mi", "disk": "1Gi"}}},
}


def sandbox_body(name: str, ip: str, version: int = 1, team: str = "search") -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": name, "resourceVersion": str(version)},
        "spec": {"template": "t", "metadata": {"team": team}},
        "status": {"phase": "Running", "podIP": ip},
    }


class _NoClient:
    async def patch(self, path: str, body: Any) -> None:
        return None


def collector(store: Store, port: int, interval: float, concurrency: int) -> UsageCollector:
    config = OperatorConfig(
        usage_interval=interval,
        usage_concurrency=concurrency,
        usage_status_interval=3600,
        agent_port=port,
        metric_metadata_keys=("team",),
    )
    return UsageCollector(store, cast(KubeClient, _NoClient()), config, lambda key: None)


def exported(usage: UsageCollector) -> list[Sample]:
    registry = CollectorRegistry()
    registry.register(UsageExporter(usage.usage, ("team",)))
    return [s for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples]


@pytest.fixture
async def fake_agents() -> AsyncIterator[int]:
    """On one port: 127.0.0.2 answers like an agent; 127.0.0.1 accepts and never answers (a dead agent)."""
    port = free_port()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=AGENT_TEXT)

    app = web.Application()
    app.router.add_get("/agent/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.2", port).start()
    hung: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)  # keep the connection open, never reply

    dead = await asyncio.start_server(hang, "127.0.0.1", port)
    try:
        yield port
    finally:
        dead.close()
        for writer in hung:
            writer.close()
        await runner.cleanup()


async def test_a_round_with_dead_agents_stays_within_the_interval_and_starves_nobody(fake_agents: int) -> None:
    store = Store()
    store.put_template(TEMPLATE)
    for index in range(6):
        store.put_sandbox(sandbox_body(f"dead{index}", "127.0.0.1"))
    store.put_sandbox(sandbox_body("alive", "127.0.0.2"))  # last: the first rounds never reach it
    usage = collector(store, fake_agents, interval=1.0, concurrency=2)
    assert usage.scrape_timeout == 1.0
    try:
        # Unbounded, 6 dead agents in waves of 2 would hold the first round for 3 scrape timeouts.
        for _ in range(5):
            started = time.monotonic()
            await usage.collect_once()
            assert time.monotonic() - started < 1.8, "a round must not outlast the interval"
            if usage.usage[("ns", "alive")].up:
                break
        assert usage.usage[("ns", "alive")].up, "the sandbox skipped by cut-short rounds is scraped later"
        assert not any(usage.usage[("ns", f"dead{i}")].up for i in range(6))
    finally:
        await usage.stop()


async def test_metadata_and_template_changes_refresh_the_labels_and_limits(fake_agents: int) -> None:
    store = Store()
    store.put_template(TEMPLATE)
    store.put_sandbox(sandbox_body("s", "127.0.0.2", version=1, team="search"))
    usage = collector(store, fake_agents, interval=1.0, concurrency=4)
    try:
        await usage.collect_once()
        assert {s.labels["metadata_team"] for s in exported(usage)} == {"search"}
        store.put_sandbox(sandbox_body("s", "127.0.0.2", version=2, team="ads"))
        store.put_template(
            {
                "metadata": {"name": "t", "resourceVersion": "2"},
                "spec": {
                    **TEMPLATE["spec"],
                    "resources": {"default": {"cpu": "500m", "memory": "256Mi", "disk": "1Gi"}},
                },
            }
        )
        await usage.collect_once()
        after = exported(usage)
        assert {s.labels["metadata_team"] for s in after} == {"ads"}, "no series keeps the old label"
        assert [s.value for s in after if s.name == "sandbox_cpu_limit_cores"] == [0.5]
        assert [s.value for s in after if s.name == "sandbox_cpu_seconds_total"] == [1.5]
    finally:
        await usage.stop()


def test_timeouts_pools_pool_starts_and_reconcile_errors_are_counted(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    def metric(name: str, **labels: str) -> float:
        return operator.value(name, **labels) or 0.0

    lifetimes = metric("sandbox_operator_timeouts_total", kind="max_lifetime")
    pool_starts = metric("sandbox_operator_time_to_running_seconds_count", source="pool")

    cluster.apply(sandbox_manifest("short", timeouts={"idle": "0", "maxLifetime": "2s", "execution": "0"}), namespace)
    wait_phase(cluster, namespace, "short", "Terminated")
    wait_until(
        lambda: metric("sandbox_operator_timeouts_total", kind="max_lifetime") >= lifetimes + 1,
        timeout=30,
        message="a max_lifetime timeout counted",
    )

    cluster.apply(
        json.dumps(
            {
                "apiVersion": "sandbox.dev/v1alpha1",
                "kind": "SandboxPool",
                "metadata": {"name": "warm"},
                "spec": {"template": "it-base", "size": 1},
            }
        ),
        namespace,
    )
    pool = {"namespace": namespace, "pool": "warm"}
    wait_until(
        lambda: (
            metric("sandbox_operator_pool_desired", **pool) == 1 and metric("sandbox_operator_pool_ready", **pool) == 1
        ),
        timeout=60,
        message="pool desired = ready = 1",
    )
    cluster.apply(sandbox_manifest("pooled"), namespace)
    wait_phase(cluster, namespace, "pooled", "Running")
    wait_until(
        lambda: metric("sandbox_operator_time_to_running_seconds_count", source="pool") >= pool_starts + 1,
        timeout=30,
        message="a pool start in time_to_running{source=pool}",
    )
    wait_until(lambda: metric("sandbox_operator_pool_claimed", **pool) == 1, timeout=30, message="pool claimed 1")

    # The API server refusing the pod (a quota of zero pods) is a reconcile error, retried with backoff.
    cluster.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": "no-pods"},
                "spec": {"hard": {"pods": "0"}},
            }
        ),
        namespace,
    )
    wait_until(
        lambda: (cluster.get_json("resourcequota", "no-pods", "-n", namespace) or {}).get("status", {}).get("hard"),
        timeout=30,
        message="the quota's status",
    )
    forbidden = metric("sandbox_operator_reconcile_errors_total", reason="Forbidden")
    # Other resources than the warm pods': a cold start, whose pod the quota refuses.
    cluster.apply(sandbox_manifest("refused", resources={"cpu": "500m"}), namespace)
    wait_until(
        lambda: metric("sandbox_operator_reconcile_errors_total", reason="Forbidden") > forbidden,
        timeout=30,
        message="a Forbidden reconcile error counted",
    )
    assert (sandbox(cluster, namespace, "refused").get("status") or {}).get("phase") in (None, "Creating")
