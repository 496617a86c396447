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

from sandbox_operator.api import (
    API_VERSION,
    EgressClass,
    Sandbox,
    SandboxPool,
    SandboxSpec,
    SandboxTemplate,
    egress_class,
)
from sandbox_operator.api.names import (
    CLAIMED_FROM_POOL_ANNOTATION,
    EGRESS_CLASS_LABEL,
    PERSISTENT_VOLUME_CLAIMS,
    POD_SIGNATURE_ANNOTATION,
    PODS,
    POOL_LABEL,
    SANDBOX_ID_LABEL,
    SANDBOX_LABEL,
    SANDBOX_POOLS,
)
from sandbox_operator.api.policy import namespace_violation
from sandbox_operator.controller.network import ensure_shared_policy
from sandbox_operator.kube import JSON, ApiError
from sandbox_operator.lifecycle.pool import (
    PoolPlan,
    claims_mounted,
    count_claimed,
    is_offerable,
    is_pool_claim,
    orphaned_claims,
    plan_pool,
    pod_signature,
    pool_readiness,
    pool_status_patch,
    unusable_pods,
    workspace_claim_of,
)
from sandbox_operator.resources import (
    build_pod,
    build_pvc,
    build_shared_network_policy,
    owner_reference,
    sandbox_id,
)
from sandbox_operator.resources.tokens import AgentToken, issue_agent_token

if TYPE_CHECKING:
    from sandbox_operator.controller.context import ReconcileContext
    from sandbox_operator.controller.store import Key

log = logging.getLogger(__name__)

__all__ = [
    "ClaimInterruptedError",
    "build_warm_pod",
    "reconcile_pool",
    "try_claim_pool_pod",
    "warm_pod_signature",
]

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


def build_warm_pod(
    pool: SandboxPool, template: SandboxTemplate, suffix: str, token: AgentToken | None = None
) -> tuple[JSON, JSON | None]:
    """A warm pod (and its workspace claim) for the pool: a sandbox pod of template defaults. Its
    agent token stays with it when a sandbox claims it (the token id is on the pod)."""
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
    pod = build_pod(stand_in, template, token)
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
    pod["metadata"].setdefault("annotations", {})[POD_SIGNATURE_ANNOTATION] = pod_signature(pod)
    return pod, claim


def warm_pod_signature(pool: SandboxPool, template: SandboxTemplate) -> str:
    """The signature every current warm pod of the pool carries (names do not enter it)."""
    pod, _ = build_warm_pod(pool, template, "signature")
    return str(pod["metadata"]["annotations"][POD_SIGNATURE_ANNOTATION])


async def _delete_unchanged(rt: ReconcileContext, path: str, obj: JSON) -> bool:
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


async def reconcile_pool(rt: ReconcileContext, key: Key) -> None:
    body = rt.store.pools.get(key)
    if body is None:
        return
    pool = SandboxPool.from_body(body)
    template_body = rt.store.templates.get(pool.spec.template)
    template = SandboxTemplate.from_body(template_body) if template_body is not None else None
    # A pool in a namespace the template excludes keeps no warm pods: no sandbox there may claim one.
    refused = namespace_violation(key[0], pool.spec.template, template.spec) if template is not None else None
    usable = template if refused is None else None

    plan = _plan(rt, key, pool, usable, pool.spec.size if refused is None else 0)
    if usable is not None:
        await _create_warm_pods(rt, key[0], pool, usable, plan.to_create)
    released, conflicted = await _delete_warm_pods(rt, key, plan)
    now = datetime.now(UTC)
    swept_cleanly = await _sweep_claims(rt, key, released, now)
    if conflicted or not swept_cleanly:
        rt.requeue(("pool", *key), CONFLICT_RETRY_SECONDS)

    claimed = count_claimed(key[1], rt.store.pods_in(key[0]))
    reason, message = pool_readiness(pool.spec.size, plan.ready, None if template else pool.spec.template, refused)
    patch = pool_status_patch(
        body.get("status") or {},
        pool=str(pool.metadata.name),
        generation=pool.metadata.generation,
        size=pool.spec.size,
        ready=plan.ready,
        claimed=claimed,
        reason=reason,
        message=message,
        now=now,
    )
    if patch:
        updated = await rt.client.patch(SANDBOX_POOLS.path(*key, "status"), {"status": patch})
        if updated is not None:
            rt.store.put_pool(updated)


