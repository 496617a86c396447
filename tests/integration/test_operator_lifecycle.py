"""The operator against a real API server + kwok: lifecycle, suspend/resume, timeouts, failures."""

from __future__ import annotations

import ipaddress
import json
import secrets
from datetime import UTC, datetime, timedelta

import pytest

from testlib import (
    Cluster,
    OperatorProcess,
    PhaseWatch,
    children,
    events_for,
    governing_policies,
    sandbox,
    sandbox_manifest,
    wait_phase,
    wait_until,
)

POD_RANGE = ipaddress.ip_network("127.1.0.0/16")


@pytest.fixture(autouse=True)
def _operator_running(operator: OperatorProcess) -> None:
    assert operator.process.poll() is None, f"operator died:\n{operator.log_tail()}"


def test_create_reaches_running_with_children(cluster: Cluster, namespace: str) -> None:
    cluster.apply(sandbox_manifest("sb1"), namespace)
    body = wait_phase(cluster, namespace, "sb1", "Running")
    status = body["status"]
    assert ipaddress.ip_address(status["podIP"]) in POD_RANGE
    assert status["sandboxID"].isalnum() and status["sandboxID"].islower()
    assert status["startedAt"] and status["expiresAt"]
    assert status["observedGeneration"] == body["metadata"]["generation"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    found = children(cluster, namespace, "sb1")
    assert found["pods"] == [status["podName"]]
    assert len(found["pvc"]) == 1 and found["services"] == []  # a Service is opt-in (network.service)
    pod = cluster.get_json("pod", status["podName"], "-n", namespace)
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["cpu"] in ("250m", "0.25")
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    wait_until(
        lambda: "Started" in events_for(cluster, namespace, "sb1") or None, timeout=30, message="a Started event"
    )


def _refuse_network_policies(cluster: Cluster, namespace: str, name: str) -> None:
    """A ValidatingAdmissionPolicy (the API server's own CEL admission) that refuses every
    NetworkPolicy write in `namespace`, in effect once a server-side dry run is refused."""
    cluster.apply(f"""
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {name}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: [networking.k8s.io]
      apiVersions: [v1]
      operations: [CREATE, UPDATE]
      resources: [networkpolicies]
  validations:
  - expression: "false"
    message: NetworkPolicies are refused here (test)
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {name}}}
spec:
  policyName: {name}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels: {{kubernetes.io/metadata.name: {namespace}}}
""")
    probe = json.dumps(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "probe", "namespace": namespace},
            "spec": {"podSelector": {}},
        }
    )

    def refused() -> bool:
        result = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=probe, check=False)
        return result.returncode != 0 and "refused here" in result.stderr

    wait_until(refused, timeout=60, message="the admission policy in effect")


