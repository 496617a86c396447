"""The Helm chart against the real API server: it lints, renders what its values say, installs and
uninstalls cleanly, keeps the gateway's token key across upgrades, and its RBAC is enough for the
operator and for the gateway: an operator authenticated as the chart's service account (RBAC is on in
the local control plane) takes a Sandbox to Running, suspends and deletes it, and a gateway
authenticated as its own account creates, reads, lists, extends and kills one over the E2B API,
without a single 403."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from chartlib import documents, find
from testlib import (
    REPO,
    Cluster,
    PodAgents,
    children,
    free_port,
    request_json,
    sandbox_manifest,
    start_operator,
    wait_phase,
    wait_until,
)

CHART = REPO / "charts" / "sandbox-operator"
CACHE = Path(os.environ.get("SANDBOX_OPERATOR_CACHE", Path.home() / ".cache" / "sandbox-operator"))


def helm_binary() -> str:
    cached = CACHE / "bin" / "helm"
    found = str(cached) if cached.exists() else shutil.which("helm")
    if not found:
        raise RuntimeError("helm not found: run hack/build-tools (it builds helm into the cache)")
    return found


def helm(cluster: Cluster | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = cluster.env() if cluster else dict(os.environ)
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
    return result


def rendered(*args: str) -> list[dict[str, Any]]:
    # --kube-version: a helm built from source defaults to v1.20 offline, below the chart's floor.
    out = helm(
        None, "template", "sbx", str(CHART), "--namespace", "sandbox-system", "--kube-version", "1.36.3", *args
    ).stdout
    return documents(out)


def forbidden_in(log: str) -> bool:
    # A whole-word 403: hex in names and uids must not count, nor the milliseconds of a log
    # timestamp ("13:10:00,403", seen in CI).
    return re.search(r"(?<![,.:])\b403\b", log) is not None or "forbidden" in log.lower()


def test_chart_lints() -> None:
    result = helm(None, "lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_chart_crds_are_the_generated_ones() -> None:
    assert sorted(path.name for path in (CHART / "crds").glob("*.yaml")) == sorted(
        path.name for path in (REPO / "crds").glob("*.yaml")
    )
    for path in (CHART / "crds").glob("*.yaml"):
        assert path.read_text() == (REPO / "crds" / path.name).read_text()


def test_defaults_render_a_hardened_operator_and_templates() -> None:
    docs = rendered()
    (deployment,) = find(docs, "Deployment", "operator")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/sandbox-operator/sandbox-operator:0.1.0"
    assert container["args"][0] == "run"
    assert "--gateway-namespace=sandbox-system" in container["args"]
    assert not any(arg.startswith("--namespace=") for arg in container["args"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Sandbox NetworkPolicies admit usage scrapes from pods labelled as the operator component.
    assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"  # two replicas, one leader
    assert sorted(t["metadata"]["name"] for t in find(docs, "SandboxTemplate")) == ["base", "code-interpreter"]
    assert find(docs, "ServiceMonitor") == []


def test_values_reach_the_operator_flags() -> None:
    docs = rendered(
        "--set",
        "operator.watchNamespaces={team-a,team-*}",
        "--set",
        "operator.normalEvents=false",
        "--set",
        "operator.metricMetadataKeys={team}",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "templates=null",
    )
    args = find(docs, "Deployment", "operator")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-*" in args
    assert "--normal-events=off" in args and "--metric-metadata-key=team" in args
    (monitor,) = find(docs, "ServiceMonitor")
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics", "gateway-metrics"]
    # The metrics Services are selected; each endpoint names a port only one of them has. The public
    # gateway Service carries no metrics port.
    (component,) = monitor["spec"]["selector"]["matchExpressions"]
    assert component["key"] == "app.kubernetes.io/component"
    assert sorted(component["values"]) == ["gateway", "operator"]
    services = {
        doc["metadata"]["name"]: [port["name"] for port in doc["spec"]["ports"]] for doc in find(docs, "Service")
    }
    assert services == {
        "sbx-sandbox-operator-metrics": ["metrics"],
        "sbx-sandbox-operator-gateway": ["http"],
        "sbx-sandbox-operator-gateway-metrics": ["gateway-metrics"],
    }
    assert find(docs, "SandboxTemplate") == []


GATEWAY = "sbx-sandbox-operator-gateway"  # the rendered release's gateway objects


def test_defaults_render_a_hardened_gateway() -> None:
    docs = rendered()
    (deployment,) = find(docs, "Deployment", "gateway")
    assert deployment["metadata"]["name"] == GATEWAY
    assert deployment["spec"]["replicas"] == 2
    template = deployment["spec"]["template"]
    # Sandbox NetworkPolicies admit ingress only from pods with this label in the release namespace.
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
    assert deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    pod = template["spec"]
    assert pod["serviceAccountName"] == GATEWAY
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/sandbox-operator/sandbox-operator:0.1.0"  # the operator's image
    assert container["args"] == [
        "gateway",
        "--bind-address=0.0.0.0",
        "--port=3000",
        "--metrics-port=9091",
        "--keys-namespace=sandbox-system",
        "--token-key-file=/etc/sandbox-gateway/token-key",
        "--create-timeout=120",
        "--header-timeout=10",
        "--body-timeout=30",
        "--keepalive-timeout=30",
        "--max-connections-per-ip=256",
        "--session-execution-timeout=300",
        "--session-idle-timeout=1800",
        "--session-max-lifetime=3600",
        "--session-code-interpreter-template=code-interpreter",
        "--session-custom-template=base",
        "--log-level=INFO",
    ]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # Distinct probes: ready once the watch caches have synced, alive while the event loop answers.
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == {"http": 3000, "metrics": 9091}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # The token key: the chart's Secret, mounted read-only where --token-key-file points (helm
    # install generates it; a render without a cluster has none: tests/unit/chart).
    (mount,) = container["volumeMounts"]
    assert mount == {"name": "token-key", "mountPath": "/etc/sandbox-gateway", "readOnly": True}
    (volume,) = pod["volumes"]
    assert volume["secret"]["secretName"] == f"{GATEWAY}-token-key"
    assert volume["secret"]["items"] == [{"key": "token-key", "path": "token-key"}]
    assert find(docs, "Secret") == []

    services = {doc["metadata"]["name"]: doc["spec"] for doc in find(docs, "Service", "gateway")}
    assert set(services) == {GATEWAY, f"{GATEWAY}-metrics"}
    for service in services.values():
        assert service["selector"]["app.kubernetes.io/component"] == "gateway"
        assert service["type"] == "ClusterIP"
    # The public Service: the API and the proxy only. Metrics: a Service of their own.
    ports = [(port["name"], port["port"], port["targetPort"]) for port in services[GATEWAY]["ports"]]
    assert ports == [("http", 80, "http")]
    ports = [(port["name"], port["port"], port["targetPort"]) for port in services[f"{GATEWAY}-metrics"]["ports"]]
    assert ports == [("gateway-metrics", 9091, "metrics")]
    assert find(docs, "Ingress") == []

    # Its own account, bound to exactly what it calls (see test_chart_rbac_is_enough_for_the_gateway).
    (account,) = find(docs, "ServiceAccount", "gateway")
    assert account["metadata"]["name"] == GATEWAY
    (cluster_role,) = find(docs, "ClusterRole", "gateway")
    assert {(rule["resources"][0], tuple(rule["verbs"])) for rule in cluster_role["rules"]} == {
        ("sandboxes", ("list", "watch", "create", "patch", "delete")),
        ("sandboxtemplates", ("list", "watch")),
    }
    (role,) = find(docs, "Role", "gateway")
    assert role["metadata"]["namespace"] == "sandbox-system"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]}]
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        (binding,) = find(docs, kind, "gateway")
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": GATEWAY, "namespace": "sandbox-system"}]


def test_gateway_disabled_renders_no_gateway_objects() -> None:
    docs = rendered(
        "--set",
        "gateway.enabled=false",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "gateway.tokenKey.value=0123456789abcdef",
    )
    gateway = [
        f"{doc['kind']}/{doc['metadata']['name']}"
        for doc in docs
        if "gateway" in doc["metadata"]["name"]
        or (doc["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "gateway"
    ]
    # Only the token key stays: the operator derives the agents' access tokens from it (its name is
    # kept from before, so that an upgrade reuses the key a cluster already has).
    assert gateway == ["Secret/sbx-sandbox-operator-gateway-token-key"], gateway
    (operator,) = find(docs, "Deployment", "operator")
    (volume,) = operator["spec"]["template"]["spec"]["volumes"]
    assert volume["secret"]["secretName"] == "sbx-sandbox-operator-gateway-token-key"
    (monitor,) = find(docs, "ServiceMonitor")
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics"]
    assert len(find(docs, "Deployment", "operator")) == 1


def test_gateway_ingress_and_overrides_render() -> None:
    docs = rendered(
        "--set",
        "gateway.ingress.enabled=true",
        "--set",
        "gateway.domain=sbx.example.com",
        "--set",
        "gateway.ingress.tls.secretName=sbx-tls",
        "--set",
        "gateway.ingress.className=nginx",
        "--set",
        "gateway.tokenKey.existingSecret=my-key",
        "--set",
        "gateway.image.tag=9.9.9",
        "--set",
        "gateway.replicas=3",
        "--set",
        "gateway.service.type=LoadBalancer",
        "--set",
        "gateway.createTimeout=30",
        "--set",
        "gateway.clientLimits.maxConnectionsPerIP=0",
        "--set",
        "gateway.metricsPort=0",
    )
    (ingress,) = find(docs, "Ingress")
    hosts = ["api.sbx.example.com", "*.sbx.example.com"]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": hosts, "secretName": "sbx-tls"}]
    assert [rule["host"] for rule in ingress["spec"]["rules"]] == hosts
    for rule in ingress["spec"]["rules"]:
        (path,) = rule["http"]["paths"]
        assert path["path"] == "/" and path["pathType"] == "Prefix"
        assert path["backend"]["service"] == {"name": GATEWAY, "port": {"name": "http"}}

    (deployment,) = find(docs, "Deployment", "gateway")
    assert deployment["spec"]["replicas"] == 3
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--domain=sbx.example.com" in container["args"] and "--create-timeout=30" in container["args"]
    assert "--max-connections-per-ip=0" in container["args"] and "--metrics-port=0" in container["args"]
    assert [port["name"] for port in container["ports"]] == ["http"]
    assert container["image"] == "ghcr.io/sandbox-operator/sandbox-operator:9.9.9"
    operator = find(docs, "Deployment", "operator")[0]["spec"]["template"]["spec"]["containers"][0]
    assert operator["image"] == "ghcr.io/sandbox-operator/sandbox-operator:0.1.0"
    # The user's Secret is mounted and none is generated.
    assert deployment["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"] == "my-key"
    assert find(docs, "Secret") == []
    (service,) = find(docs, "Service", "gateway")  # without a metrics port, no metrics Service
    assert service["spec"]["type"] == "LoadBalancer" and [port["name"] for port in service["spec"]["ports"]] == ["http"]

    # The Ingress needs the domain the SDK derives both host names from.
    refused = helm(
        None,
        "template",
        "sbx",
        str(CHART),
        "--kube-version",
        "1.36.3",
        "--set",
        "gateway.ingress.enabled=true",
        check=False,
    )
    assert refused.returncode != 0 and "gateway.domain" in refused.stderr


@pytest.fixture
def release(cluster: Cluster, apply_crds: list[str], namespace: str, tmp_path: Path) -> Iterator[str]:
    """The chart installed into `namespace` with one template of its own (cluster-scoped names are
    shared with other tests, so the chart's default templates are switched off)."""
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "templates": {
                    "base": None,
                    "code-interpreter": None,
                    f"helm-{namespace}": {
                        "image": "ghcr.io/sandbox-operator/sandbox-base:dev",
                        "resources": {"default": {"cpu": "250m", "memory": "256Mi", "disk": "1Gi"}},
                    },
                }
            }
        )
    )
    name = f"sbx-{namespace[-6:]}"
    helm(cluster, "install", name, str(CHART), "--namespace", namespace, "-f", str(values), "--wait=false")
    try:
        yield name
    finally:
        helm(cluster, "uninstall", name, "--namespace", namespace, check=False)


