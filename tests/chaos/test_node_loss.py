"""Fault: the node stops reporting (its heartbeats stop: hack/container_node.py SIGSTOPped, as a hung
or partitioned kubelet). The containers keep running; only the control plane loses sight of them.

Kubernetes' own machinery does the rest: after the node monitor grace period the node is Ready
Unknown and tainted unreachable, its pods are marked not ready, and once their toleration of the
taint runs out (the DefaultTolerationSeconds admission plugin's, from the API server's
--default-unreachable-toleration-seconds) the taint manager deletes them, a deletion no kubelet will
ever confirm. The operator reports the sandbox NodeLost, keeps routing to the pod meanwhile, and
once an evicted pod's grace period is over force-deletes it and makes a new one (docs/operator.md,
"Faults"). This module's private control plane shortens both waits (30 s grace, 40 s toleration).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from agentcrashlib import agent_pid, gateway_on
from chaoslib import Gateway, component_pid, private_container_cluster, stopped
from e2b import Sandbox

from testlib import Cluster, ObjectWatch, OperatorProcess, wait_until

TEMPLATE = "nodeloss-base"
NODE_PROCESS = "container-node"  # its name in hack/cluster's state.json
CONTAINER_NODE = "container-node-0"
GRACE_S, TOLERATION_S = 30, 40
# Node monitor grace + the controller's 5 s period + the operator's pass, on a loaded machine.
NODE_LOST_WITHIN = GRACE_S + 60


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if request.config.getoption("--kubeconfig"):
        pytest.skip("the node's heartbeats are stopped from the host: the test needs the container node it starts")
    waits = {
        "SANDBOX_CLUSTER_NODE_MONITOR_GRACE": f"{GRACE_S}s",
        "SANDBOX_CLUSTER_NODE_LOST_TOLERATION_SECONDS": str(TOLERATION_S),
    }
    # A stopped node would not stop on SIGTERM: it is resumed before the cluster goes down.
    with private_container_cluster(tmp_path_factory, waits, stopped_on_exit=NODE_PROCESS) as started:
        yield started


@pytest.fixture(scope="module")
def gateway(cluster: Cluster, operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_on(cluster, tmp_path_factory.mktemp("gateway-nodeloss"), TEMPLATE) as handle:
        yield handle


def _sandbox(cluster: Cluster, namespace: str, sandbox_id: str) -> dict[str, Any]:
    listing = cluster.get_json("sandboxes", "-n", namespace)
    (body,) = [s for s in listing["items"] if (s.get("status") or {}).get("sandboxID") == sandbox_id]
    return dict(body)


def _ready(status: dict[str, Any]) -> tuple[str, str]:
    (ready,) = [(c["status"], c["reason"]) for c in status.get("conditions") or () if c["type"] == "Ready"]
    return ready


def _ready_status(cluster: Cluster, namespace: str, sandbox_id: str) -> dict[str, Any] | None:
    """The sandbox's status once it is Ready, else None."""
    status: dict[str, Any] = _sandbox(cluster, namespace, sandbox_id)["status"]
    return status if _ready(status)[0] == "True" else None


