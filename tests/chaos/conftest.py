"""The chaos tier: faults injected into the control plane (a stopped API server, ...) while the
operator and the gateway run. Each test module gets a PRIVATE local control plane (kwok node), so
a fault never reaches the cluster the other tiers share.

These fixtures override the root conftest's session fixtures of the same names with module-scoped
ones; the root `namespace` fixture then makes its namespaces in the module's cluster.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from chaoslib import APISERVER, Gateway, gateway_on, resume_if_stopped

from testlib import (
    BASE_TEMPLATE,
    CODE_INTERPRETER_TEMPLATE,
    Cluster,
    OperatorProcess,
    PodAgents,
    apply_crds_to,
    local_cluster,
    session_operator,
)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if request.config.getoption("--kubeconfig"):
        pytest.skip("chaos tests signal the control plane's processes: they need the local one the fixtures start")
    with pytest.MonkeyPatch.context() as env:
        # Pod IPs of their own: every kwok cluster hands out 127.1.0.0/16 by default, so an agent of
        # another cluster on this machine (the session's, a concurrent run's) may hold a pod's IP and
        # answer for it. 127.1 and 127.3 are hack/cluster's defaults (kwok, containers).
        env.setenv("SANDBOX_CLUSTER_POD_CIDR", f"127.{secrets.choice(range(100, 200))}.0.0/16")
        with local_cluster(tmp_path_factory, "kwok") as started:
            try:
                yield started
            finally:
                resume_if_stopped(started, APISERVER)  # a stopped API server would not stop on SIGTERM


@pytest.fixture(scope="module")
def apply_crds(cluster: Cluster) -> list[str]:
    return apply_crds_to(cluster)


@pytest.fixture(scope="module")
def base_template(cluster: Cluster, apply_crds: list[str]) -> str:
    cluster.apply(BASE_TEMPLATE)
    return "it-base"


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, apply_crds: list[str], base_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    with session_operator(cluster, tmp_path_factory.mktemp("operator-chaos") / "operator.log") as handle:
        yield handle


@pytest.fixture(scope="module")
def gateway(cluster: Cluster, operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose key grants a namespace the operator watches, with an agent for every Running
    pod there (kwok runs no containers): creates through it complete."""
    workdir = tmp_path_factory.mktemp("gateway-chaos")
    with (
        gateway_on(cluster, workdir, CODE_INTERPRETER_TEMPLATE % "base", "op-chaos-gw") as handle,
        PodAgents(cluster, handle.namespace, workdir / "agents"),
    ):
        yield handle
