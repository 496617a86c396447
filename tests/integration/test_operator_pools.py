"""SandboxPool: warm pods are kept, claimed by matching Sandboxes, and refilled."""

from __future__ import annotations

import json

import pytest

from testlib import Cluster, OperatorProcess, children, sandbox_manifest, wait_phase, wait_until

POOL = """
apiVersion: sandbox.dev/v1alpha1
kind: SandboxPool
metadata: {name: warm}
spec: {template: it-base, size: 2}
"""


@pytest.fixture(autouse=True)
def _operator_running(operator: OperatorProcess) -> None:
    assert operator.process.poll() is None, f"operator died:\n{operator.log_tail()}"


def warm_pods(cluster: Cluster, namespace: str) -> list[dict]:  # type: ignore[type-arg]
    listing = cluster.get_json("pods", "-n", namespace, "-l", "sandbox.dev/pool=warm")
    return [p for p in (listing or {}).get("items", []) if p["status"].get("phase") == "Running"]


def test_pool_fills_serves_a_claim_and_refills(cluster: Cluster, namespace: str) -> None:
    cluster.apply(POOL, namespace)
    wait_until(lambda: len(warm_pods(cluster, namespace)) == 2, timeout=60, message="2 warm pods")
    wait_until(
        lambda: (cluster.get_json("sandboxpool", "warm", "-n", namespace) or {}).get("status", {}).get("ready") == 2,
        timeout=30,
        message="pool status ready=2",
    )
    warm_names = {p["metadata"]["name"] for p in warm_pods(cluster, namespace)}

    cluster.apply(sandbox_manifest("pooled"), namespace)
    body = wait_phase(cluster, namespace, "pooled", "Running")
    assert body["status"]["podName"] in warm_names, "the sandbox should have taken a warm pod"
    pod = cluster.get_json("pod", body["status"]["podName"], "-n", namespace)
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "Sandbox"
    assert pod["metadata"]["labels"]["sandbox.dev/sandbox"] == "pooled"
    assert "sandbox.dev/pool" not in pod["metadata"]["labels"]
    # The warm pod's workspace claim moved with it.
    found = children(cluster, namespace, "pooled")
    assert len(found["pvc"]) == 1 and found["pods"] == [body["status"]["podName"]]

    # The pool refills to its size with new pods.
    wait_until(
        lambda: len(warm_pods(cluster, namespace)) == 2
        and {p["metadata"]["name"] for p in warm_pods(cluster, namespace)} != warm_names,
        timeout=60,
        message="pool refilled",
    )

    # A claimed sandbox suspends and resumes on the workspace it took over.
    workspace = found["pvc"][0]
    cluster.kubectl("patch", "sandbox", "pooled", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspended":true}}')
    wait_phase(cluster, namespace, "pooled", "Suspended")
    cluster.kubectl("patch", "sandbox", "pooled", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspended":false}}')
    resumed = wait_phase(cluster, namespace, "pooled", "Running")
    new_pod = cluster.get_json("pod", resumed["status"]["podName"], "-n", namespace)
    claims = [v["persistentVolumeClaim"]["claimName"] for v in new_pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [workspace]


def test_sandbox_that_differs_from_pool_pods_cold_starts(cluster: Cluster, namespace: str) -> None:
    cluster.apply(POOL, namespace)
    wait_until(lambda: len(warm_pods(cluster, namespace)) == 2, timeout=60, message="2 warm pods")
    warm_names = {p["metadata"]["name"] for p in warm_pods(cluster, namespace)}
    cluster.apply(sandbox_manifest("custom", env={"MODE": "special"}), namespace)
    body = wait_phase(cluster, namespace, "custom", "Running")
    assert body["status"]["podName"] not in warm_names
    assert {p["metadata"]["name"] for p in warm_pods(cluster, namespace)} == warm_names


def test_pool_scales_down(cluster: Cluster, namespace: str) -> None:
    cluster.apply(POOL, namespace)
    wait_until(lambda: len(warm_pods(cluster, namespace)) == 2, timeout=60, message="2 warm pods")
    cluster.kubectl("patch", "sandboxpool", "warm", "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"size": 0}}))
    wait_until(
        lambda: not (cluster.get_json("pods", "-n", namespace, "-l", "sandbox.dev/pool=warm") or {}).get("items"),
        timeout=60,
        message="warm pods removed",
    )
