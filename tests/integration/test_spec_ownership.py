"""Spec belongs to its author: after every automatic transition, a server-side apply of the user's
manifest neither conflicts nor resumes anything. The operator records its decisions in status
(status.suspendedBy) and writes under its own field manager; resuming an idle suspension is a
request on an annotation, not a spec edit."""

from __future__ import annotations

import json
from typing import Any

import pytest

from testlib import Cluster, OperatorProcess, wait_phase, wait_until

USER = "gitops-user"  # the field manager of the user's applies, as Argo CD or Flux have their own


@pytest.fixture(autouse=True)
def _operator_running(operator: OperatorProcess) -> None:
    assert operator.process.poll() is None, f"operator died:\n{operator.log_tail()}"


def manifest(name: str, **spec: Any) -> str:
    body = {
        "apiVersion": "sandbox.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name},
        "spec": {"template": "it-base", "timeouts": {"idle": "2s", "maxLifetime": "1h"}, **spec},
    }
    return json.dumps(body)


def server_side_apply(cluster: Cluster, namespace: str, body: str, *extra: str) -> str:
    """`kubectl apply --server-side` as the user; fails the test on a conflict (exit code != 0)."""
    result = cluster.kubectl(
        "apply", "--server-side", f"--field-manager={USER}", "-n", namespace, *extra, "-f", "-", input=body, check=False
    )
    assert result.returncode == 0, f"server-side apply conflicted:\n{result.stderr}"
    return result.stdout


def acted_on(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    """The sandbox once the operator has acted on its current generation."""

    def caught_up() -> dict[str, Any] | None:
        body = cluster.get_json("sandbox", name, "-n", namespace)
        status = body.get("status") or {}
        return body if status.get("observedGeneration") == body["metadata"]["generation"] else None

    return wait_until(caught_up, timeout=30, message=f"the operator to act on {name}'s generation")


def test_an_idle_suspension_survives_every_reapply_and_resumes_on_request(cluster: Cluster, namespace: str) -> None:
    name = "owned-idle"
    server_side_apply(cluster, namespace, manifest(name))
    suspended = wait_phase(cluster, namespace, name, "Suspended", timeout=60)
    assert suspended["status"]["reason"] == "IdleTimeout"
    assert suspended["status"]["suspendedBy"] == "IdleTimeout"
    assert suspended["spec"].get("suspended") is False  # the CRD default, as its author left it

    # Who owns what: the user the spec, the operator only status; no anonymous "Python" manager.
    fields = cluster.get_json("sandbox", name, "-n", namespace, "--show-managed-fields")["metadata"]["managedFields"]
    managers = {(entry["manager"], entry.get("subresource", "")) for entry in fields}
    assert (USER, "") in managers and ("sandbox-operator", "status") in managers, managers
    assert not any(manager.startswith("Python") for manager, _ in managers), managers

    # The same manifest again, and one with a spec change: no conflict, and it stays Suspended.
    server_side_apply(cluster, namespace, manifest(name))
    server_side_apply(cluster, namespace, manifest(name, metadata={"team": "data"}))
    body = acted_on(cluster, namespace, name)
    assert (body["status"]["phase"], body["status"]["suspendedBy"]) == ("Suspended", "IdleTimeout")
    # A forced apply (what a GitOps tool does on drift) takes nothing back either.
    server_side_apply(cluster, namespace, manifest(name, metadata={"team": "ml"}), "--force-conflicts")
    body = acted_on(cluster, namespace, name)
    assert body["status"]["phase"] == "Suspended"

    # A resume request (what the gateway's connect writes) resumes it; spec is untouched throughout.
    cluster.kubectl("annotate", "sandbox", name, "-n", namespace, "sandbox.dev/resume-request=1", "--overwrite")
    running = wait_phase(cluster, namespace, name, "Running", timeout=60)
    assert "suspendedBy" not in running["status"] and "resumeRequestSeen" not in running["status"]
    assert running["spec"].get("suspended") is False


def test_a_pause_request_suspends_without_a_spec_change(cluster: Cluster, namespace: str) -> None:
    name = "owned-pause"
    server_side_apply(cluster, namespace, manifest(name, timeouts={"idle": "0", "maxLifetime": "1h"}))
    wait_phase(cluster, namespace, name, "Running", timeout=60)
    cluster.kubectl("annotate", "sandbox", name, "-n", namespace, "sandbox.dev/paused=true", "--overwrite")
    paused = wait_phase(cluster, namespace, name, "Suspended", timeout=60)
    assert paused["status"]["suspendedBy"] == "Request"
    server_side_apply(
        cluster, namespace, manifest(name, timeouts={"idle": "0", "maxLifetime": "1h"}, metadata={"a": "b"})
    )
    assert acted_on(cluster, namespace, name)["status"]["phase"] == "Suspended"
    cluster.kubectl("annotate", "sandbox", name, "-n", namespace, "sandbox.dev/paused-")
    wait_phase(cluster, namespace, name, "Running", timeout=60)
