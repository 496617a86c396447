"""Properties of decide() over arbitrary inputs and arbitrary sequences of observations."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from lifecycle_factories import T0, creates_anything, fed_back

from sandbox_operator.api import OnIdle, Phase
from sandbox_operator.lifecycle import (
    TERMINAL_PHASES,
    Decision,
    Desired,
    Observed,
    PodObservation,
    PodPhase,
    PvcObservation,
    PvcPhase,
    Reason,
    RequeueAfter,
    RetryPolicy,
    decide,
    is_allowed_transition,
)

NO_CREATE_PHASES = {Phase.TERMINATING, Phase.TERMINATED}
# Scale the example counts up for a long soak: LIFECYCLE_EXAMPLES_SCALE=20 pytest ...
SCALE = int(os.environ.get("LIFECYCLE_EXAMPLES_SCALE", "1"))

durations = st.one_of(st.none(), st.integers(0, 3 * 3600).map(lambda seconds: timedelta(seconds=seconds)))
moments = st.integers(0, 4 * 3600).map(lambda seconds: T0 + timedelta(seconds=seconds))
optional_moments = st.one_of(st.none(), moments)

pods = st.one_of(
    st.none(),
    st.builds(
        PodObservation,
        phase=st.sampled_from(PodPhase),
        ready=st.booleans(),
        deleting=st.booleans(),
        reason=st.sampled_from([None, "Evicted", "NodeLost", "UnexpectedAdmissionError"]),
        message=st.sampled_from([None, "the node was low on resource: memory"]),
        terminated_reasons=st.lists(st.sampled_from(["OOMKilled", "Error", "Completed"]), max_size=2).map(tuple),
        waiting_reasons=st.lists(
            st.sampled_from(["ContainerCreating", "ImagePullBackOff", "ErrImagePull", "InvalidImageName"]),
            max_size=2,
        ).map(tuple),
    ),
)
pvcs = st.one_of(st.none(), st.builds(PvcObservation, phase=st.sampled_from(PvcPhase), deleting=st.booleans()))
presence = st.sampled_from([None, True, False])
retry_policies = st.sampled_from(
    [
        RetryPolicy(),
        RetryPolicy(budget=0),
        RetryPolicy(budget=1, backoff=()),
        RetryPolicy(budget=5, backoff=(timedelta(seconds=1), timedelta(minutes=5))),
    ]
)
desireds = st.builds(
    Desired,
    suspended=st.booleans(),
    max_lifetime=durations,
    idle_timeout=durations,
    on_idle=st.sampled_from(OnIdle),
    ttl_after_terminated=durations,
    persistent_workspace=st.booleans(),
    resources_violation=st.sampled_from([None, "spec.resources.cpu 64 exceeds the template maximum 4"]),
    image_violation=st.sampled_from([None, None, "spec.image x is not allowed by the template's imagePolicy"]),
    namespace_violation=st.sampled_from([None, None, "SandboxTemplate t may not be used in namespace n"]),
    retry=retry_policies,
    generation=st.sampled_from([None, 1, 2, 3]),
)
observeds = st.builds(
    Observed,
    created_at=st.just(T0),
    phase=st.sampled_from([None, *Phase]),
    reason=st.sampled_from([None, *Reason]),
    deleting=st.booleans(),
    started_at=optional_moments,
    last_activity_at=optional_moments,
    terminated_at=optional_moments,
    recreate_attempts=st.integers(0, 6),
    last_recreate_at=optional_moments,
    observed_generation=st.sampled_from([None, 1, 2, 3]),
    pod=pods,
    pvc=pvcs,
    service_present=presence,
    network_policy_present=presence,
)


def _refused(desired: Desired) -> bool:
    """The template refuses the spec: nothing may be created."""
    return any((desired.resources_violation, desired.image_violation, desired.namespace_violation))


def _check_requeue(decision: Decision, now: datetime) -> None:
    requeues = [action for action in decision.actions if isinstance(action, RequeueAfter)]
    if decision.wake_at is None:
        assert requeues == []
    else:
        assert decision.wake_at >= now
        assert requeues == [RequeueAfter((decision.wake_at - now).total_seconds())]


@dataclass(frozen=True)
class World:
    """One reconcile's worth of outside facts: children, spec, activity, time passing."""

    pod: PodObservation | None
    pvc: PvcObservation | None
    service_present: bool | None
    network_policy_present: bool | None
    deleting: bool
    desired: Desired
    activity: bool
    advance: int


