"""Parsing whole objects the way the API server returns them, and Python-side validation."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from sandbox_operator.api import (
    API_VERSION,
    ConditionStatus,
    EgressMode,
    OnIdle,
    Phase,
    Sandbox,
    SandboxPool,
    SandboxSpec,
    SandboxTemplate,
    SandboxTemplateSpec,
    resolve_resources,
    resolve_timeouts,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_minimal_sandbox_as_returned_by_a_fresh_create() -> None:
    # What the API server returns for `spec: {template: base}`: server defaults in, no status yet.
    body = {
        "apiVersion": API_VERSION,
        "kind": "Sandbox",
        "metadata": {
            "name": "demo",
            "namespace": "default",
            "uid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "generation": 1,
            "resourceVersion": "42",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {"template": "base", "network": {"egress": "deny"}, "onIdle": "suspend", "suspended": False},
    }
    sandbox = Sandbox.from_body(body)
    assert sandbox.metadata.name == "demo"
    assert sandbox.metadata.generation == 1
    assert sandbox.metadata.creation_timestamp == datetime(2026, 1, 1, tzinfo=UTC)
    assert sandbox.spec.template == "base"
    assert sandbox.spec.network.egress is EgressMode.DENY
    assert sandbox.spec.on_idle is OnIdle.SUSPEND
    assert sandbox.spec.resources is None
    assert sandbox.status.phase is None
    assert sandbox.status.conditions is None


def test_full_sandbox_with_status() -> None:
    body = {
        "apiVersion": API_VERSION,
        "kind": "Sandbox",
        "metadata": {"name": "full", "namespace": "team-a"},
        "spec": {
            "template": "code-interpreter",
            "image": "registry.example.com/ci:1",
            "resources": {"cpu": 2, "memory": "2Gi", "disk": "10Gi"},
            "network": {
                "egress": "allowList",
                "egressAllow": ["10.0.0.0/8", "pypi.org:443"],
                "ports": [8080],
            },
            "timeouts": {"idle": "10m", "maxLifetime": "2h", "execution": "300s"},
            "onIdle": "terminate",
            "suspended": True,
            "env": {"PYTHONUNBUFFERED": "1"},
            "metadata": {"owner": "alice"},
            "ttlAfterTerminated": "1h",
        },
        "status": {
            "phase": "Running",
            "sandboxID": "i7x2k9q0m3",
            "podName": "sbx-full",
            "podIP": "127.1.0.5",
            "endpoint": "127.1.0.5:49983",
            "startedAt": "2026-01-01T00:00:01Z",
            "expiresAt": "2026-01-01T02:00:00Z",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "PodReady",
                    "message": "the sandbox is running",
                    "lastTransitionTime": "2026-01-01T00:00:01Z",
                }
            ],
            "observedGeneration": 3,
            "usage": {"cpuCores": 0.25, "memoryBytes": 1024, "collectedAt": "2026-01-01T00:01:00Z"},
            "kopf": {"progress": {}},  # written by older kopf versions; tolerated
        },
    }
    sandbox = Sandbox.from_body(body)
    assert sandbox.spec.resources is not None
    assert sandbox.spec.resources.cpu == "2"  # YAML int kept as the quantity string
    assert sandbox.spec.network.egress_allow == ["10.0.0.0/8", "pypi.org:443"]
    assert sandbox.spec.timeouts is not None and sandbox.spec.timeouts.max_lifetime == "2h"
    assert sandbox.status.phase is Phase.RUNNING
    assert sandbox.status.sandbox_id == "i7x2k9q0m3"
    ready = sandbox.status.condition("Ready")
    assert ready is not None and ready.status is ConditionStatus.TRUE
    assert sandbox.status.condition("Suspended") is None
    assert sandbox.status.usage is not None and sandbox.status.usage.cpu_cores == 0.25
    round_trip = sandbox.to_body()
    assert round_trip["spec"]["network"]["egressAllow"] == ["10.0.0.0/8", "pypi.org:443"]
    assert round_trip["status"]["sandboxID"] == "i7x2k9q0m3"
    assert "kopf" not in round_trip["status"]
    assert Sandbox.from_body(round_trip) == sandbox


def test_from_body_accepts_read_only_mapping_views() -> None:
    from types import MappingProxyType

    body = MappingProxyType(
        {
            "apiVersion": API_VERSION,
            "kind": "Sandbox",
            "metadata": MappingProxyType({"name": "x"}),
            "spec": MappingProxyType({"template": "base"}),
        }
    )
    assert Sandbox.from_body(body).spec.template == "base"


def test_wrong_kind_is_refused() -> None:
    with pytest.raises(ValidationError, match="kind"):
        Sandbox.from_body({"apiVersion": API_VERSION, "kind": "SandboxPool", "spec": {"template": "base"}})


def test_phase_values_are_the_design_phases() -> None:
    assert [phase.value for phase in Phase] == [
        "Creating",
        "Running",
        "Suspending",
        "Suspended",
        "Resuming",
        "Terminating",
        "Terminated",
        "Error",
    ]
    assert Phase("Running") == "Running"


def test_snake_case_names_are_accepted_in_python() -> None:
    spec = SandboxSpec(template="base", on_idle=OnIdle.TERMINATE, ttl_after_terminated="0")
    assert spec.model_dump(by_alias=True, exclude_none=True)["onIdle"] == "terminate"


# Specs the API server refuses (see tests/integration/test_api_validation.py) are refused here too,
# with the same message, so the gateway reports them before calling the API.
PYTHON_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"resources": {"cpu": "two"}}, "must be a Kubernetes quantity"),
    ({"resources": {"memory": "-1Gi"}}, "must be greater than zero"),
    ({"resources": {"disk": "0"}}, "must be greater than zero"),
    ({"timeouts": {"idle": "1d"}}, "must be a duration"),
    ({"timeouts": {"execution": "1.5h"}}, "must be a duration"),
    (
        {"timeouts": {"idle": "2h", "maxLifetime": "1h"}},
        "timeouts.idle must not be longer than timeouts.maxLifetime",
    ),
    ({"timeouts": {"execution": "2h", "maxLifetime": "1h"}}, "timeouts.execution must not be longer"),
    ({"network": {"egress": "sometimes"}}, "'deny', 'allow' or 'allowList'"),
    ({"network": {"egress": "deny", "egressAllow": ["10.0.0.0/8"]}}, "only used when egress is allowList"),
    ({"network": {"egress": "allowList"}}, "needs at least one egressAllow entry"),
    ({"network": {"egress": "allowList", "egressAllow": ["10.0.0.0/33"]}}, "must be a CIDR"),
    ({"network": {"egress": "allowList", "egressAllow": ["pypi.org"]}}, "must be a CIDR"),
    ({"network": {"egress": "allowList", "egressAllow": ["pypi.org:70000"]}}, "must be a CIDR"),
    ({"network": {"ports": [0]}}, "greater than or equal to 1"),
    ({"network": {"ports": [65536]}}, "less than or equal to 65535"),
    ({"network": {"ports": [49983]}}, "reserved for the sandbox agent"),
    ({"env": {"1BAD": "x"}}, "env names must be C identifiers"),
    ({"env": {"A" * 129: "x"}}, "env names must be C identifiers"),
    ({"metadata": {"-bad": "x"}}, "metadata keys must be"),
    ({"onIdle": "hibernate"}, "'suspend' or 'terminate'"),
    ({"template": "Not_A_Name"}, "must be a DNS subdomain"),
    ({"unknownField": 1}, "Extra inputs are not permitted"),
    ({"timeouts": {"idel": "5m"}}, "Extra inputs are not permitted"),
    ({"ttlAfterTerminated": "forever"}, "must be a duration"),
]


@pytest.mark.parametrize(("patch", "message"), PYTHON_REFUSED, ids=[m for _, m in PYTHON_REFUSED])
def test_python_refuses_bad_specs(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SandboxSpec.model_validate({"template": "base", **patch})


def test_zero_lifetime_means_no_limit_for_idle() -> None:
    spec = SandboxSpec.model_validate({"template": "base", "timeouts": {"idle": "48h", "maxLifetime": "0"}})
    assert spec.timeouts is not None and spec.timeouts.idle == "48h"


def test_template_defaults_fill_in() -> None:
    template = SandboxTemplateSpec.model_validate({"image": "python:3.12"})
    assert template.resources.default.cpu == "1"
    assert template.timeouts.idle == "30m"
    assert template.persistence.mount_path == "/home/user"
    assert template.security.run_as_user == 1000


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            {"resources": {"default": {"cpu": "4"}, "max": {"cpu": "2"}}},
            "resources.default.cpu must not be more",
        ),
        ({"security": {"runAsUser": 0}}, "greater than or equal to 1"),
        ({"ports": [49999]}, "reserved for the sandbox agent"),
        ({"timeouts": {"idle": "2h"}}, "timeouts.idle must not be longer"),
        ({"persistence": {"mountPath": "home/user"}}, "should match pattern"),
        ({"imagePolicy": {"mode": "AllowList"}}, "AllowList needs at least one allow entry"),
        ({"imagePolicy": {"allow": ["ghcr.io/x/"]}}, "allow is only used when mode is AllowList"),
        ({"imagePolicy": {"mode": "AllowList", "allow": ["a b"]}}, "each allow entry must be an image reference"),
        ({"imagePolicy": {"mode": "Sometimes"}}, "Input should be 'Template', 'AllowList' or 'Any'"),
        ({"allowedNamespaces": []}, "at least 1 item"),
        ({"allowedNamespaces": ["Team_A"]}, "must be a namespace name"),
        ({"allowedNamespaces": ["a", "a"]}, "allowedNamespaces must not repeat"),
        ({"timeouts": {"maxLifetimeLimit": "0"}}, "maxLifetimeLimit must be longer than 0"),
    ],
)
def test_python_refuses_bad_templates(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SandboxTemplateSpec.model_validate({"image": "python:3.12", **patch})


def test_resolution_prefers_spec_then_template() -> None:
    template = SandboxTemplateSpec.model_validate(
        {
            "image": "i",
            "resources": {"default": {"cpu": "500m"}, "max": {"memory": "1Gi"}},
            "timeouts": {"idle": "5m"},
        }
    )
    spec = SandboxSpec.model_validate(
        {"template": "t", "resources": {"memory": "2Gi"}, "timeouts": {"maxLifetime": "0"}}
    )
    resources = resolve_resources(spec, template)
    assert (resources.cpu_millicores, resources.memory_bytes, resources.disk_bytes) == (500, 2 * 2**30, 2**30)
    assert [v.message for v in resources.violations] == ["spec.resources.memory 2Gi exceeds the template maximum 1Gi"]
    timeouts = resolve_timeouts(spec, template)
    assert (timeouts.idle, timeouts.max_lifetime, timeouts.execution) == (300, 0, 300)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda path: path.name)
def test_examples_parse(path: Path) -> None:
    kinds: dict[str, type[Sandbox] | type[SandboxTemplate] | type[SandboxPool]] = {
        "Sandbox": Sandbox,
        "SandboxTemplate": SandboxTemplate,
        "SandboxPool": SandboxPool,
    }
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents
    for document in documents:
        parsed = kinds[document["kind"]].from_body(document)
        assert parsed.metadata.name
