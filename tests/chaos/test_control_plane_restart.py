"""Faults: the API server, and etcd, restarted while 50 sandboxes are being created, suspended,
resumed and deleted.

Each test runs on a control plane of its own (restartlib.audited_control_plane) with one operator.
50 sandboxes reach their phases (40 Running, 10 Suspended); then 8 are suspended, 8 resumed, 8
deleted and 8 created, and the component is restarted (`hack/cluster restart`: SIGTERM by its
recorded PID, the same command line again; etcd keeps its data) while that churn is held half done
by construction, not by timing: the pods being deleted keep a finalizer of the test's and the node
is cordoned, so the fault finds sandboxes Suspending and Resuming, pods Terminating and Pending, and
the operator writing for the sandboxes created last. The holds go once the component is back, and
one more sandbox is created, which only a resumed watch can bring to the operator.

Afterwards every Sandbox must reach its declared phase, with no orphan and no duplicate pod, no pod
created twice and the untouched sandboxes' pods the very same ones, the operator the same process,
and its watches resumed without a relist storm: a handful of LISTs per watched resource, counted in
the API server's audit log (restartlib says why not from /metrics).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from restartlib import AuditLog, audited_control_plane, component_pid, restart

from testlib import Cluster, OperatorProcess, start_operator, wait_until

COMPONENTS = ("kube-apiserver", "etcd")
TEMPLATE = "restart-ephemeral"
TEMPLATE_MANIFEST = f"""
apiVersion: sandbox.dev/v1alpha1
kind: SandboxTemplate
metadata: {{name: {TEMPLATE}}}
spec:
  image: ghcr.io/sandbox-operator/sandbox-base:dev
  resources:
    default: {{cpu: 100m, memory: 128Mi, disk: 1Gi}}
  persistence: {{enabled: false}}
  timeouts: {{idle: 30m, maxLifetime: 1h, execution: 5m}}
"""
NAMESPACE = "restart"
NODE = "kwok-node-0"  # hack/cluster's simulated node
HOLD = "test.sandbox.dev/hold"  # a finalizer of the test's: the pod stays Terminating while it is there


def _names(prefix: str, numbers: range) -> list[str]:
    return [f"{prefix}{i:02d}" for i in numbers]


# The 50 sandboxes and what the churn does to them.
SUSPEND = _names("s", range(0, 8))  # Running -> suspended
DELETE = _names("s", range(8, 16))  # Running -> deleted
UNTOUCHED = _names("s", range(16, 40))  # Running throughout: their pods must stay the same
RESUME = _names("s", range(40, 48))  # Suspended -> resumed
STILL_SUSPENDED = _names("s", range(48, 50))
CREATE = _names("n", range(0, 8))  # new, with the churn
AFTER = ["p00"]  # new once the component is back: only a resumed watch brings its event

INITIAL = {name: "Running" for name in SUSPEND + DELETE + UNTOUCHED} | dict.fromkeys(
    RESUME + STILL_SUSPENDED, "Suspended"
)
CHURNED = dict.fromkeys(SUSPEND + STILL_SUSPENDED, "Suspended") | {
    name: "Running" for name in UNTOUCHED + RESUME + CREATE
}
FINAL = CHURNED | dict.fromkeys(AFTER, "Running")

# LISTs the operator may make per watched resource from the fault until everything converged: one
# relist when a watch cannot resume where it left off (410 Gone), plus the attempts that fail while
# the component is down, spaced by kopf's backoff (1, 1, 2, 3, 5 ... s). One LIST per sandbox or per
# event would be hundreds.
LISTS_PER_RESOURCE = 6

# Generous for 2 shared cores: each is a deadline, not a duration.
CONVERGE_S = 240.0
GARBAGE_COLLECTED_S = 120.0


def _manifest(name: str, suspended: bool) -> dict[str, Any]:
    return {
        "apiVersion": "sandbox.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name},
        "spec": {"template": TEMPLATE, "suspended": suspended},
    }


def _apply(cluster: Cluster, declared: dict[str, str]) -> None:
    items = [_manifest(name, phase == "Suspended") for name, phase in declared.items()]
    cluster.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}), NAMESPACE)


def _sandboxes(cluster: Cluster) -> dict[str, dict[str, Any]]:
    listing = cluster.get_json("sandboxes", "-n", NAMESPACE) or {}
    return {item["metadata"]["name"]: item for item in listing.get("items", [])}


def _pods(cluster: Cluster) -> list[dict[str, Any]]:
    return list((cluster.get_json("pods", "-n", NAMESPACE) or {}).get("items", []))


def _mismatches(declared: dict[str, str], sandboxes: dict[str, dict[str, Any]]) -> list[str]:
    wrong = []
    for name in sorted(set(declared) | set(sandboxes)):
        status = (sandboxes.get(name) or {}).get("status") or {}
        have = status.get("phase") if name in sandboxes else "gone"
        want = declared.get(name, "gone")
        if have != want:
            wrong.append(f"{name}: {have}/{status.get('reason')} != {want}")
    return wrong


def _converge(cluster: Cluster, operator: OperatorProcess, declared: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Wait until every sandbox is in its declared phase (and no other exists); the sandboxes then."""
    found: dict[str, dict[str, Any]] = {}

    def converged() -> bool:
        nonlocal found
        found = _sandboxes(cluster)
        return not _mismatches(declared, found)

    try:
        wait_until(converged, timeout=CONVERGE_S, interval=0.2, message="every sandbox in its declared phase")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nnot converged: {_mismatches(declared, found)}\n{operator.log_tail(40)}") from exc
    return found


