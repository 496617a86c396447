"""The vocabulary of the lifecycle: what decide() reads (Desired, Observed) and returns (Decision).

Everything here is an immutable value. The controller builds Desired from the Sandbox spec and its
SandboxTemplate, Observed from the Sandbox status and the children it sees, and carries out the
Decision's actions in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from sandbox_operator.api import ConditionStatus, OnIdle, Phase, SuspendCause
from sandbox_operator.api.names import ConditionType, Reason

__all__ = [
    "Action",
    "ConditionStatus",
    "ConditionType",
    "CreatePod",
    "DecidedCondition",
    "Decision",
    "DeleteNetworkPolicy",
    "DeleteObject",
    "DeletePVC",
    "DeletePod",
    "DeleteService",
    "Desired",
    "EmitEvent",
    "EnsureNetworkPolicy",
    "EnsurePVC",
    "EnsureService",
    "EventType",
    "ForceDeletePod",
    "NodeObservation",
    "Observed",
    "OnIdle",
    "PodObservation",
    "PodPhase",
    "PvcObservation",
    "PvcPhase",
    "Reason",
    "RequeueAfter",
    "RetryPolicy",
    "StatusFields",
    "SuspendCause",
    "TimeoutKind",
]


class TimeoutKind(StrEnum):
    """A timeout that fired (the ``kind`` label of sandbox_operator_timeouts_total)."""

    IDLE = "idle"
    MAX_LIFETIME = "max_lifetime"


class PodPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNKNOWN = "Unknown"


class PvcPhase(StrEnum):
    PENDING = "Pending"
    BOUND = "Bound"
    LOST = "Lost"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeObservation:
    """The node a sandbox pod is bound to, as far as the lifecycle cares: does it still report."""

    name: str
    ready: bool  # its Ready condition is True
    reason: str | None = None  # of the Ready condition, e.g. "NodeStatusUnknown" when it stopped reporting
    since: datetime | None = None  # the Ready condition's lastTransitionTime


@dataclass(frozen=True, slots=True, kw_only=True)
class PodObservation:
    """The few facts about the sandbox Pod that the lifecycle looks at (see observe.pod_observation)."""

    phase: PodPhase
    ready: bool = False
    deleting: bool = False
    # pod.status.reason, e.g. "Evicted", "NodeLost", "UnexpectedAdmissionError".
    reason: str | None = None
    message: str | None = None
    # Reasons of containers whose state (or lastState) is terminated, e.g. "OOMKilled", "Error".
    terminated_reasons: tuple[str, ...] = ()
    # The distinct exit codes of those terminated states (state before lastState), e.g. 137 for SIGKILL.
    exit_codes: tuple[int, ...] = ()
    # Reasons of containers that are waiting, e.g. "ImagePullBackOff", "ContainerCreating".
    waiting_reasons: tuple[str, ...] = ()
    # metadata.deletionTimestamp: when a deletion's grace period ends (the kubelet confirms before).
    deletion_due: datetime | None = None
    node_name: str | None = None  # spec.nodeName: the node it is bound to
    # That node, when it was looked up (observe.node_to_check, observe.with_node).
    node: NodeObservation | None = None
    # tolerationSeconds of the pod's NoExecute toleration of node.kubernetes.io/unreachable: how long
    # Kubernetes leaves it on a node that stopped reporting before evicting it.
    unreachable_toleration: int | None = None

    @property
    def node_lost(self) -> bool:
        return self.node is not None and not self.node.ready


@dataclass(frozen=True, slots=True, kw_only=True)
class PvcObservation:
    phase: PvcPhase
    deleting: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often a lost or failed pod is replaced before the sandbox stays in Error.

    ``backoff[k]`` is the wait after the previous attempt before attempt ``k + 1`` (k = attempts so
    far); the last entry repeats. After ``stable_after`` of a ready pod the attempt count resets, so a
    long-lived sandbox losing a node once a week does not end up in Error.
    """

    budget: int = 3
    backoff: tuple[timedelta, ...] = (timedelta(0), timedelta(seconds=10), timedelta(seconds=30))
    stable_after: timedelta = timedelta(minutes=10)

    def delay_before_attempt(self, attempts_so_far: int) -> timedelta:
        if not self.backoff:
            return timedelta(0)
        return self.backoff[min(attempts_so_far, len(self.backoff) - 1)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Desired:
    """What the spec (with template defaults applied) asks for.

    Timeouts of None (or zero) mean "no limit"; ``ttl_after_terminated`` None keeps a Terminated
    object until someone deletes it, zero deletes it as soon as it is Terminated.
    """

    suspended: bool = False
    # The sandbox.dev/paused annotation says true: an API client (E2B pause) suspended it.
    paused: bool = False
    max_lifetime: timedelta | None = None
    # The sandbox.dev/end-at annotation (E2B set_timeout), within the template's maxLifetimeLimit:
    # it replaces creation + max_lifetime as the end.
    end_at: datetime | None = None
    idle_timeout: timedelta | None = None
    on_idle: OnIdle = OnIdle.SUSPEND
    # What the end of the lifetime does (spec.onLifetimeEnd): terminate, or suspend (E2B's autoPause).
    on_lifetime_end: OnIdle = OnIdle.TERMINATE
    ttl_after_terminated: timedelta | None = None
    # False when the template has no persistence: no PVC, the workspace is an emptyDir.
    persistent_workspace: bool = True
    # A headless Service is wanted (api.resolve_service: spec.network.service, else the template's).
    service: bool = False
    # Set when spec.resources exceed the template maximum (api.resolve_resources): a human
    # message naming the field. No pod is ever created while this is set.
    resources_violation: str | None = None
    # Set when the template's imagePolicy refuses the sandbox's image (api.image_violation), and when
    # its allowedNamespaces leave out the sandbox's namespace (api.namespace_violation): no child is
    # made while either is set, like resources_violation.
    image_violation: str | None = None
    namespace_violation: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # metadata.generation: a spec change lets an Error sandbox try again with a fresh budget.
    generation: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Observed:
    """What the operator sees: the Sandbox's own status and metadata, and its children.

    ``service_present`` / ``network_policy_present``: None means "not observed"; decide() then asks
    for an (idempotent) ensure while the sandbox needs the child. Present means present and current
    (as built now); for a Service the sandbox does not want, present at all (it is deleted).
    """

    created_at: datetime
    phase: Phase | None = None
    reason: str | None = None
    message: str | None = None
    deleting: bool = False
    started_at: datetime | None = None
    last_activity_at: datetime | None = None
    terminated_at: datetime | None = None
    recreate_attempts: int = 0
    last_recreate_at: datetime | None = None
    observed_generation: int | None = None
    # status.suspendedBy and status.resumeRequestSeen as last written, and the sandbox.dev/resume-request
    # annotation now: an idle suspension holds while the two values are the same.
    suspended_by: SuspendCause | None = None
    resume_request_seen: str | None = None
    resume_request: str | None = None
    pod: PodObservation | None = None
    pvc: PvcObservation | None = None
    service_present: bool | None = None
    network_policy_present: bool | None = None


# --- actions -------------------------------------------------------------------------------------
# The controller executes them in the order given and stops at the first failure, except the Service
# and the NetworkPolicy: those are written while the pod is (so today a new pod can start before its
# policy exists). Creates treat 409 AlreadyExists as success, deletes treat 404 as success.


@dataclass(frozen=True, slots=True)
class EnsureNetworkPolicy:
    """Create the sandbox NetworkPolicy (resources.build_network_policy)."""


@dataclass(frozen=True, slots=True)
class EnsurePVC:
    """Create the workspace PVC (resources.build_pvc)."""


@dataclass(frozen=True, slots=True)
class EnsureService:
    """Create the headless Service (resources.build_service)."""


@dataclass(frozen=True, slots=True)
class CreatePod:
    """Create the sandbox Pod (resources.build_pod)."""


@dataclass(frozen=True, slots=True)
class DeletePod:
    """Delete the sandbox Pod (the workspace PVC and Service stay)."""


@dataclass(frozen=True, slots=True)
class ForceDeletePod:
    """Delete the sandbox Pod with grace 0: it is being deleted on a node that stopped reporting,
    past its grace period, so no kubelet will ever confirm the deletion."""


@dataclass(frozen=True, slots=True)
class DeletePVC:
    """Delete the workspace PVC (only when the Sandbox itself is being deleted)."""


@dataclass(frozen=True, slots=True)
class DeleteService:
    """Delete the Service (only when the Sandbox itself is being deleted)."""


@dataclass(frozen=True, slots=True)
class DeleteNetworkPolicy:
    """Delete the NetworkPolicy (only when the Sandbox itself is being deleted)."""


@dataclass(frozen=True, slots=True)
class DeleteObject:
    """Delete the Sandbox object itself: ttlAfterTerminated has passed."""


@dataclass(frozen=True, slots=True)
class RequeueAfter:
    """Reconcile again after this many seconds (0 = at once), even if nothing else happens."""

    seconds: float


class EventType(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


@dataclass(frozen=True, slots=True)
class EmitEvent:
    """Post a Kubernetes Event on the Sandbox."""

    type: EventType
    reason: str
    message: str


Action = (
    EnsureNetworkPolicy
    | EnsurePVC
    | EnsureService
    | CreatePod
    | DeletePod
    | ForceDeletePod
    | DeletePVC
    | DeleteService
    | DeleteNetworkPolicy
    | DeleteObject
    | RequeueAfter
    | EmitEvent
)


# --- result --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecidedCondition:
    """A condition as decide() sets it; lastTransitionTime is added by status.merge_conditions."""

    type: ConditionType
    status: ConditionStatus
    reason: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusFields:
    """The status timestamps and counters after this decision (written by status.status_patch)."""

    started_at: datetime | None
    last_activity_at: datetime | None
    terminated_at: datetime | None
    recreate_attempts: int
    last_recreate_at: datetime | None
    expires_at: datetime | None
    idle_deadline: datetime | None
    observed_generation: int | None
    suspended_by: SuspendCause | None = None
    resume_request_seen: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The outcome of one reconcile.

    ``phase`` is None only for an object that was deleted before it was ever given a phase.
    ``wake_at`` is the earliest moment something will change without any outside event (a deadline,
    a backoff, or ``now`` when the next step can follow at once); the deadline scheduler wakes the
    object then. It is never in the past and matches the RequeueAfter action, if any.
    """

    phase: Phase | None
    reason: str
    message: str
    conditions: tuple[DecidedCondition, ...]
    actions: tuple[Action, ...]
    status: StatusFields
    wake_at: datetime | None
    # The timeout that caused this decision's transition; None for every later step that keeps its
    # reason (Suspending → Suspended after an idle timeout is not a second timeout).
    fired_timeout: TimeoutKind | None = None
    # Condition types the lifecycle owns that do not apply after this decision: removed from the
    # status (Ready of a sandbox settled Suspended as asked, or Terminated; docs/lifecycle.md).
    withdrawn: tuple[ConditionType, ...] = ()

    def has_action(self, kind: type[Action]) -> bool:
        return any(isinstance(action, kind) for action in self.actions)
