"""The operator killed with SIGKILL in the middle of 50 lifecycles converges after a restart."""

from __future__ import annotations

import json
import secrets
import signal
from collections import Counter
from pathlib import Path

from testlib import Cluster, start_operator, wait_until

COUNT = 50


def test_sigkill_mid_lifecycle_converges_without_orphans_or_duplicates(
    cluster: Cluster, base_template: str, tmp_path: Path
) -> None:
    namespace = f"k-{secrets.token_hex(3)}"  # outside the session operator's op-* scope
    cluster.kubectl("create", "namespace", namespace)
    wait_until(
        lambda: cluster.kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
        timeout=30,
        message="default service account",
    )
    # Two workers: the batch takes long enough to be caught half done, whatever the machine's speed.
    first = start_operator(cluster, tmp_path / "first.log", namespace, extra_args=("--workers", "2"))
    try:
        items = [
            {
                "apiVersion": "sandbox.dev/v1alpha1",
                "kind": "Sandbox",
                "metadata": {"name": f"s{i:02d}"},
                "spec": {"template": base_template, "suspended": i % 5 == 0, "network": {"service": True}},
            }
            for i in range(COUNT)
        ]
        cluster.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}), namespace)

        def some_running() -> bool:
            listing = cluster.get_json("sandboxes", "-n", namespace) or {}
            phases = [(s.get("status") or {}).get("phase") for s in listing.get("items", [])]
            return 1 <= phases.count("Running") < COUNT - COUNT // 5

        # Kill it mid-flight: some sandboxes are Running, others are still being created.
        wait_until(some_running, timeout=60, interval=0.02, message="a partly reconciled batch")
    finally:
        first.kill(signal.SIGKILL)

    # While it is down, the declared state changes: suspend some more, resume some suspended ones.
    for i in (1, 2, 3):
        cluster.kubectl(
            "patch", "sandbox", f"s{i:02d}", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspended":true}}'
        )
    cluster.kubectl("patch", "sandbox", "s05", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspended":false}}')
    suspended = {f"s{i:02d}" for i in range(COUNT) if i % 5 == 0} - {"s05"} | {"s01", "s02", "s03"}

    second = start_operator(cluster, tmp_path / "second.log", namespace)
    try:

        def mismatches() -> list[str]:
            listing = cluster.get_json("sandboxes", "-n", namespace) or {}
            wrong = []
            for item in listing.get("items", []):
                want = "Suspended" if item["metadata"]["name"] in suspended else "Running"
                status = item.get("status") or {}
                if status.get("phase") != want:
                    wrong.append(f"{item['metadata']['name']}: {status.get('phase')}/{status.get('reason')} != {want}")
            return wrong if wrong or len(listing.get("items", [])) != COUNT else []

        try:
            wait_until(lambda: not mismatches(), timeout=120, message="every sandbox in its declared phase")
        except AssertionError as exc:
            pods = cluster.kubectl(
                "get",
                "pods",
                "-n",
                namespace,
                "-o",
                "custom-columns=NAME:.metadata.name,PHASE:.status.phase,"
                "READY:.status.conditions[?(@.type=='Ready')].status,RV:.metadata.resourceVersion",
                check=False,
            ).stdout
            raise AssertionError(f"{exc}\nnot converged: {mismatches()}\npods:\n{pods}\n{second.log_tail(30)}") from exc
        pods = (cluster.get_json("pods", "-n", namespace) or {}).get("items", [])
        owners = Counter(
            p["metadata"]["labels"].get("sandbox.dev/sandbox")
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
        )
        assert set(owners) == {f"s{i:02d}" for i in range(COUNT)} - suspended, "orphan or missing pods"
        assert max(owners.values()) == 1, f"duplicate pods: {[k for k, v in owners.items() if v > 1]}"
        sandbox_uids = {s["metadata"]["uid"] for s in (cluster.get_json("sandboxes", "-n", namespace) or {})["items"]}
        for pod in pods:
            assert pod["metadata"]["ownerReferences"][0]["uid"] in sandbox_uids
        # Every pod is governed by exactly one NetworkPolicy: the one its template's deny-class pods
        # share, written once (no sandbox has a policy of its own).
        policies = (cluster.get_json("networkpolicies", "-n", namespace) or {}).get("items", [])
        assert [p["metadata"]["name"] for p in policies] == [f"sbx-net-{base_template}-deny"]
        for pod in pods:
            selector = policies[0]["spec"]["podSelector"]["matchLabels"]
            assert selector.items() <= pod["metadata"]["labels"].items(), pod["metadata"]["name"]
        # Every sandbox has exactly one workspace claim and Service, all owned by it.
        for kind in ("pvc", "services"):
            items = (cluster.get_json(kind, "-n", namespace) or {}).get("items", [])
            per_sandbox = Counter(i["metadata"]["labels"].get("sandbox.dev/sandbox") for i in items)
            assert set(per_sandbox) == {f"s{i:02d}" for i in range(COUNT)}, f"missing or orphan {kind}"
            assert max(per_sandbox.values()) == 1, f"duplicate {kind}"
            assert all(i["metadata"]["ownerReferences"][0]["uid"] in sandbox_uids for i in items)
    finally:
        second.kill(signal.SIGTERM)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