def test_install_and_uninstall(cluster: Cluster, namespace: str, release: str) -> None:
    fullname = f"{release}-sandbox-operator"
    deployment = cluster.get_json("deployment", fullname, "-n", namespace)
    assert deployment is not None
    assert cluster.get_json("serviceaccount", fullname, "-n", namespace) is not None
    assert cluster.get_json("clusterrole", fullname) is not None
    binding = cluster.get_json("clusterrolebinding", fullname)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": fullname, "namespace": namespace}]
    assert cluster.get_json("sandboxtemplate", f"helm-{namespace}") is not None
    assert f"--gateway-namespace={namespace}" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]

    gateway = f"{fullname}-gateway"
    gateway_deployment = cluster.get_json("deployment", gateway, "-n", namespace)
    assert gateway_deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
    assert f"--keys-namespace={namespace}" in gateway_deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert cluster.get_json("service", gateway, "-n", namespace)["spec"]["ports"][0]["port"] == 80
    assert cluster.get_json("secret", f"{gateway}-token-key", "-n", namespace)["data"]["token-key"]
    assert cluster.get_json("serviceaccount", gateway, "-n", namespace) is not None
    # The API server accepts the platform objects as rendered (PodDisruptionBudget, NetworkPolicies).
    assert cluster.get_json("poddisruptionbudget", gateway, "-n", namespace)["spec"]["maxUnavailable"] == 1
    for policy in (fullname, gateway):
        assert cluster.get_json("networkpolicy", policy, "-n", namespace)["spec"]["policyTypes"] == [
            "Ingress",
            "Egress",
        ]
    subjects = [{"kind": "ServiceAccount", "name": gateway, "namespace": namespace}]
    for kind, extra in (
        ("role", ["-n", namespace]),
        ("rolebinding", ["-n", namespace]),
        ("clusterrole", []),
        ("clusterrolebinding", []),
    ):
        found = cluster.get_json(kind, gateway, *extra)
        assert found is not None, f"{kind} {gateway}"
        if kind.endswith("binding"):
            assert found["subjects"] == subjects

    helm(cluster, "uninstall", release, "--namespace", namespace)
    owned = (
        [(kind, fullname, ["-n", namespace]) for kind in ("deployment", "serviceaccount")]
        + [(kind, fullname, []) for kind in ("clusterrole", "clusterrolebinding")]
        + [
            (kind, gateway, ["-n", namespace])
            for kind in ("deployment", "service", "serviceaccount", "role", "rolebinding")
        ]
        + [(kind, gateway, []) for kind in ("clusterrole", "clusterrolebinding")]
        + [("secret", f"{gateway}-token-key", ["-n", namespace])]
    )
    for kind, name, extra in owned:

        def removed(kind: str = kind, name: str = name, extra: list[str] = extra) -> bool:
            return cluster.get_json(kind, name, *extra) is None

        wait_until(removed, timeout=30, message=f"{kind} {name} removed")
    assert cluster.get_json("sandboxtemplate", f"helm-{namespace}") is None
    # Helm never deletes CRDs: the users' sandboxes survive an uninstall.
    assert cluster.get_json("crd", "sandboxes.sandbox.dev") is not None


