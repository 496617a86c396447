"""Pod, PVC, Service and NetworkPolicy bodies: every field, and accepted by the kubernetes models."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from resources_factories import UID, sandbox, template

from sandbox_operator.api import EgressClass, egress_class
from sandbox_operator.resources import (
    ImageNotAllowedError,
    PolicySettings,
    ResourcesExceedMaxError,
    build_network_policy,
    build_pod,
    build_pvc,
    build_service,
    build_shared_network_policy,
    governing_network_policy,
    sandbox_id,
    sandbox_id_for,
    spec_hash,
)
from sandbox_operator.resources.tokens import AgentToken, agent_token, issue_agent_token

SANDBOX_ID = sandbox_id_for("team-a", "demo", UID)
LABELS = {
    "app.kubernetes.io/managed-by": "sandbox-operator",
    "app.kubernetes.io/name": "sandbox",
    "sandbox.dev/sandbox": "demo",
    "sandbox.dev/template": "code-interpreter",
    "sandbox.dev/sandbox-id": SANDBOX_ID,
}
OWNER = {
    "apiVersion": "sandbox.dev/v1alpha1",
    "kind": "Sandbox",
    "name": "demo",
    "uid": UID,
    "controller": True,
    "blockOwnerDeletion": True,
}


def _validated(model: Any, body: dict[str, Any]) -> None:
    """The kubernetes 37 models are strict (extra="forbid", StrictStr): a misspelt or mistyped
    field fails here. The round trip also proves no field was silently dropped."""
    parsed = model.model_validate(body)
    assert parsed.model_dump(by_alias=True, exclude_none=True, mode="json") == body


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def _env(pod: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in _container(pod)["env"]}


# --- pod ------------------------------------------------------------------------------------------


def test_pod_metadata() -> None:
    pod = build_pod(sandbox(), template())
    assert pod["apiVersion"] == "v1" and pod["kind"] == "Pod"
    assert pod["metadata"] == {
        "name": "sbx-demo",
        "namespace": "team-a",
        "labels": {**LABELS, "sandbox.dev/egress-class": "deny"},
        "ownerReferences": [OWNER],
    }


def test_pod_spec_hardening() -> None:
    spec = build_pod(sandbox(), template(runtimeClassName="gvisor"))["spec"]
    assert spec["hostname"] == "demo"
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["terminationGracePeriodSeconds"] == 5
    assert spec["runtimeClassName"] == "gvisor"
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert _container({"spec": spec})["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": False,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_pod_without_runtime_class_leaves_it_unset() -> None:
    assert "runtimeClassName" not in build_pod(sandbox(), template())["spec"]


def test_a_templates_pull_secrets_reach_the_pod() -> None:
    assert "imagePullSecrets" not in build_pod(sandbox(), template())["spec"]
    spec = build_pod(sandbox(), template(imagePullSecrets=["registry-a", "registry-b"]))["spec"]
    assert spec["imagePullSecrets"] == [{"name": "registry-a"}, {"name": "registry-b"}]
    _validated(client.V1PodSpec, spec)


def test_pod_resources_are_requests_and_limits() -> None:
    tpl = template(resources={"default": {"cpu": "500m", "memory": "1Gi", "disk": "3Gi"}})
    container = _container(build_pod(sandbox(resources={"cpu": "2"}), tpl))
    expected = {"cpu": "2", "memory": "1Gi", "ephemeral-storage": "3Gi"}
    assert container["resources"] == {"requests": expected, "limits": expected}


def test_pod_env() -> None:
    tpl = template(env={"LANG": "C.UTF-8", "FOO": "template"}, timeouts={"execution": "2m"})
    env = _env(build_pod(sandbox(env={"FOO": "mine", "SANDBOX_ID": "spoofed"}), tpl))
    assert env == {
        "LANG": "C.UTF-8",
        "FOO": "mine",
        "SANDBOX_ID": SANDBOX_ID,
        "SANDBOX_EXECUTION_TIMEOUT": "120",
        "SANDBOX_WORKDIR": "/home/user",
    }


def test_a_sandboxs_env_cannot_set_the_agents_settings_or_the_loaders() -> None:
    # Stored before the CRD refused them (the admission rule): dropped when the pod is built.
    tenant = {"SANDBOX_MAX_OUTPUT_BYTES": "0", "SANDBOX_ACCESS_TOKEN": "mine", "LD_PRELOAD": "/x.so", "OK": "1"}
    env = _env(build_pod(sandbox(env=tenant), template(env={"SANDBOX_MAX_OUTPUT_BYTES": "1048576"})))
    assert env["OK"] == "1"
    assert env["SANDBOX_MAX_OUTPUT_BYTES"] == "1048576"  # the template (the cluster's operators) may tune the agent
    assert "LD_PRELOAD" not in env and "SANDBOX_ACCESS_TOKEN" not in env


def test_the_agent_token_is_in_the_pods_env_and_its_id_on_the_pod() -> None:
    token = AgentToken("id-1", "secret-1")
    pod = build_pod(sandbox(env={"X": "1"}), template(env={"SANDBOX_ACCESS_TOKEN": "template's"}), token)
    assert _env(pod)["SANDBOX_ACCESS_TOKEN"] == "secret-1"
    assert pod["metadata"]["annotations"] == {"sandbox.dev/agent-token-id": "id-1"}
    assert "annotations" not in build_pod(sandbox(), template())["metadata"]
    assert "SANDBOX_ACCESS_TOKEN" not in _env(build_pod(sandbox(), template()))


def test_agent_tokens_derive_from_the_key_and_the_id() -> None:
    key = b"k" * 32
    first, second = issue_agent_token(key), issue_agent_token(key)
    assert first.id != second.id and first.value != second.value  # a new pod, a new token
    assert agent_token(key, first.id) == first.value  # the gateway derives what the operator issued
    assert agent_token(b"other-key-of-32-bytes-----------", first.id) != first.value
    assert first.id not in first.value


def test_pod_uses_the_sandbox_id_from_status() -> None:
    pod = build_pod(sandbox(status={"sandboxID": "abc123"}), template())
    assert _env(pod)["SANDBOX_ID"] == "abc123"
    assert pod["metadata"]["labels"]["sandbox.dev/sandbox-id"] == "abc123"


def test_pod_ports_and_probe() -> None:
    container = _container(build_pod(sandbox(network={"ports": [8080, 3000]}), template(ports=[3000, 9000])))
    assert container["ports"] == [
        {"name": "envd", "containerPort": 49983, "protocol": "TCP"},
        {"name": "interpreter", "containerPort": 49999, "protocol": "TCP"},
        {"name": "port-3000", "containerPort": 3000, "protocol": "TCP"},
        {"name": "port-9000", "containerPort": 9000, "protocol": "TCP"},
        {"name": "port-8080", "containerPort": 8080, "protocol": "TCP"},
    ]
    probe = container["readinessProbe"]
    assert probe["httpGet"] == {"path": "/health", "port": 49983, "scheme": "HTTP"}
    assert probe["periodSeconds"] == 1


def test_pod_liveness_probe_detects_a_hung_agent_in_about_six_seconds() -> None:
    container = _container(build_pod(sandbox(), template()))
    assert container["livenessProbe"] == {
        "httpGet": {"path": "/health", "port": 49983, "scheme": "HTTP"},
        "initialDelaySeconds": 10,
        "periodSeconds": 2,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    }
    probe = container["livenessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] == 6
    # Not a startupProbe: it would hold back readiness (Running) by up to a period.
    assert "startupProbe" not in container


def test_pod_image_command_and_pull_policy() -> None:
    tpl = template(command=["/usr/bin/agent"], args=["--serve"], imagePullPolicy="IfNotPresent")
    container = _container(build_pod(sandbox(), tpl))
    assert (container["image"], container["command"], container["args"]) == (
        "ghcr.io/example/agent:1",
        ["/usr/bin/agent"],
        ["--serve"],
    )
    assert container["imagePullPolicy"] == "IfNotPresent"
    anything = template(imagePolicy={"mode": "Any"})
    assert _container(build_pod(sandbox(image="my/image:2"), anything))["image"] == "my/image:2"


def test_pod_with_an_image_the_template_refuses_is_never_built() -> None:
    # The lifecycle never asks for such a pod; the builder refuses all the same (last line of defence).
    with pytest.raises(ImageNotAllowedError, match=r"spec\.image evil/miner:1 is not allowed .*Template"):
        build_pod(sandbox(image="evil/miner:1"), template())
    listed = template(imagePolicy={"mode": "AllowList", "allow": ["registry.example.com/team/"]})
    with pytest.raises(ImageNotAllowedError, match=r"registry\.example\.com/team/"):
        build_pod(sandbox(image="registry.example.com/other/x:1"), listed)
    allowed = build_pod(sandbox(image="registry.example.com/team/py:3"), listed)
    assert _container(allowed)["image"] == "registry.example.com/team/py:3"
    same = build_pod(sandbox(image="ghcr.io/example/agent:1"), template())  # the template's own image
    assert _container(same)["image"] == "ghcr.io/example/agent:1"


def test_pod_mounts_the_workspace_claim() -> None:
    pod = build_pod(sandbox(), template())
    assert pod["spec"]["volumes"] == [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": "sbx-demo-workspace"}}
    ]
    container = _container(pod)
    assert container["volumeMounts"] == [{"name": "workspace", "mountPath": "/home/user"}]
    assert container["workingDir"] == "/home/user"


def test_pod_read_only_root_gets_a_writable_tmp() -> None:
    pod = build_pod(sandbox(), template(security={"readOnlyRootFilesystem": True}))
    container = _container(pod)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["spec"]["volumes"]


def test_pod_without_persistence_uses_a_bounded_empty_dir() -> None:
    tpl = template(persistence={"enabled": False, "mountPath": "/work"})
    pod = build_pod(sandbox(resources={"disk": "2Gi"}), tpl)
    assert pod["spec"]["volumes"] == [{"name": "workspace", "emptyDir": {"sizeLimit": "2Gi"}}]
    assert _env(pod)["SANDBOX_WORKDIR"] == "/work"


def test_pod_custom_user() -> None:
    pod = build_pod(sandbox(), template(security={"runAsUser": 2000, "runAsGroup": 3000, "fsGroup": 4000}))
    assert (pod["spec"]["securityContext"]["runAsUser"], pod["spec"]["securityContext"]["fsGroup"]) == (
        2000,
        4000,
    )
    assert _container(pod)["securityContext"]["runAsGroup"] == 3000


def test_pod_over_the_maximum_is_refused() -> None:
    with pytest.raises(ResourcesExceedMaxError, match=r"spec\.resources\.memory 8Gi exceeds the template maximum 4Gi"):
        build_pod(sandbox(resources={"memory": "8Gi"}), template(resources={"max": {"memory": "4Gi"}}))


def test_children_need_an_owner_uid() -> None:
    nameless = sandbox().model_copy(update={"metadata": sandbox().metadata.model_copy(update={"uid": None})})
    with pytest.raises(ValueError, match="uid"):
        build_service(nameless, template())


def test_long_sandbox_names_give_valid_children() -> None:
    long_name = "a" * 63
    pod = build_pod(sandbox(name=long_name), template())
    assert len(pod["metadata"]["name"]) == 63
    assert pod["spec"]["hostname"] == long_name
    _validated(client.V1Pod, pod)


# --- pvc, service ----------------------------------------------------------------------------------


def test_pvc() -> None:
    pvc = build_pvc(sandbox(resources={"disk": "4Gi"}), template(persistence={"storageClassName": "fast"}))
    assert pvc is not None
    assert pvc["metadata"] == {
        "name": "sbx-demo-workspace",
        "namespace": "team-a",
        "labels": LABELS,
        "ownerReferences": [OWNER],
    }
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "4Gi"}},
        "storageClassName": "fast",
    }


def test_pvc_default_storage_class_and_none_without_persistence() -> None:
    pvc = build_pvc(sandbox(), template())
    assert pvc is not None and "storageClassName" not in pvc["spec"]
    assert build_pvc(sandbox(), template(persistence={"enabled": False})) is None


def test_service_is_headless_with_the_agent_ports() -> None:
    service = build_service(sandbox(network={"ports": [8080]}), template())
    assert service["metadata"]["name"] == "sbx-demo"
    assert service["metadata"]["ownerReferences"] == [OWNER]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {
        "app.kubernetes.io/managed-by": "sandbox-operator",
        "sandbox.dev/sandbox": "demo",
    }
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("envd", 49983, 49983),
        ("interpreter", 49999, 49999),
        ("port-8080", 8080, 8080),
    ]


# --- network policy ----------------------------------------------------------------------------------

GATEWAY = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "sandbox-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}},
}
DNS = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}
# Anywhere but link-local (cloud metadata) and the cluster's own networks (by default every private range).
ANYWHERE = [
    {
        "ipBlock": {
            "cidr": "0.0.0.0/0",
            "except": ["10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"],
        }
    },
    {"ipBlock": {"cidr": "::/0", "except": ["fd00::/8", "fe80::/10"]}},
]


def _policy(**network: Any) -> dict[str, Any]:
    return build_network_policy(sandbox(network=network), template(), gateway_namespace="sandbox-system")


OPERATOR = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "sandbox-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}},
}


def test_policy_selects_the_sandbox_and_admits_only_the_gateway_and_the_metrics_scrape() -> None:
    policy = _policy()
    assert policy["metadata"]["name"] == "sbx-demo"
    assert policy["metadata"]["ownerReferences"] == [OWNER]
    spec = policy["spec"]
    assert spec["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/managed-by": "sandbox-operator", "sandbox.dev/sandbox": "demo"}
    }
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == [
        {"from": [GATEWAY], "ports": [{"protocol": "TCP", "port": 49983}, {"protocol": "TCP", "port": 49999}]},
        # the operator reaches envd only, for /agent/metrics
        {"from": [OPERATOR], "ports": [{"protocol": "TCP", "port": 49983}]},
    ]


def test_egress_deny_allows_only_dns_and_the_gateway() -> None:
    assert _policy(egress="deny")["spec"]["egress"] == [DNS, {"to": [GATEWAY]}]


def test_egress_allow_is_anywhere_but_cloud_metadata() -> None:
    assert _policy(egress="allow")["spec"]["egress"] == [DNS, {"to": [GATEWAY]}, {"to": ANYWHERE}]


def test_egress_allow_list() -> None:
    policy = _policy(
        egress="allowList",
        egressAllow=[
            "10.0.0.0/8",
            "pypi.org:443",
            "files.example.com:8443",
            "fd00::/8",
            "mirror.example.com:443",
        ],
    )
    assert policy["spec"]["egress"] == [
        DNS,
        {"to": [GATEWAY]},
        # Asked for explicitly, a private range is reachable; the AWS IPv6 metadata endpoint inside it is not.
        {
            "to": [
                {"ipBlock": {"cidr": "10.0.0.0/8"}},
                {"ipBlock": {"cidr": "fd00::/8", "except": ["fd00:ec2::254/128"]}},
            ]
        },
        {"to": ANYWHERE, "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 8443}]},
    ]
    annotations = dict(policy["metadata"]["annotations"])
    assert annotations.pop("sandbox.dev/spec-hash") == spec_hash(policy)
    assert annotations == {
        "sandbox.dev/egress-hosts-not-enforced": "pypi.org:443,files.example.com:8443,mirror.example.com:443"
    }


PACKAGE_INDEX = {"egress": "allowList", "egressAllow": ["pypi.org:443", "files.pythonhosted.org:443"]}


def test_a_sandbox_without_egress_gets_its_templates_network() -> None:
    policy = build_network_policy(sandbox(), template(network=PACKAGE_INDEX), gateway_namespace="sandbox-system")
    assert policy["spec"]["egress"] == [
        DNS,
        {"to": [GATEWAY]},
        {"to": ANYWHERE, "ports": [{"protocol": "TCP", "port": 443}]},
    ]
    assert (
        policy["metadata"]["annotations"]["sandbox.dev/egress-hosts-not-enforced"]
        == "pypi.org:443,files.pythonhosted.org:443"
    )
    # ports alone leave egress to the template too
    ported = build_network_policy(
        sandbox(network={"ports": [8080]}), template(network=PACKAGE_INDEX), gateway_namespace="sandbox-system"
    )
    assert ported["spec"]["egress"] == policy["spec"]["egress"]


@pytest.mark.parametrize(
    ("own", "expected_tail"),
    [
        ({"egress": "deny"}, []),  # a Sandbox's own egress wins, even the strictest
        ({"egress": "allow"}, [{"to": ANYWHERE}]),
        # its allow-list replaces the template's (never merged)
        (
            {"egress": "allowList", "egressAllow": ["203.0.113.0/24"]},
            [{"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}],
        ),
    ],
)
def test_a_sandboxs_own_egress_overrides_the_template(own: dict[str, Any], expected_tail: list[Any]) -> None:
    policy = build_network_policy(
        sandbox(network=own), template(network=PACKAGE_INDEX), gateway_namespace="sandbox-system"
    )
    assert policy["spec"]["egress"] == [DNS, {"to": [GATEWAY]}, *expected_tail]
    assert "sandbox.dev/egress-hosts-not-enforced" not in policy["metadata"]["annotations"]


def test_without_any_network_egress_is_denied() -> None:
    assert build_network_policy(sandbox(), template(), gateway_namespace="sandbox-system")["spec"]["egress"] == [
        DNS,
        {"to": [GATEWAY]},
    ]


@pytest.mark.parametrize(
    ("asked", "reachable"),
    [
        (["169.254.169.254/32"], None),  # the metadata endpoint itself: dropped
        (["169.254.0.0/16"], None),
        (["fe80::1/128"], None),
        (["0.0.0.0/0"], [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}}]),
        (["::/0"], [{"ipBlock": {"cidr": "::/0", "except": ["fd00:ec2::254/128", "fe80::/10"]}}]),
        (["169.0.0.0/8"], [{"ipBlock": {"cidr": "169.0.0.0/8", "except": ["169.254.0.0/16"]}}]),
        (["203.0.113.0/24"], [{"ipBlock": {"cidr": "203.0.113.0/24"}}]),
    ],
)
def test_an_allow_list_never_opens_link_local_or_metadata(asked: list[str], reachable: list[Any] | None) -> None:
    egress = _policy(egress="allowList", egressAllow=asked)["spec"]["egress"]
    assert egress[:2] == [DNS, {"to": [GATEWAY]}]
    assert (egress[2]["to"] if len(egress) > 2 else None) == reachable


def test_allow_keeps_off_the_cluster_ranges_the_operator_names() -> None:
    policy = build_network_policy(
        sandbox(network={"egress": "allow"}),
        template(),
        gateway_namespace="sandbox-system",
        cluster_cidrs=("10.96.0.0/12", "10.244.0.0/16", "fd12::/64"),
    )
    assert policy["spec"]["egress"][2]["to"] == [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16", "10.96.0.0/12", "169.254.0.0/16"]}},
        {"ipBlock": {"cidr": "::/0", "except": ["fd00:ec2::254/128", "fd12::/64", "fe80::/10"]}},
    ]
    _validated(client.V1NetworkPolicy, policy)


def test_spec_hash_follows_the_network_spec() -> None:
    deny, allow = _policy(egress="deny"), _policy(egress="allow")
    assert deny["metadata"]["annotations"]["sandbox.dev/spec-hash"] == spec_hash(deny)
    assert spec_hash(deny) != spec_hash(allow)
    assert spec_hash(deny) == spec_hash(_policy(egress="deny"))
    with_port = build_service(sandbox(network={"ports": [8080]}), template())
    without = build_service(sandbox(), template())
    assert (
        with_port["metadata"]["annotations"]["sandbox.dev/spec-hash"]
        != (without["metadata"]["annotations"]["sandbox.dev/spec-hash"])
    )


def test_custom_dns_selector() -> None:
    policy = build_network_policy(
        sandbox(), template(), gateway_namespace="gw", dns_namespace="dns", dns_pod_labels={"app": "coredns"}
    )
    (to,) = policy["spec"]["egress"][0]["to"]
    assert to["podSelector"] == {"matchLabels": {"app": "coredns"}}
    assert to["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "dns"}}


# --- every body is a valid Kubernetes object ---------------------------------------------------------

VARIANTS = [
    (sandbox(), template()),
    (
        sandbox(
            network={"egress": "allowList", "egressAllow": ["10.0.0.0/8", "pypi.org:443"], "ports": [8080]},
            env={"A": "1"},
            resources={"cpu": "250m", "memory": "256Mi", "disk": "2Gi"},
        ),
        template(
            runtimeClassName="kata",
            security={"readOnlyRootFilesystem": True},
            command=["agent"],
            persistence={"storageClassName": "standard"},
        ),
    ),
    (sandbox(network={"egress": "allow"}), template(persistence={"enabled": False})),
]


@pytest.mark.parametrize(("sbx", "tpl"), VARIANTS)
def test_bodies_validate_against_the_kubernetes_models(sbx: Any, tpl: Any) -> None:
    _validated(client.V1Pod, build_pod(sbx, tpl))
    _validated(client.V1Service, build_service(sbx, tpl))
    _validated(client.V1NetworkPolicy, build_network_policy(sbx, tpl, gateway_namespace="gw"))
    pvc = build_pvc(sbx, tpl)
    if pvc is not None:
        _validated(client.V1PersistentVolumeClaim, pvc)


def test_builders_are_deterministic() -> None:
    sbx, tpl = VARIANTS[1]
    assert build_pod(sbx, tpl) == build_pod(sbx, tpl)
    assert build_network_policy(sbx, tpl, gateway_namespace="gw") == build_network_policy(
        sbx, tpl, gateway_namespace="gw"
    )
    assert sandbox_id(sbx) == SANDBOX_ID


# --- shared NetworkPolicies -------------------------------------------------------------------------

SETTINGS = PolicySettings(gateway_namespace="sandbox-system")


@pytest.mark.parametrize(
    ("own", "template_network", "template_ports", "expected"),
    [
        ({}, {}, None, EgressClass.DENY),
        ({"egress": "deny"}, PACKAGE_INDEX, None, EgressClass.DENY),  # its own egress wins
        ({"egress": "allow"}, {}, None, EgressClass.ALLOW),
        ({}, {"egress": "allow"}, None, EgressClass.ALLOW),
        ({}, PACKAGE_INDEX, None, EgressClass.TEMPLATE),
        ({"egress": "allowList", "egressAllow": ["203.0.113.0/24"]}, {}, None, EgressClass.OWN),
        ({"ports": [8080]}, {}, None, EgressClass.OWN),  # a port the template does not open
        ({"ports": [8080]}, {}, [8080, 9000], EgressClass.DENY),  # the template's own ports
    ],
)
def test_egress_class(
    own: dict[str, Any], template_network: dict[str, Any], template_ports: list[int] | None, expected: EgressClass
) -> None:
    tpl = template(network=template_network, **({"ports": template_ports} if template_ports else {}))
    assert egress_class(sandbox(network=own).spec, tpl.spec) is expected
    assert build_pod(sandbox(network=own), tpl)["metadata"]["labels"]["sandbox.dev/egress-class"] == expected.value


def test_a_shared_policy_selects_its_template_and_class_and_matches_an_own_policy_rule_for_rule() -> None:
    tpl = template(network=PACKAGE_INDEX, ports=[8080])
    shared = build_shared_network_policy("team-a", tpl, EgressClass.TEMPLATE, SETTINGS)
    assert shared["metadata"]["name"] == "sbx-net-code-interpreter-template"
    assert "ownerReferences" not in shared["metadata"]
    selector = shared["spec"]["podSelector"]["matchLabels"]
    assert selector == {
        "app.kubernetes.io/managed-by": "sandbox-operator",
        "sandbox.dev/template": "code-interpreter",
        "sandbox.dev/egress-class": "template",
    }
    pod = build_pod(sandbox(), tpl)
    assert selector.items() <= pod["metadata"]["labels"].items()
    # The same rules a policy of the sandbox's own would have had.
    own = build_network_policy(sandbox(), tpl, gateway_namespace="sandbox-system")
    assert shared["spec"]["ingress"] == own["spec"]["ingress"] and shared["spec"]["egress"] == own["spec"]["egress"]
    assert shared["metadata"]["annotations"]["sandbox.dev/egress-hosts-not-enforced"] == (
        "pypi.org:443,files.pythonhosted.org:443"
    )
    _validated(client.V1NetworkPolicy, shared)


def test_every_sandbox_of_a_class_gets_the_same_shared_body() -> None:
    tpl = template()
    first, first_class = governing_network_policy(sandbox(), tpl, SETTINGS)
    second, _ = governing_network_policy(sandbox(name="other"), tpl, SETTINGS)
    assert first_class is EgressClass.DENY and first == second  # one digest: written once


def test_a_sandbox_of_its_own_class_is_governed_by_its_own_policy() -> None:
    own_network = {"egress": "allowList", "egressAllow": ["203.0.113.0/24"]}
    policy, egress = governing_network_policy(sandbox(network=own_network), template(), SETTINGS)
    assert egress is EgressClass.OWN and policy["metadata"]["name"] == "sbx-demo"
    assert policy["metadata"]["ownerReferences"] == [OWNER]
    with pytest.raises(ValueError, match="own"):
        build_shared_network_policy("team-a", template(), EgressClass.OWN, SETTINGS)