def test_no_pod_starts_before_its_network_policy_is_written(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    guard = f"refuse-netpol-{namespace[-6:]}"
    _refuse_network_policies(cluster, namespace, guard)
    try:
        cluster.apply(sandbox_manifest("guarded"), namespace)
        wait_until(
            lambda: "NetworkPolicies are refused here" in operator.log_tail(400),
            timeout=60,
            message="the operator's policy write refused",
        )
        # Refused, and retried with backoff: no pod (nor anything that would run one) meanwhile.
        again = operator.log_tail(4000).count("NetworkPolicies are refused here")
        wait_until(
            lambda: operator.log_tail(4000).count("NetworkPolicies are refused here") > again,
            timeout=60,
            message="a retry refused too",
        )
        assert children(cluster, namespace, "guarded")["pods"] == []
        assert (sandbox(cluster, namespace, "guarded").get("status") or {}).get("phase") != "Running"
    finally:
        cluster.kubectl("delete", "validatingadmissionpolicybinding", guard, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "validatingadmissionpolicy", guard, "--ignore-not-found", check=False)
    running = wait_phase(cluster, namespace, "guarded", "Running", timeout=90)
    assert governing_policies(cluster, namespace, running["status"]["podName"]) == ["sbx-net-it-base-deny"]


def test_suspend_and_resume_keep_the_workspace(cluster: Cluster, namespace: str) -> None:
    cluster.apply(sandbox_manifest("sb2"), namespace)
    running = wait_phase(cluster, namespace, "sb2", "Running")
    first_pod = running["status"]["podName"]
    pvc_before = children(cluster, namespace, "sb2")["pvc"]
    pvc_uid = cluster.get_json("pvc", pvc_before[0], "-n", namespace)["metadata"]["uid"]

    cluster.kubectl("patch", "sandbox", "sb2", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspended":true}}')
    suspended = wait_phase(cluster, namespace, "sb2", "Suspended")
    assert next(c for c in suspended["status"]["conditions"] if c["type"] == "Suspended")["status"] == "True"
    wait_until(lambda: children(cluster, namespace, "sb2")["pods"] == [], timeout=30, message="pod deleted")
    kept = children(cluster, namespace, "sb2")
    assert kept["pvc"] == pvc_before

    cluster.kubectl("patch", "sandbox", "sb2", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspended":false}}')
    resumed = wait_phase(cluster, namespace, "sb2", "Running")
    pod = cluster.get_json("pod", resumed["status"]["podName"], "-n", namespace)
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims == pvc_before
    assert cluster.get_json("pvc", pvc_before[0], "-n", namespace)["metadata"]["uid"] == pvc_uid
    assert first_pod  # the pod name may be reused (deterministic), the workspace is the same claim


def test_a_sandbox_created_suspended_never_runs_until_resumed(cluster: Cluster, namespace: str) -> None:
    watch = PhaseWatch(cluster, namespace, "sb-parked")
    try:
        cluster.apply(sandbox_manifest("sb-parked", suspended=True), namespace)
        phases = watch.until("Suspended")
    finally:
        watch.close()
    assert "Running" not in phases, phases
    parked = sandbox(cluster, namespace, "sb-parked")
    assert parked["status"].get("startedAt") is None and parked["status"]["reason"] == "SuspendRequested"
    made = children(cluster, namespace, "sb-parked")
    assert made["pods"] == [] and len(made["pvc"]) == 1
    # No policy of its own: its pod will share its template's deny policy, written already.
    assert made["networkpolicies"] == []
    assert cluster.get_json("networkpolicy", "sbx-net-it-base-deny", "-n", namespace)

    cluster.kubectl(
        "patch", "sandbox", "sb-parked", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspended":false}}'
    )
    running = wait_phase(cluster, namespace, "sb-parked", "Running")
    assert running["status"]["startedAt"] and running["status"]["reason"] == "Resumed"
    pod = cluster.get_json("pod", running["status"]["podName"], "-n", namespace)
    assert [
        v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v
    ] == made["pvc"]


def _parse(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _reached_at(body: dict[str, object], phase: str = "Terminated") -> datetime:
    """When the sandbox reached `phase` (Suspended or Terminated): its condition's transition."""
    conditions = body["status"]["conditions"]  # type: ignore[index]
    reached = next(c for c in conditions if c["type"] == phase and c["status"] == "True")
    return _parse(reached["lastTransitionTime"])


def test_max_lifetime_terminates(cluster: Cluster, namespace: str) -> None:
    cluster.apply(sandbox_manifest("sb3", timeouts={"idle": "0", "maxLifetime": "3s", "execution": "0"}), namespace)
    # Running may last less than a poll on a busy machine: that it started is in startedAt.
    terminated = wait_phase(cluster, namespace, "sb3", "Terminated", timeout=60)
    status = terminated["status"]
    assert status["reason"] == "MaxLifetime"
    created = _parse(terminated["metadata"]["creationTimestamp"])
    assert status["startedAt"] and _reached_at(terminated) >= created + timedelta(seconds=3)
    wait_until(lambda: children(cluster, namespace, "sb3")["pods"] == [], timeout=30, message="pod deleted")


@pytest.mark.parametrize(("on_idle", "phase"), [("suspend", "Suspended"), ("terminate", "Terminated")])
def test_idle_timeout_counts_from_last_activity(cluster: Cluster, namespace: str, on_idle: str, phase: str) -> None:
    name = f"idle-{on_idle}"
    cluster.apply(sandbox_manifest(name, onIdle=on_idle, timeouts={"idle": "1h", "maxLifetime": "2h"}), namespace)
    wait_phase(cluster, namespace, name, "Running")
    # Activity (as the agent reports it) a moment ahead, then a short idle timeout: the deadline is
    # activity + idle, whenever this test gets to run. (Activity first: the other order could fire
    # at startedAt + 2 s already.)
    activity = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    cluster.kubectl(
        "patch",
        "sandbox",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"lastActivityAt": activity.strftime("%Y-%m-%dT%H:%M:%SZ")}}),
    )
    cluster.kubectl(
        "patch",
        "sandbox",
        name,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"timeouts": {"idle": "2s"}}}),
    )
    body = wait_phase(cluster, namespace, name, phase, timeout=60)
    assert body["status"]["reason"] == "IdleTimeout"
    assert _reached_at(body, phase) >= activity + timedelta(seconds=2), "fired before activity + idle"