def test_gateway_token_key_survives_upgrade(cluster: Cluster, namespace: str, release: str, tmp_path: Path) -> None:
    secret = f"{release}-sandbox-operator-gateway-token-key"
    before = cluster.get_json("secret", secret, "-n", namespace)["data"]
    # An upgrade that changes the gateway re-renders every template, the Secret's too.
    helm(
        cluster,
        "upgrade",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "-f",
        str(tmp_path / "values.yaml"),
        "--set",
        "gateway.replicas=3",
        "--wait=false",
    )
    assert (
        cluster.get_json("deployment", f"{release}-sandbox-operator-gateway", "-n", namespace)["spec"]["replicas"] == 3
    )
    assert cluster.get_json("secret", secret, "-n", namespace)["data"] == before
    assert len(base64.b64decode(before["token-key"])) == 48
    # The notes tell how to make an API key and point the SDK at the gateway.
    notes = helm(cluster, "get", "notes", release, "--namespace", namespace).stdout
    assert f"kubectl create secret generic team-a-key -n {namespace} --from-literal=key=$KEY" in notes
    assert f"kubectl label secret team-a-key -n {namespace} sandbox.dev/api-key=true" in notes
    assert "E2B_API_URL=http://localhost:3000 E2B_SANDBOX_URL=http://localhost:3000" in notes


