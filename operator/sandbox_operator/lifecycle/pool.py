"""Pure rules of SandboxPool: how many warm pods to add or remove, which pod may be claimed, and
whether a warm pod is interchangeable with the pod a given Sandbox would get."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Env vars that name the sandbox itself: they differ between a warm pod and its claimant by design.
IDENTITY_ENV = frozenset({"SANDBOX_ID"})


@dataclass(frozen=True, slots=True)
class PoolPlan:
    ready: int
    to_create: int
    to_delete: tuple[str, ...]


def is_claimable(pod: Mapping[str, Any]) -> bool:
    """A warm pod that is Running, Ready and not being deleted."""
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if metadata.get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def plan_pool(size: int, pods: Sequence[Mapping[str, Any]]) -> PoolPlan:
    """Keep `size` live warm pods: create the shortfall, delete the surplus (not-ready ones first)."""
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    ready = sum(1 for p in live if is_claimable(p))
    surplus = max(0, len(live) - size)
    by_readiness = sorted(live, key=lambda p: (is_claimable(p), p["metadata"]["name"]))
    return PoolPlan(
        ready=ready,
        to_create=max(0, size - len(live)),
        to_delete=tuple(p["metadata"]["name"] for p in by_readiness[:surplus]),
    )


def pod_signature(pod: Mapping[str, Any]) -> str:
    """A digest of everything in a pod spec that a claim cannot change afterwards.

    Identity (names, hostname, the workspace claim's name, SANDBOX_ID) is left out: a claim rewrites
    labels and ownership, and the workspace claim moves with the pod.
    """
    spec = json.loads(json.dumps(pod.get("spec") or {}))
    spec.pop("hostname", None)
    for container in spec.get("containers") or []:
        container["env"] = [e for e in container.get("env") or [] if e.get("name") not in IDENTITY_ENV]
    for volume in spec.get("volumes") or []:
        if "persistentVolumeClaim" in volume:
            volume["persistentVolumeClaim"] = {"claimName": ""}
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
