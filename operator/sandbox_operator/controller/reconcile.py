"""Reconcile one Sandbox: read the store, ask the pure core, carry out its decision.

All judgement is in lifecycle (phases, deadlines, failures, a missing template, when a warm pod may
be claimed) and resources (what children look like). This module only translates: store →
Desired/Observed, Decision → API calls, and the result → status, Events, metrics and the next
wake-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sandbox_operator.api import API_VERSION, EgressClass, Phase, Sandbox, SandboxTemplate, resolve_service
from sandbox_operator.api.names import (
    AGENT_TOKEN_ID_ANNOTATION,
    CLAIMED_FROM_POOL_ANNOTATION,
    EGRESS_CLASS_LABEL,
    ENVD_PORT,
    EVENTS,
    MANAGED_BY,
    NETWORK_POLICIES,
    PERSISTENT_VOLUME_CLAIMS,
    PODS,
    SANDBOXES,
    SERVICES,
    SPEC_HASH_ANNOTATION,
)
from sandbox_operator.controller.inflight import ChildKind
from sandbox_operator.controller.network import ensure_shared_policy, shared_policy_current, write_child
from sandbox_operator.controller.pools import pools_of_template, try_claim_pool_pod
from sandbox_operator.kube import JSON
from sandbox_operator.lifecycle.decide import decide
from sandbox_operator.lifecycle.observe import (
    desired_from,
    idle_deadline_passed,
    node_to_check,
    observed_from,
    serving_pod_ip,
    with_activity,
    with_node,
)
from sandbox_operator.lifecycle.pool import WORKSPACE_VOLUME_KEY, may_claim_warm_pod
from sandbox_operator.lifecycle.status import format_time, parse_time, progress_write_due, status_patch
from sandbox_operator.lifecycle.template import has_started, template_missing
from sandbox_operator.lifecycle.types import (
    Action,
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
    ForceDeletePod,
    Observed,
    RequeueAfter,
)
from sandbox_operator.resources import (
    build_pod,
    build_pvc,
    build_service,
    child_names,
    governing_network_policy,
    sandbox_id,
)
from sandbox_operator.resources.tokens import issue_agent_token

if TYPE_CHECKING:
    from sandbox_operator.controller.context import ReconcileContext
    from sandbox_operator.controller.store import Key

log = logging.getLogger(__name__)


def _use_claim(pod: JSON, claim_name: str) -> None:
    for volume in pod["spec"]["volumes"]:
        if WORKSPACE_VOLUME_KEY in volume:
            volume[WORKSPACE_VOLUME_KEY]["claimName"] = claim_name


def _select_pod(pods: list[JSON], expected_name: str, status_pod: str | None) -> tuple[JSON | None, list[JSON]]:
    """The sandbox's pod, and any extra pods labelled for it (duplicates to remove)."""
    preferred = [p for p in pods if p["metadata"]["name"] in (status_pod, expected_name)]
    chosen = preferred[0] if preferred else (pods[0] if pods else None)
    extras = [p for p in pods if p is not chosen]
    return chosen, extras


@dataclass(frozen=True)
class _Children:
    """The Service (None when the sandbox wants none) and the NetworkPolicy that should govern the
    sandbox's pod (shared, or its own: see `egress`), as built now."""

    service: JSON | None
    policy: JSON
    egress: EgressClass


