"""Helpers of test_control_plane_restart.py: a private control plane whose API server keeps an audit
log, a restart of one of its components (hack/cluster restart), and what the audit log says the
operator asked for.

Why an audit log: the LISTs the operator makes around a restart cannot be read from the API server's
own `apiserver_request_total` — a restarted API server starts its counters at zero, and the counter
has no client label (kube-controller-manager's garbage collector lists every resource too, sandboxes
included). The audit log is a file the restarted API server appends to, and each entry names the
client by its User-Agent.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from testlib import REPO, Cluster, apply_crds_to, local_cluster, wait_until

# Only what the assertions read: LISTs (by anyone) and pod creates and deletes, at Metadata level
# (who, what, when, the answer's code; no bodies). Watches, gets and everything else: nothing.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "verbs": ["list"]},
        {"level": "Metadata", "verbs": ["create", "delete"], "resources": [{"group": "", "resources": ["pods"]}]},
        {"level": "None"},
    ],
}

# The operator's two HTTP clients: kopf's (its watches and their LISTs) and its own aiohttp client
# (kube/client.py, aiohttp's default User-Agent). Nothing else talking to the private cluster uses
# either: the control plane's components name themselves, kubectl too, hack/cluster is Python-urllib.
OPERATOR_USER_AGENTS = ("kopf/", "Python/")


@dataclass
class AuditLog:
    path: Path

    def events(self, since: float, until: float | None = None) -> list[dict[str, Any]]:
        """The completed requests received from `since` (a time.time()) on, up to `until`."""
        found = []
        with contextlib.suppress(FileNotFoundError), self.path.open() as lines:
            for line in lines:
                event = json.loads(line)
                if event.get("stage") != "ResponseComplete":
                    continue
                received = datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp()
                if received >= since and (until is None or received <= until):
                    found.append(event)
        return found

    def operator_lists(self, since: float, until: float | None = None) -> Counter[str]:
        """LIST requests the operator made, by resource (failed ones too: each is work for the server)."""
        return Counter(
            event["objectRef"]["resource"]
            for event in self.events(since, until)
            if event["verb"] == "list" and is_operator(event)
        )

    def pods_created(self, namespace: str, since: float) -> Counter[str]:
        """Pods the API server created (201) in `namespace`, by name."""
        return Counter(
            event["objectRef"].get("name", "?")
            for event in self.events(since)
            if event["verb"] == "create"
            and event["objectRef"].get("namespace") == namespace
            and event["responseStatus"]["code"] == 201
        )


def is_operator(event: dict[str, Any]) -> bool:
    return str(event.get("userAgent", "")).startswith(OPERATOR_USER_AGENTS)


def _hack_cluster(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "hack" / "cluster"), *args], capture_output=True, text=True, timeout=timeout
    )


def restart(cluster: Cluster, component: str, *append_args: str, timeout: float = 180) -> str:
    """`hack/cluster restart`: SIGTERM the component by its recorded PID (SIGKILL after 10 s), start
    it again with its command line (plus `append_args`), wait until it and the API server are
    healthy. Returns hack/cluster's account of it."""
    assert cluster.state_dir is not None, "only a control plane the fixtures started can be restarted"
    args = ["restart", "--state-dir", str(cluster.state_dir), "--component", component]
    args += [f"--append-arg={arg}" for arg in append_args]
    result = _hack_cluster(*args, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"hack/cluster restart --component {component} failed:\n{result.stderr}")
    return result.stderr.strip()


def component_pid(cluster: Cluster, component: str) -> int:
    assert cluster.state_dir is not None
    return int(json.loads((cluster.state_dir / "state.json").read_text())["processes"][component]["pid"])


@contextlib.contextmanager
def audited_control_plane(tmp_path_factory: Any) -> Iterator[tuple[Cluster, AuditLog]]:
    """A private local control plane (kwok node) with the CRDs, whose API server writes an audit log.

    `hack/cluster up` has no audit flags; one restart of the fresh API server with them appended
    turns it on (and hack/cluster keeps them for the test's own restart)."""
    with local_cluster(tmp_path_factory, "kwok") as cluster:
        assert cluster.state_dir is not None
        audit_dir = cluster.state_dir.parent / "audit"
        audit_dir.mkdir()
        policy = audit_dir / "policy.json"  # JSON is YAML: the API server reads it as its policy file
        policy.write_text(json.dumps(AUDIT_POLICY))
        audit = AuditLog(audit_dir / "audit.log")
        restart(
            cluster,
            "kube-apiserver",
            f"--audit-policy-file={policy}",
            f"--audit-log-path={audit.path}",
            "--audit-log-maxsize=1000",  # MB: one file for the whole test, never rotated
        )
        wait_until(audit.path.exists, timeout=60, message="the API server's audit log")
        apply_crds_to(cluster)
        yield cluster, audit
