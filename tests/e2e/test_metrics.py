"""Operator /metrics during real lifecycles, with real agents answering on the sandbox pod IPs."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from testlib import Cluster, OperatorProcess, PodAgents, http_json, sandbox_manifest, wait_phase, wait_until


def samples(operator: OperatorProcess, name: str, **labels: str) -> list[Sample]:
    found = []
    for family in text_string_to_metric_families(operator.metrics_text()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found.append(sample)
    return found


def value(operator: OperatorProcess, name: str, **labels: str) -> float | None:
    found = samples(operator, name, **labels)
    return found[0].value if found else None


@pytest.fixture
def agents(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[PodAgents]:
    with PodAgents(cluster, namespace, tmp_path) as running:
        yield running


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
        return Counter({s.labels["phase"]: int(s.value)
                        for s in samples(operator, "sandbox_operator_sandboxes", namespace=namespace)})

    wait_until(lambda: exported_phases() == cluster_phases(), timeout=30, message="exported phases == cluster")
    assert exported_phases() == Counter({"Running": 2, "Suspended": 1})
    # Histograms and counters got observations from these lifecycles.
    cold = value(operator, "sandbox_operator_time_to_running_seconds_count", source="cold")
    assert cold is not None and cold >= 3
    transitions = "sandbox_operator_transitions_total"
    assert (value(operator, transitions, from_phase="Creating", to_phase="Running") or 0) >= 3
    assert (value(operator, transitions, from_phase="Running", to_phase="Suspending") or 0) >= 1
    assert value(operator, "sandbox_operator_build_info", version="0.1.0") == 1.0


def test_usage_comes_from_the_agent_and_moves(
    cluster: Cluster, namespace: str, operator: OperatorProcess, agents: PodAgents
) -> None:
    cluster.apply(json.dumps({**json.loads(sandbox_manifest("u1")), "spec": {
        "template": "it-base", "metadata": {"team": "search", "owner": "not-exported"}}}), namespace)
    body = wait_phase(cluster, namespace, "u1", "Running")
    ip = body["status"]["podIP"]
    labels = {"namespace": namespace, "sandbox": "u1"}
    wait_until(lambda: value(operator, "sandbox_up", **labels) == 1.0, timeout=60, message="sandbox_up 1")
    up = samples(operator, "sandbox_up", **labels)[0]
    assert up.labels["template"] == "it-base" and up.labels["metadata_team"] == "search"
    assert "metadata_owner" not in up.labels, "only allow-listed metadata keys become labels"
    assert value(operator, "sandbox_memory_limit_bytes", **labels) == 256 * 1024**2
    assert value(operator, "sandbox_cpu_limit_cores", **labels) == 0.25

    cpu_before = value(operator, "sandbox_cpu_seconds_total", **labels) or 0.0
    memory_before = value(operator, "sandbox_memory_used_bytes", **labels) or 0.0
    code = "hold = bytearray(600 * 1024 * 1024)\nimport time\nt = time.time()\nwhile time.time() - t < 1.5: pass\n"
    http_json(f"http://{ip}:49983/execute", {"code": code}, timeout=120)
    wait_until(
        lambda: (value(operator, "sandbox_memory_used_bytes", **labels) or 0) > memory_before + 300 * 1024**2,
        timeout=30, message="memory usage to rise by the 600 MiB the sandbox holds",
    )
    wait_until(
        lambda: (value(operator, "sandbox_cpu_seconds_total", **labels) or 0) >= cpu_before + 1.0,
        timeout=30, message="cpu seconds to rise by the 1.5 s the sandbox burned",
    )
    wait_until(lambda: (value(operator, "sandbox_executions_total", kind="code", **labels) or 0) >= 1,
               timeout=30, message="an execution counted")
    # The snapshot and the agent's activity reach the Sandbox status (the idle timeout reads it).
    status = wait_until(
        lambda: (s := (cluster.get_json("sandbox", "u1", "-n", namespace) or {}).get("status", {}))
        .get("usage", {}).get("memoryBytes", 0) > memory_before + 300 * 1024**2 and s,
        timeout=30, message="status.usage with the new memory figure",
    )
    assert status["lastActivityAt"] >= status["startedAt"]


def test_deleted_sandbox_series_disappear(
    cluster: Cluster, namespace: str, operator: OperatorProcess, agents: PodAgents
) -> None:
    cluster.apply(sandbox_manifest("gone"), namespace)
    wait_phase(cluster, namespace, "gone", "Running")
    labels = {"namespace": namespace, "sandbox": "gone"}
    wait_until(lambda: value(operator, "sandbox_up", **labels) == 1.0, timeout=60, message="sandbox_up 1")
    cluster.kubectl("delete", "sandbox", "gone", "-n", namespace)
    wait_until(
        lambda: not any(s.labels.get("sandbox") == "gone" and s.labels.get("namespace") == namespace
                        for f in text_string_to_metric_families(operator.metrics_text()) for s in f.samples),
        timeout=30, message="every series of the deleted sandbox gone",
    )


def test_unreachable_agent_reports_down_without_numbers(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    cluster.apply(sandbox_manifest("noagent"), namespace)
    wait_phase(cluster, namespace, "noagent", "Running")
    labels = {"namespace": namespace, "sandbox": "noagent"}
    wait_until(lambda: value(operator, "sandbox_up", **labels) == 0.0, timeout=30, message="sandbox_up 0")
    assert value(operator, "sandbox_memory_used_bytes", **labels) is None
    assert value(operator, "sandbox_cpu_seconds_total", **labels) is None
