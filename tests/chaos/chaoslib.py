"""Helpers of the chaos tier (importable from its test modules: pytest puts tests/chaos on sys.path):
the gateway's handle and faults injected into the private control plane's processes."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandbox_operator.gateway.e2b import api_key_secret
from testlib import Cluster, free_port, local_cluster, request_json, stop_process, wait_until

APISERVER = "kube-apiserver"  # the name hack/cluster records the process under in its state.json


@dataclass
class Gateway:
    url: str
    namespace: str  # where its API key's sandboxes go (also its keys namespace)
    api_key: str
    process: subprocess.Popen[bytes]
    log: Path

    def sdk(self) -> dict[str, Any]:
        return {"api_key": self.api_key, "api_url": self.url, "sandbox_url": self.url}

    def call(self, method: str, path: str, body: object = None, timeout: float = 120) -> tuple[int, Any]:
        """A control-plane call with the API key; the status and the decoded JSON answer."""
        return request_json(method, self.url + path, body, {"X-API-KEY": self.api_key}, timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def component_pid(cluster: Cluster, name: str) -> int:
    """The PID of a control-plane process the fixtures started (hack/cluster's state.json), checked to
    still run the recorded binary: a reused PID must never get a signal meant for the API server."""
    if cluster.state_dir is None:
        raise AssertionError("the cluster was not started by the fixtures: its processes are not ours to signal")
    recorded = json.loads((cluster.state_dir / "state.json").read_text())["processes"][name]
    pid = int(recorded["pid"])
    argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    if argv0 != recorded["binary"]:
        raise AssertionError(f"pid {pid} runs {argv0!r}, not {name} ({recorded['binary']})")
    return pid


def process_state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat: T when stopped by a signal, S sleeping, R running."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP `pid` for the block, SIGCONT afterwards whatever happens. A stopped process keeps its
    sockets: the kernel still accepts connections into its backlog and no answer ever comes, as from
    a hung or partitioned server (not a refused connection)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: process_state(pid) == "T", timeout=10, message=f"pid {pid} stopped")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def resume_if_stopped(cluster: Cluster, name: str) -> None:
    """SIGCONT a process a failed test may have left stopped (before the cluster is torn down)."""
    with contextlib.suppress(AssertionError, OSError, KeyError):
        os.kill(component_pid(cluster, name), signal.SIGCONT)


@contextlib.contextmanager
def private_container_cluster(
    tmp_path_factory: Any, extra_env: dict[str, str] | None = None, stopped_on_exit: str | None = None
) -> Iterator[Cluster]:
    """A control plane of the module's own on the container node, with a pod range of its own: the
    node binds each pod's agent on its pod IP in the host's network namespace, so two container
    clusters on the default 127.3.0.0/16 (the e2e session's and this one) would hand out the same
    addresses and one agent would answer for another's pod. `extra_env` goes to hack/cluster;
    `stopped_on_exit` names a component a failed test may have left SIGSTOPped (resumed first)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SANDBOX_CLUSTER_CONTAINER_POD_CIDR", f"127.{secrets.choice(range(200, 250))}.0.0/16")
        for key, value in (extra_env or {}).items():
            env.setenv(key, value)
        with local_cluster(tmp_path_factory, "containers") as started:
            try:
                yield started
            finally:
                if stopped_on_exit:
                    resume_if_stopped(started, stopped_on_exit)


def start_gateway(cluster: Cluster, namespace: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """A gateway process on 127.0.0.1:`port` taking its API keys from `namespace`, its output appended
    to `log`; returned once /health answers (it listens only after its caches have listed)."""
    argv = [sys.executable, "-m", "sandbox_operator", "gateway", "--kubeconfig", cluster.kubeconfig]
    argv += ["--bind-address", "127.0.0.1", "--port", str(port), "--metrics-port", str(free_port())]
    argv += ["--keys-namespace", namespace, "--create-timeout", "60"]
    with open(log, "ab") as out:
        # The token key the operator has too: agent tokens derive from it on both sides.
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=cluster.env())
    url = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        if process.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise AssertionError(f"gateway exited with {process.returncode}:\n{tail}")
        try:
            return request_json("GET", url + "/health", timeout=5)[0] == 200
        except urllib.error.URLError:
            return False  # not listening yet: it lists the cluster first

    try:
        wait_until(serving, timeout=90, message=f"gateway /health on port {port}")
    except BaseException:
        stop_process(process)
        raise
    return process


@contextlib.contextmanager
def gateway_on(
    cluster: Cluster, workdir: Path, template_manifest: str, namespace_prefix: str, port: int | None = None
) -> Iterator[Gateway]:
    """A gateway whose key grants a fresh namespace the session operator watches (`op-*` prefixes),
    with `template_manifest` applied, on `port` (a free one by default); stopped (the process
    `handle.process` names then, so a restarted one too) and the namespace deleted afterwards."""
    namespace = f"{namespace_prefix}-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", namespace)
    wait_until(
        lambda: cluster.kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
        timeout=60,
        message=f"default service account in {namespace}",
    )
    cluster.apply(template_manifest)
    api_key = "e2b_" + secrets.token_hex(20)
    cluster.apply(json.dumps(api_key_secret("key-chaos", api_key, keys_namespace=namespace, grants=namespace)))
    port = port or free_port()
    log = workdir / "gateway.log"
    try:
        with gateway_process(cluster, namespace, api_key, port, log) as handle:
            yield handle
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@contextlib.contextmanager
def gateway_process(cluster: Cluster, namespace: str, api_key: str, port: int, log: Path) -> Iterator[Gateway]:
    """A gateway on `port` for the keys in `namespace` (start_gateway); afterwards the process the
    handle names then (a test may have restarted it) is stopped, its log tail printed on a failure."""
    handle = Gateway(f"http://127.0.0.1:{port}", namespace, api_key, start_gateway(cluster, namespace, port, log), log)
    try:
        yield handle
    finally:
        code = stop_process(handle.process)
        if code not in (0, -15):
            print(f"gateway on port {port} exited with {code}:\n{handle.log_tail()}", file=sys.stderr)