worlds = st.builds(
    World,
    pod=pods,
    pvc=pvcs,
    service_present=presence,
    network_policy_present=presence,
    deleting=st.integers(0, 9).map(lambda roll: roll == 0),  # deletion is rare, and for good
    desired=desireds,
    activity=st.booleans(),
    advance=st.sampled_from([0, 1, 5, 30, 300, 900, 1800, 3600]),
)


@settings(max_examples=300 * SCALE, deadline=None)
@given(st.lists(worlds, min_size=1, max_size=25))
def test_any_sequence_only_takes_allowed_transitions(steps: list[World]) -> None:
    now = T0
    current = Observed(created_at=T0)
    decision: Decision | None = None
    for step in steps:
        now += timedelta(seconds=step.advance)
        base = fed_back(current, decision) if decision is not None else current
        current = replace(
            base,
            pod=step.pod,
            pvc=step.pvc,
            service_present=step.service_present,
            network_policy_present=step.network_policy_present,
            deleting=base.deleting or step.deleting,  # deletion is not undone
            last_activity_at=now if step.activity else base.last_activity_at,
        )
        desired = step.desired
        decision = decide(desired, current, now)
        assert is_allowed_transition(current.phase, decision.phase), (current.phase, decision.phase)
        if current.phase in NO_CREATE_PHASES or _refused(desired) or current.deleting:
            assert not creates_anything(decision)
        _check_requeue(decision, now)


@settings(max_examples=500 * SCALE, deadline=None)
@given(desireds, observeds, moments)
def test_every_single_step_is_allowed(desired: Desired, observed: Observed, now: datetime) -> None:
    decision = decide(desired, observed, now)
    assert is_allowed_transition(observed.phase, decision.phase)
    assert decision.phase is not None or observed.phase is None


@settings(max_examples=300 * SCALE, deadline=None)
@given(desireds, observeds, moments)
def test_decide_is_deterministic(desired: Desired, observed: Observed, now: datetime) -> None:
    first = decide(desired, observed, now)
    assert decide(copy.deepcopy(desired), copy.deepcopy(observed), now) == first
    assert decide(desired, observed, now) == first


@settings(max_examples=500 * SCALE, deadline=None)
@given(desireds, observeds, moments)
def test_no_creation_when_ending_or_over_the_maximum(desired: Desired, observed: Observed, now: datetime) -> None:
    decision = decide(desired, observed, now)
    if observed.phase in NO_CREATE_PHASES or _refused(desired) or observed.deleting:
        assert not creates_anything(decision)
    if decision.phase in NO_CREATE_PHASES:
        assert not creates_anything(decision)


@settings(max_examples=500 * SCALE, deadline=None)
@given(desireds, observeds, moments)
def test_requeue_deadline_is_never_in_the_past(desired: Desired, observed: Observed, now: datetime) -> None:
    decision = decide(desired, observed, now)
    if decision.phase not in TERMINAL_PHASES:
        assert decision.wake_at is None or decision.wake_at >= now
    _check_requeue(decision, now)


@settings(max_examples=300 * SCALE, deadline=None)
@given(desireds, observeds, moments)
def test_conditions_agree_with_the_phase(desired: Desired, observed: Observed, now: datetime) -> None:
    decision = decide(desired, observed, now)
    statuses = {str(condition.type): str(condition.status) for condition in decision.conditions}
    assert statuses["Suspended"] == ("True" if decision.phase is Phase.SUSPENDED else "False")
    assert statuses["Terminated"] == ("True" if decision.phase is Phase.TERMINATED else "False")
    if statuses.get("Ready") == "True":
        assert decision.phase is Phase.RUNNING
