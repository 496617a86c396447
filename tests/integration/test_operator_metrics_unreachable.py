"""On the kwok node no agent answers on a Running sandbox's pod IP: the usage series say so."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from testlib import Cluster, OperatorProcess, sandbox_manifest, wait_phase, wait_until


def value(operator: OperatorProcess, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(operator.metrics_text()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def test_unreachable_agent_reports_down_without_numbers(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    cluster.apply(sandbox_manifest("noagent"), namespace)
    wait_phase(cluster, namespace, "noagent", "Running")
    labels = {"namespace": namespace, "sandbox": "noagent"}
    wait_until(lambda: value(operator, "sandbox_up", **labels) == 0.0, timeout=30, message="sandbox_up 0")
    assert value(operator, "sandbox_memory_used_bytes", **labels) is None
    assert value(operator, "sandbox_cpu_seconds_total", **labels) is None
