"""Read the lifecycle's observations out of Kubernetes objects (plain camelCase dicts, as the API
server or a kopf index hands them over), and Desired/Observed out of the API models.

Pure: the controller fetches the objects, these functions only look at them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sandbox_operator.api import (
    Phase,
    Sandbox,
    SandboxTemplate,
    capped_lifetime,
    image_violation,
    namespace_violation,
    parse_duration,
    resolve_resources,
    resolve_service,
    resolve_timeouts,
)
from sandbox_operator.api.names import END_AT_ANNOTATION, PAUSED_ANNOTATION, RESUME_REQUEST_ANNOTATION
from sandbox_operator.lifecycle.deadlines import compute_deadlines
from sandbox_operator.lifecycle.status import parse_time
from sandbox_operator.lifecycle.types import (
    ConditionType,
    Desired,
    NodeObservation,
    Observed,
    PodObservation,
    PodPhase,
    PvcObservation,
    PvcPhase,
    RetryPolicy,
)

__all__ = [
    "desired_from",
    "idle_deadline_passed",
    "node_observation",
    "node_to_check",
    "observed_from",
    "pod_observation",
    "pvc_observation",
    "serving_pod_ip",
    "with_activity",
    "with_node",
]


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _container_reasons(
    statuses: Iterable[Mapping[str, Any]],
) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """The terminated reasons, the terminated exit codes and the waiting reasons, each once."""
    terminated: list[str] = []
    exit_codes: list[int] = []
    waiting: list[str] = []
    for container in statuses:
        for state_key in ("state", "lastState"):
            state = _mapping(_mapping(container.get(state_key)).get("terminated"))
            reason, code = state.get("reason"), state.get("exitCode")
            if isinstance(reason, str) and reason not in terminated:
                terminated.append(reason)
            if isinstance(code, int) and not isinstance(code, bool) and code not in exit_codes:
                exit_codes.append(code)
        reason = _mapping(_mapping(container.get("state")).get("waiting")).get("reason")
        if isinstance(reason, str) and reason not in waiting:
            waiting.append(reason)
    return tuple(terminated), tuple(exit_codes), tuple(waiting)


UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"  # the node lifecycle controller's taint


def _unreachable_toleration(spec: Mapping[str, Any]) -> int | None:
    for toleration in _list(spec.get("tolerations")):
        if toleration.get("key") == UNREACHABLE_TAINT and toleration.get("effect") == "NoExecute":
            seconds = toleration.get("tolerationSeconds")
            return seconds if isinstance(seconds, int) and not isinstance(seconds, bool) else None
    return None


def node_to_check(observed: Observed) -> str | None:
    """The node whose readiness the lifecycle needs: that of a bound pod that is not ready or is
    being deleted (a node that stopped reporting explains both). A ready pod needs no lookup."""
    pod = observed.pod
    if pod is None or pod.node_name is None or (pod.ready and not pod.deleting):
        return None
    return pod.node_name


def with_node(observed: Observed, node: NodeObservation | None) -> Observed:
    """``observed`` with its pod's node as looked up (None: unknown, which is not lost)."""
    if observed.pod is None or node is None:
        return observed
    return replace(observed, pod=replace(observed.pod, node=node))


def node_observation(node: Mapping[str, Any]) -> NodeObservation:
    """The facts the lifecycle needs from a Node object."""
    name = str(_mapping(node.get("metadata")).get("name") or "")
    for condition in _list(_mapping(node.get("status")).get("conditions")):
        if condition.get("type") == "Ready":
            reason = condition.get("reason")
            return NodeObservation(
                name=name,
                ready=condition.get("status") == "True",
                reason=reason if isinstance(reason, str) else None,
                since=parse_time(condition.get("lastTransitionTime")),
            )
    return NodeObservation(name=name, ready=False, reason="NoReadyCondition")


