"""Reconcile one Sandbox: read the store, ask the pure core, carry out its decision.

All judgement is in lifecycle.decide (phases, deadlines, failures) and resources (what children
look like). This module only translates: store → Desired/Observed, Decision → API calls, and the
result → status, Events, metrics and the next wake-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sandbox_operator.api import API_VERSION, Phase, Sandbox, SandboxTemplate
from sandbox_operator.api.names import (
    CLAIMED_FROM_POOL_ANNOTATION,
    ENVD_PORT,
    EVENTS,
    FINALIZER,
    MANAGED_BY,
    NETWORK_POLICIES,
    PERSISTENT_VOLUME_CLAIMS,
    PODS,
    SANDBOXES,
    SERVICES,
    SPEC_HASH_ANNOTATION,
)
from sandbox_operator.controller.pools import try_claim_pool_pod
from sandbox_operator.kube import JSON
from sandbox_operator.lifecycle.decide import decide
from sandbox_operator.lifecycle.observe import desired_from, observed_from
from sandbox_operator.lifecycle.status import format_time, parse_time, progress_write_due, status_patch
from sandbox_operator.lifecycle.types import (
    CreatePod,
    Decision,
    DeleteNetworkPolicy,
    DeleteObject,
    DeletePod,
    DeletePVC,
    DeleteService,
    Desired,
    EmitEvent,
    EnsureNetworkPolicy,
    EnsurePVC,
    EnsureService,
    EventType,
    Observed,
    Reason,
    RemoveFinalizer,
    RequeueAfter,
    SetSuspended,
)
from sandbox_operator.resources import (
    build_network_policy,
    build_pod,
    build_pvc,
    build_service,
    child_names,
    sandbox_id,
)

if TYPE_CHECKING:
    from sandbox_operator.controller.runtime import Runtime
    from sandbox_operator.controller.store import Key

log = logging.getLogger(__name__)

TIMEOUT_KINDS = {Reason.IDLE_TIMEOUT.value: "idle", Reason.MAX_LIFETIME.value: "max_lifetime"}


def _use_claim(pod: JSON, claim_name: str) -> None:
    for volume in pod["spec"]["volumes"]:
        if "persistentVolumeClaim" in volume:
            volume["persistentVolumeClaim"]["claimName"] = claim_name


def _select_pod(pods: list[JSON], expected_name: str, status_pod: str | None) -> tuple[JSON | None, list[JSON]]:
    """The sandbox's pod, and any extra pods labelled for it (duplicates to remove)."""
    preferred = [p for p in pods if p["metadata"]["name"] in (status_pod, expected_name)]
    chosen = preferred[0] if preferred else (pods[0] if pods else None)
    extras = [p for p in pods if p is not chosen]
    return chosen, extras


async def reconcile_sandbox(rt: Runtime, key: Key) -> None:
    body = rt.store.sandboxes.get(key)
    if body is None:
        return
    namespace, name = key
    sandbox = Sandbox.from_body(body)
    now = datetime.now(UTC)
    status_now: Mapping[str, Any] = body.get("status") or {}

    # Past Creating (e.g. created suspended, never run) counts too: it keeps its template's last
    # version if the template is deleted, like one that ran.
    started = status_now.get("startedAt") is not None or status_now.get("phase") not in (None, "Creating")
    template_body = rt.store.template_for(sandbox.spec.template, started=started)
    if template_body is None:
        await _report_missing_template(rt, key, sandbox, status_now)
        return
    template = SandboxTemplate.from_body(template_body)
    names = child_names(name)

    pods = rt.store.pods_of_sandbox(key)
    pod, extras = _select_pod(pods, names.pod, status_now.get("podName"))
    for extra in extras:  # e.g. a pool claim raced a cold create: keep one pod per sandbox
        log.info("deleting duplicate pod %s/%s of sandbox %s", namespace, extra["metadata"]["name"], name)
        await rt.client.delete(PODS.path(namespace, extra["metadata"]["name"]), uid=extra["metadata"].get("uid"))
        rt.store.delete_pod((namespace, extra["metadata"]["name"]))
    pvc = rt.store.pvc_of_sandbox(key) or rt.store.pvcs.get((namespace, names.pvc))
    uid = str(sandbox.metadata.uid)
    service = build_service(sandbox, template)
    policy = build_network_policy(sandbox, template, gateway_namespace=rt.config.gateway_namespace)
    desired = desired_from(sandbox, template)
    decision = decide(desired, _observe(rt, sandbox, pod, pvc, service, policy), now)

    # The Service and the NetworkPolicy depend on nothing else: written while the pod is.
    children = [
        ("service", SERVICES.collection(namespace), names.service, service)
        if isinstance(action, EnsureService)
        else ("networkpolicy", NETWORK_POLICIES.collection(namespace), names.network_policy, policy)
        for action in decision.actions
        if isinstance(action, EnsureService | EnsureNetworkPolicy)
    ]
    children_written = (
        asyncio.ensure_future(
            asyncio.gather(*(_ensure_child(rt, kind, path, child, uid, built) for kind, path, child, built in children))
        )
        if children
        else None
    )
    try:
        pod, pvc, pool_source, deleted = await _act(rt, key, body, sandbox, template, decision, pod, pvc)
    except BaseException:
        if children_written is not None:
            await asyncio.gather(children_written, return_exceptions=True)
        raise
    if children_written is not None:
        await children_written
    if deleted:
        return

    decisions = [decision]
    if pool_source is not None and decision.phase is Phase.CREATING:
        # A claimed warm pod is Running already: decide once more on what this pass made, so that
        # the sandbox goes Creating -> Running in one status write instead of two passes.
        followup = _decide_again(rt, body, desired, decision, status_now, pod, pvc, service, policy, now)
        if followup is not None:
            decisions.append(followup)
    await _write_status(rt, key, sandbox, decisions, status_now, pod, now, pool_source)
    for made in decisions:
        for action in made.actions:
            if isinstance(action, EmitEvent) and (action.type is EventType.WARNING or rt.config.normal_events):
                rt.spawn(post_event(rt, sandbox, action.type, action.reason, action.message))
    _schedule(rt, key, decisions[-1], now)