def test_delete_removes_every_child(cluster: Cluster, namespace: str) -> None:
    cluster.apply(sandbox_manifest("sb4"), namespace)
    wait_phase(cluster, namespace, "sb4", "Running")
    cluster.kubectl("delete", "sandbox", "sb4", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_until(
        lambda: children(cluster, namespace, "sb4") == {"pods": [], "pvc": [], "services": [], "networkpolicies": []},
        timeout=60,
        message="all children of sb4 gone",
    )


def test_pod_deleted_out_of_band_is_recreated(cluster: Cluster, namespace: str) -> None:
    cluster.apply(sandbox_manifest("sb5"), namespace)
    running = wait_phase(cluster, namespace, "sb5", "Running")
    pod_name = running["status"]["podName"]
    old_uid = cluster.get_json("pod", pod_name, "-n", namespace)["metadata"]["uid"]
    cluster.kubectl("delete", "pod", pod_name, "-n", namespace, "--wait=false")

    def replaced() -> bool:
        body = sandbox(cluster, namespace, "sb5")
        pod = cluster.get_json("pod", body["status"].get("podName") or pod_name, "-n", namespace)
        return bool(pod and pod["metadata"]["uid"] != old_uid and body["status"]["phase"] == "Running")

    wait_until(replaced, timeout=60, message="a new pod with a new uid, sandbox Running")
    wait_until(
        lambda: "PodRecreated" in events_for(cluster, namespace, "sb5") or None,
        timeout=30,
        message="a PodRecreated event",
    )


def test_pod_failure_sets_error_with_reason(cluster: Cluster, namespace: str) -> None:
    cluster.apply(sandbox_manifest("sb6"), namespace)
    running = wait_phase(cluster, namespace, "sb6", "Running")
    pod_name = running["status"]["podName"]
    terminated = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    patch = {
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"name": "sandbox", "image": "x", "imageID": "", "ready": False, "restartCount": 0, "state": terminated}
            ],
        }
    }
    cluster.kubectl(
        "patch", "pod", pod_name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(patch)
    )
    body = wait_phase(cluster, namespace, "sb6", "Error")
    assert body["status"]["reason"] == "OOMKilled"


def test_resources_over_template_max_error_and_nothing_created(cluster: Cluster, namespace: str) -> None:
    cluster.apply(sandbox_manifest("big", resources={"cpu": "8", "memory": "1Gi"}), namespace)
    body = wait_phase(cluster, namespace, "big", "Error")
    assert body["status"]["reason"] == "ResourcesExceedTemplateMax"
    assert "cpu" in body["status"]["message"]
    assert children(cluster, namespace, "big") == {"pods": [], "pvc": [], "services": [], "networkpolicies": []}


