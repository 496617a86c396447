"""What GitOps tools read from the operator's objects: every Sandbox and SandboxPool write of a real
lifecycle (local control plane, kwok node) is recorded from a watch and run through hack/gitops-health,
which computes the kstatus status (the cli-utils library Flux and cli-utils' appliers use), the Argo CD
health of docs/gitops/argocd/*.lua (gopher-lua, as Argo CD runs them) and the Flux healthCheckExprs
of docs/gitops/flux-health-check-exprs.yaml (cel-go, in Flux's order). docs/operator.md, "GitOps"."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testlib import REPO, Cluster, ObjectWatch, OperatorProcess, sandbox_manifest, wait_phase, wait_until

GITOPS = REPO / "docs" / "gitops"
Verdicts = tuple[str, str | None, str | None]  # kstatus, Argo CD, Flux
IN_PROGRESS: Verdicts = ("InProgress", "Progressing", "InProgress")
FAILED: Verdicts = ("Failed", "Degraded", "Failed")
# Before the operator's first status write: kstatus's generic rules see no condition and no
# observedGeneration and say Current; the Argo CD script and the Flux expressions wait.
UNREPORTED: Verdicts = ("Current", "Progressing", "Unknown")
SANDBOX_PHASES: dict[str, Verdicts] = {
    "Creating": IN_PROGRESS,
    "Running": ("Current", "Healthy", "Current"),
    "Suspending": IN_PROGRESS,
    "Suspended": ("Current", "Suspended", "Current"),
    "Resuming": IN_PROGRESS,
    "Terminating": IN_PROGRESS,
    "Terminated": ("Current", "Healthy", "Current"),
    "Error": FAILED,
}
POOL_REASONS: dict[str, Verdicts] = {
    "Filling": IN_PROGRESS,
    "Draining": IN_PROGRESS,
    "Filled": ("Current", "Healthy", "Current"),
    "TemplateNotFound": FAILED,
}


@pytest.fixture(autouse=True)
def _operator_running(operator: OperatorProcess) -> None:
    assert operator.process.poll() is None, f"operator died:\n{operator.log_tail()}"


@pytest.fixture(scope="module")
def gitops_health() -> Path:
    """hack/gitops-health, built (or found in the cache) by hack/build-tools."""
    built = subprocess.run(
        [str(REPO / "hack" / "build-tools"), "gitops-health"], capture_output=True, text=True, timeout=900
    )
    assert built.returncode == 0, f"hack/build-tools gitops-health failed:\n{built.stderr}"
    binary = Path(built.stdout.strip().splitlines()[-1]) / "gitops-health"
    assert binary.exists(), binary
    return binary


class Recorder(ObjectWatch):
    """Every version of the objects of one resource in a namespace written from now on."""

    def seen(self, name: str, predicate: Any) -> bool:
        return any(o["metadata"]["name"] == name and predicate(o.get("status") or {}) for o in list(self.objects))


@pytest.fixture
def recorders(cluster: Cluster, namespace: str) -> Iterator[dict[str, Recorder]]:
    found = {plural: Recorder(cluster, namespace, plural) for plural in ("sandboxes", "sandboxpools")}
    try:
        yield found
    finally:
        for recorder in found.values():
            recorder.close()


def assess(binary: Path, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(binary), "--argo-dir", str(GITOPS / "argocd"), "--flux", str(GITOPS / "flux-health-check-exprs.yaml")],
        input="".join(json.dumps(obj) + "\n" for obj in objects),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) == len(objects)
    return reports


def verdicts(report: dict[str, Any]) -> Verdicts:
    return (
        report["kstatus"]["status"],
        (report["argo"] or {}).get("status"),
        (report["flux"] or {}).get("status"),
    )


def expected_for(obj: dict[str, Any], by_state: dict[str, Verdicts], state: str | None) -> Verdicts:
    status = obj.get("status") or {}
    if not status.get("conditions"):
        return UNREPORTED
    if status.get("observedGeneration") != obj["metadata"]["generation"]:
        return IN_PROGRESS  # a spec the operator has not acted on yet, whatever the phase
    assert state in by_state, f"{obj['kind']} {obj['metadata']['name']} in an unexpected state {state}: {status}"
    return by_state[state]


def sandbox_state(obj: dict[str, Any]) -> str | None:
    status = obj.get("status") or {}
    if status.get("reason") == "TemplateNotFound":
        return "Error"  # still Creating, but Stalled: nothing starts until the template exists
    return status.get("phase")


def pool_state(obj: dict[str, Any]) -> str | None:
    ready = next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), None)
    return ready["reason"] if ready else None


def mismatches(
    reports: list[dict[str, Any]], objects: list[dict[str, Any]], by_state: dict[str, Verdicts], state: Any
) -> list[str]:
    wrong = []
    for obj, report in zip(objects, reports, strict=True):
        want = expected_for(obj, by_state, state(obj))
        if verdicts(report) != want:
            status = obj.get("status") or {}
            wrong.append(
                f"{obj['metadata']['name']} {state(obj)} {status.get('reason')}: {verdicts(report)} != {want}"
                f" ({report['kstatus'].get('message')}; {json.dumps(obj)})"
            )
    return wrong


def patch_spec(cluster: Cluster, namespace: str, kind: str, name: str, spec: dict[str, Any]) -> None:
    cluster.kubectl("patch", kind, name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": spec}))


def fail_pod(cluster: Cluster, namespace: str, pod: str) -> None:
    state = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    container = {"name": "sandbox", "image": "x", "imageID": "", "ready": False, "restartCount": 0, "state": state}
    patch = {"status": {"phase": "Failed", "containerStatuses": [container]}}
    cluster.kubectl(
        "patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(patch)
    )


def test_every_sandbox_phase_reads_right_in_kstatus_argo_and_flux(
    cluster: Cluster, namespace: str, recorders: dict[str, Recorder], gitops_health: Path
) -> None:
    recorder = recorders["sandboxes"]
    cluster.apply(sandbox_manifest("life"), namespace)
    cluster.apply(sandbox_manifest("short", timeouts={"idle": "0", "maxLifetime": "3s", "execution": "0"}), namespace)
    cluster.apply(sandbox_manifest("big", resources={"cpu": "8", "memory": "1Gi"}), namespace)
    cluster.apply(sandbox_manifest("orphan", template="gitops-no-such-template"), namespace)
    cluster.apply(sandbox_manifest("oom"), namespace)

    wait_phase(cluster, namespace, "life", "Running")
    patch_spec(cluster, namespace, "sandbox", "life", {"suspended": True})
    wait_phase(cluster, namespace, "life", "Suspended")
    patch_spec(cluster, namespace, "sandbox", "life", {"suspended": False})
    wait_until(
        lambda: recorder.seen("life", lambda s: s.get("phase") == "Running" and s.get("reason") == "Resumed"),
        timeout=60,
        message="life resumed",
    )
    running = wait_phase(cluster, namespace, "oom", "Running")
    fail_pod(cluster, namespace, running["status"]["podName"])
    wait_phase(cluster, namespace, "oom", "Error")
    wait_phase(cluster, namespace, "short", "Terminated", timeout=60)
    wait_phase(cluster, namespace, "big", "Error")
    wait_until(
        lambda: recorder.seen("orphan", lambda s: s.get("reason") == "TemplateNotFound"),
        timeout=30,
        message="orphan reports TemplateNotFound",
    )

    objects = list(recorder.objects)
    reports = assess(gitops_health, objects)
    assert mismatches(reports, objects, SANDBOX_PHASES, sandbox_state) == []
    seen = {sandbox_state(obj) for obj in objects}
    assert set(SANDBOX_PHASES) <= seen, f"phases never recorded: {set(SANDBOX_PHASES) - seen}"
    # Stalled carries the reason of the Error into what the tools print.
    oom = [
        r
        for r, o in zip(reports, objects, strict=True)
        if o["metadata"]["name"] == "oom" and sandbox_state(o) == "Error"
    ][-1]
    assert "OOMKilled" in oom["argo"]["message"] and "memory" in oom["kstatus"]["message"]
    # A spec change the operator has not seen yet is InProgress: at least the two suspend patches.
    lagging = [
        o
        for o in objects
        if (o.get("status") or {}).get("observedGeneration") not in (None, o["metadata"]["generation"])
    ]
    assert len(lagging) >= 2
    # The template, which has no status of its own, is Current for kstatus; no Argo/Flux check needed.
    template = cluster.get_json("sandboxtemplate", "it-base")
    (report,) = assess(gitops_health, [template])
    assert verdicts(report) == ("Current", None, None)


def test_kubectl_wait_for_ready_cannot_fail_fast_but_reconciling_false_does(
    cluster: Cluster, namespace: str, gitops_health: Path
) -> None:
    cluster.apply(sandbox_manifest("broken", resources={"cpu": "8", "memory": "1Gi"}), namespace)
    wait_phase(cluster, namespace, "broken", "Error")
    target = ["sandbox/broken", "-n", namespace]

    # kubectl wait has no failure condition: Ready on an Error sandbox runs to its timeout.
    start = time.monotonic()
    ready = cluster.kubectl("wait", *target, "--for=condition=Ready", "--timeout=3s", check=False)
    assert ready.returncode != 0 and time.monotonic() - start >= 3
    assert "timed out" in ready.stderr

    # The documented recipe: wait until the operator has settled (Ready or Stalled), then check Ready.
    start = time.monotonic()
    settled = cluster.kubectl("wait", *target, "--for=condition=Reconciling=False", "--timeout=60s", check=False)
    assert settled.returncode == 0, settled.stderr
    check = cluster.kubectl("wait", *target, "--for=condition=Ready", "--timeout=0", check=False)
    assert check.returncode != 0
    assert time.monotonic() - start < 10  # well inside the 60 s the recipe allows
    stalled = cluster.kubectl("wait", *target, "--for=condition=Stalled", "--timeout=0", check=False)
    assert stalled.returncode == 0, stalled.stderr
    reason = cluster.kubectl("get", *target, "-o", "jsonpath={.status.conditions[?(@.type=='Stalled')].reason}").stdout
    assert reason == "ResourcesExceedTemplateMax"

    # The same recipe on a healthy sandbox passes both steps.
    cluster.apply(sandbox_manifest("fine"), namespace)
    fine = ["sandbox/fine", "-n", namespace]
    cluster.kubectl("wait", *fine, "--for=condition=Reconciling=False", "--timeout=60s")
    cluster.kubectl("wait", *fine, "--for=condition=Ready", "--timeout=0")


def test_pools_read_right_in_kstatus_argo_and_flux(
    cluster: Cluster, namespace: str, recorders: dict[str, Recorder], gitops_health: Path
) -> None:
    recorder = recorders["sandboxpools"]
    cluster.apply(
        """