async def _act(
    rt: Runtime,
    key: Key,
    body: Mapping[str, Any],
    sandbox: Sandbox,
    template: SandboxTemplate,
    decision: Decision,
    pod: JSON | None,
    pvc: JSON | None,
) -> tuple[JSON | None, JSON | None, str | None, bool]:
    """Carry out the decision's actions on the pod, the workspace and the Sandbox itself (the
    Service and NetworkPolicy are the caller's). Returns the pod and claim as they now stand, the
    pool a warm pod was claimed from, and whether the Sandbox was deleted."""
    namespace, name = key
    names = child_names(name)
    uid = str(sandbox.metadata.uid)
    pool_source = None
    claim_tried = False
    status = body.get("status") or {}
    entering = status.get("startedAt") is None and status.get("phase") in (None, "Creating")
    for action in decision.actions:
        # Only a first start may take a warm pod; a resume or recreate keeps the sandbox's workspace.
        first_start = pvc is None and entering
        wants_pod = decision.has_action(CreatePod) and first_start
        if isinstance(action, EnsurePVC | CreatePod) and wants_pod and not claim_tried:
            # A warm pod from a pool brings its own workspace claim: try that before creating either.
            claim_tried = True
            claimed = await try_claim_pool_pod(rt, sandbox, template)
            if claimed is not None:
                pod, pool_source = claimed, claimed["metadata"]["annotations"][CLAIMED_FROM_POOL_ANNOTATION]
                pvc = rt.store.pvc_of_sandbox(key) or pvc
        if isinstance(action, CreatePod):
            if pool_source is not None:
                continue
            new_pod = build_pod(sandbox, template)
            if pvc is not None and pvc["metadata"]["name"] != names.pvc:
                _use_claim(new_pod, pvc["metadata"]["name"])  # a workspace taken over from a pool pod
            created = await rt.client.create(PODS.collection(namespace), new_pod)
            if created is not None:
                pod = rt.store.put_pod(created)
        elif isinstance(action, EnsurePVC):
            if pvc is not None or pool_source is not None:
                continue
            claim = build_pvc(sandbox, template)  # None: the template's workspace is an emptyDir
            if claim is not None:
                created = await rt.client.create(PERSISTENT_VOLUME_CLAIMS.collection(namespace), claim)
                if created is not None:
                    rt.store.put_pvc(created)
                    pvc = created
        elif isinstance(action, DeletePod):
            if pod is not None:
                await rt.client.delete(PODS.path(namespace, pod["metadata"]["name"]), uid=pod["metadata"].get("uid"))
        elif isinstance(action, DeletePVC):
            await rt.client.delete(PERSISTENT_VOLUME_CLAIMS.path(namespace, names.pvc))
        elif isinstance(action, DeleteService):
            await rt.client.delete(SERVICES.path(namespace, names.service))
            rt.ensured.pop((uid, "service"), None)
        elif isinstance(action, DeleteNetworkPolicy):
            await rt.client.delete(NETWORK_POLICIES.path(namespace, names.network_policy))
            rt.ensured.pop((uid, "networkpolicy"), None)
        elif isinstance(action, SetSuspended):
            await rt.client.patch(SANDBOXES.path(namespace, name), {"spec": {"suspended": action.suspended}})
        elif isinstance(action, DeleteObject):
            await rt.client.delete(SANDBOXES.path(namespace, name), uid=uid)
            return pod, pvc, pool_source, True
        elif isinstance(action, RemoveFinalizer):
            await _remove_finalizers(rt, key, body)
        # EnsureService / EnsureNetworkPolicy: the caller's; EmitEvent: after the status write;
        # RequeueAfter: the wake-up comes from decision.wake_at.
    return pod, pvc, pool_source, False