def _orphans(pods: list[dict[str, Any]], sandboxes: dict[str, dict[str, Any]]) -> list[str]:
    """Pods with no live Sandbox of theirs: none named in their label, or not the owner's uid."""
    uids = {body["metadata"]["uid"] for body in sandboxes.values()}
    return [
        pod["metadata"]["name"]
        for pod in pods
        if pod["metadata"].get("labels", {}).get("sandbox.dev/sandbox") not in sandboxes
        or not any(ref.get("uid") in uids for ref in pod["metadata"].get("ownerReferences") or ())
    ]


def _pod_uids(pods: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Sandbox name -> the uids of its pods."""
    found: dict[str, list[str]] = {}
    for pod in pods:
        found.setdefault(pod["metadata"]["labels"].get("sandbox.dev/sandbox"), []).append(pod["metadata"]["uid"])
    return found


def _hold(cluster: Cluster, pod: str) -> None:
    cluster.kubectl(
        "patch", "pod", pod, "-n", NAMESPACE, "--type=merge", "-p", json.dumps({"metadata": {"finalizers": [HOLD]}})
    )


def _release(cluster: Cluster, pod: str) -> None:
    patch = {"metadata": {"$deleteFromPrimitiveList/finalizers": [HOLD]}}
    cluster.kubectl("patch", "pod", pod, "-n", NAMESPACE, "--type=strategic", "-p", json.dumps(patch))


def _wait_held(cluster: Cluster, operator: OperatorProcess) -> None:
    """Wait until the churn is as far as the holds let it go: suspending sandboxes Suspending and
    resumed ones Resuming, their pods Terminating and Pending; deleted sandboxes gone, their pods
    Terminating."""
    want = dict.fromkeys(SUSPEND, "Suspending") | dict.fromkeys(RESUME, "Resuming")
    held = {name: phase for name, phase in INITIAL.items() if name not in DELETE} | want
    state: list[str] = []

    def reached() -> bool:
        nonlocal state
        state = _mismatches(held, _sandboxes(cluster))
        pods = {pod["metadata"]["name"]: pod for pod in _pods(cluster)}
        for name in SUSPEND + DELETE:
            if not (pods.get(f"sbx-{name}") or {}).get("metadata", {}).get("deletionTimestamp"):
                state.append(f"sbx-{name} not Terminating")
        for name in RESUME:
            if (pods.get(f"sbx-{name}") or {}).get("status", {}).get("phase") != "Pending":
                state.append(f"sbx-{name} not Pending")
        return not state

    try:
        wait_until(reached, timeout=CONVERGE_S, interval=0.2, message="the churn held half done")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{state}\n{operator.log_tail(40)}") from exc


@pytest.fixture
def control_plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, AuditLog]]:
    if request.config.getoption("--kubeconfig"):
        pytest.skip("restarts the control plane's processes: needs a local one of its own")
    with audited_control_plane(tmp_path_factory) as plane:
        yield plane


@pytest.fixture
def lone_operator(control_plane: tuple[Cluster, AuditLog], tmp_path: Path) -> Iterator[OperatorProcess]:
    cluster, _ = control_plane
    cluster.kubectl("create", "namespace", NAMESPACE)
    wait_until(
        lambda: cluster.kubectl("get", "sa", "default", "-n", NAMESPACE, check=False).returncode == 0,
        timeout=60,
        message="default service account",
    )
    cluster.apply(TEMPLATE_MANIFEST)
    handle = start_operator(cluster, tmp_path / "operator.log", NAMESPACE)
    try:
        yield handle
    finally:
        code = handle.kill(signal.SIGTERM)
        if code not in (0, -signal.SIGTERM):
            print(f"operator exited with {code}:\n{handle.log_tail()}")


@pytest.mark.timeout(600)  # the private control plane's start-up counts too; each wait has its own deadline
@pytest.mark.parametrize("component", COMPONENTS)
def test_restart_mid_churn_converges(
    component: str, control_plane: tuple[Cluster, AuditLog], lone_operator: OperatorProcess
) -> None:
    cluster, audit = control_plane
    operator = lone_operator
    operator_pid = operator.process.pid
    _apply(cluster, INITIAL)
    _converge(cluster, operator, INITIAL)
    before = _pod_uids(_pods(cluster))
    assert sorted(before) == sorted(name for name, phase in INITIAL.items() if phase == "Running")

    # The churn is held half done, so that the fault finds it in flight whatever the machine's speed:
    # the pods being deleted stay Terminating (a finalizer of the test's) and new pods stay Pending
    # (the node cordoned) until the component is back.
    for name in SUSPEND + DELETE:
        _hold(cluster, f"sbx-{name}")
    cluster.kubectl("cordon", NODE)
    churn_at = time.time()
    cluster.kubectl("delete", "sandboxes", *DELETE, "-n", NAMESPACE, "--wait=false")
    _apply(cluster, {name: CHURNED[name] for name in SUSPEND + RESUME})
    _wait_held(cluster, operator)
    # The new sandboxes go in last, with no wait: the fault lands on the operator's writes for them.
    _apply(cluster, {name: CHURNED[name] for name in CREATE})

    fault_at = time.time()
    old_pid = component_pid(cluster, component)
    account = restart(cluster, component)
    assert component_pid(cluster, component) != old_pid, account
    cluster.kubectl("uncordon", NODE)
    for name in SUSPEND + DELETE:
        _release(cluster, f"sbx-{name}")
    _apply(cluster, dict.fromkeys(AFTER, "Running"))
    sandboxes = _converge(cluster, operator, FINAL)
    converged_at = time.time()

    # Deleted sandboxes' pods go with Kubernetes' garbage collector, which restarts its work too.
    pods: list[dict[str, Any]] = []

    def collected() -> bool:
        nonlocal pods
        pods = _pods(cluster)
        return not _orphans(pods, sandboxes)

    try:
        wait_until(collected, timeout=GARBAGE_COLLECTED_S, interval=0.5, message="no pod without its sandbox")
    except AssertionError as exc:
        raise AssertionError(f"orphan pods: {_orphans(pods, sandboxes)}") from exc
    uids = _pod_uids(pods)
    running = sorted(name for name, phase in FINAL.items() if phase == "Running")
    assert sorted(uids) == running, "a pod for a sandbox that should have none, or a running one without"
    assert [name for name, pod_uids in uids.items() if len(pod_uids) > 1] == [], "sandboxes with two pods"
    replaced = [name for name in UNTOUCHED if uids[name] != before[name]]
    assert replaced == [], f"pods recreated for sandboxes Running throughout: {replaced}"
    created = audit.pods_created(NAMESPACE, churn_at)
    twice = {name: count for name, count in created.items() if count > 1}
    assert twice == {}, f"pods created more than once: {twice}"
    assert sorted(created) == sorted(f"sbx-{name}" for name in RESUME + CREATE + AFTER), created

    assert operator.process.poll() is None, f"the operator exited:\n{operator.log_tail()}"
    assert operator.process.pid == operator_pid
    wait_until(lambda: operator.value("sandbox_operator_build_info") is not None, timeout=10, message="/metrics")

    assert audit.operator_lists(0, churn_at), f"the operator's first LISTs are not in the audit log {audit.path}"
    steady = audit.operator_lists(churn_at, fault_at)
    relists = audit.operator_lists(fault_at, converged_at)
    storm = {resource: count for resource, count in relists.items() if count > LISTS_PER_RESOURCE}
    assert storm == {}, (
        f"LISTs per resource after the {component} restart: {dict(relists)} ({account}); "
        f"between the churn and the fault, while the watches ran: {dict(steady)}"
    )
    errors = sum(sample.value for sample in operator.samples("sandbox_operator_reconcile_errors_total"))
    print(
        f"{component}: {account}; converged {converged_at - fault_at:.1f}s after the fault; "
        f"LISTs after it: {dict(relists)} (before it: {dict(steady)}); reconcile errors: {errors:g}"
    )
