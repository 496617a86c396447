"""Builders of lifecycle inputs for the tests: a sandbox that is fine unless told otherwise."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sandbox_operator.api import Phase
from sandbox_operator.lifecycle import (
    Action,
    CreatePod,
    Decision,
    Desired,
    EmitEvent,
    EnsureNetworkPolicy,
    EnsurePVC,
    EnsureService,
    Observed,
    PodObservation,
    PodPhase,
    PvcObservation,
    PvcPhase,
    RequeueAfter,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)

READY_POD = PodObservation(phase=PodPhase.RUNNING, ready=True)
PENDING_POD = PodObservation(phase=PodPhase.PENDING)
BOUND_PVC = PvcObservation(phase=PvcPhase.BOUND)


def pod(phase: PodPhase = PodPhase.RUNNING, **fields: Any) -> PodObservation:
    return PodObservation(phase=phase, **fields)


def desired(**fields: Any) -> Desired:
    """A sandbox that asks for everything there is (a Service too: the opt-in path is the longer one)."""
    return Desired(**{"max_lifetime": HOUR, "idle_timeout": timedelta(minutes=30), "service": True, **fields})


def observed(phase: Phase | None, **fields: Any) -> Observed:
    """All children present and fine; a Running-ish sandbox started at T0 + 5s."""
    defaults: dict[str, Any] = {
        "created_at": T0,
        "phase": phase,
        "pvc": BOUND_PVC,
        "service_present": True,
        "network_policy_present": True,
    }
    if phase not in (None, Phase.CREATING):
        defaults["started_at"] = T0 + timedelta(seconds=5)
    if phase in (Phase.RUNNING, Phase.RESUMING, Phase.CREATING, Phase.SUSPENDING, Phase.TERMINATING):
        defaults["pod"] = READY_POD
    return Observed(**{**defaults, **fields})


def at(seconds: float = 0, minutes: float = 0) -> datetime:
    return T0 + timedelta(seconds=seconds, minutes=minutes)


def work(decision: Decision) -> list[Action]:
    """The actions that change the cluster (no events, no requeue)."""
    return [action for action in decision.actions if not isinstance(action, EmitEvent | RequeueAfter)]


def creates_anything(decision: Decision) -> bool:
    return any(
        isinstance(action, CreatePod | EnsurePVC | EnsureService | EnsureNetworkPolicy) for action in decision.actions
    )


def events(decision: Decision) -> list[EmitEvent]:
    return [action for action in decision.actions if isinstance(action, EmitEvent)]


def requeue(decision: Decision) -> float | None:
    found = [action.seconds for action in decision.actions if isinstance(action, RequeueAfter)]
    assert len(found) <= 1
    return found[0] if found else None


def condition(decision: Decision, kind: str) -> tuple[str, str]:
    (match,) = [item for item in decision.conditions if item.type == kind]
    return match.status, match.reason


def fed_back(previous: Observed, decision: Decision) -> Observed:
    """The Observed of the next reconcile: the decision's status written back."""
    status = decision.status
    return replace(
        previous,
        phase=decision.phase,
        reason=decision.reason,
        message=decision.message,
        started_at=status.started_at,
        last_activity_at=status.last_activity_at,
        terminated_at=status.terminated_at,
        recreate_attempts=status.recreate_attempts,
        last_recreate_at=status.last_recreate_at,
        observed_generation=status.observed_generation,
        suspended_by=status.suspended_by,
        resume_request_seen=status.resume_request_seen,
    )
