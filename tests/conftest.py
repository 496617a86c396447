"""Session fixtures: a real local control plane (or the cluster named by --kubeconfig)."""

from __future__ import annotations

import functools
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testlib import BASE_TEMPLATE, REPO, Cluster, OperatorProcess, start_operator, wait_until

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
    existing = request.config.getoption("--kubeconfig")
    if existing:
        yield Cluster(kubeconfig=str(Path(existing).expanduser()))
        return
    state_dir = tmp_path_factory.mktemp("cluster", numbered=True) / "state"
    up = subprocess.run(
        [sys.executable, str(REPO / "hack" / "cluster"), "up", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if up.returncode != 0:
        pytest.fail(f"hack/cluster up failed:\n{up.stderr}{up.stdout}", pytrace=False)
    kubeconfig = up.stdout.strip().splitlines()[-1].removeprefix("KUBECONFIG=")
    try:
        yield Cluster(kubeconfig=kubeconfig, state_dir=state_dir)
    finally:
        subprocess.run(
            [sys.executable, str(REPO / "hack" / "cluster"), "down", "--state-dir", str(state_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )


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
    """Apply crds/*.yaml and wait until each is Established; returns the CRD names."""
    names: list[str] = []
    for path in sorted((REPO / "crds").glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
        name = cluster.kubectl("get", "-f", str(path), "-o", "jsonpath={.metadata.name}").stdout.strip()
        names.append(name)
    def listable(crd: str) -> bool:
        return cluster.kubectl("get", crd, "-A", check=False).returncode == 0

    for name in names:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
        # Just after Established, list/watch can answer 429 "storage is (re)initializing" briefly.
        wait_until(functools.partial(listable, name), timeout=30, message=f"{name} to be listable")
    return names


@pytest.fixture(scope="session")
def base_template(cluster: Cluster, apply_crds: list[str]) -> str:
    cluster.apply(BASE_TEMPLATE)
    return "it-base"


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, apply_crds: list[str], base_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """One operator for the session, watching the namespaces of tests that ask for it (op-*)."""
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    # Fast usage collection so metric tests see agents' numbers within a second.
    handle = start_operator(
        cluster, log_path, "op-*",
        extra_args=("--usage-interval", "0.5", "--usage-status-interval", "1", "--metric-metadata-key", "team"),
    )
    try:
        yield handle
    finally:
        code = handle.kill(signal.SIGTERM)
        if code not in (0, -signal.SIGTERM):
            print(f"operator exited with {code}:\n{handle.log_tail()}")