apiVersion: sandbox.dev/v1alpha1
kind: SandboxPool
metadata: {name: warm}
spec: {template: it-base, size: 2}
---
apiVersion: sandbox.dev/v1alpha1
kind: SandboxPool
metadata: {name: lost}
spec: {template: gitops-no-such-template, size: 1}
""",
        namespace,
    )

    def pool_reason(name: str, reason: str, ready: int | None = None) -> bool:
        return recorder.seen(
            name,
            lambda s: (
                any(c["type"] == "Ready" and c["reason"] == reason for c in s.get("conditions") or [])
                and (ready is None or s.get("ready") == ready)
            ),
        )

    wait_until(lambda: pool_reason("warm", "Filled", 2), timeout=60, message="pool warm Filled")
    patch_spec(cluster, namespace, "sandboxpool", "warm", {"size": 1})
    wait_until(lambda: pool_reason("warm", "Filled", 1), timeout=60, message="pool warm Filled at 1")
    wait_until(lambda: pool_reason("lost", "TemplateNotFound"), timeout=30, message="pool lost TemplateNotFound")

    objects = list(recorder.objects)
    reports = assess(gitops_health, objects)
    assert mismatches(reports, objects, POOL_REASONS, pool_state) == []
    seen = {pool_state(obj) for obj in objects}
    assert {"Filling", "Filled", "TemplateNotFound"} <= seen, seen
