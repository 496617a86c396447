"""SandboxPool: warm pods are kept, claimed by matching Sandboxes, and refilled."""

from __future__ import annotations

import json

import pytest

from testlib import (
    Cluster,
    OperatorProcess,
    PhaseWatch,
    children,
    governing_policies,
    sandbox_manifest,
    wait_phase,
    wait_until,
)

SHARED_DENY = "sbx-net-it-base-deny"  # the policy of it-base's deny-class pods in the namespace

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


def _event_messages(cluster: Cluster, namespace: str, name: str) -> list[str]:
    listing = cluster.get_json("events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    return [str(event.get("message")) for event in (listing or {}).get("items", [])]


def test_pool_fills_serves_a_claim_and_refills(cluster: Cluster, namespace: str) -> None:
    cluster.apply(POOL, namespace)
    wait_until(lambda: len(warm_pods(cluster, namespace)) == 2, timeout=60, message="2 warm pods")
    wait_until(
        lambda: (cluster.get_json("sandboxpool", "warm", "-n", namespace) or {}).get("status", {}).get("ready") == 2,
        timeout=30,
        message="pool status ready=2",
    )
    warm_names = {p["metadata"]["name"] for p in warm_pods(cluster, namespace)}
    # Warm pods start under their template's shared policy (written before the first of them).
    for name in warm_names:
        assert governing_policies(cluster, namespace, name) == [SHARED_DENY]

    watch = PhaseWatch(cluster, namespace, "pooled")
    try:
        cluster.apply(sandbox_manifest("pooled"), namespace)
        # The warm pod is Running already: its claim writes the status once, straight to Running.
        assert [phase for phase in watch.until("Running") if phase] == ["Running"], watch.phases
    finally:
        watch.close()
    body = wait_phase(cluster, namespace, "pooled", "Running")
    assert body["status"]["podName"] in warm_names, "the sandbox should have taken a warm pod"
    # Still one Event per transition: New -> Creating and Creating -> Running.
    reasons = wait_until(
        lambda: (
            _event_messages(cluster, namespace, "pooled")
            if len(_event_messages(cluster, namespace, "pooled")) >= 2
            else None
        ),
        timeout=30,
        message="2 events",
    )
    assert any("New → Creating" in m for m in reasons) and any("Creating → Running" in m for m in reasons), reasons
    pod = cluster.get_json("pod", body["status"]["podName"], "-n", namespace)
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "Sandbox"
    assert pod["metadata"]["labels"]["sandbox.dev/sandbox"] == "pooled"
    assert "sandbox.dev/pool" not in pod["metadata"]["labels"]
    # The warm pod's workspace claim moved with it.
    found = children(cluster, namespace, "pooled")
    assert len(found["pvc"]) == 1 and found["pods"] == [body["status"]["podName"]]

    # The pool refills to its size with new pods.
    wait_until(
        lambda: (
            len(warm_pods(cluster, namespace)) == 2
            and {p["metadata"]["name"] for p in warm_pods(cluster, namespace)} != warm_names
        ),
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
    claims = [
        v["persistentVolumeClaim"]["claimName"] for v in new_pod["spec"]["volumes"] if "persistentVolumeClaim" in v
    ]
    assert claims == [workspace]


def test_a_claimed_warm_pod_moves_to_the_policy_of_its_sandbox(cluster: Cluster, namespace: str) -> None:
    cluster.apply(POOL, namespace)
    wait_until(lambda: len(warm_pods(cluster, namespace)) == 2, timeout=60, message="2 warm pods")
    warm_names = {p["metadata"]["name"] for p in warm_pods(cluster, namespace)}
    own = {"egress": "allowList", "egressAllow": ["203.0.113.0/24"]}  # egress is no part of the pod spec
    cluster.apply(sandbox_manifest("listed", network=own), namespace)
    body = wait_phase(cluster, namespace, "listed", "Running")
    pod_name = body["status"]["podName"]
    assert pod_name in warm_names, "an allow-list of its own does not keep a sandbox off a warm pod"
    own_policy = children(cluster, namespace, "listed")["networkpolicies"]
    assert governing_policies(cluster, namespace, pod_name) == own_policy and len(own_policy) == 1
    policy = cluster.get_json("networkpolicy", own_policy[0], "-n", namespace)
    assert {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]} in policy["spec"]["egress"]
    for name in warm_names - {pod_name}:  # the other warm pod keeps the shared one
        assert governing_policies(cluster, namespace, name) == [SHARED_DENY]


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
    cluster.kubectl(
        "patch", "sandboxpool", "warm", "-n", namespace, "--type=merge", "-p", json.dumps({"spec": {"size": 0}})
    )
    wait_until(
        lambda: not (cluster.get_json("pods", "-n", namespace, "-l", "sandbox.dev/pool=warm") or {}).get("items"),
        timeout=60,
        message="warm pods removed",
    )


def pool_status(cluster: Cluster, namespace: str) -> dict:  # type: ignore[type-arg]
    return dict((cluster.get_json("sandboxpool", "warm", "-n", namespace) or {}).get("status") or {})


def workspace_of(pod: dict) -> str:  # type: ignore[type-arg]
    (claim,) = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    return str(claim)


def pool_claims(cluster: Cluster, namespace: str) -> set[str]:
    listing = cluster.get_json("pvc", "-n", namespace, "-l", "sandbox.dev/pool=warm") or {}
    return {c["metadata"]["name"] for c in listing.get("items", []) if not c["metadata"].get("deletionTimestamp")}


def test_a_failed_warm_pod_is_replaced(cluster: Cluster, namespace: str) -> None:
    cluster.apply(POOL, namespace)
    wait_until(lambda: len(warm_pods(cluster, namespace)) == 2, timeout=60, message="2 warm pods")
    victim = warm_pods(cluster, namespace)[0]
    name, claim = victim["metadata"]["name"], workspace_of(victim)
    patch = {"status": {"phase": "Failed", "reason": "Evicted", "message": "the node was low on memory"}}
    cluster.kubectl(
        "patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(patch)
    )

    wait_until(
        lambda: cluster.get_json("pod", name, "-n", namespace) is None,
        timeout=60,
        message=f"failed warm pod {name} deleted",
    )
    wait_until(
        lambda: cluster.get_json("pvc", claim, "-n", namespace) is None,
        timeout=60,
        message=f"its workspace claim {claim} deleted",
    )
    wait_until(
        lambda: len(warm_pods(cluster, namespace)) == 2 and pool_status(cluster, namespace).get("ready") == 2,
        timeout=60,
        message="pool back to 2 ready warm pods",
    )
    assert name not in {p["metadata"]["name"] for p in warm_pods(cluster, namespace)}


def test_a_warm_pod_deleted_out_of_band_leaves_no_claim_behind(cluster: Cluster, namespace: str) -> None:
    cluster.apply(POOL, namespace)
    wait_until(lambda: len(warm_pods(cluster, namespace)) == 2, timeout=60, message="2 warm pods")
    victim = warm_pods(cluster, namespace)[0]
    name, claim = victim["metadata"]["name"], workspace_of(victim)
    cluster.kubectl("delete", "pod", name, "-n", namespace, "--wait=false")

    # The claim goes once no pod uses it (after a short grace period the operator allows new claims).
    wait_until(
        lambda: cluster.get_json("pvc", claim, "-n", namespace) is None,
        timeout=60,
        message=f"workspace claim {claim} of the deleted warm pod deleted",
    )

    def refilled_without_leaks() -> bool:
        pods = warm_pods(cluster, namespace)
        return len(pods) == 2 and pool_claims(cluster, namespace) == {workspace_of(p) for p in pods}

    wait_until(refilled_without_leaks, timeout=60, message="2 warm pods, one claim each, no other pool claims")


def test_status_claimed_counts_sandboxes_on_claimed_pods(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.apply(POOL, namespace)

    def status_is(ready: int, claimed: int) -> bool:
        status = pool_status(cluster, namespace)
        return status.get("ready") == ready and status.get("claimed") == claimed

    wait_until(lambda: status_is(2, 0), timeout=60, message="pool status ready=2, claimed=0")
    for name in ("pooled-a", "pooled-b"):
        cluster.apply(sandbox_manifest(name), namespace)
        body = wait_phase(cluster, namespace, name, "Running")
        pod = cluster.get_json("pod", body["status"]["podName"], "-n", namespace)
        assert pod["metadata"]["annotations"].get("sandbox.dev/claimed-from-pool") == "warm", f"{name} cold-started"
        # The next one must find a ready warm pod too.
        wait_until(lambda: pool_status(cluster, namespace).get("ready") == 2, timeout=60, message="pool refilled")
    wait_until(lambda: pool_status(cluster, namespace).get("claimed") == 2, timeout=30, message="claimed=2")

    # A suspended sandbox no longer runs on the pod it took: it stops counting.
    cluster.kubectl(
        "patch", "sandbox", "pooled-a", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspended":true}}'
    )
    wait_phase(cluster, namespace, "pooled-a", "Suspended")
    wait_until(lambda: pool_status(cluster, namespace).get("claimed") == 1, timeout=30, message="claimed=1")
    series = f'sandbox_operator_pool_claimed{{namespace="{namespace}",pool="warm"}} 1.0'
    wait_until(lambda: series in operator.metrics_text(), timeout=30, message=f"metric {series}")


def test_the_scale_subresource_serves_an_autoscaler(cluster: Cluster, namespace: str) -> None:
    """What a HorizontalPodAutoscaler does with a pool: GET .../scale for the selector of the pods it
    averages metrics over and the current replicas, then PUT the Scale with new replicas (and what
    `kubectl scale` does: PATCH it). spec.replicas is spec.size; status.selector the warm pods'."""
    cluster.apply(POOL, namespace)
    scale_path = f"/apis/sandbox.dev/v1alpha1/namespaces/{namespace}/sandboxpools/warm/scale"

    def scale() -> dict:  # type: ignore[type-arg]
        return dict(json.loads(cluster.kubectl("get", "--raw", scale_path).stdout))

    def filled_with_selector() -> dict | None:  # type: ignore[type-arg]
        read = scale()
        status = read.get("status") or {}
        return read if status.get("selector") and status.get("replicas") == 2 else None

    # The operator writes the selector with the pool's first status.
    current = wait_until(filled_with_selector, timeout=60, message="Scale with status.selector and 2 ready replicas")
    assert (current["apiVersion"], current["kind"]) == ("autoscaling/v1", "Scale")
    assert current["spec"]["replicas"] == 2
    selector = current["status"]["selector"]
    assert selector == "app.kubernetes.io/managed-by=sandbox-operator,sandbox.dev/pool=warm"
    selected = cluster.get_json("pods", "-n", namespace, "-l", selector)["items"]
    assert {p["metadata"]["name"] for p in selected} == {p["metadata"]["name"] for p in warm_pods(cluster, namespace)}

    # HPA: an update of the Scale it read (its resourceVersion is the pool's: a conflict if it moved).
    current["spec"]["replicas"] = 3
    cluster.kubectl("replace", "--raw", scale_path, "-f", "-", input=json.dumps(current))
    assert cluster.get_json("sandboxpool", "warm", "-n", namespace)["spec"]["size"] == 3
    wait_until(lambda: len(warm_pods(cluster, namespace)) == 3, timeout=60, message="3 warm pods")
    wait_until(lambda: scale()["status"].get("replicas") == 3, timeout=60, message="Scale status.replicas=3")

    # kubectl scale / a patch of the subresource.
    cluster.kubectl(
        "patch", "sandboxpool", "warm", "-n", namespace, "--subresource=scale", "--type=merge",
        "-p", json.dumps({"spec": {"replicas": 1}}),
    )  # fmt: skip
    assert cluster.get_json("sandboxpool", "warm", "-n", namespace)["spec"]["size"] == 1
    assert scale()["spec"]["replicas"] == 1
    wait_until(lambda: len(warm_pods(cluster, namespace)) == 1, timeout=60, message="1 warm pod")
    assert scale()["status"]["selector"] == selector
