"""SandboxPool: keep warm, unassigned pods; hand one to a new Sandbox instead of a cold start.

A warm pod is built exactly like a sandbox pod of the pool's template (template defaults only), with
its own workspace claim, both labelled `sandbox.dev/pool=<pool>` and owned by the pool. A claim
relabels the workspace claim and then the pod for the sandbox and moves their ownerReference to it,
with the claim's resourceVersion (the pod's, when there is no claim) as a precondition, so two
sandboxes can never take the same pod. The pool refills, replaces warm pods that finished or no
longer match the template, and deletes workspace claims of its own that no pod uses.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sandbox_operator.api import API_VERSION, Sandbox, SandboxPool, SandboxTemplate
from sandbox_operator.api.names import (
    CLAIMED_FROM_POOL_ANNOTATION,
    PERSISTENT_VOLUME_CLAIMS,
    POD_SIGNATURE_ANNOTATION,
    PODS,
    POOL_LABEL,
    SANDBOX_ID_LABEL,
    SANDBOX_LABEL,
    SANDBOX_POOLS,
)
from sandbox_operator.kube import JSON, ApiError
from sandbox_operator.lifecycle.pool import (
    count_claimed,
    is_claimable,
    is_pool_claim,
    orphaned_claims,
    plan_pool,
    pod_signature,
)
from sandbox_operator.lifecycle.status import format_time
from sandbox_operator.resources import (
    build_pod,
    build_pvc,
    owner_reference,
    sandbox_id,
)

if TYPE_CHECKING:
    from sandbox_operator.controller.runtime import Runtime
    from sandbox_operator.controller.store import Key

log = logging.getLogger(__name__)

__all__ = [
    "ClaimInterruptedError",
    "build_warm_pod",
    "reconcile_pool",
    "try_claim_pool_pod",
    "warm_pod_signature",
    "workspace_claim_of",
]

WORKSPACE_VOLUME_KEY = "persistentVolumeClaim"
# A pool claim no pod uses is kept this long after its creation: it is created before its pod, and
# that pod may exist without being in the store yet (a lost create response, another operator
# process during a rollout). Generous against watch lag, short against a leak.
ORPHAN_CLAIM_GRACE = timedelta(seconds=10)
# A delete refused because the object changed since the store saw it: look again after this long.
CONFLICT_RETRY_SECONDS = 1.0


class ClaimInterruptedError(Exception):
    """The workspace claim was handed to the sandbox, the pod was not. The reconcile fails and its
    retry finds the workspace by its sandbox label and starts a cold pod on it."""


def _pool_owner(pool: SandboxPool) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "SandboxPool",
        "name": pool.metadata.name,
        "uid": pool.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def build_warm_pod(pool: SandboxPool, template: SandboxTemplate, suffix: str) -> tuple[JSON, JSON | None]:
    """A warm pod (and its workspace claim) for the pool: a sandbox pod of template defaults."""
    name = f"{pool.metadata.name}-{suffix}"
    stand_in = Sandbox.from_body(
        {
            "apiVersion": API_VERSION,
            "kind": "Sandbox",
            "metadata": {
                "name": name,
                "namespace": pool.metadata.namespace,
                "uid": f"pool-{pool.metadata.uid}-{suffix}",
            },
            "spec": {"template": pool.spec.template},
        }
    )
    pod = build_pod(stand_in, template)
    claim = build_pvc(stand_in, template)
    for child in (pod, claim):
        if child is None:
            continue
        labels = child["metadata"]["labels"]
        labels.pop(SANDBOX_LABEL, None)
        labels.pop(SANDBOX_ID_LABEL, None)
        labels[POOL_LABEL] = str(pool.metadata.name)
        child["metadata"]["ownerReferences"] = [_pool_owner(pool)]
    # The pod's env names the stand-in; the real identity arrives with the claim (labels, status).
    pod["metadata"]["annotations"] = {POD_SIGNATURE_ANNOTATION: pod_signature(pod)}
    return pod, claim


def warm_pod_signature(pool: SandboxPool, template: SandboxTemplate) -> str:
    """The signature every current warm pod of the pool carries (names do not enter it)."""
    pod, _ = build_warm_pod(pool, template, "signature")
    return str(pod["metadata"]["annotations"][POD_SIGNATURE_ANNOTATION])


def workspace_claim_of(pod: JSON) -> str | None:
    for volume in pod.get("spec", {}).get("volumes") or []:
        if WORKSPACE_VOLUME_KEY in volume:
            return str(volume[WORKSPACE_VOLUME_KEY]["claimName"])
    return None


def _claims_mounted(pod: JSON) -> list[str]:
    return [
        str(v[WORKSPACE_VOLUME_KEY]["claimName"])
        for v in pod.get("spec", {}).get("volumes") or []
        if WORKSPACE_VOLUME_KEY in v
    ]


async def _delete_unchanged(rt: Runtime, path: str, obj: JSON) -> bool:
    """DELETE only the version the store holds (uid and resourceVersion preconditions): a pod or
    claim that a sandbox has claimed since then has another resourceVersion and is left alone.
    True when it is deleted or already gone, False when it changed."""
    metadata = obj["metadata"]
    preconditions = {k: metadata[k] for k in ("uid", "resourceVersion") if metadata.get(k)}
    options: JSON = {
        "kind": "DeleteOptions",
        "apiVersion": "v1",
        "propagationPolicy": "Background",
        "preconditions": preconditions,
    }
    try:
        await rt.client.request("DELETE", path, options)
    except ApiError as exc:
        if exc.status == 404:
            return True
        if exc.status == 409:
            return False
        raise
    return True


async def reconcile_pool(rt: Runtime, key: Key) -> None:
    body = rt.store.pools.get(key)
    if body is None:
        return
    namespace, pool_name = key
    pool = SandboxPool.from_body(body)
    template_body = rt.store.templates.get(pool.spec.template)
    template = SandboxTemplate.from_body(template_body) if template_body is not None else None
    signature = warm_pod_signature(pool, template) if template is not None else None

    pods = [p for p in rt.store.pods_of_pool(key) if (namespace, p["metadata"]["name"]) not in rt.claims_in_flight]
    # A warm pod whose workspace claim a sandbox already took (a claim interrupted between the claim
    # and the pod) or that is being deleted can serve no one: replace it. The sweep below never
    # deletes a claim a sandbox took (it is the sandbox's now).
    unusable: set[str] = set()
    for pod in pods:
        claim_name = workspace_claim_of(pod)
        claim = rt.store.pvcs.get((namespace, claim_name)) if claim_name else None
        if claim is not None and (not is_pool_claim(pool_name, claim) or claim["metadata"].get("deletionTimestamp")):
            unusable.add(str(pod["metadata"]["name"]))
    plan = plan_pool(pool.spec.size, pods, signature, unusable)

    if template is not None:
        for _ in range(plan.to_create):
            pod, claim = build_warm_pod(pool, template, secrets.token_hex(3))
            if claim is not None:
                await rt.client.create(PERSISTENT_VOLUME_CLAIMS.collection(namespace), claim)
            created = await rt.client.create(PODS.collection(namespace), pod)
            if created is not None:
                rt.store.put_pod(created)

    retry = False
    released: list[str] = []
    for pod_name in plan.to_delete:
        deleted = await _delete_warm_pod(rt, key, pod_name, pod_name in plan.stale)
        if deleted is None:
            retry = True
        elif deleted:
            released.append(deleted)

    now = datetime.now(UTC)
    # Any pod may mount a pool claim (a warm pod, or one claimed from the pool in the middle of its
    # claim), so all of the namespace's pods count; one pass, O(pods in the store).
    namespace_pods = [p for (ns, _), p in list(rt.store.pods.items()) if ns == namespace]
    pool_claims = [
        c
        for (ns, _), c in list(rt.store.pvcs.items())
        if ns == namespace and (c["metadata"].get("labels") or {}).get(POOL_LABEL) == pool_name
    ]
    in_use = {claim for p in namespace_pods for claim in _claims_mounted(p)} if pool_claims else set()
    sweep = orphaned_claims(pool_name, pool_claims, in_use, now, ORPHAN_CLAIM_GRACE, released)
    for claim_name in sweep.to_delete:
        retry = not await _delete_pool_claim(rt, namespace, claim_name) or retry
    if sweep.recheck_at is not None:
        rt.queue.add_after(("pool", namespace, pool_name), max(0.0, (sweep.recheck_at - now).total_seconds()))
    if retry:
        rt.queue.add_after(("pool", namespace, pool_name), CONFLICT_RETRY_SECONDS)

    claimed = count_claimed(pool_name, namespace_pods)
    if template is None:
        await _write_pool_status(
            rt, key, body, plan.ready, claimed, "TemplateNotFound", f'SandboxTemplate "{pool.spec.template}" not found'
        )
        return
    message = f"{plan.ready}/{pool.spec.size} warm pods ready"
    await _write_pool_status(
        rt, key, body, plan.ready, claimed, "Filled" if plan.ready >= pool.spec.size else "Filling", message
    )


async def _delete_warm_pod(rt: Runtime, key: Key, pod_name: str, stale: bool) -> str | None:
    """Delete a warm pod the plan gave up. Returns the workspace claim it releases ("" for none), or
    None when the pod is being claimed or changed since the store saw it: the pool looks again."""
    namespace, pool_name = key
    pod_key = (namespace, pod_name)
    pod = rt.store.pods.get(pod_key)
    # The creates above yield: since the plan, a sandbox may have claimed this pod or be claiming it.
    if pod_key in rt.claims_in_flight:
        return None
    if pod is None or (pod["metadata"].get("labels") or {}).get(POOL_LABEL) != pool_name:
        return ""  # gone, or no longer the pool's
    if stale:
        phase = (pod.get("status") or {}).get("phase")
        log.info(
            "replacing warm pod %s/%s of pool %s (%s)",
            namespace,
            pod_name,
            pool_name,
            phase if phase in ("Failed", "Succeeded") else "outdated or workspace taken",
        )
    if not await _delete_unchanged(rt, PODS.path(namespace, pod_name), pod):
        return None
    rt.store.delete_pod(pod_key)
    return workspace_claim_of(pod) or ""


async def _delete_pool_claim(rt: Runtime, namespace: str, claim_name: str) -> bool:
    """Delete a workspace claim of the pool that no pod uses; False when it changed meanwhile."""
    claim = rt.store.pvcs.get((namespace, claim_name))
    if claim is None:
        return True
    if not await _delete_unchanged(rt, PERSISTENT_VOLUME_CLAIMS.path(namespace, claim_name), claim):
        return False
    log.info("deleted unused workspace claim %s/%s of a warm pool", namespace, claim_name)
    rt.store.delete_pvc((namespace, claim_name))  # the watch brings it back while it terminates
    return True


async def _write_pool_status(
    rt: Runtime, key: Key, body: JSON, ready: int, claimed: int, reason: str, message: str
) -> None:
    current = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    size = int((body.get("spec") or {}).get("size") or 0)
    is_ready = "True" if ready >= size and reason != "TemplateNotFound" else "False"
    old = next((c for c in current.get("conditions") or [] if c.get("type") == "Ready"), None)
    patch: JSON = {}
    if current.get("ready") != ready:
        patch["ready"] = ready
    if current.get("claimed") != claimed:
        patch["claimed"] = claimed
    if current.get("observedGeneration") != generation:
        patch["observedGeneration"] = generation
    if old is None or (old.get("status"), old.get("reason"), old.get("message")) != (is_ready, reason, message):
        transition = old.get("lastTransitionTime") if old and old.get("status") == is_ready else None
        patch["conditions"] = [
            {
                "type": "Ready",
                "status": is_ready,
                "reason": reason,
                "message": message,
                "lastTransitionTime": transition or format_time(datetime.now(UTC)),
                "observedGeneration": generation,
            }
        ]
    if not patch:
        return
    updated = await rt.client.patch(SANDBOX_POOLS.path(*key, "status"), {"status": patch})
    if updated is not None:
        rt.store.put_pool(updated)


def _offered_claim(rt: Runtime, namespace: str, pool_name: str, pod: JSON) -> bool:
    """The warm pod's workspace claim (if it has one) is known and still the pool's to give."""
    claim_name = workspace_claim_of(pod)
    if not claim_name:
        return True
    claim = rt.store.pvcs.get((namespace, claim_name))
    return claim is not None and is_pool_claim(pool_name, claim) and not claim["metadata"].get("deletionTimestamp")


async def try_claim_pool_pod(rt: Runtime, sandbox: Sandbox, template: SandboxTemplate) -> JSON | None:
    """Take a ready warm pod of a matching pool for `sandbox`, or None (then: cold start)."""
    namespace = str(sandbox.metadata.namespace)
    pools = [
        pool_name
        for (pool_ns, pool_name), body in rt.store.pools.items()
        if pool_ns == namespace and (body.get("spec") or {}).get("template") == sandbox.spec.template
    ]
    if not pools:
        return None
    # Only a pod identical to the one this sandbox would get may stand in for it (same image,
    # resources, env, execution timeout, ports...): pod specs cannot change after creation.
    wanted = pod_signature(build_pod(sandbox, template))
    for pool_name in pools:
        pool_ns = namespace
        for pod in rt.store.pods_of_pool((pool_ns, pool_name)):
            pod_key = (namespace, pod["metadata"]["name"])
            annotations = pod["metadata"].get("annotations") or {}
            if pod_key in rt.claims_in_flight or annotations.get(POD_SIGNATURE_ANNOTATION) != wanted:
                continue
            if not is_claimable(pod) or not _offered_claim(rt, namespace, pool_name, pod):
                continue
            rt.claims_in_flight.add(pod_key)
            try:
                claimed = await _claim(rt, sandbox, pod, pool_name)
            finally:
                rt.claims_in_flight.discard(pod_key)
            if claimed is not None:
                rt.queue.add(("pool", pool_ns, pool_name))
                return claimed
    return None


def _claim_metadata(sandbox: Sandbox, pool_name: str, resource_version: str | None) -> JSON:
    metadata: JSON = {
        "labels": {POOL_LABEL: None, SANDBOX_LABEL: sandbox.metadata.name, SANDBOX_ID_LABEL: sandbox_id(sandbox)},
        "annotations": {CLAIMED_FROM_POOL_ANNOTATION: pool_name},
        "ownerReferences": [owner_reference(sandbox)],
    }
    if resource_version:
        metadata["resourceVersion"] = resource_version  # optimistic lock: 409 if someone else claimed it
    return metadata


async def _claim(rt: Runtime, sandbox: Sandbox, pod: JSON, pool_name: str) -> JSON | None:
    """Hand a warm pod and its workspace claim to `sandbox`; None when another sandbox was first.

    The workspace claim goes first, locked by its resourceVersion (claims rarely change; pods do, with
    every status update): whoever relabels it owns the pair. Then the pod follows without a lock.
    If the pod step fails, the sandbox already finds its workspace by label, so the retry mounts it
    on a cold pod and creates no second claim; and the pool never deletes it (no longer its label).
    The other order could leave a sandbox's pod on a claim still labelled for the pool: the retry
    would create a second, unused workspace, and the pool would delete the real one once the pod
    went (e.g. on suspend).
    """
    namespace = str(sandbox.metadata.namespace)
    pod_name = pod["metadata"]["name"]
    claim_name = workspace_claim_of(pod)
    lock: str | None = pod["metadata"].get("resourceVersion")
    if claim_name:
        claim = rt.store.pvcs.get((namespace, claim_name))
        if claim is None or not is_pool_claim(pool_name, claim):
            return None
        try:
            moved = await rt.client.patch(
                PERSISTENT_VOLUME_CLAIMS.path(namespace, claim_name),
                {"metadata": _claim_metadata(sandbox, pool_name, claim["metadata"].get("resourceVersion"))},
            )
        except ApiError as exc:
            if exc.status == 409:
                return None  # lost the race (or the claim changed); try the next pod
            raise
        if moved is None:
            return None  # the claim is gone (the pool is replacing this pod); try the next pod
        rt.store.put_pvc(moved)
        lock = None  # the pair is ours now; the pod's resourceVersion may have moved with its status
    try:
        updated = await rt.client.patch(
            PODS.path(namespace, pod_name),
            {"metadata": _claim_metadata(sandbox, pool_name, lock)},
        )
    except ApiError as exc:
        if exc.status == 409 and lock:
            return None  # lost the race; try the next pod
        raise
    if updated is None:
        if claim_name:
            raise ClaimInterruptedError(
                f"warm pod {namespace}/{pod_name} went away after its workspace {claim_name} was claimed"
            )
        return None
    log.info("sandbox %s/%s claimed warm pod %s from pool %s", namespace, sandbox.metadata.name, pod_name, pool_name)
    return rt.store.put_pod(updated)