def _decide_again(
    rt: Runtime,
    body: Mapping[str, Any],
    desired: Desired,
    decision: Decision,
    status_now: Mapping[str, Any],
    pod: JSON | None,
    pvc: JSON | None,
    service: JSON,
    policy: JSON,
    now: datetime,
) -> Decision | None:
    """The next decision, as if `decision`'s status had been written and read back; None unless it
    moves the sandbox on with nothing left to do but report (no child to write)."""
    projected = {**status_now, **status_patch(decision, status_now, now)}
    sandbox = Sandbox.from_body({**body, "status": projected})
    followup = decide(desired, _observe(rt, sandbox, pod, pvc, service, policy), now)
    if followup.phase is None or followup.phase == decision.phase:
        return None
    if any(not isinstance(action, EmitEvent | RequeueAfter) for action in followup.actions):
        return None
    return followup


def _observe(
    rt: Runtime, sandbox: Sandbox, pod: JSON | None, pvc: JSON | None, service: JSON, policy: JSON
) -> Observed:
    namespace, uid = str(sandbox.metadata.namespace), str(sandbox.metadata.uid)
    names = child_names(str(sandbox.metadata.name))
    return observed_from(
        sandbox,
        pod=pod,
        pvc=pvc,
        # "present" means present and current: a changed spec.network re-applies the policy.
        service_present=_is_current(rt, "service", (namespace, names.service), uid, service),
        network_policy_present=_is_current(rt, "networkpolicy", (namespace, names.network_policy), uid, policy),
    )