def service_account_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    config["users"] = [{"name": account, "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = account
    path.write_text(yaml.safe_dump(config))
    return path


def test_chart_rbac_is_enough_for_the_operator(cluster: Cluster, namespace: str, release: str, tmp_path: Path) -> None:
    fullname = f"{release}-sandbox-operator"
    as_operator = Cluster(str(service_account_kubeconfig(cluster, namespace, fullname, tmp_path / "sa.kubeconfig")))
    # RBAC is really enforced: the account cannot read secrets.
    denied = as_operator.kubectl("get", "secrets", "-n", namespace, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    log_path = tmp_path / "operator.log"
    operator = start_operator(as_operator, log_path, namespace)
    try:
        cluster.apply(sandbox_manifest("rbac", template=f"helm-{namespace}"), namespace)
        running = wait_phase(cluster, namespace, "rbac", "Running")
        assert running["status"]["podIP"]
        cluster.kubectl(
            "patch", "sandbox", "rbac", "-n", namespace, "--type=merge", "-p", json.dumps({"spec": {"suspended": True}})
        )
        wait_phase(cluster, namespace, "rbac", "Suspended")
        cluster.kubectl("delete", "sandbox", "rbac", "-n", namespace, "--wait=true", "--timeout=60s")
        wait_until(
            lambda: not any(children(cluster, namespace, "rbac").values()),
            timeout=60,
            message="children of rbac removed",
        )
        assert operator.process.poll() is None, operator.log_tail()
    finally:
        operator.kill()
    log = log_path.read_text(errors="replace")
    assert not forbidden_in(log), log[-4000:]


@dataclass
class LocalGateway:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def call(self, method: str, path: str, body: object = None, api_key: str | None = None) -> tuple[int, Any]:
        return request_json(method, self.url + path, body, {"X-API-KEY": api_key} if api_key else None, timeout=90)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)


def start_gateway(as_gateway: Cluster, keys_namespace: str, token_key_file: Path, log_path: Path) -> LocalGateway:
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sandbox_operator",
                "gateway",
                "--kubeconfig",
                as_gateway.kubeconfig,
                "--bind-address",
                "127.0.0.1",
                "--port",
                str(port),
                "--metrics-port",
                "0",
                "--keys-namespace",
                keys_namespace,
                "--token-key-file",
                str(token_key_file),
                "--create-timeout",
                "60",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=as_gateway.env(),
        )
    gateway = LocalGateway(f"http://127.0.0.1:{port}", process, log_path)

    def serving() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            return gateway.call("GET", "/health")[0] == 200
        except urllib.error.URLError:
            return False  # not listening yet: it lists Sandboxes, templates and keys first

    try:
        wait_until(serving, timeout=60, message="gateway /health")
    except BaseException:
        gateway.stop()
        raise
    return gateway


def test_chart_rbac_is_enough_for_the_gateway(cluster: Cluster, namespace: str, release: str, tmp_path: Path) -> None:
    """The gateway as the chart's gateway account, the operator as the operator's: an E2B create,
    get, list, timeout and kill of a sandbox whose agent really answers on its pod IP."""
    fullname = f"{release}-sandbox-operator"
    gateway_account = f"{fullname}-gateway"
    # The sandboxes go to a namespace of their own (t-*: outside the session operator's op-*).
    sandboxes = f"{namespace}-sbx"
    cluster.kubectl("create", "namespace", sandboxes)
    try:
        wait_until(
            lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", sandboxes, check=False).returncode == 0,
            timeout=30,
            message=f"service account default in {sandboxes}",
        )
        as_operator = Cluster(str(service_account_kubeconfig(cluster, namespace, fullname, tmp_path / "op.kubeconfig")))
        as_gateway = Cluster(
            str(service_account_kubeconfig(cluster, namespace, gateway_account, tmp_path / "gw.kubeconfig"))
        )
        # RBAC is really enforced, and the gateway's account has nothing it does not use.
        for args in (
            ["get", "pods", "-n", sandboxes],
            ["get", "secrets", "-n", sandboxes],
            ["get", "secret", f"{gateway_account}-token-key", "-n", namespace],
        ):
            denied = as_gateway.kubectl(*args, check=False)
            assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), args

        # An API key, made the way the chart's notes say.
        api_key = "e2b_" + secrets.token_hex(20)
        cluster.kubectl("create", "secret", "generic", "rbac-key", "-n", namespace, f"--from-literal=key={api_key}")
        cluster.kubectl("label", "secret", "rbac-key", "-n", namespace, "sandbox.dev/api-key=true")
        cluster.kubectl("annotate", "secret", "rbac-key", "-n", namespace, f"sandbox.dev/namespace={sandboxes}")
        # The gateway's token key, from the Secret the chart generated.
        token_secret = cluster.get_json("secret", f"{gateway_account}-token-key", "-n", namespace)
        token_key_file = tmp_path / "token-key"
        token_key_file.write_bytes(base64.b64decode(token_secret["data"]["token-key"]))

        operator_log, gateway_log = tmp_path / "operator.log", tmp_path / "gateway.log"
        operator = start_operator(as_operator, operator_log, sandboxes)
        try:
            gateway = start_gateway(as_gateway, namespace, token_key_file, gateway_log)
            try:
                with PodAgents(cluster, sandboxes, tmp_path / "agents"):
                    drive_the_gateway(cluster, gateway, api_key, sandboxes, template=f"helm-{namespace}")
                assert gateway.process.poll() is None, gateway_log.read_text()
            finally:
                gateway.stop()
            assert operator.process.poll() is None, operator.log_tail()
        finally:
            operator.kill()
        for path in (operator_log, gateway_log):
            log = path.read_text(errors="replace")
            assert not forbidden_in(log), f"{path.name}:\n{log[-4000:]}"
    finally:
        cluster.kubectl("delete", "namespace", sandboxes, "--wait=false", "--ignore-not-found", check=False)