def test_template_policies_refuse_images_and_namespaces_and_cap_lifetimes(cluster: Cluster, namespace: str) -> None:
    template = f"policy-{namespace[-6:]}"
    elsewhere = f"op-elsewhere-{secrets.token_hex(3)}"
    cluster.apply(f"""
apiVersion: sandbox.dev/v1alpha1
kind: SandboxTemplate
metadata: {{name: {template}}}
spec:
  image: ghcr.io/sandbox-operator/sandbox-base:dev
  imagePolicy: {{mode: AllowList, allow: [ghcr.io/sandbox-operator/]}}
  allowedNamespaces: [{namespace}]
  resources: {{default: {{cpu: 250m, memory: 256Mi, disk: 1Gi}}}}
  timeouts: {{maxLifetimeLimit: 2h}}
""")
    cluster.kubectl("create", "namespace", elsewhere)
    try:
        cluster.apply(sandbox_manifest("miner", template=template, image="docker.io/evil/miner:1"), namespace)
        cluster.apply(
            sandbox_manifest("forever", template=template, timeouts={"maxLifetime": "0", "idle": "0"}), namespace
        )
        cluster.apply(sandbox_manifest("stranger", template=template), elsewhere)

        refused = wait_phase(cluster, namespace, "miner", "Error")
        assert refused["status"]["reason"] == "ImageNotAllowed"
        assert "docker.io/evil/miner:1" in refused["status"]["message"]
        assert children(cluster, namespace, "miner") == {"pods": [], "pvc": [], "services": [], "networkpolicies": []}

        # maxLifetime 0 ("no limit") gets the template's cap.
        running = wait_phase(cluster, namespace, "forever", "Running")
        created = datetime.fromisoformat(running["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
        expires = datetime.fromisoformat(running["status"]["expiresAt"].replace("Z", "+00:00"))
        assert expires - created == timedelta(hours=2)

        stranger = wait_phase(cluster, elsewhere, "stranger", "Error")
        assert stranger["status"]["reason"] == "TemplateNotAllowed"
        assert namespace not in stranger["status"]["message"]  # other tenants' namespaces are not told
        assert children(cluster, elsewhere, "stranger")["pods"] == []
    finally:
        cluster.kubectl("delete", "namespace", elsewhere, "--wait=false", "--ignore-not-found", check=False)
        cluster.kubectl("delete", "sandboxtemplate", template, "--ignore-not-found", check=False)


def test_unknown_template_reports_it(cluster: Cluster, namespace: str) -> None:
    cluster.apply(sandbox_manifest("orphan", template="does-not-exist"), namespace)
    body = wait_until(
        lambda: (
            (b := cluster.get_json("sandbox", "orphan", "-n", namespace))
            and (b.get("status") or {}).get("reason") == "TemplateNotFound"
            and b
        ),
        timeout=30,
        message="reason TemplateNotFound",
    )
    assert "does-not-exist" in body["status"]["message"]
    assert children(cluster, namespace, "orphan")["pods"] == []


def test_network_change_moves_the_pod_between_shared_and_own_policies_and_deleted_children_come_back(
    cluster: Cluster, namespace: str
) -> None:
    shared = "sbx-net-it-base-deny"  # every deny pod of template it-base in the namespace shares it
    cluster.apply(sandbox_manifest("net", network={"egress": "deny", "service": True}), namespace)
    cluster.apply(sandbox_manifest("net-peer"), namespace)
    running = wait_phase(cluster, namespace, "net", "Running")
    peer = wait_phase(cluster, namespace, "net-peer", "Running")
    pod_name = own_name = service_name = running["status"]["podName"]  # children share the sbx-<name> name
    for pod in (pod_name, peer["status"]["podName"]):
        assert governing_policies(cluster, namespace, pod) == [shared]
    assert cluster.get_json("networkpolicy", own_name, "-n", namespace) is None

    # Ports and egress of its own: a policy of its own, and the pod relabelled out of the shared one.
    cluster.kubectl(
        "patch",
        "sandbox",
        "net",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"network": {"egress": "allow", "ports": [8080], "service": True}}}),
    )
    wait_until(
        lambda: governing_policies(cluster, namespace, pod_name) == [own_name],
        timeout=30,
        message="the pod governed by a policy of its own",
    )
    own = cluster.get_json("networkpolicy", own_name, "-n", namespace)
    assert {"protocol": "TCP", "port": 8080} in own["spec"]["ingress"][0]["ports"]
    shared_egress = cluster.get_json("networkpolicy", shared, "-n", namespace)["spec"]["egress"]
    assert len(own["spec"]["egress"]) == len(shared_egress) + 1  # allow: one rule more than deny
    assert governing_policies(cluster, namespace, peer["status"]["podName"]) == [shared]  # the peer keeps it
    wait_until(
        lambda: any(
            p["port"] == 8080
            for p in (cluster.get_json("service", service_name, "-n", namespace) or {"spec": {"ports": []}})["spec"][
                "ports"
            ]
        ),
        timeout=30,
        message="the Service re-applied with port 8080",
    )

    for kind, name in (("networkpolicy", own_name), ("service", service_name), ("networkpolicy", shared)):
        old_uid = cluster.get_json(kind, name, "-n", namespace)["metadata"]["uid"]
        cluster.kubectl("delete", kind, name, "-n", namespace)

        def recreated(kind: str = kind, name: str = name, old_uid: str = old_uid) -> bool:
            child = cluster.get_json(kind, name, "-n", namespace)
            return child is not None and child["metadata"]["uid"] != old_uid

        wait_until(recreated, timeout=30, message=f"{kind} {name} recreated")
    assert sandbox(cluster, namespace, "net")["status"]["phase"] == "Running"

    # Back to its template's defaults: the shared policy again, its own deleted after the relabel.
    defaults = '{"spec":{"network":{"egress":null,"ports":null}}}'
    cluster.kubectl("patch", "sandbox", "net", "-n", namespace, "--type=merge", "-p", defaults)
    wait_until(
        lambda: (
            governing_policies(cluster, namespace, pod_name) == [shared]
            and cluster.get_json("networkpolicy", own_name, "-n", namespace) is None
        ),
        timeout=30,
        message="the pod back under the shared policy, its own gone",
    )

    # No longer asked for: the Service goes, the sandbox keeps running (the gateway uses the pod IP).
    cluster.kubectl(
        "patch", "sandbox", "net", "-n", namespace, "--type=merge", "-p", '{"spec":{"network":{"service":false}}}'
    )
    wait_until(
        lambda: cluster.get_json("service", service_name, "-n", namespace) is None,
        timeout=30,
        message="the Service deleted once network.service is false",
    )
    assert sandbox(cluster, namespace, "net")["status"]["phase"] == "Running"
    # Deleting both sandboxes leaves the shared policy (it has no owner; it selects nothing now).
    cluster.kubectl("delete", "sandbox", "net", "net-peer", "-n", namespace, "--wait=true", "--timeout=60s")
    assert cluster.get_json("networkpolicy", shared, "-n", namespace)


def test_deleting_the_template_keeps_the_timeouts_of_started_sandboxes(cluster: Cluster, namespace: str) -> None:
    template = f"tmp-{namespace[-6:]}"
    cluster.apply(f"""
apiVersion: sandbox.dev/v1alpha1
kind: SandboxTemplate
metadata: {{name: {template}}}
spec:
  image: ghcr.io/sandbox-operator/sandbox-base:dev
  timeouts: {{idle: "0", maxLifetime: 4s, execution: "0"}}
""")
    try:
        cluster.apply(sandbox_manifest("orphaned", template=template), namespace)
        wait_until(
            lambda: (sandbox(cluster, namespace, "orphaned").get("status") or {}).get("startedAt"),
            timeout=30,
            message="orphaned started",
        )
        cluster.kubectl("delete", "sandboxtemplate", template)
        terminated = wait_phase(cluster, namespace, "orphaned", "Terminated", timeout=60)
        assert terminated["status"]["reason"] == "MaxLifetime"
    finally:
        cluster.kubectl("delete", "sandboxtemplate", template, "--ignore-not-found", check=False)