def pod_observation(pod: Mapping[str, Any]) -> PodObservation:
    """The facts the lifecycle needs from a Pod object."""
    metadata, spec, status = _mapping(pod.get("metadata")), _mapping(pod.get("spec")), _mapping(pod.get("status"))
    try:
        phase = PodPhase(status.get("phase") or PodPhase.PENDING)
    except ValueError:
        phase = PodPhase.UNKNOWN
    ready = any(
        condition.get("type") == "Ready" and condition.get("status") == "True"
        for condition in _list(status.get("conditions"))
    )
    containers = [*_list(status.get("initContainerStatuses")), *_list(status.get("containerStatuses"))]
    terminated, exit_codes, waiting = _container_reasons(containers)
    reason, message = status.get("reason"), status.get("message")
    return PodObservation(
        phase=phase,
        ready=ready,
        deleting=metadata.get("deletionTimestamp") is not None,
        reason=reason if isinstance(reason, str) else None,
        message=message if isinstance(message, str) else None,
        terminated_reasons=terminated,
        exit_codes=exit_codes,
        waiting_reasons=waiting,
        deletion_due=parse_time(metadata.get("deletionTimestamp")),
        node_name=node_name if isinstance(node_name := spec.get("nodeName"), str) and node_name else None,
        unreachable_toleration=_unreachable_toleration(spec),
    )


def serving_pod_ip(pod: Mapping[str, Any] | None) -> str | None:
    """The pod IP clients may be sent to (status.podIP of a Running sandbox): a Running pod's that is
    not being deleted. A failed pod keeps its IP in its status, but nothing answers there any more:
    clients (the gateway) wait for the pod that replaces it instead of calling a dead agent."""
    if pod is None or _mapping(pod.get("metadata")).get("deletionTimestamp") is not None:
        return None
    status = _mapping(pod.get("status"))
    ip = status.get("podIP")
    return ip if status.get("phase") == PodPhase.RUNNING and isinstance(ip, str) and ip else None


def pvc_observation(pvc: Mapping[str, Any]) -> PvcObservation:
    """The facts the lifecycle needs from a PersistentVolumeClaim object."""
    metadata, status = _mapping(pvc.get("metadata")), _mapping(pvc.get("status"))
    try:
        phase = PvcPhase(status.get("phase") or PvcPhase.PENDING)
    except ValueError:
        phase = PvcPhase.PENDING
    return PvcObservation(phase=phase, deleting=metadata.get("deletionTimestamp") is not None)


def _seconds(value: int) -> timedelta | None:
    return timedelta(seconds=value) if value else None


RESUME_REQUEST_MAX = 256  # status.resumeRequestSeen's bound: longer annotation values compare by prefix


def resume_request(sandbox: Sandbox) -> str | None:
    """The sandbox.dev/resume-request annotation, cut to what status.resumeRequestSeen holds."""
    value = (sandbox.metadata.annotations or {}).get(RESUME_REQUEST_ANNOTATION)
    return None if value is None else value[:RESUME_REQUEST_MAX]


def requested_end(sandbox: Sandbox, template: SandboxTemplate) -> datetime | None:
    """The sandbox.dev/end-at annotation as a time, no later than the template's maxLifetimeLimit
    allows from creation; None when absent or not an RFC 3339 time (then spec.timeouts decide)."""
    end = parse_time((sandbox.metadata.annotations or {}).get(END_AT_ANNOTATION))
    created = sandbox.metadata.creation_timestamp
    if end is None or created is None or template.spec.timeouts.max_lifetime_limit is None:
        return end
    latest = _aware(created) + timedelta(seconds=capped_lifetime(0, template.spec))
    return min(end, latest)


