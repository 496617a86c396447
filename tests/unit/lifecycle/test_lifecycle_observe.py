"""Observations from Kubernetes dicts, and Desired/Observed/deadlines from the API models."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from lifecycle_factories import T0

from sandbox_operator.api import OnIdle, Phase, Sandbox, SandboxTemplate, SuspendCause
from sandbox_operator.lifecycle import (
    PodPhase,
    PvcPhase,
    desired_from,
    observed_from,
    pod_observation,
    pvc_observation,
)
from sandbox_operator.lifecycle.observe import serving_pod_ip


def test_ready_running_pod() -> None:
    seen = pod_observation(
        {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}, "metadata": {}}
    )
    assert (seen.phase, seen.ready, seen.deleting) == (PodPhase.RUNNING, True, False)


def test_failed_pod_reasons() -> None:
    seen = pod_observation(
        {
            "metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"},
            "status": {
                "phase": "Failed",
                "reason": "Evicted",
                "message": "low on memory",
                "containerStatuses": [
                    {
                        "state": {"terminated": {"reason": "Error", "exitCode": 137}},
                        "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
                    },
                    {"state": {"terminated": {"reason": "Completed", "exitCode": 0}}},
                    {"state": {"waiting": {"reason": "ImagePullBackOff"}}},
                ],
            },
        }
    )
    assert seen.phase is PodPhase.FAILED
    assert (seen.reason, seen.message, seen.deleting) == ("Evicted", "low on memory", True)
    assert seen.terminated_reasons == ("Error", "OOMKilled", "Completed")
    assert seen.exit_codes == (137, 0)  # each once, in the containers' order
    assert seen.waiting_reasons == ("ImagePullBackOff",)


def test_pod_without_status_is_pending_and_odd_phases_unknown() -> None:
    assert pod_observation({}).phase is PodPhase.PENDING
    assert pod_observation({"status": {"phase": "Weird"}}).phase is PodPhase.UNKNOWN


def test_pvc_observation() -> None:
    assert pvc_observation({"status": {"phase": "Bound"}}).phase is PvcPhase.BOUND
    lost = pvc_observation({"status": {"phase": "Lost"}, "metadata": {"deletionTimestamp": "x"}})
    assert (lost.phase, lost.deleting) == (PvcPhase.LOST, True)


def _sandbox(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, **meta: Any) -> Sandbox:
    metadata = {
        "name": "demo",
        "namespace": "team",
        "uid": "u-1",
        "generation": 2,
        "creationTimestamp": "2026-01-01T00:00:00Z",
        **meta,
    }
    return Sandbox.from_body(
        {"metadata": metadata, "spec": {"template": "python", **(spec or {})}, "status": status or {}}
    )


TEMPLATE = SandboxTemplate.from_body(
    {
        "metadata": {"name": "python"},
        "spec": {
            "image": "agent:1",
            "resources": {"max": {"memory": "1Gi"}},
            "timeouts": {"idle": "10m", "maxLifetime": "2h", "execution": "1m"},
        },
    }
)


def test_desired_from_uses_template_defaults_and_spec_overrides() -> None:
    wanted = desired_from(
        _sandbox({"timeouts": {"idle": "0"}, "onIdle": "terminate", "suspended": True, "ttlAfterTerminated": "0"}),
        TEMPLATE,
    )
    assert wanted.max_lifetime == timedelta(hours=2)
    assert wanted.idle_timeout is None  # 0 = none
    assert (wanted.on_idle, wanted.suspended, wanted.generation) == (OnIdle.TERMINATE, True, 2)
    assert wanted.ttl_after_terminated == timedelta(0)
    assert wanted.resources_violation is None
    assert wanted.persistent_workspace


def test_desired_from_reports_resources_over_max() -> None:
    wanted = desired_from(_sandbox({"resources": {"memory": "4Gi"}}), TEMPLATE)
    assert wanted.resources_violation == "spec.resources.memory 4Gi exceeds the template maximum 1Gi"


def test_desired_from_reports_an_image_the_template_refuses() -> None:
    assert desired_from(_sandbox(), TEMPLATE).image_violation is None
    assert desired_from(_sandbox({"image": "agent:1"}), TEMPLATE).image_violation is None
    refused = desired_from(_sandbox({"image": "evil/miner:1"}), TEMPLATE).image_violation
    assert refused is not None and refused.startswith("spec.image evil/miner:1 is not allowed")


def test_desired_from_reports_a_namespace_the_template_leaves_out() -> None:
    only = TEMPLATE.model_copy(update={"spec": TEMPLATE.spec.model_copy(update={"allowed_namespaces": ["ml"]})})
    assert desired_from(_sandbox(namespace="ml"), only).namespace_violation is None
    refused = desired_from(_sandbox(namespace="team"), only).namespace_violation
    assert refused == "SandboxTemplate python may not be used in namespace team (see its allowedNamespaces)"
    assert desired_from(_sandbox(namespace="team"), TEMPLATE).namespace_violation is None


def test_desired_from_clamps_the_lifetime_to_the_template_cap() -> None:
    capped = SandboxTemplate.from_body(
        {"metadata": {"name": "python"}, "spec": {"image": "agent:1", "timeouts": {"maxLifetimeLimit": "24h"}}}
    )
    for asked in ("0", "48h"):  # 0 is "no limit": the cap all the same
        wanted = desired_from(_sandbox({"timeouts": {"maxLifetime": asked, "idle": "0"}}), capped)
        assert wanted.max_lifetime == timedelta(hours=24)
    assert desired_from(_sandbox({"timeouts": {"maxLifetime": "2h"}}), capped).max_lifetime == timedelta(hours=2)


def test_desired_from_reads_the_api_clients_requests_from_annotations() -> None:
    plain = desired_from(_sandbox(), TEMPLATE)
    assert (plain.paused, plain.end_at) == (False, None)
    asked = desired_from(
        _sandbox(annotations={"sandbox.dev/paused": "true", "sandbox.dev/end-at": "2026-01-01T05:00:00Z"}), TEMPLATE
    )
    assert asked.paused and asked.end_at == T0 + timedelta(hours=5)
    assert not desired_from(_sandbox(annotations={"sandbox.dev/paused": "false"}), TEMPLATE).paused
    # not a time: ignored (spec.timeouts decide)
    assert desired_from(_sandbox(annotations={"sandbox.dev/end-at": "tomorrow"}), TEMPLATE).end_at is None
    capped = SandboxTemplate.from_body(
        {"metadata": {"name": "python"}, "spec": {"image": "agent:1", "timeouts": {"maxLifetimeLimit": "24h"}}}
    )
    far = _sandbox(annotations={"sandbox.dev/end-at": "2026-03-01T00:00:00Z"})
    assert desired_from(far, capped).end_at == T0 + timedelta(hours=24)  # within maxLifetimeLimit


def test_observed_from_reads_the_suspension_record_and_the_resume_request() -> None:
    sandbox = _sandbox(
        status={"phase": "Suspended", "suspendedBy": "IdleTimeout", "resumeRequestSeen": "a"},
        annotations={"sandbox.dev/resume-request": "b" * 300},
    )
    seen = observed_from(sandbox, pod=None, pvc=None)
    assert (seen.suspended_by, seen.resume_request_seen) == (SuspendCause.IDLE_TIMEOUT, "a")
    assert seen.resume_request == "b" * 256  # as much as status.resumeRequestSeen can hold


def test_observed_from_reads_status_and_children() -> None:
    status = {
        "phase": "Running",
        "reason": "Started",
        "message": "the sandbox is running",
        "startedAt": "2026-01-01T00:00:05Z",
        "lastActivityAt": "2026-01-01T00:10:00Z",
        "observedGeneration": 2,
    }
    seen = observed_from(
        _sandbox(status=status),
        pod={"status": {"phase": "Running"}},
        pvc=None,
        service_present=True,
    )
    assert (seen.phase, seen.reason, seen.observed_generation) == (Phase.RUNNING, "Started", 2)
    assert seen.message == "the sandbox is running"
    assert seen.created_at == T0
    assert seen.started_at == T0 + timedelta(seconds=5)
    assert seen.pod is not None and seen.pod.phase is PodPhase.RUNNING
    assert (seen.pvc, seen.service_present, seen.network_policy_present) == (None, True, None)
    assert not seen.deleting


def test_terminated_at_falls_back_to_the_condition() -> None:
    status = {
        "phase": "Terminated",
        "conditions": [
            {
                "type": "Terminated",
                "status": "True",
                "reason": "Deleted",
                "message": "the sandbox is terminated",
                "lastTransitionTime": "2026-01-01T01:00:00Z",
            }
        ],
    }
    seen = observed_from(_sandbox(status=status, deletionTimestamp="2026-01-01T02:00:00Z"), pod=None, pvc=None)
    assert seen.terminated_at == T0 + timedelta(hours=1)
    assert seen.deleting


def test_observed_from_needs_a_creation_timestamp() -> None:
    body = {"metadata": {"name": "x"}, "spec": {"template": "python"}}
    with pytest.raises(ValueError, match="creationTimestamp"):
        observed_from(Sandbox.from_body(body), pod=None, pvc=None)


@pytest.mark.parametrize(
    ("pod", "ip"),
    [
        ({"status": {"phase": "Running", "podIP": "10.0.0.7"}}, "10.0.0.7"),
        ({"status": {"phase": "Failed", "podIP": "10.0.0.7"}}, None),  # the agent is dead: nothing answers
        ({"status": {"phase": "Running", "podIP": "10.0.0.7"}, "metadata": {"deletionTimestamp": "x"}}, None),
        ({"status": {"phase": "Pending"}}, None),
        ({"status": {"phase": "Running", "podIP": ""}}, None),
        (None, None),
    ],
)
def test_serving_pod_ip_is_a_running_pods_only(pod: dict[str, Any] | None, ip: str | None) -> None:
    assert serving_pod_ip(pod) == ip