def _events(cluster: Cluster, namespace: str, name: str) -> list[tuple[str, str, str]]:
    listing = cluster.get_json("events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    return [(e["type"], e["reason"], e["message"]) for e in (listing or {}).get("items", [])]


def _node_ready(cluster: Cluster) -> str:
    node = cluster.get_json("node", CONTAINER_NODE)
    return str(next(c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready"))


BYSTANDER = "bystander-0"
BYSTANDER_NODE = json.dumps(
    {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": BYSTANDER},
        # Nothing is scheduled here: the node only keeps its zone from being wholly down.
        "spec": {"taints": [{"key": "sandbox.dev/bystander", "effect": "NoSchedule"}]},
    }
)


@contextlib.contextmanager
def healthy_bystander(cluster: Cluster) -> Iterator[None]:
    """A second node that keeps reporting (the test renews its Lease, as a kubelet would).

    Kubernetes evicts nothing while every node of a zone is down: the node lifecycle controller
    takes that for the control plane's own network failing (a one-node cluster never evicts; the
    sandbox then waits, NodeLost, until its node is back). With a healthy bystander the lost node is
    one of two, and its pods are evicted after their toleration, as in a real cluster."""
    cluster.apply(BYSTANDER_NODE)
    ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "the test's bystander"}
    cluster.kubectl(
        "patch", "node", BYSTANDER, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"conditions": [ready]}}),
    )  # fmt: skip
    stop = threading.Event()

    def renew() -> None:
        while not stop.is_set():
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": BYSTANDER, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": BYSTANDER, "leaseDurationSeconds": 40, "renewTime": stamp},
            }
            cluster.kubectl("apply", "-f", "-", input=json.dumps(lease), check=False)
            stop.wait(5)

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(30)
        cluster.kubectl("delete", "node", BYSTANDER, "--wait=false", check=False)
        cluster.kubectl("delete", "lease", BYSTANDER, "-n", "kube-node-lease", "--wait=false", check=False)


def _pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return list(cluster.get_json("pods", "-n", namespace)["items"])


