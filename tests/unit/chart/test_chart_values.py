"""The chart's values contract, without a cluster: values.schema.json refuses each kind of bad
value by name (helm template and lint alike), every value of values.yaml has a schema, renders are
deterministic (GitOps: two `helm template` runs are byte-identical), and the platform conventions
(probes, PodDisruptionBudget, anti-affinity and spread, NetworkPolicies, pull secrets, priority,
pod labels, name overrides, the DNS selector) reach the objects."""

from __future__ import annotations

import base64
import json
import subprocess
from typing import Any

import pytest
import yaml

from chartlib import CHART, EVERYTHING_ON, cached_binary, documents, find, helm_template

OPERATOR, GATEWAY = "sbx-sandbox-operator", "sbx-sandbox-operator-gateway"

# (--set argument, what the refusal must name): one kind of mistake each.
BAD_VALUES = [
    ("operator.logLevel=VERBOSE", "at '/operator/logLevel': value must be one of 'DEBUG'"),
    ("operator.workers=lots", "at '/operator/workers': got string, want integer"),
    ("operator.maxInFlight=0", "at '/operator/maxInFlight': minimum: got 0, want 1"),
    ("gateway.port=70000", "at '/gateway/port': maximum: got 70,000, want 65,535"),
    ("gateway.createTimeout=0", "at '/gateway/createTimeout'"),
    ("operator.normalEvents=maybe", "at '/operator/normalEvents': got string, want boolean"),
    ("operator.image.pullPolicy=Sometimes", "at '/operator/image/pullPolicy'"),
    ("gateway.service.type=Internal", "at '/gateway/service/type': value must be one of 'ClusterIP'"),
    ("gateway.domain=Not_A_Domain", "at '/gateway/domain'"),
    ("gateway.tokenKey.value=too-short", "at '/gateway/tokenKey/value'"),
    ("operator.replicas=0", "at '/operator/replicas': minimum: got 0, want 1"),
    ("operator.leaderElection.enabled=false", "operator.replicas=2 needs operator.leaderElection.enabled"),
    ("gateway.session.executionTimeout=0", "at '/gateway/session/executionTimeout'"),
    ("gateway.session.anonymousNamespace=Bad_NS", "at '/gateway/session/anonymousNamespace'"),
    ("bogus=1", "additional properties 'bogus' not allowed"),
    ("operator.resources.limits.memory=lots", "at '/operator/resources/limits/memory'"),
    ("serviceMonitor.interval=soon", "at '/serviceMonitor/interval'"),
    ("gateway.podDisruptionBudget.maxUnavailable=0", "at '/gateway/podDisruptionBudget/maxUnavailable'"),
    ("gateway.podAntiAffinity=always", "at '/gateway/podAntiAffinity': value must be one of 'soft'"),
    ("operator.watchNamespaces={Team_A}", "at '/operator/watchNamespaces/0'"),
    ("operator.egressClusterCIDRs={10.0.0.0}", "at '/operator/egressClusterCIDRs/0'"),
    ("networkPolicy.dns.namespace=Kube_System", "at '/networkPolicy/dns/namespace'"),
    ("operator.podLabels.team=not a label", "at '/operator/podLabels/team'"),
    ("templates.Bad_Name.image=x", "invalid propertyName 'Bad_Name'"),
    # Across values: the templates refuse what one value's schema cannot see.
    ("gateway.metricsPort=3000", "gateway.metricsPort (3000) must differ from gateway.port"),
    ("operator.livenessPort=9090", "operator.metricsPort and operator.livenessPort must differ"),
    ("gateway.tokenKey.existingSecret=mine,gateway.tokenKey.value=0123456789abcdef", "set existingSecret or value"),
]


@pytest.mark.parametrize(("setting", "message"), BAD_VALUES, ids=[setting for setting, _ in BAD_VALUES])
def test_bad_values_are_refused_by_name(setting: str, message: str) -> None:
    refused = helm_template("--set", setting, check=False)
    assert refused.returncode != 0, f"{setting} rendered"
    assert message in refused.stderr, refused.stderr


