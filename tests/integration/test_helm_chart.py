"""The Helm chart against the real API server: it lints, renders what its values say, installs and
uninstalls cleanly, and its RBAC is enough for the operator: an operator authenticated as the chart's
service account (RBAC is on in the local control plane) takes a Sandbox to Running, suspends and
deletes it without a single 403."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testlib import REPO, Cluster, children, sandbox_manifest, start_operator, wait_phase, wait_until

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
    out = helm(None, "template", "sbx", str(CHART), "--namespace", "sandbox-system", "--kube-version", "1.36.3",
               *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


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
    (deployment,) = find(docs, "Deployment")
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
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert sorted(t["metadata"]["name"] for t in find(docs, "SandboxTemplate")) == ["base", "code-interpreter"]
    assert find(docs, "ServiceMonitor") == []


def test_values_reach_the_operator_flags() -> None:
    docs = rendered(
        "--set", "operator.watchNamespaces={team-a,team-*}",
        "--set", "operator.normalEvents=false",
        "--set", "operator.metricMetadataKeys={team}",
        "--set", "serviceMonitor.enabled=true",
        "--set", "templates=null",
    )
    args = find(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-*" in args
    assert "--normal-events=off" in args and "--metric-metadata-key=team" in args
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert find(docs, "SandboxTemplate") == []


@pytest.fixture
def release(cluster: Cluster, apply_crds: list[str], namespace: str, tmp_path: Path) -> Iterator[str]:
    """The chart installed into `namespace` with one template of its own (cluster-scoped names are
    shared with other tests, so the chart's default templates are switched off)."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"templates": {
        "base": None,
        "code-interpreter": None,
        f"helm-{namespace}": {
            "image": "ghcr.io/sandbox-operator/sandbox-base:dev",
            "resources": {"default": {"cpu": "250m", "memory": "256Mi", "disk": "1Gi"}},
        },
    }}))
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

    helm(cluster, "uninstall", release, "--namespace", namespace)
    for kind, extra in (("deployment", ["-n", namespace]), ("serviceaccount", ["-n", namespace]),
                        ("clusterrole", []), ("clusterrolebinding", [])):

        def removed(kind: str = kind, extra: list[str] = extra) -> bool:
            return cluster.get_json(kind, fullname, *extra) is None

        wait_until(removed, timeout=30, message=f"{kind} {fullname} removed")
    assert cluster.get_json("sandboxtemplate", f"helm-{namespace}") is None
    # Helm never deletes CRDs: the users' sandboxes survive an uninstall.
    assert cluster.get_json("crd", "sandboxes.sandbox.dev") is not None


def service_account_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    config["users"] = [{"name": account, "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = account
    path.write_text(yaml.safe_dump(config))
    return path


def test_chart_rbac_is_enough_for_the_operator(
    cluster: Cluster, namespace: str, release: str, tmp_path: Path
) -> None:
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
        cluster.kubectl("patch", "sandbox", "rbac", "-n", namespace, "--type=merge",
                        "-p", json.dumps({"spec": {"suspended": True}}))
        wait_phase(cluster, namespace, "rbac", "Suspended")
        cluster.kubectl("delete", "sandbox", "rbac", "-n", namespace, "--wait=true", "--timeout=60s")
        wait_until(lambda: not any(children(cluster, namespace, "rbac").values()), timeout=60,
                   message="children of rbac removed")
        assert operator.process.poll() is None, operator.log_tail()
    finally:
        operator.kill()
    log = log_path.read_text(errors="replace")
    assert "403" not in log and "forbidden" not in log.lower(), log[-4000:]