def _runs_the_agent(pid: int) -> bool:
    try:
        return any(part.endswith(b"sandbox-agent") for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
    except OSError:
        return False


def _node_lost(watch: ObjectWatch) -> dict[str, Any] | None:
    seen = [s for s in (o.get("status") or {} for o in list(watch.objects)) if s.get("reason") == "NodeLost"]
    return seen[0] if seen else None


@pytest.mark.timeout(600)  # the private cluster's start-up is counted too; each wait has its own deadline
def test_a_node_back_before_the_eviction_brings_back_the_same_pod_with_its_processes(
    cluster: Cluster, operator: OperatorProcess, gateway: Gateway
) -> None:
    sbx = Sandbox.create(template=TEMPLATE, timeout=600, **gateway.sdk())
    body = _sandbox(cluster, gateway.namespace, sbx.sandbox_id)
    name, pod_name = body["metadata"]["name"], body["status"]["podName"]
    pod_uid = cluster.get_json("pod", pod_name, "-n", gateway.namespace)["metadata"]["uid"]
    sleeper = sbx.commands.run("sleep 900", background=True)
    sbx.files.write("kept.txt", "before the node went quiet\n")

    watch = ObjectWatch(cluster, gateway.namespace, "sandboxes", name=name)
    try:
        with stopped(component_pid(cluster, NODE_PROCESS)):
            lost = wait_until(lambda: _node_lost(watch), timeout=NODE_LOST_WITHIN, message="the sandbox NodeLost")
            assert lost["phase"] == "Running" and _ready(lost) == ("False", "NodeLost")
            assert "container-node-0" in lost["message"] and f"evicts the pod {TOLERATION_S} s after" in lost["message"]
            assert lost.get("podIP"), "the pod IP is kept: a node cut off from the control plane may still serve"
            # The agent still runs and the gateway still routes to it: the sandbox serves through the loss.
            assert sbx.commands.run("cat kept.txt").stdout == "before the node went quiet\n"
        wait_until(lambda: _node_ready(cluster) == "True", timeout=60, message="the node Ready again")

        after = wait_until(
            lambda: _ready_status(cluster, gateway.namespace, sbx.sandbox_id),
            timeout=60,
            message="the sandbox Ready again",
        )
        phases = {str(s.get("phase")) for s in (o.get("status") or {} for o in list(watch.objects))}
    finally:
        watch.close()
    assert phases == {"Running"}
    assert after["podName"] == pod_name and after.get("recreateAttempts", 0) == 0
    assert cluster.get_json("pod", pod_name, "-n", gateway.namespace)["metadata"]["uid"] == pod_uid  # the same pod
    assert sleeper.pid in [process.pid for process in sbx.commands.list()], "processes survive a node that returns"
    kinds = {(kind, reason) for kind, reason, _ in _events(cluster, gateway.namespace, name)}
    assert {("Warning", "NodeLost"), ("Normal", "NodeRecovered")} <= kinds
    sbx.kill()


@pytest.mark.timeout(600)
def test_a_node_lost_past_the_toleration_gets_the_sandbox_a_new_pod_and_nothing_stays_terminating(
    cluster: Cluster, operator: OperatorProcess, gateway: Gateway
) -> None:
    sbx = Sandbox.create(template=TEMPLATE, timeout=600, **gateway.sdk())
    body = _sandbox(cluster, gateway.namespace, sbx.sandbox_id)
    name, pod_name = body["metadata"]["name"], body["status"]["podName"]
    old_pod = cluster.get_json("pod", pod_name, "-n", gateway.namespace)
    old_agent = agent_pid(cluster, old_pod)
    sbx.files.write("kept.txt", "the workspace outlives the pod\n")

    watch = ObjectWatch(cluster, gateway.namespace, "sandboxes", name=name)
    try:
        with healthy_bystander(cluster), stopped(component_pid(cluster, NODE_PROCESS)):
            wait_until(lambda: _node_lost(watch), timeout=NODE_LOST_WITHIN, message="the sandbox NodeLost")

            def replaced() -> list[dict[str, Any]] | None:
                pods = _pods(cluster, gateway.namespace)
                gone = all(p["metadata"]["uid"] != old_pod["metadata"]["uid"] for p in pods)
                return pods if gone and pods else None

            # Evicted after the toleration, force-deleted once its grace period is over (no kubelet
            # confirms it), and a new pod made, which waits unscheduled: the only node is tainted.
            (new_pod,) = wait_until(replaced, timeout=TOLERATION_S + 90, message="the evicted pod replaced")
            assert not new_pod["spec"].get("nodeName") and not new_pod["metadata"].get("deletionTimestamp")
            status = _sandbox(cluster, gateway.namespace, sbx.sandbox_id)["status"]
            assert status["phase"] == "Running" and _ready(status)[0] == "False"
            assert status["recreateAttempts"] == 1
        wait_until(lambda: _node_ready(cluster) == "True", timeout=60, message="the node Ready again")

        try:
            after = wait_until(
                lambda: _ready_status(cluster, gateway.namespace, sbx.sandbox_id),
                timeout=120,
                message="the sandbox Ready on its new pod",
            )
        except AssertionError as error:
            pods = [
                (p["metadata"]["uid"], p["spec"].get("nodeName"), p.get("status"))
                for p in _pods(cluster, gateway.namespace)
            ]
            status = _sandbox(cluster, gateway.namespace, sbx.sandbox_id)["status"]
            raise AssertionError(f"{error}\nsandbox status: {status}\npods: {pods}") from None
        phases = {str(s.get("phase")) for s in (o.get("status") or {} for o in list(watch.objects))}
    finally:
        watch.close()
    assert phases == {"Running"}
    (pod,) = _pods(cluster, gateway.namespace)
    assert pod["metadata"]["uid"] == new_pod["metadata"]["uid"] and not pod["metadata"].get("deletionTimestamp")
    assert after["podName"] == pod["metadata"]["name"]
    # The node, back, stopped the container of the pod that was deleted while it was away.
    wait_until(lambda: not _runs_the_agent(old_agent), timeout=60, message="the old pod's agent stopped")
    again = Sandbox.connect(sbx.sandbox_id, **gateway.sdk())
    assert again.commands.run("cat kept.txt").stdout == "the workspace outlives the pod\n"
    messages = [(kind, reason, text) for kind, reason, text in _events(cluster, gateway.namespace, name)]
    assert any(r == "NodeLost" and "without the node's confirmation" in t for _, r, t in messages), messages
    assert ("Warning", "PodRecreated", "the sandbox pod was lost with its node; recreating it (attempt 1 of 3)") in [
        (k, r, t) for k, r, t in messages
    ]
    again.kill()
