"""Operator fixtures: the real operator process against the local control plane."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testlib import Cluster, wait_until

BASE_TEMPLATE = """
apiVersion: sandbox.dev/v1alpha1
kind: SandboxTemplate
metadata: {name: it-base}
spec:
  image: ghcr.io/sandbox-operator/sandbox-base:dev
  resources:
    default: {cpu: 250m, memory: 256Mi, disk: 1Gi}
    max: {cpu: "2", memory: 2Gi, disk: 10Gi}
  timeouts: {idle: 30m, maxLifetime: 1h, execution: 5m}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OperatorProcess:
    process: subprocess.Popen[bytes]
    metrics_url: str
    liveness_url: str
    log_path: Path

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return str(response.read().decode())

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def start_operator(cluster: Cluster, log_path: Path, *namespaces: str) -> OperatorProcess:
    metrics_port, liveness_port = free_port(), free_port()
    scope = [arg for ns in namespaces for arg in ("--namespace", ns)] or ["--all-namespaces"]
    argv = [
        sys.executable, "-m", "sandbox_operator", "run", *scope,
        "--kubeconfig", cluster.kubeconfig,
        "--bind-address", "127.0.0.1",
        "--metrics-port", str(metrics_port),
        "--liveness-port", str(liveness_port),
        "--gateway-namespace", "sandbox-system",
        "--log-level", "DEBUG" if os.environ.get("SANDBOX_TEST_DEBUG") else "INFO",
    ]
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed with the fixture
    process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=cluster.env())
    log_file.close()
    handle = OperatorProcess(
        process=process,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        liveness_url=f"http://127.0.0.1:{liveness_port}/healthz",
        log_path=log_path,
    )

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"operator exited with {process.returncode}:\n{handle.log_tail()}")
        return _healthy(handle.liveness_url)

    wait_until(ready, timeout=60, message="operator liveness endpoint")
    return handle


@pytest.fixture(scope="session")
def base_template(cluster: Cluster, apply_crds: list[str]) -> str:
    cluster.apply(BASE_TEMPLATE)
    return "it-base"


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, apply_crds: list[str], base_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """One operator for the session, watching the per-test namespaces (named t-*)."""
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    handle = start_operator(cluster, log_path, "t-*")
    try:
        yield handle
    finally:
        code = handle.kill(signal.SIGTERM)
        if code not in (0, -signal.SIGTERM):
            print(f"operator exited with {code}:\n{handle.log_tail()}")