async def reconcile_sandbox(rt: ReconcileContext, key: Key) -> None:
    body = rt.store.sandboxes.get(key)
    if body is None:
        return
    sandbox = Sandbox.from_body(body)
    now = datetime.now(UTC)
    status_now: Mapping[str, Any] = body.get("status") or {}
    template_body = rt.store.template_for(sandbox.spec.template, started=has_started(status_now))
    if template_body is None:
        await _report_missing_template(rt, key, sandbox, status_now, now)
        return
    template = SandboxTemplate.from_body(template_body)

    pod = await _the_pod(rt, key, status_now)
    pvc = rt.store.pvc_of_sandbox(key) or rt.store.pvcs.get((key[0], child_names(key[1]).pvc))
    policy, egress = governing_network_policy(sandbox, template, rt.config.policy_settings)
    children = _Children(
        build_service(sandbox, template) if resolve_service(sandbox.spec, template.spec) else None, policy, egress
    )
    desired = desired_from(sandbox, template)
    observed = _observe(rt, sandbox, pod, pvc, children)
    if node_name := node_to_check(observed):
        observed = with_node(observed, await rt.node_status(node_name))
    observed = await _with_agent_activity(rt, desired, observed, pod, now)
    decision = decide(desired, observed, now)

    work = _Pass(rt, key, body, sandbox, template, pod, pvc)
    deleted = await work.carry_out(decision, children)
    if deleted:
        return
    decisions = [decision]
    if work.pool_source is not None and decision.phase is Phase.CREATING:
        # A claimed warm pod is Running already: decide once more on what this pass made, so that
        # the sandbox goes Creating -> Running in one status write instead of two passes.
        followup = _decide_again(rt, body, desired, decision, status_now, work, children, now)
        if followup is not None:
            decisions.append(followup)
    await _write_status(rt, key, sandbox, decisions, status_now, work, now)
    for made in decisions:
        for action in made.actions:
            if isinstance(action, EmitEvent) and (action.type is EventType.WARNING or rt.config.normal_events):
                rt.spawn(post_event(rt, sandbox, action.type, action.reason, action.message))
    _schedule(rt, key, decisions[-1], now)


async def _the_pod(rt: ReconcileContext, key: Key, status: Mapping[str, Any]) -> JSON | None:
    """The sandbox's pod; any other pod labelled for it (e.g. a pool claim raced a cold create) is
    deleted: one pod per sandbox."""
    namespace, name = key
    pod, extras = _select_pod(rt.store.pods_of_sandbox(key), child_names(name).pod, status.get("podName"))
    for extra in extras:
        extra_name = extra["metadata"]["name"]
        log.info("deleting duplicate pod %s/%s of sandbox %s", namespace, extra_name, name)
        await rt.client.delete(PODS.path(namespace, extra_name), uid=extra["metadata"].get("uid"))
        rt.store.delete_pod((namespace, extra_name))
    return pod


async def _with_agent_activity(
    rt: ReconcileContext, desired: Desired, observed: Observed, pod: JSON | None, now: datetime
) -> Observed:
    """At the idle deadline the agent itself says whether the sandbox was idle: the status only holds
    activity as often as the usage collector writes it, which must not decide a suspension."""
    pod_ip = ((pod or {}).get("status") or {}).get("podIP")
    if not pod_ip or not idle_deadline_passed(desired, observed, now):
        return observed
    token_id = (((pod or {}).get("metadata") or {}).get("annotations") or {}).get(AGENT_TOKEN_ID_ANNOTATION)
    return with_activity(observed, await rt.agent_activity(str(pod_ip), rt.config.agent_token(token_id)))