def drive_the_gateway(cluster: Cluster, gateway: LocalGateway, api_key: str, sandboxes: str, template: str) -> None:
    assert gateway.call("GET", "/ready") == (200, {"status": "ready"})  # the readinessProbe's route
    assert gateway.call("POST", "/v2/sandboxes", {"templateID": template})[0] == 401  # no key, no sandbox
    # Answered once the operator has it Running and the agent answers /health on the pod IP.
    status, created = gateway.call("POST", "/v2/sandboxes", {"templateID": template, "timeout": 300}, api_key)
    assert status == 201, created
    sandbox_id = created["sandboxID"]
    assert created["envdAccessToken"]
    (body,) = [
        item
        for item in (cluster.get_json("sandboxes", "-n", sandboxes) or {}).get("items", [])
        if item["status"].get("sandboxID") == sandbox_id
    ]
    assert body["status"]["phase"] == "Running"

    status, info = gateway.call("GET", f"/sandboxes/{sandbox_id}", api_key=api_key)
    assert status == 200 and info["state"] == "running" and info["templateID"] == template, info
    status, listed = gateway.call("GET", "/v2/sandboxes", api_key=api_key)
    assert status == 200 and [item["sandboxID"] for item in listed] == [sandbox_id], listed
    # A patch (the sandbox's maxLifetime), in effect once the operator has seen it.
    status, _ = gateway.call("POST", f"/sandboxes/{sandbox_id}/timeout", {"timeout": 600}, api_key)
    assert status == 204
    assert gateway.call("GET", f"/sandboxes/{sandbox_id}", api_key=api_key)[1]["endAt"] > info["endAt"]

    status, _ = gateway.call("DELETE", f"/sandboxes/{sandbox_id}", api_key=api_key)
    assert status == 204
    name = body["metadata"]["name"]
    wait_until(
        lambda: cluster.get_json("sandbox", name, "-n", sandboxes) is None,
        timeout=60,
        message=f"sandbox {name} deleted",
    )
    # Gone for the gateway too, once its watch has the deletion (its children go with the garbage
    # collector, on the cluster's schedule, not the gateway's).
    wait_until(
        lambda: gateway.call("GET", f"/sandboxes/{sandbox_id}", api_key=api_key)[0] == 404,
        timeout=30,
        message=f"gateway answers 404 for {sandbox_id}",
    )