def _plan(rt: ReconcileContext, key: Key, pool: SandboxPool, template: SandboxTemplate | None, size: int) -> PoolPlan:
    """The pool's plan over its warm pods (those being claimed right now are not the pool's any more)."""
    namespace = key[0]
    pods = [p for p in rt.store.pods_of_pool(key) if not rt.in_flight.is_claiming((namespace, p["metadata"]["name"]))]
    signature = warm_pod_signature(pool, template) if template is not None else None
    # A warm pod whose workspace claim a sandbox already took, or that is being deleted, can serve
    # no one: replace it. The sweep never deletes a claim a sandbox took (it is the sandbox's now).
    unusable = unusable_pods(key[1], pods, rt.store.pvcs_in(namespace))
    return plan_pool(size, pods, signature, unusable)


async def _create_warm_pods(
    rt: ReconcileContext, namespace: str, pool: SandboxPool, template: SandboxTemplate, count: int
) -> None:
    if count:
        # Warm pods start under their template's shared policy, written before the first of them.
        egress = egress_class(SandboxSpec(template=pool.spec.template), template.spec)
        policy = build_shared_network_policy(namespace, template, egress, rt.config.policy_settings)
        await ensure_shared_policy(rt, policy)
    for _ in range(count):
        token = issue_agent_token(rt.config.agent_token_key) if rt.config.agent_token_key else None
        pod, claim = build_warm_pod(pool, template, secrets.token_hex(3), token)
        if claim is not None:
            await rt.client.create(PERSISTENT_VOLUME_CLAIMS.collection(namespace), claim)
        created = await rt.client.create(PODS.collection(namespace), pod)
        if created is not None:
            rt.store.put_pod(created)


async def _delete_warm_pods(rt: ReconcileContext, key: Key, plan: PoolPlan) -> tuple[list[str], bool]:
    """Delete the pods the plan gave up: the workspace claims they released, and whether any could
    not be deleted because it changed (or is being claimed) meanwhile."""
    released: list[str] = []
    conflicted = False
    for pod_name in plan.to_delete:
        deleted = await _delete_warm_pod(rt, key, pod_name, pod_name in plan.stale)
        if deleted is None:
            conflicted = True
        elif deleted:
            released.append(deleted)
    return released, conflicted


async def _sweep_claims(rt: ReconcileContext, key: Key, released: list[str], now: datetime) -> bool:
    """Delete the pool's workspace claims no pod uses; False when one changed meanwhile."""
    namespace, pool_name = key
    # Any pod may mount a pool claim (a warm pod, or one claimed from the pool in the middle of its
    # claim), so all of the namespace's pods count; one pass, O(pods in the store).
    pool_claims = [
        claim
        for claim in rt.store.pvcs_in(namespace).values()
        if (claim["metadata"].get("labels") or {}).get(POOL_LABEL) == pool_name
    ]
    if not pool_claims:
        return True
    in_use = {claim for pod in rt.store.pods_in(namespace) for claim in claims_mounted(pod)}
    sweep = orphaned_claims(pool_name, pool_claims, in_use, now, ORPHAN_CLAIM_GRACE, released)
    clean = True
    for claim_name in sweep.to_delete:
        clean = await _delete_pool_claim(rt, namespace, claim_name) and clean
    if sweep.recheck_at is not None:
        rt.requeue(("pool", *key), max(0.0, (sweep.recheck_at - now).total_seconds()))
    return clean


