"""The generated CRDs against a real kube-apiserver: bad specs refused with clear messages,
defaults filled in, descriptions served to `kubectl explain`, examples accepted."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sandbox_operator.api import Sandbox, SandboxPool, SandboxTemplate
from testlib import REPO, Cluster, wait_until

pytestmark = pytest.mark.integration

EXAMPLES = REPO / "examples"


def _sandbox(spec: dict[str, Any], name: str = "bad") -> dict[str, Any]:
    return {"apiVersion": "sandbox.dev/v1alpha1", "kind": "Sandbox", "metadata": {"name": name}, "spec": spec}


def _template(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "apiVersion": "sandbox.dev/v1alpha1",
        "kind": "SandboxTemplate",
        "metadata": {"name": name},
        "spec": spec,
    }


def _pool(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "sandbox.dev/v1alpha1",
        "kind": "SandboxPool",
        "metadata": {"name": "bad"},
        "spec": spec,
    }


def _allow(*targets: str) -> dict[str, Any]:
    return {"template": "base", "network": {"egress": "allowList", "egressAllow": list(targets)}}


# Each case: (id, object, field the error must name, text of the rule the error must contain).
BAD_SANDBOXES: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "cpu-not-a-quantity",
        _sandbox({"template": "base", "resources": {"cpu": "two"}}),
        "spec.resources.cpu",
        "must be a Kubernetes quantity such as 500m, 2, 512Mi or 10Gi",
    ),
    (
        "memory-with-si-typo",
        _sandbox({"template": "base", "resources": {"memory": "512MB"}}),
        "spec.resources.memory",
        "must be a Kubernetes quantity",
    ),
    (
        "memory-negative",
        _sandbox({"template": "base", "resources": {"memory": "-1Gi"}}),
        "spec.resources.memory",
        "must be greater than zero",
    ),
    (
        "cpu-negative-integer",
        _sandbox({"template": "base", "resources": {"cpu": -1}}),
        "spec.resources.cpu",
        "must be greater than zero",
    ),
    (
        "cpu-unquoted-fraction",
        _sandbox({"template": "base", "resources": {"cpu": 0.5}}),
        "spec.resources.cpu",
        "must be of type integer,string",
    ),
    (
        "disk-zero",
        _sandbox({"template": "base", "resources": {"disk": "0"}}),
        "spec.resources.disk",
        "must be greater than zero",
    ),
    (
        "idle-in-days",
        _sandbox({"template": "base", "timeouts": {"idle": "1d"}}),
        "spec.timeouts.idle",
        "must be a duration such as 300s, 30m or 1h30m",
    ),
    (
        "lifetime-fractional",
        _sandbox({"template": "base", "timeouts": {"maxLifetime": "1.5h"}}),
        "spec.timeouts.maxLifetime",
        "must be a duration",
    ),
    (
        "execution-negative",
        _sandbox({"template": "base", "timeouts": {"execution": "-5m"}}),
        "spec.timeouts.execution",
        "must be a duration",
    ),
    (
        "idle-over-lifetime",
        _sandbox({"template": "base", "timeouts": {"idle": "2h", "maxLifetime": "1h"}}),
        "spec.timeouts.idle",
        "timeouts.idle must not be longer than timeouts.maxLifetime",
    ),
    (
        "execution-over-lifetime",
        _sandbox({"template": "base", "timeouts": {"execution": "90m", "maxLifetime": "1h"}}),
        "spec.timeouts.execution",
        "timeouts.execution must not be longer than timeouts.maxLifetime",
    ),
    (
        "ttl-not-a-duration",
        _sandbox({"template": "base", "ttlAfterTerminated": "forever"}),
        "spec.ttlAfterTerminated",
        "must be a duration",
    ),
    (
        "unknown-egress-mode",
        _sandbox({"template": "base", "network": {"egress": "sometimes"}}),
        "spec.network.egress",
        'Unsupported value: "sometimes"',
    ),
    (
        "allow-entries-without-allowlist",
        _sandbox({"template": "base", "network": {"egress": "deny", "egressAllow": ["10.0.0.0/8"]}}),
        "spec.network.egressAllow",
        "egressAllow is only used when egress is allowList",
    ),
    (
        "allow-entries-without-egress",
        _sandbox({"template": "base", "network": {"egressAllow": ["10.0.0.0/8"]}}),
        "spec.network.egressAllow",
        "egressAllow is only used when egress is allowList",
    ),
    (
        "allowlist-without-entries",
        _sandbox({"template": "base", "network": {"egress": "allowList"}}),
        "spec.network.egressAllow",
        "egress allowList needs at least one egressAllow entry",
    ),
    (
        "cidr-prefix-too-long",
        _sandbox(_allow("10.0.0.0/33")),
        "spec.network.egressAllow[0]",
        "each egressAllow entry must be a CIDR",
    ),
    (
        "cidr-bad-octet",
        _sandbox(_allow("10.0.0.0/8", "300.1.2.0/24")),
        "spec.network.egressAllow[1]",
        "each egressAllow entry must be a CIDR",
    ),
    (
        "host-without-port",
        _sandbox(_allow("pypi.org")),
        "spec.network.egressAllow[0]",
        "each egressAllow entry must be a CIDR",
    ),
    (
        "host-port-out-of-range",
        _sandbox(_allow("pypi.org:70000")),
        "spec.network.egressAllow[0]",
        "or a lowercase host:port with a port from 1 to 65535",
    ),
    (
        "port-above-65535",
        _sandbox({"template": "base", "network": {"ports": [8080, 70000]}}),
        "spec.network.ports[1]",
        "should be less than or equal to 65535",
    ),
    (
        "port-zero",
        _sandbox({"template": "base", "network": {"ports": [0]}}),
        "spec.network.ports[0]",
        "should be greater than or equal to 1",
    ),
    (
        "port-reserved-for-agent",
        _sandbox({"template": "base", "network": {"ports": [49983]}}),
        "spec.network.ports",
        "ports 49983 and 49999 are reserved for the sandbox agent",
    ),
    (
        "port-repeated",
        _sandbox({"template": "base", "network": {"ports": [8080, 8080]}}),
        "spec.network.ports[1]",
        "Duplicate value: 8080",
    ),
    (
        "env-reserved-for-the-agent",
        _sandbox({"template": "base", "env": {"SANDBOX_MAX_OUTPUT_BYTES": "0"}}),
        "spec.env",
        "env names starting with SANDBOX_ or LD_ are reserved",
    ),
    (
        "env-loader-variable",
        _sandbox({"template": "base", "env": {"LD_PRELOAD": "/tmp/x.so"}}),
        "spec.env",
        "env names starting with SANDBOX_ or LD_ are reserved",
    ),
    (
        "env-name-starts-with-digit",
        _sandbox({"template": "base", "env": {"1BAD": "x"}}),
        "spec.env",
        "env names must be C identifiers",
    ),
    (
        "env-name-too-long",
        _sandbox({"template": "base", "env": {"A" * 129: "x"}}),
        "spec.env",
        "of at most 128 characters",
    ),
    (
        "metadata-key-invalid",
        _sandbox({"template": "base", "metadata": {"-team": "x"}}),
        "spec.metadata",
        "metadata keys must be at most 63 characters",
    ),
    (
        "metadata-value-too-long",
        _sandbox({"template": "base", "metadata": {"team": "x" * 1025}}),
        "spec.metadata.team",
        "may not be more than 1024 bytes",
    ),
    (
        "unknown-on-idle",
        _sandbox({"template": "base", "onIdle": "hibernate"}),
        "spec.onIdle",
        'supported values: "suspend", "terminate"',
    ),
    (
        "suspended-not-boolean",
        _sandbox({"template": "base", "suspended": "yes"}),
        "spec.suspended",
        "must be of type boolean",
    ),
    ("template-missing", _sandbox({"image": "python:3.12"}), "spec.template", "Required value"),
    (
        "template-not-a-name",
        _sandbox({"template": "Base_Template"}),
        "spec.template",
        "must be a DNS subdomain",
    ),
    ("image-empty", _sandbox({"template": "base", "image": ""}), "spec.image", "at least 1 chars long"),
    (
        "image-too-long",
        _sandbox({"template": "base", "image": "r/" + "i" * 600}),
        "spec.image",
        "may not be more than 512 bytes",
    ),
    (
        "unknown-spec-field",
        _sandbox({"template": "base", "cpu": "1"}),
        "spec.cpu",
        'unknown field "spec.cpu"',
    ),
    (
        "unknown-nested-field",
        _sandbox({"template": "base", "timeouts": {"idel": "5m"}}),
        "spec.timeouts.idel",
        'unknown field "spec.timeouts.idel"',
    ),
    (
        "name-too-long",
        _sandbox({"template": "base"}, name="s" * 64),
        "metadata.name",
        "Sandbox names must be at most 63 characters",
    ),
    (
        "name-with-dot",
        _sandbox({"template": "base"}, name="my.sandbox"),
        "metadata.name",
        "Sandbox names must be DNS labels",
    ),
    (
        "pool-size-negative",
        _pool({"template": "base", "size": -1}),
        "spec.size",
        "should be greater than or equal to 0",
    ),
    (
        "pool-size-too-large",
        _pool({"template": "base", "size": 5000}),
        "spec.size",
        "should be less than or equal to 1000",
    ),
]

BAD_TEMPLATES: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "network-allowlist-without-entries",
        {"image": "i", "network": {"egress": "allowList"}},
        "spec.network.egressAllow",
        "egress allowList needs at least one egressAllow entry",
    ),
    (
        "network-entries-without-allowlist",
        {"image": "i", "network": {"egressAllow": ["pypi.org:443"]}},
        "spec.network.egressAllow",
        "egressAllow is only used when egress is allowList",
    ),
    (
        "default-cpu-over-max",
        {"image": "i", "resources": {"default": {"cpu": "4"}, "max": {"cpu": "2"}}},
        "spec.resources.default.cpu",
        "resources.default.cpu must not be more than resources.max.cpu",
    ),
    (
        "default-memory-over-max",
        {"image": "i", "resources": {"default": {"memory": "2Gi"}, "max": {"memory": "1500Mi"}}},
        "spec.resources.default.memory",
        "resources.default.memory must not be more than resources.max.memory",
    ),
    (
        "root-user",
        {"image": "i", "security": {"runAsUser": 0}},
        "spec.security.runAsUser",
        "should be greater than or equal to 1",
    ),
    (
        "relative-mount-path",
        {"image": "i", "persistence": {"mountPath": "home/user"}},
        "spec.persistence.mountPath",
        "should match '^/'",
    ),
    (
        "template-idle-over-lifetime",
        {"image": "i", "timeouts": {"idle": "2h"}},
        "spec.timeouts.idle",
        "timeouts.idle must not be longer than timeouts.maxLifetime",
    ),
    ("image-missing", {"command": ["sandbox-agent"]}, "spec.image", "Required value"),
    (
        "unknown-pull-policy",
        {"image": "i", "imagePullPolicy": "Sometimes"},
        "spec.imagePullPolicy",
        'Unsupported value: "Sometimes"',
    ),
    (
        "image-allow-list-empty",
        {"image": "i", "imagePolicy": {"mode": "AllowList"}},
        "spec.imagePolicy.allow",
        "imagePolicy mode AllowList needs at least one allow entry",
    ),
    (
        "image-allow-without-allow-list",
        {"image": "i", "imagePolicy": {"allow": ["ghcr.io/x/"]}},
        "spec.imagePolicy.allow",
        "imagePolicy.allow is only used when mode is AllowList",
    ),
    (
        "image-allow-entry-with-space",
        {"image": "i", "imagePolicy": {"mode": "AllowList", "allow": ["ghcr.io/x y"]}},
        "spec.imagePolicy.allow[0]",
        "each allow entry must be an image reference",
    ),
    (
        "unknown-image-policy-mode",
        {"image": "i", "imagePolicy": {"mode": "Sometimes"}},
        "spec.imagePolicy.mode",
        'Unsupported value: "Sometimes"',
    ),
    (
        "allowed-namespaces-empty",
        {"image": "i", "allowedNamespaces": []},
        "spec.allowedNamespaces",
        "should have at least 1 items",
    ),
    (
        "allowed-namespace-not-a-name",
        {"image": "i", "allowedNamespaces": ["Team_A"]},
        "spec.allowedNamespaces[0]",
        "must be a namespace name",
    ),
    (
        "lifetime-limit-zero",
        {"image": "i", "timeouts": {"maxLifetimeLimit": "0"}},
        "spec.timeouts.maxLifetimeLimit",
        "timeouts.maxLifetimeLimit must be longer than 0",
    ),
]


@pytest.fixture(scope="module")
def refusals_namespace(cluster: Cluster) -> Iterator[str]:
    """One namespace for all refusal cases: each case checks it is still empty afterwards."""
    name = f"t-api-refusals-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


def _assert_refused(cluster: Cluster, body: dict[str, Any], namespace: str | None, field: str, rule: str) -> None:
    # `kubectl create` validates strictly by default (--validate=strict, i.e. fieldValidation=Strict).
    args = ["create", "-f", "-"] + (["-n", namespace] if namespace else [])
    result = cluster.kubectl(*args, input=json.dumps(body), check=False)
    assert result.returncode != 0, f"the API server accepted {body}: {result.stdout}"
    assert field in result.stderr, f"error does not name {field}:\n{result.stderr}"
    assert rule in result.stderr, f"error does not contain {rule!r}:\n{result.stderr}"


@pytest.mark.parametrize(
    ("body", "field", "rule"), [case[1:] for case in BAD_SANDBOXES], ids=[case[0] for case in BAD_SANDBOXES]
)
def test_bad_namespaced_object_is_refused(
    cluster: Cluster,
    apply_crds: list[str],
    refusals_namespace: str,
    body: dict[str, Any],
    field: str,
    rule: str,
) -> None:
    _assert_refused(cluster, body, refusals_namespace, field, rule)
    leftovers = cluster.get_json("sandboxes,sandboxpools", "-n", refusals_namespace)
    assert leftovers["items"] == []


@pytest.mark.parametrize(
    ("spec", "field", "rule"), [case[1:] for case in BAD_TEMPLATES], ids=[case[0] for case in BAD_TEMPLATES]
)
def test_bad_template_is_refused(
    cluster: Cluster, apply_crds: list[str], spec: dict[str, Any], field: str, rule: str
) -> None:
    name = f"bad-{secrets.token_hex(4)}"
    _assert_refused(cluster, _template(spec, name), None, field, rule)
    assert cluster.get_json("sandboxtemplate", name) is None


def test_minimal_sandbox_comes_back_with_defaults(cluster: Cluster, apply_crds: list[str], namespace: str) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", str(EXAMPLES / "sandbox-minimal.yaml"))
    body = cluster.get_json("sandbox", "minimal", "-n", namespace)
    assert body["spec"] == {
        "template": "base",
        "network": {},  # egress unset: the template's network decides
        "onIdle": "suspend",
        "onLifetimeEnd": "terminate",
        "suspended": False,
    }
    sandbox = Sandbox.from_body(body)
    assert sandbox.status.phase is None
    assert sandbox.metadata.generation == 1


def test_minimal_template_comes_back_with_defaults(cluster: Cluster, apply_crds: list[str]) -> None:
    name = f"defaults-{secrets.token_hex(4)}"
    cluster.kubectl("create", "-f", "-", input=json.dumps(_template({"image": "python:3.12"}, name)))
    try:
        spec = cluster.get_json("sandboxtemplate", name)["spec"]
        assert spec == {
            "image": "python:3.12",
            "imagePolicy": {"mode": "Template"},  # only the template's own image, unless it says otherwise
            "network": {},  # its sandboxes' egress: deny unless it says otherwise
            "resources": {"default": {"cpu": "1", "memory": "512Mi", "disk": "1Gi"}},
            "timeouts": {"idle": "30m", "maxLifetime": "1h", "execution": "5m"},
            "persistence": {"enabled": True, "mountPath": "/home/user"},
            "security": {
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "fsGroup": 1000,
                "readOnlyRootFilesystem": False,
            },
        }
    finally:
        cluster.kubectl("delete", "sandboxtemplate", name, "--ignore-not-found")


def test_zero_lifetime_allows_any_idle(cluster: Cluster, apply_crds: list[str], namespace: str) -> None:
    body = _sandbox({"template": "base", "timeouts": {"idle": "48h", "maxLifetime": "0", "execution": "0"}}, "nolimit")
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(body))
    stored = cluster.get_json("sandbox", "nolimit", "-n", namespace)
    assert stored["spec"]["timeouts"] == {"idle": "48h", "maxLifetime": "0", "execution": "0"}


def test_template_is_immutable(cluster: Cluster, apply_crds: list[str], namespace: str) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(_sandbox({"template": "base"}, "fixed")))
    result = cluster.kubectl(
        "patch",
        "sandbox",
        "fixed",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"template":"other"}}',
        check=False,
    )
    assert result.returncode != 0
    assert "spec.template" in result.stderr
    assert "template is immutable: create a new Sandbox instead" in result.stderr
    assert cluster.get_json("sandbox", "fixed", "-n", namespace)["spec"]["template"] == "base"


def test_status_subresource_accepts_operator_status(cluster: Cluster, apply_crds: list[str], namespace: str) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(_sandbox({"template": "base"}, "st")))
    status = {
        "phase": "Running",
        "sandboxID": "a1b2c3d4e5",
        "podName": "st",
        "podIP": "127.1.0.9",
        "startedAt": "2026-01-01T00:00:00Z",
        "expiresAt": "2026-01-01T01:00:00Z",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "PodReady",
                "message": "the sandbox is running",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
                "observedGeneration": 1,
            }
        ],
        "reason": "Started",
        "observedGeneration": 1,
        "usage": {
            "cpuCores": 0.5,
            "memoryBytes": 1048576,
            "processes": 3,
            "collectedAt": "2026-01-01T00:00:30Z",
        },
    }
    cluster.kubectl(
        "patch",
        "sandbox",
        "st",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    sandbox = Sandbox.from_body(cluster.get_json("sandbox", "st", "-n", namespace))
    assert sandbox.status.sandbox_id == "a1b2c3d4e5"
    assert sandbox.status.usage is not None and sandbox.status.usage.processes == 3

    refused = cluster.kubectl(
        "patch",
        "sandbox",
        "st",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"sandboxID":"not-e2b.shaped"}}',
        check=False,
    )
    assert refused.returncode != 0
    assert "status.sandboxID" in refused.stderr

    table = cluster.kubectl("get", "sbx", "st", "-n", namespace, "-o", "wide").stdout
    header = table.splitlines()[0].split()
    assert header[:7] == ["NAME", "PHASE", "READY", "REASON", "TEMPLATE", "AGE", "EXPIRES"]
    assert table.splitlines()[1].split()[:5] == ["st", "Running", "True", "Started", "base"]
    assert {"ID", "POD", "IP"} <= set(header)
    assert "a1b2c3d4e5" in table and "127.1.0.9" in table


_GOOD_CONDITION: dict[str, Any] = {
    "type": "Ready",
    "status": "True",
    "reason": "Filled",
    "message": "2/2 warm pods ready",
    "lastTransitionTime": "2026-01-01T00:00:00Z",
}


@pytest.mark.parametrize(
    ("change", "field", "rule"),
    [
        ({"type": "not a type"}, "status.conditions[0].type", "should match"),
        ({"type": "x" * 317}, "status.conditions[0].type", "may not be more than 316"),
        ({"status": "Yes"}, "status.conditions[0].status", 'Unsupported value: "Yes"'),
        ({"reason": "Not CamelCase!"}, "status.conditions[0].reason", "should match"),
        ({"reason": None}, "status.conditions[0].reason", "Required value"),
        ({"message": None}, "status.conditions[0].message", "Required value"),
        ({"message": "m" * 32769}, "status.conditions[0].message", "may not be more than 32768"),
        ({"lastTransitionTime": None}, "status.conditions[0].lastTransitionTime", "Required value"),
        ({"lastTransitionTime": "yesterday"}, "status.conditions[0].lastTransitionTime", "date-time"),
        ({"observedGeneration": -1}, "status.conditions[0].observedGeneration", "greater than or equal to 0"),
    ],
    ids=lambda value: None if isinstance(value, dict) else str(value)[:24],
)
def test_conditions_are_checked_like_metav1_conditions(
    cluster: Cluster, apply_crds: list[str], namespace: str, change: dict[str, Any], field: str, rule: str
) -> None:
    name = f"cond-{secrets.token_hex(3)}"
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(_sandbox({"template": "base"}, name)))

    def write(condition: dict[str, Any]) -> Any:
        patch = json.dumps({"status": {"conditions": [condition]}})
        args = ("patch", "sandbox", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", patch)
        return cluster.kubectl(*args, check=False)

    accepted = write({**_GOOD_CONDITION, "type": "sandbox.dev/Audited", "observedGeneration": 1})
    assert accepted.returncode == 0, accepted.stderr  # a prefixed type, as metav1 allows
    bad = {key: value for key, value in {**_GOOD_CONDITION, **change}.items() if value is not None}
    refused = write(bad)
    assert refused.returncode != 0, f"accepted {bad}"
    assert field in refused.stderr and rule in refused.stderr, refused.stderr
    stored = cluster.get_json("sandbox", name, "-n", namespace)["status"]["conditions"]
    assert [c["type"] for c in stored] == ["sandbox.dev/Audited"]


def test_labels_and_annotations_pass_with_name_rules_on_the_object(
    cluster: Cluster, apply_crds: list[str], namespace: str
) -> None:
    body = _sandbox({"template": "base"}, "labelled")
    body["metadata"] |= {"labels": {"team": "a"}, "annotations": {"sandbox.dev/created-by": "ci"}}
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(body))
    stored = cluster.get_json("sandbox", "labelled", "-n", namespace)
    assert stored["metadata"]["labels"] == {"team": "a"}
    assert stored["metadata"]["annotations"] == {"sandbox.dev/created-by": "ci"}
    crd = cluster.get_json("crd", "sandboxes.sandbox.dev")
    assert crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["metadata"] == {"type": "object"}


def test_the_category_lists_every_kind_and_leaves_names_alone(
    cluster: Cluster, apply_crds: list[str], namespace: str
) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(_sandbox({"template": "base"}, "cat")))
    pool = {**_pool({"template": "base", "size": 0}), "metadata": {"name": "cat-pool"}}
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pool))
    resources = cluster.kubectl("api-resources", "--categories=sandbox-operator", "-o", "name").stdout.split()
    assert sorted(resources) == ["sandboxes.sandbox.dev", "sandboxpools.sandbox.dev", "sandboxtemplates.sandbox.dev"]
    listed = cluster.kubectl("get", "sandbox-operator", "-n", namespace, "-o", "name").stdout.split()
    assert {"sandbox.sandbox.dev/cat", "sandboxpool.sandbox.dev/cat-pool"} <= set(listed)
    # The kinds' own names still name one kind (a category called sandbox would expand first).
    for resource in ("sandbox", "sandboxes", "sbx"):
        one = cluster.kubectl("get", resource, "cat", "-n", namespace, "-o", "name")
        assert one.stdout.strip() == "sandbox.sandbox.dev/cat", resource


def test_explain_shows_descriptions(cluster: Cluster, apply_crds: list[str]) -> None:
    # kubectl explain reads the published OpenAPI, which lags CRD establishment slightly.
    explained = wait_until(
        lambda: (out := cluster.kubectl("explain", "sandbox.spec.timeouts", check=False)).returncode == 0 and out,
        timeout=30,
        message="kubectl explain sandbox.spec.timeouts",
    )
    text = " ".join(explained.stdout.split())
    assert "Idle, lifetime and execution timeouts" in text
    for field in ("idle", "maxLifetime", "execution"):
        assert f"{field}\t<string>" in explained.stdout or f"{field} <string>" in text, field
    assert "How long the sandbox may go without activity" in text
    assert "0 disables it" in text


@pytest.fixture
def example_templates(cluster: Cluster, apply_crds: list[str]) -> Iterator[list[Path]]:
    paths = sorted(EXAMPLES.glob("sandboxtemplate-*.yaml"))
    yield paths
    for path in paths:
        cluster.kubectl("delete", "-f", str(path), "--ignore-not-found", check=False)


def test_examples_are_accepted(cluster: Cluster, example_templates: list[Path], namespace: str) -> None:
    kinds: dict[str, type[Sandbox] | type[SandboxTemplate] | type[SandboxPool]] = {
        "Sandbox": Sandbox,
        "SandboxTemplate": SandboxTemplate,
        "SandboxPool": SandboxPool,
    }
    for path in example_templates:
        cluster.kubectl("apply", "-f", str(path))
    namespaced = ["sandbox-minimal.yaml", "sandbox-full.yaml", "sandboxpool.yaml"]
    assert {path.name for path in EXAMPLES.glob("*.yaml")} == {
        *namespaced,
        *(p.name for p in example_templates),
    }
    for name in namespaced:
        cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / name))
    for path in [*example_templates, *(EXAMPLES / name for name in namespaced)]:
        manifest = yaml.safe_load(path.read_text())
        scope = ["-n", namespace] if manifest["kind"] != "SandboxTemplate" else []
        stored = cluster.get_json(manifest["kind"].lower(), manifest["metadata"]["name"], *scope)
        parsed = kinds[manifest["kind"]].from_body(stored)
        assert parsed.metadata.name == manifest["metadata"]["name"]
        # Everything the example sets is stored as written (no field silently pruned).
        assert _contains(stored["spec"], manifest["spec"]), f"{path.name}: stored spec lost fields"
    scaled = cluster.kubectl("scale", "sandboxpool", "code-interpreter", "-n", namespace, "--replicas=7")
    assert scaled.returncode == 0
    assert cluster.get_json("sandboxpool", "code-interpreter", "-n", namespace)["spec"]["size"] == 7


def _contains(stored: Any, written: Any) -> bool:
    if isinstance(written, dict):
        return isinstance(stored, dict) and all(
            key in stored and _contains(stored[key], v) for key, v in written.items()
        )
    return bool(stored == written)
