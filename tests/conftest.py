"""Session fixtures: a real local control plane (or the cluster named by --kubeconfig)."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from testlib import (
    BASE_TEMPLATE,
    REPO,
    Cluster,
    OperatorProcess,
    apply_crds_to,
    local_cluster,
    session_operator,
    wait_until,
)

# Child processes (the operator, the gateway, agents: `python -m sandbox_operator ...`) run this
# checkout's code too, not whichever clone the editable install last pointed at.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "operator"), os.environ.get("PYTHONPATH")]))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kubeconfig",
        default=os.environ.get("SANDBOX_TEST_KUBECONFIG"),
        help="run integration tests against this cluster instead of starting a local control plane "
        "(env SANDBOX_TEST_KUBECONFIG)",
    )


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The kwok cluster of the integration tests (pods are simulated: fast, many)."""
    existing = request.config.getoption("--kubeconfig")
    if existing:
        yield Cluster(kubeconfig=str(Path(existing).expanduser()))
        return
    with local_cluster(tmp_path_factory, "kwok") as started:
        yield started


def _namespace_name(node_name: str, prefix: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", node_name.lower()).strip("-")[:40].strip("-")
    return f"{prefix}-{slug}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without blocking on its finalization)."""
    # Tests that use the operator get a namespace it watches (op-*); the others (API validation,
    # the control plane itself) get one it never touches (t-*).
    name = _namespace_name(request.node.name, "op" if "operator" in request.fixturenames else "t")
    cluster.kubectl("create", "namespace", name)
    # Pods need the namespace's default service account, which kube-controller-manager creates.
    wait_until(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
        timeout=30,
        message=f"service account default in {name}",
    )
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


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
    with session_operator(cluster, tmp_path_factory.mktemp("operator") / "operator.log") as handle:
        yield handle
