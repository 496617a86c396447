"""decide(): the level-based reconcile step of a Sandbox, as a pure function.

Given what the spec asks for (Desired), what exists (Observed) and the time, return the next phase,
the conditions and the actions that move the world towards the spec. It reads no history: feeding it
the same inputs gives the same Decision, and feeding the returned phase back converges.
See docs/lifecycle.md for the behaviours, phase by phase.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sandbox_operator.api import Phase
from sandbox_operator.lifecycle.deadlines import Deadlines, compute_deadlines, expires_at
from sandbox_operator.lifecycle.transitions import is_allowed_transition
from sandbox_operator.lifecycle.types import (
    Action,
    ConditionStatus,
    ConditionType,
    CreatePod,
    DecidedCondition,
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
    OnIdle,
    PodObservation,
    PodPhase,
    PvcPhase,
    Reason,
    RequeueAfter,
    StatusFields,
    SuspendCause,
    TimeoutKind,
)

__all__ = ["RETRYABLE_REASONS", "IllegalTransitionError", "classify_pod_failure", "convergence", "decide"]

# Failures that a fresh pod may well not repeat (node trouble, a crash); they are retried within the
# budget. OOMKilled and image/config errors would fail the same way again: they wait for a spec change.
RETRYABLE_REASONS: frozenset[str] = frozenset({Reason.EVICTED, Reason.POD_FAILED, Reason.POD_SUCCEEDED})

# Container waiting reasons that will not resolve by waiting.
_FATAL_WAITING_REASONS: dict[str, Reason] = {
    "ErrImageNeverPull": Reason.IMAGE_ERROR,
    "InvalidImageName": Reason.IMAGE_ERROR,
    "CreateContainerConfigError": Reason.CONTAINER_CONFIG_ERROR,
    "CreateContainerError": Reason.CONTAINER_CONFIG_ERROR,
}
_PULL_WAITING_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull"})
# How often a sandbox whose pod's node stopped reporting looks at the node again.
NODE_RECHECK = timedelta(seconds=30)
_SUSPEND_REASONS = frozenset({Reason.SUSPEND_REQUESTED, Reason.IDLE_TIMEOUT, Reason.MAX_LIFETIME})
_HELD_CAUSES = frozenset({SuspendCause.IDLE_TIMEOUT, SuspendCause.MAX_LIFETIME})
# What the template refuses about a spec (Desired's *_violation fields): no child is made while one
# holds, and it is not a failure, so fixing it (spec or template) retries without spending an attempt.
_REFUSAL_REASONS = frozenset(
    {Reason.TEMPLATE_NOT_ALLOWED, Reason.IMAGE_NOT_ALLOWED, Reason.RESOURCES_EXCEED_TEMPLATE_MAX}
)


def _exit_detail(code: int) -> str:
    """An exit code as a person reads it: 137 is SIGKILL (128 + 9), as shells and kubelets count."""
    try:
        return f"exit code {code}: killed by {signal.Signals(code - 128).name}" if code > 128 else f"exit code {code}"
    except ValueError:
        return f"exit code {code}"


class IllegalTransitionError(RuntimeError):
    """decide() computed a transition outside the table: a bug in this module, never user input."""


@dataclass(slots=True)
class _Plan:
    """What one phase handler wants; _finish() turns it into a Decision."""

    phase: Phase | None
    reason: str
    message: str
    actions: list[Action] = field(default_factory=list)
    events: list[EmitEvent] = field(default_factory=list)
    wake_at: list[datetime] = field(default_factory=list)
    # Ask for an immediate re-reconcile: the next step does not depend on any outside event.
    again_now: bool = False
    started_at: datetime | None = None
    last_activity_at: datetime | None = None
    terminated_at: datetime | None = None
    recreate_attempts: int | None = None
    last_recreate_at: datetime | None = None
    # False while an Error waits to retry a spec change: the new generation is not acted on yet.
    acknowledge_generation: bool = True
    fired_timeout: TimeoutKind | None = None
    # Set by the idle timeout's suspension: recorded in status (spec is the user's, never written).
    suspended_by: SuspendCause | None = None
    resume_request_seen: str | None = None


def classify_pod_failure(pod: PodObservation) -> tuple[Reason, str] | None:
    """The failure a pod shows, as (reason, message), or None when it is not failed.

    A pod that is being deleted is going away, not failing: its containers die from the deletion.
    """
    if pod.deleting:
        return None
    detail = f": {pod.message}" if pod.message else ""
    if pod.reason == "Evicted":
        return Reason.EVICTED, f"the sandbox pod was evicted{detail}"
    if "OOMKilled" in pod.terminated_reasons:
        return Reason.OOM_KILLED, "the sandbox ran out of memory (OOMKilled); raise spec.resources.memory"
    if pod.phase is PodPhase.FAILED:
        exits = (_exit_detail(code) for code in pod.exit_codes if code != 0)
        causes = ", ".join(filter(None, (pod.reason, *pod.terminated_reasons, *exits))) or "unknown cause"
        return Reason.POD_FAILED, f"the sandbox pod failed ({causes}){detail}"
    if pod.phase is PodPhase.SUCCEEDED:
        return Reason.POD_SUCCEEDED, "the sandbox pod exited; the agent is not expected to stop"
    for waiting in pod.waiting_reasons:
        if waiting in _FATAL_WAITING_REASONS:
            return _FATAL_WAITING_REASONS[waiting], f"the sandbox container cannot start: {waiting}{detail}"
    return None


def _refusal(desired: Desired) -> tuple[Reason, str] | None:
    """What the template refuses about the spec, as (reason, message): the namespace first (nothing
    of the template applies there), then the image, then the resources."""
    for reason, message in (
        (Reason.TEMPLATE_NOT_ALLOWED, desired.namespace_violation),
        (Reason.IMAGE_NOT_ALLOWED, desired.image_violation),
        (Reason.RESOURCES_EXCEED_TEMPLATE_MAX, desired.resources_violation),
    ):
        if message:
            return reason, message
    return None


def _pod_ready(pod: PodObservation | None) -> bool:
    return pod is not None and pod.ready and not pod.deleting and pod.phase is PodPhase.RUNNING


def _node_lost_message(pod: PodObservation) -> str:
    """What a pod on a node that stopped reporting waits for (pod.node is set and not ready)."""
    node = pod.node
    assert node is not None
    since = f" since {node.since.strftime('%Y-%m-%dT%H:%M:%SZ')}" if node.since else ""
    what = f"the node {node.name} of the sandbox pod is not ready ({node.reason or 'no reason given'}{since})"
    if pod.deleting:
        return f"{what}; the pod is being deleted there and is recreated once it is gone"
    eviction = (
        f"Kubernetes evicts the pod {pod.unreachable_toleration} s after the node became unreachable"
        if pod.unreachable_toleration is not None
        else "Kubernetes evicts the pod when its toleration of the node's taint runs out"
    )
    return f"{what}; the sandbox waits for it: {eviction}, then a new pod is made"


def _waiting_reason(pod: PodObservation) -> tuple[Reason, str]:
    if pod.node_lost:
        return Reason.NODE_LOST, _node_lost_message(pod)
    pulling = [reason for reason in pod.waiting_reasons if reason in _PULL_WAITING_REASONS]
    if pulling:
        return Reason.IMAGE_PULL_BACK_OFF, f"pulling the sandbox image: {pulling[0]}"
    if pod.phase is PodPhase.RUNNING:
        return Reason.POD_NOT_READY, "the sandbox pod is running but its agent is not ready yet"
    waiting = f" ({', '.join(pod.waiting_reasons)})" if pod.waiting_reasons else ""
    return Reason.POD_PENDING, f"waiting for the sandbox pod to start{waiting}"


class _Reconcile:
    def __init__(self, desired: Desired, observed: Observed, now: datetime) -> None:
        self.desired = desired
        self.observed = observed
        self.now = now
        # Timestamps decide() writes are whole seconds, like metav1.Time, so a round trip through
        # the API server gives back exactly what was decided.
        self.stamp = now.replace(microsecond=0)
        self.pod = observed.pod
        self.deadlines = self._deadlines(observed.started_at, observed.terminated_at)
        self.refusal = _refusal(desired)
        # Suspended by the operator (an idle timeout, a lifetime end with onLifetimeEnd: suspend): held
        # until a new sandbox.dev/resume-request.
        self.timeout_held = (
            observed.suspended_by in _HELD_CAUSES
            and observed.phase in (Phase.SUSPENDING, Phase.SUSPENDED)
            and observed.resume_request == observed.resume_request_seen
        )
        # Suspended as declared (spec.suspended), as requested (sandbox.dev/paused), or held.
        self.suspend_wanted = desired.suspended or desired.paused or self.timeout_held
        self.lifetime_suspends = desired.on_lifetime_end is OnIdle.SUSPEND

    def _deadlines(self, started_at: datetime | None, terminated_at: datetime | None) -> Deadlines:
        return compute_deadlines(
            self.desired,
            created_at=self.observed.created_at,
            started_at=started_at,
            last_activity_at=self.observed.last_activity_at,
            terminated_at=terminated_at,
        )

    def _passed(self, deadline: datetime | None) -> bool:
        return deadline is not None and deadline <= self.now

    # --- building blocks -------------------------------------------------------------------------

    def _unstick_pod_deletion(self, plan: _Plan) -> None:
        """A pod being deleted on a node that stopped reporting is never confirmed gone (that is the
        kubelet's part), so every phase waiting for it would wait forever. Once its grace period is
        over it is deleted with grace 0, as `kubectl delete --force` would; the node's kubelet, if it
        comes back, stops the containers of a pod it no longer finds."""
        pod = self.pod
        if pod is None or not pod.deleting or not pod.node_lost or pod.deletion_due is None:
            return
        if pod.deletion_due > self.now:
            plan.wake_at.append(pod.deletion_due)
            return
        assert pod.node is not None
        plan.actions.append(ForceDeletePod())
        plan.events.append(
            EmitEvent(
                EventType.WARNING,
                Reason.NODE_LOST,
                f"the sandbox pod's grace period is over and its node {pod.node.name} is not ready "
                f"({pod.node.reason or 'no reason given'}): deleting it without the node's confirmation",
            )
        )

    def _delete_pod(self) -> list[Action]:
        if self.pod is None or self.pod.deleting:
            return []
        return [DeletePod()]

    def _ensure_children(self) -> list[Action]:
        """Children the running sandbox needs and that are not known to exist (NetworkPolicy first)."""
        actions: list[Action] = []
        if self.refusal:
            return actions  # a spec the template refuses creates nothing at all until it is fixed
        if self.observed.network_policy_present is not True:
            actions.append(EnsureNetworkPolicy())
        if self.desired.persistent_workspace and self.observed.pvc is None:
            actions.append(EnsurePVC())
        if self.desired.service and self.observed.service_present is not True:
            actions.append(EnsureService())
        elif not self.desired.service and self.observed.service_present:
            actions.append(DeleteService())  # no longer asked for (or made before Services were opt-in)
        return actions

    def _start_pod(self) -> list[Action]:
        return [*self._ensure_children(), CreatePod()]

    def _pod_blockers(self) -> tuple[Reason, str] | None:
        """Why a pod cannot be created right now, without being an error."""
        if self.pod is not None:
            return Reason.POD_TERMINATING, "waiting for the previous sandbox pod to go away"
        pvc = self.observed.pvc
        if self.desired.persistent_workspace and pvc is not None and pvc.deleting:
            return Reason.POD_PENDING, "waiting for the workspace PVC that is being deleted to go away"
        return None

    def _workspace_lost(self) -> bool:
        pvc = self.observed.pvc
        return self.desired.persistent_workspace and pvc is not None and pvc.phase is PvcPhase.LOST

    def _refused_error(self, refusal: tuple[Reason, str]) -> _Plan:
        # A pod started before the spec (or the template) changed does not match it any more: it goes too.
        return _Plan(Phase.ERROR, *refusal, actions=self._delete_pod())

    def _terminate(self, reason: Reason, message: str) -> _Plan:
        return _Plan(Phase.TERMINATING, reason, message, actions=self._delete_pod())

    def _max_lifetime_plan(self, *, may_suspend: bool = False) -> _Plan | None:
        """The end of the lifetime: terminate; with onLifetimeEnd: suspend, a suspension (held like an
        idle one) where the phase allows one (`may_suspend`), else nothing: an Error sandbox ends."""
        if not self._passed(self.deadlines.max_lifetime):
            return None
        if self.lifetime_suspends and may_suspend:
            plan = self._held_suspension(
                Reason.MAX_LIFETIME,
                "the sandbox reached the end of its lifetime: suspending (onLifetimeEnd: suspend)",
                SuspendCause.MAX_LIFETIME,
            )
        else:
            plan = self._terminate(Reason.MAX_LIFETIME, "the sandbox reached its maximum lifetime")
        plan.fired_timeout = TimeoutKind.MAX_LIFETIME
        return plan

    # --- phases ----------------------------------------------------------------------------------

    def run(self) -> Decision:
        if self.observed.deleting:
            plan = self._deletion()
            self._unstick_pod_deletion(plan)
            return self._finish(plan)
        handler = {
            None: self._creating,
            Phase.CREATING: self._creating,
            Phase.RUNNING: self._running,
            Phase.SUSPENDING: self._suspending,
            Phase.SUSPENDED: self._suspended,
            Phase.RESUMING: self._resuming,
            Phase.ERROR: self._error,
            Phase.TERMINATING: self._terminating,
            Phase.TERMINATED: self._terminated,
        }[self.observed.phase]
        plan = handler()
        if self.observed.phase is None and plan.phase is not Phase.CREATING:
            # A new object can only enter Creating; take the real step right after, on the next pass.
            plan = _Plan(Phase.CREATING, Reason.CREATING, "the sandbox is being set up", again_now=True)
        self._unstick_pod_deletion(plan)
        return self._finish(plan)

    def _creating(self) -> _Plan:
        if plan := self._max_lifetime_plan(may_suspend=True):
            return plan
        pod = self.pod
        if pod is not None and (failure := classify_pod_failure(pod)):
            return _Plan(Phase.ERROR, *failure)
        if self._workspace_lost():
            return _Plan(Phase.ERROR, Reason.WORKSPACE_LOST, "the workspace PVC lost its volume")
        if self.refusal:
            return self._refused_error(self.refusal)
        if self.suspend_wanted:
            # Declared suspended before it ever ran: nothing starts. Its workspace and Service are
            # set up all the same, so that the resume is like any other.
            return _Plan(
                Phase.SUSPENDING,
                Reason.SUSPEND_REQUESTED,
                "suspended before it started: it starts when spec.suspended is false",
                actions=[*self._ensure_children(), *self._delete_pod()],
            )
        if pod is None:
            if blocker := self._pod_blockers():
                return _Plan(Phase.CREATING, *blocker)
            return _Plan(Phase.CREATING, Reason.CREATING, "creating the sandbox pod", actions=self._start_pod())
        if pod.deleting:
            return _Plan(Phase.CREATING, Reason.POD_TERMINATING, "waiting for the old sandbox pod to go away")
        if _pod_ready(pod):
            return _Plan(
                Phase.RUNNING,
                Reason.STARTED,
                "the sandbox is running",
                actions=self._ensure_children(),
                started_at=self.observed.started_at or self.stamp,
            )
        return _Plan(Phase.CREATING, *_waiting_reason(pod), actions=self._ensure_children())

    def _running(self) -> _Plan:
        if plan := self._max_lifetime_plan(may_suspend=True):
            return plan
        if self.suspend_wanted:
            return _Plan(
                Phase.SUSPENDING,
                Reason.SUSPEND_REQUESTED,
                "suspending: deleting the pod",
                actions=self._delete_pod(),
            )
        if self._passed(self.deadlines.idle):
            return self._idle_plan()
        pod = self.pod
        if pod is not None and (failure := classify_pod_failure(pod)):
            return self._failed_while_running(*failure)
        if self._workspace_lost():
            return _Plan(Phase.ERROR, Reason.WORKSPACE_LOST, "the workspace PVC lost its volume")
        if pod is None:
            return self._recreate_lost_pod()
        if pod.deleting:
            if self._replacing_failed_pod():
                return _Plan(Phase.RUNNING, self.observed.reason or Reason.POD_FAILED, self.observed.message or "")
            if pod.node_lost:
                return _Plan(Phase.RUNNING, Reason.NODE_LOST, _node_lost_message(pod))
            return _Plan(
                Phase.RUNNING,
                Reason.POD_TERMINATING,
                "the sandbox pod is being deleted; it will be recreated",
            )
        if not _pod_ready(pod):
            plan = _Plan(Phase.RUNNING, *_waiting_reason(pod), actions=self._ensure_children())
            if plan.reason == Reason.NODE_LOST:
                plan.wake_at.append(self.now + NODE_RECHECK)  # a node may return before its pods say so
                if self.observed.reason != Reason.NODE_LOST:
                    plan.events.append(EmitEvent(EventType.WARNING, Reason.NODE_LOST, plan.message))
            return plan
        plan = _Plan(
            Phase.RUNNING,
            self.observed.reason if self.observed.reason in (Reason.STARTED, Reason.RESUMED) else Reason.STARTED,
            "the sandbox is running",
            actions=self._ensure_children(),
        )
        if self.observed.reason == Reason.NODE_LOST:
            plan.events.append(
                EmitEvent(EventType.NORMAL, Reason.NODE_RECOVERED, "the node reports again: the same pod serves")
            )
        self._reset_attempts_when_stable(plan)
        return plan

    def _idle_plan(self) -> _Plan:
        if self.desired.on_idle is OnIdle.TERMINATE:
            plan = self._terminate(Reason.IDLE_TIMEOUT, "the sandbox was idle for too long")
        else:
            plan = self._held_suspension(
                Reason.IDLE_TIMEOUT, "the sandbox was idle for too long: suspending", SuspendCause.IDLE_TIMEOUT
            )
        plan.fired_timeout = TimeoutKind.IDLE
        return plan

    def _held_suspension(self, reason: Reason, message: str, cause: SuspendCause) -> _Plan:
        """A suspension the operator decides (a timeout): recorded in status with the resume request
        seen now, so that only a new one releases it (spec stays the user's)."""
        return _Plan(
            Phase.SUSPENDING,
            reason,
            message,
            actions=self._delete_pod(),
            suspended_by=cause,
            resume_request_seen=self.observed.resume_request,
        )

    def _reset_attempts_when_stable(self, plan: _Plan) -> None:
        last = self.observed.last_recreate_at
        if self.observed.recreate_attempts == 0 or last is None:
            return
        stable_at = last + self.desired.retry.stable_after
        if stable_at <= self.now:
            plan.recreate_attempts = 0
        else:
            plan.wake_at.append(stable_at)

    def _backoff_until(self) -> datetime | None:
        """When the next attempt may start, if that is still in the future."""
        attempts, last = self.observed.recreate_attempts, self.observed.last_recreate_at
        if attempts == 0 or last is None:
            return None
        due = last + self.desired.retry.delay_before_attempt(attempts)
        return due if due > self.now else None

    def _failed_while_running(self, reason: Reason, message: str) -> _Plan:
        """The pod of a running sandbox failed. A failure a fresh pod may well not repeat (the agent
        crashed or exited, an eviction) is healed while the budget lasts: the failed pod is deleted and
        then recreated like a lost one, the sandbox stays Running (Ready False, reason = the failure), so
        clients wait for it instead of seeing it fail. Anything else, or with the budget spent: Error,
        keeping the failed pod for `kubectl logs`."""
        attempts, budget = self.observed.recreate_attempts, self.desired.retry.budget
        if reason not in RETRYABLE_REASONS:
            return _Plan(Phase.ERROR, reason, message)
        if attempts >= budget:
            return _Plan(Phase.ERROR, reason, f"{message}; recreated {attempts} times already, giving up")
        message = f"{message}; replacing it"
        plan = _Plan(Phase.RUNNING, reason, message, actions=self._delete_pod())
        if self.observed.reason != reason:  # once per failure, not on every pass while it goes
            plan.events.append(EmitEvent(EventType.WARNING, reason, message))
        return plan

    def _replacing_failed_pod(self) -> bool:
        """This sandbox is Running through a failed pod's replacement (_failed_while_running): the
        status keeps the failure as its reason until the new pod is made."""
        return self.observed.phase is Phase.RUNNING and self.observed.reason in RETRYABLE_REASONS

    def _recreate_lost_pod(self) -> _Plan:
        attempts, budget = self.observed.recreate_attempts, self.desired.retry.budget
        failure = self.observed.reason if self._replacing_failed_pod() else None
        if self.refusal:
            return self._refused_error(self.refusal)
        if attempts >= budget:
            return _Plan(
                Phase.ERROR,
                Reason.RECREATE_BUDGET_EXHAUSTED,
                f"the sandbox pod disappeared and was recreated {attempts} times; giving up",
            )
        if blocker := self._pod_blockers():
            return _Plan(Phase.RUNNING, *blocker)
        if due := self._backoff_until():
            if failure:  # the failure stays the reason: it says more than the wait
                return _Plan(Phase.RUNNING, failure, self.observed.message or "", wake_at=[due])
            return _Plan(
                Phase.RUNNING,
                Reason.RECREATE_BACKOFF,
                "the sandbox pod disappeared; recreating it after a backoff",
                wake_at=[due],
            )
        if failure:
            what = f"the sandbox pod failed ({failure})"
        elif self.observed.reason == Reason.NODE_LOST:
            what = "the sandbox pod was lost with its node"
        else:
            what = "the sandbox pod disappeared"
        message = f"{what}; recreating it (attempt {attempts + 1} of {budget})"
        return _Plan(
            Phase.RUNNING,
            Reason.POD_RECREATED,
            message,
            actions=self._start_pod(),
            events=[EmitEvent(EventType.WARNING, Reason.POD_RECREATED, message)],
            recreate_attempts=attempts + 1,
            last_recreate_at=self.stamp,
        )

    def _suspending(self) -> _Plan:
        reason = self.observed.reason if self.observed.reason in _SUSPEND_REASONS else Reason.SUSPEND_REQUESTED
        if self.pod is None:
            return _Plan(Phase.SUSPENDED, reason, "the sandbox is suspended; its workspace is kept")
        return _Plan(Phase.SUSPENDING, reason, "suspending: waiting for the pod to go away", actions=self._delete_pod())

    def _suspended(self) -> _Plan:
        if self.lifetime_suspends and self._passed(self.deadlines.max_lifetime) and not self.suspend_wanted:
            # A resume asked for with the lifetime still over would only run into it again: stay, and
            # hold again, until the end moves (a resume through the gateway moves it with the request).
            return _Plan(
                Phase.SUSPENDED,
                Reason.MAX_LIFETIME,
                "cannot resume: its lifetime is over; set a later sandbox.dev/end-at (or a longer "
                "maxLifetime) with the resume request",
                suspended_by=SuspendCause.MAX_LIFETIME,
                resume_request_seen=self.observed.resume_request,
            )
        if not self.lifetime_suspends and (plan := self._max_lifetime_plan()):
            return plan
        reason = self.observed.reason if self.observed.reason in _SUSPEND_REASONS else Reason.SUSPEND_REQUESTED
        suspended = _Plan(
            Phase.SUSPENDED,
            reason,
            "the sandbox is suspended; its workspace is kept",
            actions=self._delete_pod(),
        )
        if self.suspend_wanted:
            return suspended
        if self.refusal:
            # Suspended → Error is not in the table, and the workspace is safe here: stay and say why.
            reason, message = self.refusal[0], f"cannot resume: {self.refusal[1]}"
            plan = _Plan(Phase.SUSPENDED, reason, message)
            if self.observed.reason != reason:
                plan.events.append(EmitEvent(EventType.WARNING, reason, message))
            return plan
        if self._pod_blockers():
            return suspended  # a leftover pod is deleted first; the resume follows when it is gone
        return _Plan(
            Phase.RESUMING,
            Reason.RESUME_REQUESTED,
            "resuming: creating the pod on the same workspace",
            actions=self._start_pod(),
        )

    def _resuming(self) -> _Plan:
        pod = self.pod
        if pod is not None and (failure := classify_pod_failure(pod)):
            return _Plan(Phase.ERROR, *failure)
        if self._workspace_lost():
            return _Plan(Phase.ERROR, Reason.WORKSPACE_LOST, "the workspace PVC lost its volume")
        if self.refusal:
            return self._refused_error(self.refusal)
        if pod is None:
            if blocker := self._pod_blockers():
                return _Plan(Phase.RESUMING, *blocker)
            return _Plan(
                Phase.RESUMING,
                Reason.RESUME_REQUESTED,
                "resuming: creating the pod on the same workspace",
                actions=self._start_pod(),
            )
        if pod.deleting:
            return _Plan(Phase.RESUMING, Reason.POD_TERMINATING, "waiting for the old sandbox pod to go away")
        if _pod_ready(pod):
            # A resume is activity: the idle clock restarts from here.
            return _Plan(
                Phase.RUNNING,
                Reason.RESUMED,
                "the sandbox is running again",
                actions=self._ensure_children(),
                last_activity_at=max(self.stamp, self.observed.last_activity_at or self.stamp),
                started_at=self.observed.started_at or self.stamp,  # first run of one created suspended
            )
        return _Plan(Phase.RESUMING, *_waiting_reason(pod), actions=self._ensure_children())

    def _error(self) -> _Plan:
        if plan := self._max_lifetime_plan():
            return plan
        observed = self.observed
        stay = _Plan(Phase.ERROR, observed.reason or Reason.POD_FAILED, observed.message or "the sandbox failed")
        if self.refusal:
            return self._refused_error(self.refusal)
        generation, acted_on = self.desired.generation, observed.observed_generation
        spec_changed = generation is not None and acted_on is not None and generation != acted_on
        attempts = observed.recreate_attempts
        if spec_changed:
            retry_reason, next_attempts, backoff = Reason.SPEC_CHANGED, 0, None
        elif observed.reason in _REFUSAL_REASONS:
            # The template now allows the spec (maximum raised, image or namespace allowed): not a
            # failure, so it costs no attempt.
            retry_reason, next_attempts, backoff = Reason.SPEC_CHANGED, attempts, None
        elif observed.reason in RETRYABLE_REASONS and attempts < self.desired.retry.budget:
            retry_reason, next_attempts, backoff = Reason.RETRYING, attempts + 1, self._backoff_until()
        else:
            return stay
        if self.pod is not None:
            # Same pod name: the failed pod has to go before a new one can be created.
            stay.actions = self._delete_pod()
            stay.acknowledge_generation = False
            return stay
        if backoff is not None:
            stay.wake_at.append(backoff)
            return stay
        if blocker := self._pod_blockers():
            stay.message = blocker[1]
            stay.acknowledge_generation = False
            return stay
        return _Plan(
            Phase.CREATING,
            retry_reason,
            f"retrying after {observed.reason or 'an error'}",
            # A sandbox suspended meanwhile starts nothing: Creating takes it on to Suspending.
            actions=self._ensure_children() if self.suspend_wanted else self._start_pod(),
            recreate_attempts=next_attempts,
            last_recreate_at=self.stamp if retry_reason is Reason.RETRYING else observed.last_recreate_at,
        )

    def _terminating(self) -> _Plan:
        reason = self.observed.reason or Reason.DELETED
        if self.pod is None:
            return _Plan(Phase.TERMINATED, reason, "the sandbox is terminated", terminated_at=self.stamp)
        return _Plan(Phase.TERMINATING, reason, "terminating: deleting the pod", actions=self._delete_pod())

    def _terminated(self) -> _Plan:
        plan = _Plan(
            Phase.TERMINATED,
            self.observed.reason or Reason.DELETED,
            "the sandbox is terminated",
            actions=self._delete_pod(),
            terminated_at=self.observed.terminated_at or self.stamp,
        )
        ttl = self._deadlines(self.observed.started_at, plan.terminated_at).ttl
        if self._passed(ttl):
            plan.actions.append(DeleteObject())
            plan.events.append(
                EmitEvent(EventType.NORMAL, Reason.TTL_EXPIRED, "ttlAfterTerminated passed: deleting the sandbox")
            )
        return plan

    def _deletion(self) -> _Plan:
        observed, current = self.observed, self.observed.phase
        actions = self._delete_pod()
        if observed.pvc is not None and not observed.pvc.deleting:
            actions.append(DeletePVC())
        # Children not observed are left to ownerReference garbage collection.
        if observed.service_present:
            actions.append(DeleteService())
        if observed.network_policy_present:
            actions.append(DeleteNetworkPolicy())
        pod_gone = self.pod is None
        reason: str = Reason.DELETED
        phase: Phase | None
        if current is Phase.TERMINATED:
            phase, reason = current, observed.reason or Reason.DELETED
        elif current is Phase.TERMINATING:
            phase, reason = (Phase.TERMINATED if pod_gone else current), observed.reason or Reason.DELETED
        elif is_allowed_transition(current, Phase.TERMINATING):
            phase = Phase.TERMINATING
        else:
            phase = current  # Suspending, Resuming or never reconciled: the object goes away anyway
        plan = _Plan(phase, reason, "the sandbox is being deleted", actions=actions)
        if phase is Phase.TERMINATED:
            plan.terminated_at = observed.terminated_at or self.stamp
        return plan

    # --- assembling the decision -----------------------------------------------------------------

    def _finish(self, plan: _Plan) -> Decision:
        observed, current = self.observed, self.observed.phase
        if not is_allowed_transition(current, plan.phase):
            raise IllegalTransitionError(f"{current} → {plan.phase} is not an allowed transition")
        started_at = plan.started_at or observed.started_at
        terminated_at = plan.terminated_at or observed.terminated_at
        last_activity_at = plan.last_activity_at or observed.last_activity_at
        deadlines = compute_deadlines(
            self.desired,
            created_at=observed.created_at,
            started_at=started_at,
            last_activity_at=last_activity_at,
            terminated_at=terminated_at,
        )
        phase = plan.phase
        live = phase not in (None, Phase.TERMINATING, Phase.TERMINATED)

        wakes = list(plan.wake_at)
        if live and deadlines.max_lifetime:
            wakes.append(deadlines.max_lifetime)
        if phase is Phase.RUNNING and deadlines.idle:
            wakes.append(deadlines.idle)
        if phase is Phase.TERMINATED and deadlines.ttl:
            wakes.append(deadlines.ttl)
        future = [moment for moment in wakes if moment > self.now]
        if plan.again_now:
            future.append(self.now)
        wake_at = min(future, default=None)

        events = list(plan.events)
        if phase is not None and phase != current:
            kind = EventType.WARNING if phase is Phase.ERROR else EventType.NORMAL
            events.insert(0, EmitEvent(kind, plan.reason, f"{current or 'New'} → {phase}: {plan.message}"))
        actions: list[Action] = [*plan.actions, *events]
        if wake_at is not None:
            actions.append(RequeueAfter((wake_at - self.now).total_seconds()))

        status = StatusFields(
            started_at=started_at,
            last_activity_at=last_activity_at,
            terminated_at=terminated_at,
            recreate_attempts=observed.recreate_attempts if plan.recreate_attempts is None else plan.recreate_attempts,
            last_recreate_at=plan.last_recreate_at or observed.last_recreate_at,
            expires_at=expires_at(self.desired, deadlines) if live else None,
            idle_deadline=deadlines.idle if phase is Phase.RUNNING else None,
            observed_generation=(
                self.desired.generation if plan.acknowledge_generation else observed.observed_generation
            ),
            **self._suspension(plan),
        )
        conditions, withdrawn = _conditions(
            phase, plan.reason, plan.message, self.pod, suspend_wanted=self.suspend_wanted
        )
        return Decision(
            phase=phase,
            reason=plan.reason,
            message=plan.message,
            conditions=conditions,
            withdrawn=withdrawn,
            actions=tuple(actions),
            status=status,
            wake_at=wake_at,
            fired_timeout=plan.fired_timeout if phase != current else None,
        )

    def _suspension(self, plan: _Plan) -> dict[str, Any]:
        """status.suspendedBy and status.resumeRequestSeen after this decision: why it is suspended,
        while Suspending or Suspended; nothing otherwise (a resume clears them)."""
        if plan.phase not in (Phase.SUSPENDING, Phase.SUSPENDED):
            return {"suspended_by": None, "resume_request_seen": None}
        if plan.suspended_by is not None:
            return {"suspended_by": plan.suspended_by, "resume_request_seen": plan.resume_request_seen}
        if self.timeout_held:
            return {
                "suspended_by": self.observed.suspended_by,
                "resume_request_seen": self.observed.resume_request_seen,
            }
        if self.desired.suspended:
            return {"suspended_by": SuspendCause.SPEC, "resume_request_seen": None}
        if self.desired.paused:
            return {"suspended_by": SuspendCause.REQUEST, "resume_request_seen": None}
        # Resuming is blocked (a refused template, a leftover pod): it stays what suspended it.
        return {"suspended_by": self.observed.suspended_by, "resume_request_seen": None}


def _condition(kind: ConditionType, true: bool, reason: str, message: str) -> DecidedCondition:
    return DecidedCondition(kind, ConditionStatus.TRUE if true else ConditionStatus.FALSE, reason, message)


# Phases that are a step on the way to another one: the operator is converging (kstatus InProgress).
_CONVERGING_PHASES = frozenset({Phase.CREATING, Phase.RESUMING, Phase.SUSPENDING, Phase.TERMINATING})


def convergence(phase: Phase | None, reason: str, *, ready: bool, suspend_wanted: bool) -> tuple[bool, bool]:
    """(reconciling, stalled) of a sandbox, as kstatus reads them (docs/lifecycle.md, GitOps).

    Stalled: the spec cannot be reached without someone changing something — the sandbox is in Error,
    or it is Suspended while asked to run and the template refuses the resume. Reconciling: the
    operator is on its way (a transitional phase, a Running sandbox whose pod is not ready, a Suspended
    one about to resume). Never both; neither for Running and ready, Suspended as asked, Terminated.
    """
    if phase is Phase.ERROR or (phase is Phase.SUSPENDED and reason in _REFUSAL_REASONS):
        return False, True
    if phase is None or phase in _CONVERGING_PHASES:
        return True, False
    if phase is Phase.RUNNING:
        return not ready, False
    if phase is Phase.SUSPENDED:
        return not suspend_wanted, False
    return False, False


def _conditions(
    phase: Phase | None, reason: str, message: str, pod: PodObservation | None, *, suspend_wanted: bool
) -> tuple[tuple[DecidedCondition, ...], tuple[ConditionType, ...]]:
    """The conditions of the decision, and the types withdrawn from the status.

    Ready is True only for a Running sandbox with a ready pod and False on the way there or in
    Error; a sandbox that has settled where Ready does not apply (Suspended as asked, Terminated)
    has none: kstatus reads a Ready=False without Reconciling or Stalled as InProgress forever.
    """
    # The reason of a False condition is the phase (or the cause while Running), so that
    # `kubectl wait --for=condition=Ready` failures say where the sandbox is.
    where = str(phase) if phase is not None else reason
    ready = phase is Phase.RUNNING and _pod_ready(pod)
    reconciling, stalled = convergence(phase, reason, ready=ready, suspend_wanted=suspend_wanted)
    settled = phase is Phase.TERMINATED or (phase is Phase.SUSPENDED and not (reconciling or stalled))
    conditions = (
        _condition(
            ConditionType.SUSPENDED, phase is Phase.SUSPENDED, reason if phase is Phase.SUSPENDED else where, message
        ),
        _condition(
            ConditionType.TERMINATED,
            phase is Phase.TERMINATED,
            reason if phase is Phase.TERMINATED else where,
            message,
        ),
        _condition(ConditionType.RECONCILING, reconciling, reason if reconciling else where, message),
        _condition(ConditionType.STALLED, stalled, reason if stalled else where, message),
    )
    if settled:
        return conditions, (ConditionType.READY,)
    ready_reason = reason if ready or phase is Phase.RUNNING else where
    return (_condition(ConditionType.READY, ready, ready_reason, message), *conditions), ()


def decide(desired: Desired, observed: Observed, now: datetime) -> Decision:
    """The next phase, conditions and actions for a Sandbox. Pure and deterministic.

    ``now`` must be timezone-aware, like every datetime in ``observed``.
    """
    return _Reconcile(desired, observed, now).run()
