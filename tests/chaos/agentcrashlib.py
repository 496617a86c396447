"""Helpers of test_agent_crash.py: a gateway on a control plane whose node really runs the sandbox
pods (hack/container_node.py), and the fault, a sandbox's agent SIGKILLed from the host."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chaoslib
from chaoslib import Gateway

from testlib import Cluster

# The "base" template of the test: the small base image, a workspace claim (persistence is the
# default, stated here because the test is about it surviving).
PERSISTENT_TEMPLATE = """
apiVersion: sandbox.dev/v1alpha1
kind: SandboxTemplate
metadata: {name: %s}
spec:
  image: ghcr.io/sandbox-operator/sandbox-base:dev
  resources:
    default: {cpu: 500m, memory: 256Mi, disk: 1Gi}
  persistence: {enabled: true}
  timeouts: {idle: 30m, maxLifetime: 1h, execution: 5m}
"""


@contextlib.contextmanager
def gateway_on(cluster: Cluster, workdir: Path, template: str) -> Iterator[Gateway]:
    """A gateway on a fresh namespace with the persistent template `template`."""
    with chaoslib.gateway_on(cluster, workdir, PERSISTENT_TEMPLATE % template, "op-crash") as handle:
        yield handle


def _crun_state(cluster: Cluster, container_id: str) -> dict[str, Any]:
    assert cluster.state_dir is not None, "not a cluster the fixtures started"
    crun_root = cluster.state_dir / "node" / "crun"  # hack/cluster's node state dir, container_node's crun root
    result = subprocess.run(
        ["crun", "--root", str(crun_root), "state", container_id], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, f"crun state {container_id}: {result.stderr}"
    state: dict[str, Any] = json.loads(result.stdout)
    return state


def agent_pid(cluster: Cluster, pod: dict[str, Any]) -> int:
    """The host PID of the agent in the pod's (only) container: the container's init, as crun knows
    it, checked to run sandbox-agent as PID 1 of its own PID namespace (never some other process)."""
    (status,) = pod["status"]["containerStatuses"]
    container_id = status["containerID"].removeprefix("crun://")
    state = _crun_state(cluster, container_id)
    assert state["status"] == "running", state
    pid = int(state["pid"])
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert any(part.endswith(b"sandbox-agent") for part in cmdline), f"pid {pid} runs {cmdline!r}"
    nspid = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("NSpid:"))
    assert nspid.split()[-1] == "1", f"pid {pid} is not its container's init: {nspid}"
    return pid


def kill_agent(cluster: Cluster, pod: dict[str, Any]) -> int:
    """SIGKILL the sandbox's agent from the host; its PID."""
    pid = agent_pid(cluster, pod)
    os.kill(pid, signal.SIGKILL)
    return pid