def test_lint_refuses_a_bad_value_too() -> None:
    lint = subprocess.run(
        [cached_binary("helm"), "lint", "--strict", str(CHART), "--set", "operator.logLevel=VERBOSE"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert lint.returncode != 0 and "/operator/logLevel" in lint.stdout + lint.stderr


def _schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, sub in (schema.get("properties") or {}).items():
        paths.add(prefix + key)
        paths |= _schema_paths(sub, f"{prefix}{key}.")
    return paths


def _value_paths(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> set[str]:
    """Every key of values.yaml, down to where the schema stops naming properties (free-form maps
    such as resources, nodeSelector or templates)."""
    paths = set()
    for key, value in values.items():
        paths.add(prefix + key)
        sub = (schema.get("properties") or {}).get(key) or {}
        if isinstance(value, dict) and "properties" in sub:
            paths |= _value_paths(value, sub, f"{prefix}{key}.")
    return paths


def test_every_value_has_a_schema_that_forbids_unknown_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = _value_paths(values, schema) - _schema_paths(schema)
    assert not missing, f"values without a schema: {sorted(missing)}"

    def open_objects(node: dict[str, Any], path: str) -> list[str]:
        found = [path] if "properties" in node and node.get("additionalProperties") is not False else []
        for key, sub in (node.get("properties") or {}).items():
            found += open_objects(sub, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                found += open_objects(node[key], f"{path}[{key}]")
        return found

    # Where the schema names keys it refuses the others, but for what Kubernetes validates itself:
    # a topologySpreadConstraint and a SandboxTemplate spec (the CRD's schema).
    assert open_objects(schema, "") == [".gateway.topologySpreadConstraints[items]", ".templates[additionalProperties]"]


@pytest.mark.parametrize("values", [[], ["-f", str(EVERYTHING_ON)]], ids=["defaults", "everything-on"])
def test_renders_are_deterministic(values: list[str]) -> None:
    first, second = helm_template(*values).stdout, helm_template(*values).stdout
    assert first == second
    assert documents(first)


def test_without_a_cluster_no_token_key_is_generated() -> None:
    docs = documents(helm_template().stdout)
    # lookup answers nothing under `helm template`: no random key, no Secret; the pods name the
    # Secret that a `helm install` generates (or that you create).
    assert find(docs, "Secret") == []
    for component in ("operator", "gateway"):
        (deployment,) = find(docs, "Deployment", component)
        (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
        assert volume["secret"]["secretName"] == f"{GATEWAY}-token-key"


def test_a_given_token_key_renders_a_stable_secret() -> None:
    key = "0123456789abcdef-stable"
    docs = documents(helm_template("--set", f"gateway.tokenKey.value={key}").stdout)
    (secret,) = find(docs, "Secret", "gateway")
    assert secret["metadata"]["name"] == f"{GATEWAY}-token-key"
    assert base64.b64decode(secret["data"]["token-key"]).decode() == key

    docs = documents(helm_template("--set", "gateway.tokenKey.existingSecret=sealed-key").stdout)
    assert find(docs, "Secret") == []
    for component in ("operator", "gateway"):
        (deployment,) = find(docs, "Deployment", component)
        assert deployment["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"] == "sealed-key"


def _container(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (deployment,) = find(docs, "Deployment", component)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def test_probes_are_distinct() -> None:
    docs = documents(helm_template().stdout)
    operator = _container(docs, "operator")
    assert operator["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    gateway = _container(docs, "gateway")
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # The gateway's port opens only once its caches have synced (up to 60 s): the startup probe
    # holds liveness off until then.
    assert gateway["startupProbe"]["periodSeconds"] * gateway["startupProbe"]["failureThreshold"] > 60


def test_gateway_spreads_and_has_a_disruption_budget() -> None:
    docs = documents(helm_template().stdout)
    (deployment,) = find(docs, "Deployment", "gateway")
    pod = deployment["spec"]["template"]["spec"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    (preferred,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["podAffinityTerm"] == {
        "labelSelector": {"matchLabels": selector},
        "topologyKey": "kubernetes.io/hostname",
    }
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["labelSelector"] == {"matchLabels": selector}
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    (budget,) = find(docs, "PodDisruptionBudget", "gateway")
    assert budget["spec"]["selector"]["matchLabels"] == selector
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"

    docs = documents(
        helm_template(
            "--set",
            "gateway.podAntiAffinity=hard",
            "--set",
            "gateway.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=pool",
            "--set",
            "gateway.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
            "--set",
            "gateway.topologySpreadConstraints=null",
            "--set",
            "gateway.podDisruptionBudget.enabled=false",
        ).stdout
    )
    pod = find(docs, "Deployment", "gateway")[0]["spec"]["template"]["spec"]
    assert set(pod["affinity"]) == {"nodeAffinity", "podAntiAffinity"}
    (required,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["topologyKey"] == "kubernetes.io/hostname"
    assert "topologySpreadConstraints" not in pod
    assert find(docs, "PodDisruptionBudget", "gateway") == []
    pod = find(documents(helm_template("--set", "gateway.podAntiAffinity=none").stdout), "Deployment", "gateway")[0]
    assert "affinity" not in pod["spec"]["template"]["spec"]


def test_network_policies_for_both_pods_and_the_dns_selector() -> None:
    docs = documents(helm_template().stdout)
    policies = {doc["metadata"]["name"]: doc["spec"] for doc in find(docs, "NetworkPolicy")}
    assert set(policies) == {OPERATOR, GATEWAY}
    for name, component in ((OPERATOR, "operator"), (GATEWAY, "gateway")):
        policy = policies[name]
        (deployment,) = find(docs, "Deployment", component)
        assert policy["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        dns = policy["egress"][0]
        assert dns["to"] == [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }
        ]
        assert {port["port"] for port in dns["ports"]} == {53}
    ingress_ports = [rule["ports"][0]["port"] for rule in policies[GATEWAY]["ingress"]]
    assert ingress_ports == [3000, 9091]
    assert [rule["ports"][0]["port"] for rule in policies[OPERATOR]["ingress"]] == [9090]
    args = _container(docs, "operator")["args"]
    assert "--dns-namespace=kube-system" in args and "--dns-pod-label=k8s-app=kube-dns" in args

    docs = documents(helm_template("-f", str(EVERYTHING_ON)).stdout)
    args = _container(docs, "operator")["args"]
    assert "--dns-namespace=dns-system" in args and "--dns-pod-label=app.kubernetes.io/name=coredns" in args
    assert "--egress-cluster-cidr=10.0.0.0/8" in args and "--egress-cluster-cidr=fd00::/8" in args
    for policy in find(docs, "NetworkPolicy"):
        dns, api = policy["spec"]["egress"][:2]
        assert dns["to"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "coredns"}}
        assert api == {"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}], "ports": [{"protocol": "TCP", "port": 6443}]}
        metrics_from = [rule for rule in policy["spec"]["ingress"] if "from" in rule]
        assert [rule["from"] for rule in metrics_from] == [
            [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        ]

    assert find(documents(helm_template("--set", "networkPolicy.enabled=false").stdout), "NetworkPolicy") == []


def test_pod_conventions_reach_both_pods() -> None:
    docs = documents(
        helm_template("-f", str(EVERYTHING_ON), "--set", "operator.podLabels.app\\.kubernetes\\.io/component=x").stdout
    )
    for component in ("operator", "gateway"):
        (deployment,) = find(docs, "Deployment", component)
        template = deployment["spec"]["template"]
        assert template["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert template["spec"]["priorityClassName"] == "system-cluster-critical"
        assert template["metadata"]["labels"]["team"] == "platform"
        # A pod label never overrides a selector label.
        assert template["metadata"]["labels"]["app.kubernetes.io/component"] == component
        assert deployment["metadata"]["name"].startswith("sbx-sandboxes")
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "sandboxes"
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "sandboxes"

    docs = documents(helm_template("--set", "fullnameOverride=sbx").stdout)
    names = {doc["metadata"]["name"] for doc in docs if doc["kind"] != "SandboxTemplate"}
    assert names and all(name.startswith("sbx") and "sandbox-operator" not in name for name in names), names


def test_the_operator_runs_two_replicas_with_leader_election() -> None:
    docs = documents(helm_template().stdout)
    (deployment,) = find(docs, "Deployment", "operator")
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--leader-election" in container["args"]
    assert {env["name"] for env in container["env"]} >= {"POD_NAME", "POD_NAMESPACE"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    (budget,) = find(docs, "PodDisruptionBudget", "operator")
    assert budget["spec"]["maxUnavailable"] == 1
    (role,) = [doc for doc in docs if doc["kind"] == "Role" and doc["metadata"]["name"].endswith("-leader-election")]
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}
    ]

    single = documents(
        helm_template("--set", "operator.replicas=1", "--set", "operator.leaderElection.enabled=false").stdout
    )
    (deployment,) = find(single, "Deployment", "operator")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"} and deployment["spec"]["replicas"] == 1
    assert "--leader-election" not in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert find(single, "PodDisruptionBudget", "operator") == []
    assert not [doc for doc in single if doc["kind"] == "Role" and doc["metadata"]["name"].endswith("-leader-election")]


def test_the_gateway_gets_the_session_settings() -> None:
    args = find(
        documents(helm_template("--set", "gateway.session.anonymousNamespace=front").stdout), "Deployment", "gateway"
    )[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--session-execution-timeout=300" in args and "--session-anonymous-namespace=front" in args
    default_args = find(documents(helm_template().stdout), "Deployment", "gateway")[0]["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert not any(arg.startswith("--session-anonymous-namespace") for arg in default_args)  # off by default


def test_the_kubernetes_floor_is_the_first_version_with_the_crds_cel_libraries() -> None:
    """The Sandbox CRD's CEL calls isCIDR (the IP/CIDR library of Kubernetes 1.31): a 1.30 API
    server refuses the CRD, so the chart refuses 1.30 itself."""
    crds = "".join(path.read_text() for path in sorted((CHART / "crds").glob("*.yaml")))
    assert "isCIDR(" in crds
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"] == ">=1.31.0-0"
    refused = helm_template("--kube-version", "1.30.9", check=False)
    assert refused.returncode != 0
    assert "chart requires kubeVersion: >=1.31.0-0" in refused.stderr, refused.stderr
    assert helm_template("--kube-version", "1.31.0").returncode == 0