class _Pass:
    """The actions of one decision carried out on the pod, the workspace and the Sandbox itself, and
    the pod and workspace as they stand afterwards."""

    def __init__(
        self,
        rt: ReconcileContext,
        key: Key,
        body: Mapping[str, Any],
        sandbox: Sandbox,
        template: SandboxTemplate,
        pod: JSON | None,
        pvc: JSON | None,
    ) -> None:
        self.rt, self.key, self.body, self.sandbox, self.template = rt, key, body, sandbox, template
        self.pod, self.pvc = pod, pvc
        self.names = child_names(key[1])
        self._own_policy = (key[0], self.names.network_policy)
        self.uid = str(sandbox.metadata.uid)
        self.pool_source: str | None = None  # the pool a warm pod was claimed from in this pass
        self.policy_written: asyncio.Future[None] | None = None  # this pass's NetworkPolicy write
        self._steps: dict[type[Action], Callable[[Action], Awaitable[bool]]] = {
            CreatePod: self._create_pod,
            EnsurePVC: self._ensure_pvc,
            DeletePod: self._delete_pod,
            ForceDeletePod: self._force_delete_pod,
            DeletePVC: self._delete_pvc,
            DeleteService: self._delete_service,
            DeleteNetworkPolicy: self._delete_network_policy,
            DeleteObject: self._delete_object,
        }

    async def carry_out(self, decision: Decision, children: _Children) -> bool:
        """Run the decision; True when the Sandbox itself was deleted. The Service and the
        NetworkPolicy are written alongside the claim, but no pod is created or claimed before its
        NetworkPolicy write has succeeded: a refused policy leaves no pod running without it."""
        namespace = self.key[0]
        writes: list[asyncio.Future[None]] = []
        for action in decision.actions:
            if isinstance(action, EnsureService) and children.service is not None:  # decide asks only then
                service = _ensure_child(self.rt, "service", SERVICES.collection(namespace), self.uid, children.service)
                writes.append(asyncio.ensure_future(service))
            elif isinstance(action, EnsureNetworkPolicy):
                self.policy_written = asyncio.ensure_future(self._write_policy(children))
                writes.append(self.policy_written)
        try:
            deleted = await self._run(decision)
            if not deleted and self.policy_written is not None:
                await self._align_pod_with_policy(children)
        except BaseException:
            await asyncio.gather(*writes, return_exceptions=True)
            raise
        await asyncio.gather(*writes)
        return deleted

    async def _write_policy(self, children: _Children) -> None:
        if children.egress.shared:
            await ensure_shared_policy(self.rt, children.policy)
        else:
            collection = NETWORK_POLICIES.collection(self.key[0])
            await _ensure_child(self.rt, "networkpolicy", collection, self.uid, children.policy)

    async def _align_pod_with_policy(self, children: _Children) -> None:
        """An existing pod of another class (spec.network changed, or made before policies were
        shared) is relabelled for its policy once that is written; a policy of its own that no longer
        applies is deleted after the relabel, so the pod is never left without one."""
        pod = self.pod
        if pod is not None and (pod["metadata"].get("labels") or {}).get(EGRESS_CLASS_LABEL) != children.egress:
            await self._policy_in_place()
            relabel = {"metadata": {"labels": {EGRESS_CLASS_LABEL: children.egress.value}}}
            updated = await self.rt.client.patch(PODS.path(self.key[0], pod["metadata"]["name"]), relabel)
            if updated is not None:
                self.pod = self.rt.store.put_pod(updated)
        if children.egress.shared and _own_policy_known(self.rt, self._own_policy, self.uid):
            await self._policy_in_place()
            await self._delete_network_policy(DeleteNetworkPolicy())

    async def _policy_in_place(self) -> None:
        """Wait for this pass's NetworkPolicy write (if any); its failure fails the pass here."""
        if self.policy_written is not None:
            await self.policy_written

    async def _run(self, decision: Decision) -> bool:
        status = self.body.get("status") or {}
        if may_claim_warm_pod(status, has_workspace=self.pvc is not None, creates_pod=decision.has_action(CreatePod)):
            # A warm pod from a pool brings its own workspace claim: try that before creating either.
            # The claim relabels the pod for the sandbox's policy, so that policy is written first.
            if pools_of_template(self.rt, self.key[0], self.sandbox.spec.template):
                await self._policy_in_place()
            claimed = await try_claim_pool_pod(self.rt, self.sandbox, self.template)
            if claimed is not None:
                self.pod, self.pool_source = claimed, claimed["metadata"]["annotations"][CLAIMED_FROM_POOL_ANNOTATION]
                self.pvc = self.rt.store.pvc_of_sandbox(self.key) or self.pvc
        for action in decision.actions:
            # EnsureService / EnsureNetworkPolicy: carry_out's; EmitEvent: after the status write;
            # RequeueAfter: the wake-up comes from decision.wake_at.
            step = self._steps.get(type(action))
            if step is not None and await step(action):
                return True
        return False

    # --- steps: each returns True when the Sandbox is gone and nothing further applies ----------

    async def _create_pod(self, _: Action) -> bool:
        if self.pool_source is not None:
            return False
        await self._policy_in_place()
        key = self.rt.config.agent_token_key
        new_pod = build_pod(self.sandbox, self.template, issue_agent_token(key) if key else None)
        if self.pvc is not None and self.pvc["metadata"]["name"] != self.names.pvc:
            _use_claim(new_pod, self.pvc["metadata"]["name"])  # a workspace taken over from a pool pod
        created = await self.rt.client.create(PODS.collection(self.key[0]), new_pod)
        if created is not None:
            self.pod = self.rt.store.put_pod(created)
        return False

    async def _ensure_pvc(self, _: Action) -> bool:
        if self.pvc is not None or self.pool_source is not None:
            return False
        claim = build_pvc(self.sandbox, self.template)  # None: the template's workspace is an emptyDir
        if claim is not None:
            created = await self.rt.client.create(PERSISTENT_VOLUME_CLAIMS.collection(self.key[0]), claim)
            if created is not None:
                self.rt.store.put_pvc(created)
                self.pvc = created
        return False

    async def _delete_pod(self, _: Action) -> bool:
        if self.pod is not None:
            metadata = self.pod["metadata"]
            await self.rt.client.delete(PODS.path(self.key[0], metadata["name"]), uid=metadata.get("uid"))
        return False

    async def _force_delete_pod(self, _: Action) -> bool:
        if self.pod is not None:
            metadata = self.pod["metadata"]
            path = PODS.path(self.key[0], metadata["name"])
            log.warning("force-deleting pod %s/%s: its node is not ready", self.key[0], metadata["name"])
            await self.rt.client.delete(path, uid=metadata.get("uid"), grace_seconds=0)
        return False

    async def _delete_pvc(self, _: Action) -> bool:
        await self.rt.client.delete(PERSISTENT_VOLUME_CLAIMS.path(self.key[0], self.names.pvc))
        return False

    async def _delete_service(self, _: Action) -> bool:
        await self.rt.client.delete(SERVICES.path(self.key[0], self.names.service))
        self.rt.in_flight.forget_child(self.uid, "service")
        return False

    async def _delete_network_policy(self, _: Action) -> bool:
        """The sandbox's own policy, if it has one; a shared policy outlives the sandbox."""
        if _own_policy_known(self.rt, self._own_policy, self.uid):
            await self.rt.client.delete(NETWORK_POLICIES.path(self.key[0], self.names.network_policy))
            self.rt.store.delete_child_hash("networkpolicy", self._own_policy)
            self.rt.in_flight.forget_child(self.uid, "networkpolicy")
        return False

    async def _delete_object(self, _: Action) -> bool:
        await self.rt.client.delete(SANDBOXES.path(*self.key), uid=self.uid)
        return True


