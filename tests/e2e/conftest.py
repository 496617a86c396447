"""The e2e tier runs on the container node: sandbox pods are real containers from the project's
images (hack/build-images), started by hack/container_node.py under crun, so the tests see what
users get (uid 1000 in /home/user, the pod's security settings, memory limits, real deaths).

These fixtures override the root conftest's session fixtures of the same names for tests in this
directory, each with its own session cache: the integration tier keeps its kwok cluster.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2elib import Gateway

from sandbox_operator.gateway.e2b import api_key_secret
from testlib import (
    BASE_TEMPLATE,
    CODE_INTERPRETER_TEMPLATE,
    Cluster,
    OperatorProcess,
    apply_crds_to,
    free_port,
    local_cluster,
    request_json,
    session_operator,
    wait_until,
)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    existing = request.config.getoption("--kubeconfig")
    if existing:
        yield Cluster(kubeconfig=str(Path(existing).expanduser()), node="containers")
        return
    with local_cluster(tmp_path_factory, "containers") as started:
        yield started


@pytest.fixture(scope="session")
def apply_crds(cluster: Cluster) -> list[str]:
    return apply_crds_to(cluster)


@pytest.fixture(scope="session")
def base_template(cluster: Cluster, apply_crds: list[str]) -> str:
    cluster.apply(BASE_TEMPLATE)
    return "it-base"


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, apply_crds: list[str], base_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    with session_operator(cluster, tmp_path_factory.mktemp("operator-e2e") / "operator.log") as handle:
        yield handle


@pytest.fixture(scope="session")
def gateway(cluster: Cluster, operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    suffix = secrets.token_hex(3)
    namespace, other = f"op-gw-{suffix}", f"op-gw-other-{suffix}"  # op-*: the session operator's scope
    for ns in (namespace, other):
        cluster.kubectl("create", "namespace", ns)

        def has_service_account(ns: str = ns) -> bool:
            return cluster.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0

        wait_until(has_service_account, timeout=30, message=f"default service account in {ns}")
    for name in ("base", "code-interpreter"):
        cluster.apply(CODE_INTERPRETER_TEMPLATE % name)
    api_key, other_key = "e2b_" + secrets.token_hex(20), "e2b_" + secrets.token_hex(20)
    for name, key, grants in (("key-main", api_key, namespace), ("key-other", other_key, other)):
        cluster.apply(json.dumps(api_key_secret(name, key, keys_namespace=namespace, grants=grants)))
    workdir = tmp_path_factory.mktemp("gateway")
    port, metrics_port = free_port(), free_port()
    log = workdir / "gateway.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sandbox_operator",
                "gateway",
                "--kubeconfig",
                cluster.kubeconfig,
                "--bind-address",
                "127.0.0.1",
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
                "--keys-namespace",
                namespace,
                "--create-timeout",
                "60",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cluster.env(),  # the token key the operator has too (agent tokens)
        )
    handle = Gateway(
        f"http://127.0.0.1:{port}",
        namespace,
        api_key,
        other_key,
        process,
        log,
        f"http://127.0.0.1:{metrics_port}/metrics",
    )

    def serving() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited:\n{log.read_text()}")
        try:
            return request_json("GET", handle.url + "/health")[0] == 200
        except urllib.error.URLError:
            return False  # not listening yet: it lists the cluster first

    try:
        wait_until(serving, timeout=60, message="gateway /health")
        yield handle
    finally:
        process.terminate()
        process.wait(timeout=30)
        for ns in (namespace, other):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