def desired_from(sandbox: Sandbox, template: SandboxTemplate, retry: RetryPolicy | None = None) -> Desired:
    """Desired state from the spec, with the template's defaults, limits and policies applied, and
    the API clients' requests (annotations: pause, end)."""
    spec, template_spec = sandbox.spec, template.spec
    timeouts = resolve_timeouts(spec, template_spec)
    resources = resolve_resources(spec, template_spec)
    ttl = spec.ttl_after_terminated
    return Desired(
        suspended=spec.suspended,
        paused=(sandbox.metadata.annotations or {}).get(PAUSED_ANNOTATION) == "true",
        max_lifetime=_seconds(timeouts.max_lifetime),
        end_at=requested_end(sandbox, template),
        idle_timeout=_seconds(timeouts.idle),
        on_idle=spec.on_idle,
        on_lifetime_end=spec.on_lifetime_end,
        ttl_after_terminated=None if ttl is None else timedelta(seconds=parse_duration(ttl)),
        persistent_workspace=template_spec.persistence.enabled,
        service=resolve_service(spec, template_spec),
        resources_violation=resources.violation_message,
        image_violation=image_violation(spec, template_spec),
        namespace_violation=namespace_violation(
            sandbox.metadata.namespace or "", template.metadata.name or spec.template, template_spec
        ),
        retry=retry or RetryPolicy(),
        generation=sandbox.metadata.generation,
    )


def observed_from(
    sandbox: Sandbox,
    *,
    pod: Mapping[str, Any] | None,
    pvc: Mapping[str, Any] | None,
    service_present: bool | None = None,
    network_policy_present: bool | None = None,
) -> Observed:
    """Observed state from the Sandbox (metadata and status) and its children as seen.

    ``pod``/``pvc`` are the child objects (None when absent). Children that are not watched can be
    passed as None ("unknown"): the lifecycle then asks for idempotent ensures. The pod's node is
    added by with_node when node_to_check asks for it.
    """
    metadata, status = sandbox.metadata, sandbox.status
    if metadata.creation_timestamp is None:
        raise ValueError("the Sandbox has no metadata.creationTimestamp: pass the object as the API server returns it")
    # terminatedAt, recreateAttempts and lastRecreateAt are not in the v1alpha1 status model yet; read
    # them when present, and fall back to the Terminated condition for the termination time.
    terminated_at = parse_time(getattr(status, "terminated_at", None))
    terminated = status.condition(ConditionType.TERMINATED)
    if terminated_at is None and terminated is not None and terminated.status == "True":
        terminated_at = terminated.last_transition_time
    attempts = getattr(status, "recreate_attempts", None)
    return Observed(
        created_at=_aware(metadata.creation_timestamp),
        phase=status.phase,
        reason=status.reason,
        message=status.message,
        deleting=metadata.deletion_timestamp is not None,
        started_at=_aware_or_none(status.started_at),
        last_activity_at=_aware_or_none(status.last_activity_at),
        terminated_at=_aware_or_none(terminated_at),
        recreate_attempts=attempts if isinstance(attempts, int) else 0,
        last_recreate_at=parse_time(getattr(status, "last_recreate_at", None)),
        observed_generation=status.observed_generation,
        suspended_by=status.suspended_by,
        resume_request_seen=status.resume_request_seen,
        resume_request=resume_request(sandbox),
        pod=pod_observation(pod) if pod is not None else None,
        pvc=pvc_observation(pvc) if pvc is not None else None,
        service_present=service_present,
        network_policy_present=network_policy_present,
    )


def _aware(moment: datetime) -> datetime:
    parsed = parse_time(moment)
    assert parsed is not None  # a datetime always parses
    return parsed


def _aware_or_none(moment: datetime | None) -> datetime | None:
    return parse_time(moment)


def idle_deadline_passed(desired: Desired, observed: Observed, now: datetime) -> bool:
    """The idle timeout would fire now on what the status says. Status carries activity only as
    often as the usage collector writes it, so this is when to ask the agent itself (with_activity)."""
    if observed.phase is not Phase.RUNNING or observed.deleting:
        return False
    idle = compute_deadlines(
        desired,
        created_at=observed.created_at,
        started_at=observed.started_at,
        last_activity_at=observed.last_activity_at,
        terminated_at=observed.terminated_at,
    ).idle
    return idle is not None and idle <= now


def with_activity(observed: Observed, activity: datetime | None) -> Observed:
    """``observed`` with the agent's own last activity when it is newer than the status's (whole
    seconds, like every time the status holds)."""
    if activity is None:
        return observed
    mark = activity.replace(microsecond=0)
    if observed.last_activity_at is not None and mark <= observed.last_activity_at:
        return observed
    return replace(observed, last_activity_at=mark)
