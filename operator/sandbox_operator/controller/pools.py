"""SandboxPool: keep warm, unassigned pods; hand one to a new Sandbox instead of a cold start.

A warm pod is built exactly like a sandbox pod of the pool's template (template defaults only), with
its own workspace claim, both labelled `sandbox.dev/pool=<pool>` and owned by the pool. A claim
relabels the pod and its claim for the sandbox and moves their ownerReference to it, with the pod's
resourceVersion as a precondition, so two sandboxes can never take the same pod. The pool refills.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sandbox_operator.api import GROUP, VERSION, Sandbox, SandboxPool, SandboxTemplate
from sandbox_operator.controller.kube import JSON, ApiError
from sandbox_operator.controller.store import POOL_LABEL
from sandbox_operator.lifecycle.pool import is_claimable, plan_pool, pod_signature
from sandbox_operator.lifecycle.status import format_time
from sandbox_operator.resources import (
    SANDBOX_ID_LABEL,
    SANDBOX_LABEL,
    build_pod,
    build_pvc,
    owner_reference,
    sandbox_id,
)

if TYPE_CHECKING:
    from sandbox_operator.controller.runtime import Runtime
    from sandbox_operator.controller.store import Key

log = logging.getLogger(__name__)

CLAIMED_FROM_ANNOTATION = "sandbox.dev/claimed-from-pool"
SIGNATURE_ANNOTATION = "sandbox.dev/pod-signature"
WORKSPACE_VOLUME_KEY = "persistentVolumeClaim"


def _pool_owner(pool: SandboxPool) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SandboxPool",
        "name": pool.metadata.name,
        "uid": pool.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def build_warm_pod(pool: SandboxPool, template: SandboxTemplate, suffix: str) -> tuple[JSON, JSON | None]:
    """A warm pod (and its workspace claim) for the pool: a sandbox pod of template defaults."""
    name = f"{pool.metadata.name}-{suffix}"
    stand_in = Sandbox.from_body({
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Sandbox",
        "metadata": {
            "name": name,
            "namespace": pool.metadata.namespace,
            "uid": f"pool-{pool.metadata.uid}-{suffix}",
        },
        "spec": {"template": pool.spec.template},
    })
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
    pod["metadata"]["annotations"] = {SIGNATURE_ANNOTATION: pod_signature(pod)}
    return pod, claim


def workspace_claim_of(pod: JSON) -> str | None:
    for volume in pod.get("spec", {}).get("volumes") or []:
        if WORKSPACE_VOLUME_KEY in volume:
            return str(volume[WORKSPACE_VOLUME_KEY]["claimName"])
    return None


async def reconcile_pool(rt: Runtime, key: Key) -> None:
    body = rt.store.pools.get(key)
    if body is None:
        return
    namespace = key[0]
    pool = SandboxPool.from_body(body)
    template_body = rt.store.templates.get(pool.spec.template)
    pods = [p for p in rt.store.pods_of_pool(key) if (namespace, p["metadata"]["name"]) not in rt.claims_in_flight]
    plan = plan_pool(pool.spec.size, pods)
    if template_body is None:
        await _write_pool_status(rt, key, body, plan.ready, "TemplateNotFound",
                                 f'SandboxTemplate "{pool.spec.template}" not found')
        return
    template = SandboxTemplate.from_body(template_body)
    for _ in range(plan.to_create):
        pod, claim = build_warm_pod(pool, template, secrets.token_hex(3))
        if claim is not None:
            await rt.client.create(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", claim)
        created = await rt.client.create(f"/api/v1/namespaces/{namespace}/pods", pod)
        if created is not None:
            rt.store.put_pod(created)
    for pod_name in plan.to_delete:
        surplus = rt.store.pods.get((namespace, pod_name))
        if surplus is None:
            continue
        await rt.client.delete(f"/api/v1/namespaces/{namespace}/pods/{pod_name}", uid=surplus["metadata"].get("uid"))
        surplus_claim = workspace_claim_of(surplus)
        if surplus_claim:
            await rt.client.delete(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{surplus_claim}")
        rt.store.delete_pod((namespace, pod_name))
    message = f"{plan.ready}/{pool.spec.size} warm pods ready"
    await _write_pool_status(rt, key, body, plan.ready, "Filled" if plan.ready >= pool.spec.size else "Filling",
                             message)


async def _write_pool_status(rt: Runtime, key: Key, body: JSON, ready: int, reason: str, message: str) -> None:
    current = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    size = int((body.get("spec") or {}).get("size") or 0)
    is_ready = "True" if ready >= size and reason != "TemplateNotFound" else "False"
    old = next((c for c in current.get("conditions") or [] if c.get("type") == "Ready"), None)
    patch: JSON = {}
    if current.get("ready") != ready:
        patch["ready"] = ready
    if current.get("observedGeneration") != generation:
        patch["observedGeneration"] = generation
    if old is None or (old.get("status"), old.get("reason"), old.get("message")) != (is_ready, reason, message):
        transition = old.get("lastTransitionTime") if old and old.get("status") == is_ready else None
        patch["conditions"] = [{
            "type": "Ready", "status": is_ready, "reason": reason, "message": message,
            "lastTransitionTime": transition or format_time(datetime.now(UTC)),
            "observedGeneration": generation,
        }]
    if not patch:
        return
    updated = await rt.client.patch(
        f"/apis/{GROUP}/{VERSION}/namespaces/{key[0]}/sandboxpools/{key[1]}/status", {"status": patch}
    )
    if updated is not None:
        rt.store.put_pool(updated)


async def try_claim_pool_pod(rt: Runtime, sandbox: Sandbox, template: SandboxTemplate) -> JSON | None:
    """Take a ready warm pod of a matching pool for `sandbox`, or None (then: cold start)."""
    namespace = str(sandbox.metadata.namespace)
    pools = [
        pool_name for (pool_ns, pool_name), body in rt.store.pools.items()
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
            if pod_key in rt.claims_in_flight or annotations.get(SIGNATURE_ANNOTATION) != wanted:
                continue
            if not is_claimable(pod):
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
        "annotations": {CLAIMED_FROM_ANNOTATION: pool_name},
        "ownerReferences": [owner_reference(sandbox)],
    }
    if resource_version:
        metadata["resourceVersion"] = resource_version  # optimistic lock: 409 if someone else claimed it
    return metadata


async def _claim(rt: Runtime, sandbox: Sandbox, pod: JSON, pool_name: str) -> JSON | None:
    namespace = str(sandbox.metadata.namespace)
    pod_name = pod["metadata"]["name"]
    try:
        updated = await rt.client.patch(
            f"/api/v1/namespaces/{namespace}/pods/{pod_name}",
            {"metadata": _claim_metadata(sandbox, pool_name, pod["metadata"].get("resourceVersion"))},
        )
    except ApiError as exc:
        if exc.status == 409:
            return None  # lost the race; try the next pod
        raise
    if updated is None:
        return None
    claim = workspace_claim_of(updated)
    if claim:
        moved = await rt.client.patch(
            f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}",
            {"metadata": _claim_metadata(sandbox, pool_name, None)},
        )
        if moved is not None:
            rt.store.put_pvc(moved)
    log.info("sandbox %s/%s claimed warm pod %s from pool %s", namespace, sandbox.metadata.name, pod_name, pool_name)
    return rt.store.put_pod(updated)
