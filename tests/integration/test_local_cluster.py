"""The local control plane is a real Kubernetes: CRDs with status, pods on kwok, namespace deletion."""

from __future__ import annotations

import ipaddress
import json

from testlib import Cluster, wait_until

POD_RANGE = ipaddress.ip_network("127.1.0.0/16")

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.fixture.sandbox.dev
spec:
  group: fixture.sandbox.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {status: {}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer, minimum: 1}
            status:
              type: object
              properties:
                phase: {type: string}
"""


def test_custom_resource_with_status_subresource(cluster: Cluster, namespace: str) -> None:
    cluster.apply(WIDGET_CRD)
    cluster.kubectl("wait", "--for=condition=Established", "crd/widgets.fixture.sandbox.dev", "--timeout=60s")
    wait_until(
        lambda: cluster.kubectl("get", "widgets", "-n", namespace, check=False).returncode == 0,
        timeout=30,
        message="widgets to be listable",
    )
    cluster.apply(
        "apiVersion: fixture.sandbox.dev/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3}\n",
        namespace,
    )
    # Status only changes through the status subresource: a main-resource patch ignores it.
    cluster.kubectl(
        "patch", "widget", "w1", "-n", namespace, "--type=merge", "-p", json.dumps({"status": {"phase": "Ignored"}})
    )
    assert cluster.get_json("widget", "w1", "-n", namespace).get("status") is None
    cluster.kubectl(
        "patch",
        "widget",
        "w1",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"phase": "Ready"}}),
    )
    widget = cluster.get_json("widget", "w1", "-n", namespace)
    assert widget["status"] == {"phase": "Ready"}
    assert widget["spec"] == {"size": 3}

    refused = cluster.apply_refused(
        "apiVersion: fixture.sandbox.dev/v1\nkind: Widget\nmetadata: {name: w2}\nspec: {size: 0}\n", namespace
    )
    assert "spec.size" in refused and "should be greater than or equal to 1" in refused


def test_pod_runs_on_simulated_node_with_loopback_ip(cluster: Cluster, namespace: str) -> None:
    cluster.apply(
        """
apiVersion: v1
kind: Pod
metadata: {name: hello}
spec:
  containers:
    - name: main
      image: busybox
""",
        namespace,
    )

    def running_pod() -> dict[str, object] | None:
        pod = cluster.get_json("pod", "hello", "-n", namespace)
        return pod if pod and pod.get("status", {}).get("phase") == "Running" else None

    pod = wait_until(running_pod, timeout=60, message="pod hello Running")
    assert pod["spec"]["nodeName"] == "kwok-node-0"  # type: ignore[index]
    pod_ip = ipaddress.ip_address(pod["status"]["podIP"])  # type: ignore[index]
    assert pod_ip in POD_RANGE, f"pod IP {pod_ip} outside {POD_RANGE}"


def test_workspace_claim_binds_with_default_storage_class(cluster: Cluster, namespace: str) -> None:
    cluster.apply(
        """
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: workspace}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
""",
        namespace,
    )
    wait_until(
        lambda: (cluster.get_json("pvc", "workspace", "-n", namespace) or {}).get("status", {}).get("phase") == "Bound",
        timeout=60,
        message="PVC workspace Bound",
    )


def test_namespace_with_pod_deletes_cleanly(cluster: Cluster) -> None:
    name = "t-ns-delete"
    cluster.kubectl("create", "namespace", name)
    wait_until(
        lambda: cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
        timeout=30,
        message="default service account",
    )
    cluster.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: x}]}\n", name)
    wait_until(
        lambda: (cluster.get_json("pod", "p", "-n", name) or {}).get("status", {}).get("phase") == "Running",
        timeout=60,
        message="pod Running",
    )
    cluster.kubectl("delete", "namespace", name, "--wait=false")
    # kwok finishes pod deletion (there is no kubelet); without it the namespace would hang Terminating.
    wait_until(lambda: cluster.get_json("namespace", name) is None, timeout=90, message=f"namespace {name} gone")