async def _delete_warm_pod(rt: ReconcileContext, key: Key, pod_name: str, stale: bool) -> str | None:
    """Delete a warm pod the plan gave up. Returns the workspace claim it releases ("" for none), or
    None when the pod is being claimed or changed since the store saw it: the pool looks again."""
    namespace, pool_name = key
    pod_key = (namespace, pod_name)
    pod = rt.store.pods.get(pod_key)
    # The creates above yield: since the plan, a sandbox may have claimed this pod or be claiming it.
    if rt.in_flight.is_claiming(pod_key):
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


async def _delete_pool_claim(rt: ReconcileContext, namespace: str, claim_name: str) -> bool:
    """Delete a workspace claim of the pool that no pod uses; False when it changed meanwhile."""
    claim = rt.store.pvcs.get((namespace, claim_name))
    if claim is None:
        return True
    if not await _delete_unchanged(rt, PERSISTENT_VOLUME_CLAIMS.path(namespace, claim_name), claim):
        return False
    log.info("deleted unused workspace claim %s/%s of a warm pool", namespace, claim_name)
    rt.store.delete_pvc((namespace, claim_name))  # the watch brings it back while it terminates
    return True


def pools_of_template(rt: ReconcileContext, namespace: str, template: str) -> list[str]:
    """The namespace's SandboxPools of `template`: where a new sandbox of it may find a warm pod."""
    return [
        pool_name
        for (pool_ns, pool_name), body in rt.store.pools.items()
        if pool_ns == namespace and (body.get("spec") or {}).get("template") == template
    ]


async def try_claim_pool_pod(rt: ReconcileContext, sandbox: Sandbox, template: SandboxTemplate) -> JSON | None:
    """Take a ready warm pod of a matching pool for `sandbox`, or None (then: cold start)."""
    namespace = str(sandbox.metadata.namespace)
    pools = pools_of_template(rt, namespace, sandbox.spec.template)
    if not pools:
        return None
    # Only a pod identical to the one this sandbox would get may stand in for it (same image,
    # resources, env, execution timeout, ports...): pod specs cannot change after creation.
    wanted = pod_signature(build_pod(sandbox, template))
    egress = egress_class(sandbox.spec, template.spec)
    claims = rt.store.pvcs_in(namespace)
    for pool_name in pools:
        for pod in rt.store.pods_of_pool((namespace, pool_name)):
            pod_key = (namespace, pod["metadata"]["name"])
            if rt.in_flight.is_claiming(pod_key) or not is_offerable(pool_name, pod, wanted, claims):
                continue
            with rt.in_flight.claiming(pod_key):
                claimed = await _claim(rt, sandbox, pod, pool_name, egress)
            if claimed is not None:
                rt.requeue(("pool", namespace, pool_name))
                return claimed
    return None


def _claim_metadata(sandbox: Sandbox, pool_name: str, resource_version: str | None, egress: EgressClass | None) -> JSON:
    """The claim's relabel: the sandbox's identity, and (on the pod) the class of its policy."""
    labels: JSON = {POOL_LABEL: None, SANDBOX_LABEL: sandbox.metadata.name, SANDBOX_ID_LABEL: sandbox_id(sandbox)}
    if egress is not None:
        labels[EGRESS_CLASS_LABEL] = egress.value
    metadata: JSON = {
        "labels": labels,
        "annotations": {CLAIMED_FROM_POOL_ANNOTATION: pool_name},
        "ownerReferences": [owner_reference(sandbox)],
    }
    if resource_version:
        metadata["resourceVersion"] = resource_version  # optimistic lock: 409 if someone else claimed it
    return metadata


async def _claim(rt: ReconcileContext, sandbox: Sandbox, pod: JSON, pool_name: str, egress: EgressClass) -> JSON | None:
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
                {"metadata": _claim_metadata(sandbox, pool_name, claim["metadata"].get("resourceVersion"), None)},
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
            {"metadata": _claim_metadata(sandbox, pool_name, lock, egress)},
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