def _is_current(rt: Runtime, kind: str, key: Key, uid: str, built: JSON) -> bool:
    """The live child (as last watched, or as this process just wrote it) matches `built`."""
    digest = built["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    return digest in (rt.store.child_hash(kind, key), rt.ensured.get((uid, kind)))


async def _ensure_child(rt: Runtime, kind: str, collection: str, name: str, uid: str, body: JSON) -> None:
    """Create a Service / NetworkPolicy, or bring an existing one up to `body` with a merge patch
    (lists are replaced whole). A POST first: the common case is a new sandbox, and a POST costs the
    API server less than a server-side apply, which matters in a burst."""
    key = (str(body["metadata"]["namespace"]), name)
    written: JSON | None = None
    if rt.store.child_hash(kind, key) is None:
        written = await rt.client.create(collection, body)  # None: it exists (409), maybe outdated
    if written is None:
        patch = {
            "metadata": {"labels": body["metadata"]["labels"], "annotations": body["metadata"]["annotations"]},
            "spec": body["spec"],
        }
        written = await rt.client.patch(f"{collection}/{name}", patch)
    rt.ensured[(uid, kind)] = body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    if written is not None:
        rt.store.put_child_hash(kind, written)


async def _write_status(
    rt: Runtime,
    key: Key,
    sandbox: Sandbox,
    decisions: list[Decision],
    current: Mapping[str, Any],
    pod: JSON | None,
    now: datetime,
    pool_source: str | None,
) -> None:
    """Write the last of `decisions` (each follows from the one before) and record every phase
    change on the way."""
    namespace, name = key
    decision = decisions[-1]
    patch = status_patch(decision, current, now)
    pod_ip = (pod or {}).get("status", {}).get("podIP") if decision.phase == Phase.RUNNING else None
    extra = {
        "sandboxID": sandbox_id(sandbox),
        "podName": pod["metadata"]["name"] if pod is not None else None,
        "podIP": pod_ip,
        "endpoint": f"{pod_ip}:{ENVD_PORT}" if pod_ip else None,
    }
    for field, value in extra.items():
        if current.get(field) != value:
            patch[field] = value
    due = progress_write_due(patch, current, parse_time(sandbox.metadata.creation_timestamp), now)
    if due is not None:  # a fast start skips this write; a slow one writes it at `due`
        rt.queue.add_after(("sandbox", *key), (due - now).total_seconds())
        return
    if not patch:
        return
    previous = current.get("phase")
    updated = await rt.client.patch(SANDBOXES.path(namespace, name, "status"), {"status": patch})
    if updated is not None:
        rt.store.put_sandbox(updated)
    for made in decisions:
        if made.phase is not None and str(made.phase) != previous:
            _record_transition(rt, sandbox, previous, str(made.phase), made.reason, now, pool_source, pod)
            previous = str(made.phase)


def _record_transition(
    rt: Runtime,
    sandbox: Sandbox,
    previous: str | None,
    phase: str,
    reason: str,
    now: datetime,
    pool_source: str | None,
    pod: JSON | None,
) -> None:
    rt.metrics.transitions.labels(previous or "", phase, reason).inc()
    if reason in TIMEOUT_KINDS:
        rt.metrics.timeouts.labels(TIMEOUT_KINDS[reason]).inc()
    created = parse_time(sandbox.metadata.creation_timestamp)
    if phase == Phase.RUNNING and previous in (None, Phase.CREATING) and created is not None:
        from_pool = pool_source or ((pod or {}).get("metadata", {}).get("annotations") or {}).get(
            CLAIMED_FROM_POOL_ANNOTATION
        )
        rt.metrics.time_to_running.labels("pool" if from_pool else "cold").observe(
            max(0.0, (now - created).total_seconds())
        )
    log.info(
        "sandbox %s/%s: %s -> %s (%s)",
        sandbox.metadata.namespace,
        sandbox.metadata.name,
        previous or "-",
        phase,
        reason,
    )


def _schedule(rt: Runtime, key: Key, decision: Decision, now: datetime) -> None:
    if decision.wake_at is None:
        return
    delay = max(0.0, (decision.wake_at - now).total_seconds())
    rt.queue.add_after(("sandbox", *key), delay)


async def _report_missing_template(rt: Runtime, key: Key, sandbox: Sandbox, current: Mapping[str, Any]) -> None:
    message = f'SandboxTemplate "{sandbox.spec.template}" not found; waiting for it to be created'
    if current.get("reason") == "TemplateNotFound" and current.get("message") == message:
        return
    if current.get("phase") == Phase.TERMINATED:
        return  # final: its reason (MaxLifetime, IdleTimeout, ...) stays as it is
    patch = {
        "phase": current.get("phase") or Phase.CREATING.value,
        "reason": "TemplateNotFound",
        "message": message,
        "sandboxID": sandbox_id(sandbox),
        "observedGeneration": sandbox.metadata.generation,
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "TemplateNotFound",
                "message": message,
                "lastTransitionTime": format_time(datetime.now(UTC)),
                "observedGeneration": sandbox.metadata.generation,
            }
        ],
    }
    updated = await rt.client.patch(SANDBOXES.path(*key, "status"), {"status": patch})
    if updated is not None:
        rt.store.put_sandbox(updated)
    await post_event(rt, sandbox, EventType.WARNING, "TemplateNotFound", message)


async def _remove_finalizers(rt: Runtime, key: Key, body: Mapping[str, Any]) -> None:
    finalizers = list((body.get("metadata") or {}).get("finalizers") or [])
    if FINALIZER in finalizers:
        finalizers.remove(FINALIZER)
        await rt.client.patch(SANDBOXES.path(*key), {"metadata": {"finalizers": finalizers}})


async def post_event(rt: Runtime, sandbox: Sandbox, event_type: EventType, reason: str, message: str) -> None:
    if event_type is EventType.NORMAL and not rt.config.normal_events:
        return
    namespace = str(sandbox.metadata.namespace)
    now = format_time(datetime.now(UTC))
    event: JSON = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{sandbox.metadata.name}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": "Sandbox",
            "name": sandbox.metadata.name,
            "namespace": namespace,
            "uid": sandbox.metadata.uid,
        },
        "type": str(event_type),
        "reason": reason,
        "message": message[:1024],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": MANAGED_BY},
        "reportingComponent": MANAGED_BY,
    }
    try:
        await rt.client.create(EVENTS.collection(namespace), event)
    except Exception as exc:  # an Event is best effort: never fail a reconcile over it
        log.debug("could not post event %s on %s: %s", reason, sandbox.metadata.name, exc)
