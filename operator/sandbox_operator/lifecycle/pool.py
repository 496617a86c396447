"""Pure rules of SandboxPool: how many warm pods to add or remove, which pod may be claimed and
when a sandbox may claim one, which workspace claims the pool has leaked, whether a warm pod is
interchangeable with the pod a given Sandbox would get, and the pool's status."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sandbox_operator.api.names import (
    AGENT_TOKEN_ENV,
    CLAIMED_FROM_POOL_ANNOTATION,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    POD_SIGNATURE_ANNOTATION,
    POOL_LABEL,
    SANDBOX_LABEL,
    ConditionType,
    PoolReason,
)
from sandbox_operator.lifecycle.status import format_time, parse_time

# The volume source of a workspace claim in a pod spec.
WORKSPACE_VOLUME_KEY = "persistentVolumeClaim"
# Env vars that name the sandbox itself: they differ between a warm pod and its claimant by design.
IDENTITY_ENV = frozenset({"SANDBOX_ID", AGENT_TOKEN_ENV})
# A pod in one of these phases never runs again (restartPolicy Never): it can serve no one.
FINISHED_PHASES = frozenset({"Failed", "Succeeded"})


@dataclass(frozen=True, slots=True)
class PoolPlan:
    ready: int
    to_create: int
    to_delete: tuple[str, ...]  # stale pods first, then the surplus
    stale: tuple[str, ...] = ()  # the part of to_delete that is replaced (finished or outdated)


@dataclass(frozen=True, slots=True)
class ClaimSweep:
    to_delete: tuple[str, ...]
    recheck_at: datetime | None  # when an orphan still inside its grace period may go


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _deleting(obj: Mapping[str, Any]) -> bool:
    return bool(_metadata(obj).get("deletionTimestamp"))


def is_claimable(pod: Mapping[str, Any]) -> bool:
    """A warm pod that is Running, Ready and not being deleted."""
    status = pod.get("status") or {}
    if _deleting(pod) or status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def is_stale(pod: Mapping[str, Any], signature: str | None) -> bool:
    """A warm pod that can never be claimed: it has finished, or it was built from another version of
    the template (or by another operator version), so no Sandbox's pod would match it.

    `signature` is the pool's current warm-pod signature; None when unknown (template missing), and
    then only finished pods are stale.
    """
    if (pod.get("status") or {}).get("phase") in FINISHED_PHASES:
        return True
    if signature is None:
        return False
    return (_metadata(pod).get("annotations") or {}).get(POD_SIGNATURE_ANNOTATION) != signature


def plan_pool(
    size: int,
    pods: Sequence[Mapping[str, Any]],
    signature: str | None = None,
    unusable: Collection[str] = (),
) -> PoolPlan:
    """Keep `size` live, current warm pods: replace stale ones (`is_stale`, or named in `unusable`,
    e.g. a pod whose workspace claim is gone), create the shortfall, delete the surplus (not-ready
    ones first). Pods being deleted count for nothing."""
    live = [p for p in pods if not _deleting(p)]
    stale = sorted(
        str(p["metadata"]["name"]) for p in live if is_stale(p, signature) or p["metadata"]["name"] in unusable
    )
    stale_names = set(stale)
    healthy = [p for p in live if p["metadata"]["name"] not in stale_names]
    surplus = max(0, len(healthy) - size)
    by_readiness = sorted(healthy, key=lambda p: (is_claimable(p), p["metadata"]["name"]))
    return PoolPlan(
        ready=sum(1 for p in healthy if is_claimable(p)),
        to_create=max(0, size - len(healthy)),
        to_delete=(*stale, *(str(p["metadata"]["name"]) for p in by_readiness[:surplus])),
        stale=tuple(stale),
    )


def is_pool_claim(pool: str, claim: Mapping[str, Any]) -> bool:
    """A workspace claim that still belongs to the pool. A Sandbox's claim of a warm pod relabels the
    claim (pool label off, sandbox label on) before it touches the pod, so a claim with the pool's
    label and no sandbox label has not been handed to anyone."""
    labels = _metadata(claim).get("labels") or {}
    return labels.get(POOL_LABEL) == pool and SANDBOX_LABEL not in labels


def orphaned_claims(
    pool: str,
    claims: Sequence[Mapping[str, Any]],
    in_use: Collection[str],
    now: datetime,
    grace: timedelta,
    released: Collection[str] = (),
) -> ClaimSweep:
    """The pool's workspace claims that no pod uses (`in_use`: claim names mounted by any pod in the
    namespace), e.g. that of a warm pod deleted behind the operator's back.

    A claim younger than `grace` is kept (its pod may exist but not be in the store yet: the claim is
    created before its pod); `recheck_at` says when to look again. `released` names claims whose pod
    the caller has just deleted itself: no doubt there, no grace.
    """
    to_delete: list[str] = []
    recheck_at: datetime | None = None
    for claim in claims:
        name = str(claim["metadata"]["name"])
        if not is_pool_claim(pool, claim) or _deleting(claim) or name in in_use:
            continue
        created = parse_time(_metadata(claim).get("creationTimestamp"))
        # The API server always sets creationTimestamp; without one, the claim's age is unknown and
        # it is treated as old (keeping it would leak it forever).
        if name not in released and created is not None and created + grace > now:
            eligible = created + grace
            recheck_at = eligible if recheck_at is None else min(recheck_at, eligible)
            continue
        to_delete.append(name)
    return ClaimSweep(to_delete=tuple(sorted(to_delete)), recheck_at=recheck_at)


def count_claimed(pool: str, pods: Sequence[Mapping[str, Any]]) -> int:
    """Sandboxes running now on a pod claimed from `pool` (status.claimed).

    A claimed pod keeps the claimed-from annotation for its whole life; a resume or recreate builds
    a new pod without it, so a sandbox counts while it runs on the warm pod it took.
    """
    count = 0
    for pod in pods:
        metadata = _metadata(pod)
        if (metadata.get("annotations") or {}).get(CLAIMED_FROM_POOL_ANNOTATION) != pool:
            continue
        if SANDBOX_LABEL not in (metadata.get("labels") or {}) or _deleting(pod):
            continue
        if (pod.get("status") or {}).get("phase") in FINISHED_PHASES:
            continue
        count += 1
    return count


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
        if WORKSPACE_VOLUME_KEY in volume:
            volume[WORKSPACE_VOLUME_KEY] = {"claimName": ""}
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def workspace_claim_of(pod: Mapping[str, Any]) -> str | None:
    """The workspace claim a pod mounts, if any."""
    claims = claims_mounted(pod)
    return claims[0] if claims else None


def claims_mounted(pod: Mapping[str, Any]) -> list[str]:
    return [
        str(volume[WORKSPACE_VOLUME_KEY]["claimName"])
        for volume in (pod.get("spec") or {}).get("volumes") or []
        if WORKSPACE_VOLUME_KEY in volume
    ]


def may_claim_warm_pod(status: Mapping[str, Any], *, has_workspace: bool, creates_pod: bool) -> bool:
    """Only a first start may take a warm pod (it brings its own, fresh workspace): a resume or a
    recreate keeps the sandbox's workspace, and a sandbox that already has one keeps it."""
    entering = status.get("startedAt") is None and status.get("phase") in (None, "Creating")
    return creates_pod and entering and not has_workspace