def _decide_again(
    rt: ReconcileContext,
    body: Mapping[str, Any],
    desired: Desired,
    decision: Decision,
    status_now: Mapping[str, Any],
    work: _Pass,
    children: _Children,
    now: datetime,
) -> Decision | None:
    """The next decision, as if `decision`'s status had been written and read back; None unless it
    moves the sandbox on with nothing left to do but report (no child to write)."""
    projected = {**status_now, **status_patch(decision, status_now, now)}
    sandbox = Sandbox.from_body({**body, "status": projected})
    followup = decide(desired, _observe(rt, sandbox, work.pod, work.pvc, children), now)
    if followup.phase is None or followup.phase == decision.phase:
        return None
    if any(not isinstance(action, EmitEvent | RequeueAfter) for action in followup.actions):
        return None
    return followup


def _observe(
    rt: ReconcileContext, sandbox: Sandbox, pod: JSON | None, pvc: JSON | None, children: _Children
) -> Observed:
    namespace, uid = str(sandbox.metadata.namespace), str(sandbox.metadata.uid)
    names = child_names(str(sandbox.metadata.name))
    return observed_from(
        sandbox,
        pod=pod,
        pvc=pvc,
        # "present" means present and current: a changed spec.network re-applies the policy. A
        # Service the sandbox does not want is present when it exists at all (decide deletes it).
        service_present=(
            _is_current(rt, "service", (namespace, names.service), uid, children.service)
            if children.service is not None
            else rt.store.child_hash("service", (namespace, names.service)) is not None
        ),
        network_policy_present=_policy_in_place(rt, (namespace, names.network_policy), uid, pod, children),
    )


def _own_policy_known(rt: ReconcileContext, own: Key, uid: str) -> bool:
    """The sandbox's own NetworkPolicy (key `own`) exists, as watched or as this process wrote it."""
    watched = rt.store.child_hash("networkpolicy", own) is not None
    return watched or rt.in_flight.ensured(uid, "networkpolicy") is not None


def _policy_in_place(rt: ReconcileContext, own: Key, uid: str, pod: JSON | None, children: _Children) -> bool:
    """The governing policy is current, the pod (if any) is labelled for it, and no policy of the
    sandbox's own lingers beside a shared one (policies add up: it would widen the shared one)."""
    if children.egress.shared:
        current = shared_policy_current(rt, children.policy) and not _own_policy_known(rt, own, uid)
    else:
        current = _is_current(rt, "networkpolicy", own, uid, children.policy)
    labelled = pod is None or (pod["metadata"].get("labels") or {}).get(EGRESS_CLASS_LABEL) == children.egress
    return current and labelled


