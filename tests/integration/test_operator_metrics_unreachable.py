"""On the kwok node no agent answers on a Running sandbox's pod IP: the usage series say so."""

from __future__ import annotations

from testlib import Cluster, OperatorProcess, sandbox_manifest, wait_phase, wait_until


def test_unreachable_agent_reports_down_without_numbers(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    cluster.apply(sandbox_manifest("noagent"), namespace)
    wait_phase(cluster, namespace, "noagent", "Running")
    labels = {"namespace": namespace, "sandbox": "noagent"}
    wait_until(lambda: operator.value("sandbox_up", **labels) == 0.0, timeout=30, message="sandbox_up 0")
    assert operator.value("sandbox_memory_used_bytes", **labels) is None
    assert operator.value("sandbox_cpu_seconds_total", **labels) is None