def offered_claim(pool: str, pod: Mapping[str, Any], claims: Mapping[str, Mapping[str, Any]]) -> bool:
    """The warm pod's workspace claim (if it has one) is known and still the pool's to give."""
    claim_name = workspace_claim_of(pod)
    if not claim_name:
        return True
    claim = claims.get(claim_name)
    return claim is not None and is_pool_claim(pool, claim) and not _deleting(claim)


def is_offerable(
    pool: str, pod: Mapping[str, Any], wanted_signature: str, claims: Mapping[str, Mapping[str, Any]]
) -> bool:
    """A warm pod that may stand in for a sandbox whose pod would have ``wanted_signature``: identical
    spec (pod specs cannot change after creation), Running and Ready, its workspace still the pool's."""
    annotations = _metadata(pod).get("annotations") or {}
    if annotations.get(POD_SIGNATURE_ANNOTATION) != wanted_signature:
        return False
    return is_claimable(pod) and offered_claim(pool, pod, claims)


def unusable_pods(pool: str, pods: Sequence[Mapping[str, Any]], claims: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Warm pods that can serve no one: their workspace claim was taken by a sandbox (a claim
    interrupted between the claim and the pod) or is being deleted."""
    unusable: set[str] = set()
    for pod in pods:
        claim_name = workspace_claim_of(pod)
        claim = claims.get(claim_name) if claim_name else None
        if claim is not None and (not is_pool_claim(pool, claim) or _deleting(claim)):
            unusable.add(str(pod["metadata"]["name"]))
    return unusable


def pool_readiness(
    size: int, ready: int, missing_template: str | None = None, refused: str | None = None
) -> tuple[PoolReason, str]:
    """The reason and message of the pool's conditions; ``refused`` says why the pool's namespace may
    not use its template (api.policy.namespace_violation)."""
    if missing_template is not None:
        return PoolReason.TEMPLATE_NOT_FOUND, f'SandboxTemplate "{missing_template}" not found'
    if refused is not None:
        return PoolReason.TEMPLATE_NOT_ALLOWED, refused
    if ready > size:
        return PoolReason.DRAINING, f"{ready}/{size} warm pods ready; deleting the surplus"
    reason = PoolReason.FILLED if ready == size else PoolReason.FILLING
    return reason, f"{ready}/{size} warm pods ready"


# What keeps a pool from ever holding its warm pods until someone changes the pool or the template.
_STALLED_REASONS = frozenset({PoolReason.TEMPLATE_NOT_FOUND, PoolReason.TEMPLATE_NOT_ALLOWED})


def pool_conditions(size: int, ready: int, reason: PoolReason) -> dict[ConditionType, bool]:
    """The status of each condition of a pool, as kstatus reads them: Ready when it holds ``size``
    ready warm pods of a usable template; Reconciling while it fills up or drains to ``size``;
    Stalled when its template is missing or refused (never both Reconciling and Stalled)."""
    stalled = reason in _STALLED_REASONS
    return {
        ConditionType.READY: ready >= size and not stalled,
        ConditionType.RECONCILING: ready != size and not stalled,
        ConditionType.STALLED: stalled,
    }


def warm_pod_selector(pool: str) -> str:
    """The label selector, in string form, of the pool's warm pods (status.selector, read through the
    scale subresource by a HorizontalPodAutoscaler): the operator's pods labelled with the pool. A
    claim takes the pool label off, so a claimed pod leaves the selection."""
    return f"{MANAGED_BY_LABEL}={MANAGED_BY},{POOL_LABEL}={pool}"


def pool_status_patch(
    current: Mapping[str, Any],
    *,
    pool: str,
    generation: int | None,
    size: int,
    ready: int,
    claimed: int,
    reason: PoolReason,
    message: str,
    now: datetime,
) -> dict[str, Any]:
    """The smallest status merge patch for the pool named ``pool`` ({} when nothing changed): the
    counts, the warm pods' selector (``warm_pod_selector``), observedGeneration and the conditions
    of ``pool_conditions`` (a False one's reason is the pool's reason too). lastTransitionTime moves
    only when a condition's status does; conditions of other types are kept."""
    patch: dict[str, Any] = {}
    fields = (
        ("ready", ready),
        ("claimed", claimed),
        ("selector", warm_pod_selector(pool)),
        ("observedGeneration", generation),
    )
    for field, value in fields:
        if current.get(field) != value:
            patch[field] = value
    previous = [c for c in current.get("conditions") or [] if isinstance(c, Mapping)]
    by_type = {c.get("type"): c for c in previous}
    conditions: list[dict[str, Any]] = []
    for kind, true in pool_conditions(size, ready, reason).items():
        status = "True" if true else "False"
        old = by_type.pop(kind.value, None)
        transition = old.get("lastTransitionTime") if old and old.get("status") == status else None
        conditions.append(
            {
                "type": kind.value,
                "status": status,
                "reason": reason.value,
                "message": message,
                "lastTransitionTime": transition or format_time(now),
                "observedGeneration": generation,
            }
        )
    conditions.extend(dict(c) for c in by_type.values())
    keys = ("type", "status", "reason", "message", "observedGeneration")
    unchanged = len(previous) == len(conditions) and all(
        all(old.get(key) == new.get(key) for key in keys) for old, new in zip(previous, conditions, strict=True)
    )
    if not unchanged:
        patch["conditions"] = conditions
    return patch
