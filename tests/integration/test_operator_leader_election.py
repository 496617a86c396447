"""Two operator replicas with leader election (docs/operator.md, "High availability"): only the
Lease's holder acts; when it is SIGKILLed the standby takes over once the Lease expires; a SIGTERMed
leader releases the Lease. Real API server, two real operator processes."""

from __future__ import annotations

import json
import secrets
import signal
from datetime import datetime
from pathlib import Path
from typing import Any

from testlib import Cluster, OperatorProcess, sandbox_manifest, start_operator, wait_until

LEASE = "sandbox-operator"
DURATION, DEADLINE, RETRY = 4, 3, 0.5


def elect_args(namespace: str, identity: str) -> tuple[str, ...]:
    return (
        "--leader-election",
        "--leader-election-namespace",
        namespace,
        "--leader-election-identity",
        identity,
        "--lease-duration",
        str(DURATION),
        "--lease-renew-deadline",
        str(DEADLINE),
        "--lease-retry-period",
        str(RETRY),
    )


def lease(cluster: Cluster, namespace: str) -> dict[str, Any]:
    return cluster.get_json("lease", LEASE, "-n", namespace) or {}


def holder(cluster: Cluster, namespace: str) -> str | None:
    return (lease(cluster, namespace).get("spec") or {}).get("holderIdentity")


def acting_writes(process: OperatorProcess) -> float:
    """API writes of the replica other than its Lease's: what it did to sandboxes and their children."""
    return sum(
        float(sample.value)
        for sample in process.samples("sandbox_operator_api_writes_total")
        if not sample.labels["resource"].startswith("leases")
    )


def pods_of(cluster: Cluster, namespace: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pod in (cluster.get_json("pods", "-n", namespace) or {}).get("items", []):
        owner = (pod["metadata"].get("labels") or {}).get("sandbox.dev/sandbox")
        if owner:
            counts[owner] = counts.get(owner, 0) + 1
    return counts


def running(cluster: Cluster, namespace: str, name: str) -> bool:
    body = cluster.get_json("sandbox", name, "-n", namespace) or {}
    return (body.get("status") or {}).get("phase") == "Running"


def test_the_standby_takes_over_a_killed_leader_without_double_acting(
    cluster: Cluster, base_template: str, tmp_path: Path
) -> None:
    namespace = f"ha-{secrets.token_hex(3)}"  # outside the session operator's op-* scope
    cluster.kubectl("create", "namespace", namespace)
    first = start_operator(cluster, tmp_path / "a.log", namespace, extra_args=elect_args(namespace, "replica-a"))
    second: OperatorProcess | None = None
    try:
        wait_until(lambda: holder(cluster, namespace) == "replica-a", timeout=30, message="replica-a to lead")
        second = start_operator(cluster, tmp_path / "b.log", namespace, extra_args=elect_args(namespace, "replica-b"))
        assert second.value("sandbox_operator_leader") == 0 and first.value("sandbox_operator_leader") == 1

        cluster.apply(sandbox_manifest("before", base_template), namespace)
        wait_until(lambda: running(cluster, namespace, "before"), timeout=60, message="the first sandbox Running")
        assert acting_writes(second) == 0  # the standby touched nothing
        assert pods_of(cluster, namespace) == {"before": 1}

        renewed = lease(cluster, namespace)["spec"]["renewTime"]
        first.kill(signal.SIGKILL)
        wait_until(lambda: holder(cluster, namespace) == "replica-b", timeout=30, message="replica-b to take over")
        spec = lease(cluster, namespace)["spec"]
        handover = datetime.fromisoformat(spec["acquireTime"]) - datetime.fromisoformat(renewed)
        # Not before the killed leader's Lease ran out (no double acting), and within a few looks after.
        assert DURATION <= handover.total_seconds() <= DURATION + DEADLINE + 4 * RETRY, handover
        assert spec["leaseTransitions"] >= 1
        wait_until(lambda: second.value("sandbox_operator_leader") == 1, timeout=10, message="replica-b's gauge")

        cluster.apply(sandbox_manifest("after", base_template), namespace)
        wait_until(lambda: running(cluster, namespace, "after"), timeout=60, message="the second sandbox Running")
        cluster.kubectl(
            "patch", "sandbox", "before", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspended":true}}'
        )

        def suspended() -> bool:
            body = cluster.get_json("sandbox", "before", "-n", namespace) or {}
            return (body.get("status") or {}).get("phase") == "Suspended"

        wait_until(suspended, timeout=60, message="the new leader to suspend the first sandbox")
        assert pods_of(cluster, namespace) == {"after": 1}  # no duplicate, no orphan

        # A clean stop hands over at once: the Lease is released, not left to expire.
        assert second.kill(signal.SIGTERM) in (0, -signal.SIGTERM), second.log_tail()
        released = lease(cluster, namespace)["spec"]
        assert not released.get("holderIdentity"), json.dumps(released)
    finally:
        for process in (first, second):
            if process is not None and process.process.poll() is None:
                process.kill(signal.SIGKILL)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