def _is_current(rt: ReconcileContext, kind: ChildKind, key: Key, uid: str, built: JSON) -> bool:
    """The live child (as last watched, or as this process just wrote it) matches `built`."""
    digest = built["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    return digest in (rt.store.child_hash(kind, key), rt.in_flight.ensured(uid, kind))


async def _ensure_child(rt: ReconcileContext, kind: ChildKind, collection: str, uid: str, body: JSON) -> None:
    """Write the sandbox's own Service / NetworkPolicy (network.write_child) and remember its digest
    until the watch brings it back."""
    await write_child(rt, kind, collection, body)
    rt.in_flight.note_ensured(uid, kind, body["metadata"]["annotations"][SPEC_HASH_ANNOTATION])


async def _write_status(
    rt: ReconcileContext,
    key: Key,
    sandbox: Sandbox,
    decisions: list[Decision],
    current: Mapping[str, Any],
    work: _Pass,
    now: datetime,
) -> None:
    """Write the last of `decisions` (each follows from the one before) and record every phase
    change on the way."""
    decision = decisions[-1]
    pod = work.pod
    patch = status_patch(decision, current, now)
    pod_ip = serving_pod_ip(pod) if decision.phase == Phase.RUNNING else None
    pod_annotations = ((pod or {}).get("metadata") or {}).get("annotations") or {}
    extra = {
        "sandboxID": sandbox_id(sandbox),
        "podName": pod["metadata"]["name"] if pod is not None else None,
        "agentTokenId": pod_annotations.get(AGENT_TOKEN_ID_ANNOTATION),
        "podIP": pod_ip,
        "endpoint": f"{pod_ip}:{ENVD_PORT}" if pod_ip else None,
    }
    for field, value in extra.items():
        if current.get(field) != value:
            patch[field] = value
    due = progress_write_due(patch, current, parse_time(sandbox.metadata.creation_timestamp), now)
    if due is not None:  # a fast start skips this write; a slow one writes it at `due`
        rt.requeue(("sandbox", *key), (due - now).total_seconds())
        return
    if not patch:
        return
    previous = current.get("phase")
    updated = await rt.client.patch(SANDBOXES.path(*key, "status"), {"status": patch})
    if updated is not None:
        rt.store.put_sandbox(updated)
    from_pool = work.pool_source or pod_annotations.get(CLAIMED_FROM_POOL_ANNOTATION)
    for made in decisions:
        if made.phase is not None and str(made.phase) != previous:
            _record_transition(rt, sandbox, previous, made, now, bool(from_pool))
            previous = str(made.phase)


def _record_transition(
    rt: ReconcileContext, sandbox: Sandbox, previous: str | None, made: Decision, now: datetime, from_pool: bool
) -> None:
    phase = str(made.phase)
    rt.metrics.transitions.labels(previous or "", phase, made.reason).inc()
    if made.fired_timeout is not None:
        rt.metrics.timeouts.labels(made.fired_timeout.value).inc()
    created = parse_time(sandbox.metadata.creation_timestamp)
    if phase == Phase.RUNNING and previous in (None, Phase.CREATING) and created is not None:
        rt.metrics.time_to_running.labels("pool" if from_pool else "cold").observe(
            max(0.0, (now - created).total_seconds())
        )
    log.info(
        "sandbox %s/%s: %s -> %s (%s)",
        sandbox.metadata.namespace,
        sandbox.metadata.name,
        previous or "-",
        phase,
        made.reason,
    )


def _schedule(rt: ReconcileContext, key: Key, decision: Decision, now: datetime) -> None:
    if decision.wake_at is None:
        return
    rt.requeue(("sandbox", *key), max(0.0, (decision.wake_at - now).total_seconds()))


async def _report_missing_template(
    rt: ReconcileContext, key: Key, sandbox: Sandbox, current: Mapping[str, Any], now: datetime
) -> None:
    report = template_missing(sandbox.spec.template, current, sandbox.metadata.generation, now)
    if report is None:
        return
    status = {**report.status, "sandboxID": sandbox_id(sandbox)}
    updated = await rt.client.patch(SANDBOXES.path(*key, "status"), {"status": status})
    if updated is not None:
        rt.store.put_sandbox(updated)
    await post_event(rt, sandbox, report.event.type, report.event.reason, report.event.message)


async def post_event(rt: ReconcileContext, sandbox: Sandbox, event_type: EventType, reason: str, message: str) -> None:
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
