"""decide(), behaviour by behaviour (docs/lifecycle.md)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from lifecycle_factories import (
    BOUND_PVC,
    HOUR,
    PENDING_POD,
    READY_POD,
    T0,
    at,
    condition,
    creates_anything,
    desired,
    events,
    fed_back,
    observed,
    pod,
    requeue,
    work,
)

from sandbox_operator.api import OnIdle, Phase
from sandbox_operator.api.names import ConditionType
from sandbox_operator.lifecycle import (
    RETRYABLE_REASONS,
    CreatePod,
    DeleteNetworkPolicy,
    DeleteObject,
    DeletePod,
    DeletePVC,
    DeleteService,
    EnsureNetworkPolicy,
    EnsurePVC,
    EnsureService,
    EventType,
    PodPhase,
    PvcObservation,
    PvcPhase,
    Reason,
    RetryPolicy,
    SuspendCause,
    classify_pod_failure,
    decide,
    status_patch,
)

P = Phase
START_ALL = [EnsureNetworkPolicy(), EnsurePVC(), EnsureService(), CreatePod()]


# --- creating -------------------------------------------------------------------------------------


def test_new_sandbox_creates_children_network_policy_first() -> None:
    decision = decide(desired(), observed(None, pvc=None, service_present=None, network_policy_present=None), T0)
    assert decision.phase is P.CREATING
    assert work(decision) == START_ALL
    (event,) = events(decision)
    assert (event.type, event.reason) == (EventType.NORMAL, Reason.CREATING)
    assert requeue(decision) == HOUR.total_seconds()  # next: maxLifetime
    assert decision.wake_at == T0 + HOUR
    assert decision.status.expires_at == T0 + HOUR


def test_without_persistence_no_pvc_is_asked_for() -> None:
    decision = decide(desired(persistent_workspace=False), observed(None, pvc=None, service_present=False), T0)
    assert work(decision) == [EnsureService(), CreatePod()]


def test_creating_waits_for_a_pending_pod() -> None:
    decision = decide(desired(), observed(P.CREATING, pod=PENDING_POD), at(1))
    assert (decision.phase, decision.reason) == (P.CREATING, Reason.POD_PENDING)
    assert work(decision) == []
    assert condition(decision, "Ready") == ("False", "Creating")


def test_creating_reports_image_pull_back_off_without_failing() -> None:
    pulling = pod(PodPhase.PENDING, waiting_reasons=("ImagePullBackOff",))
    decision = decide(desired(), observed(P.CREATING, pod=pulling), at(1))
    assert (decision.phase, decision.reason) == (P.CREATING, Reason.IMAGE_PULL_BACK_OFF)


def test_creating_waits_for_readiness() -> None:
    decision = decide(desired(), observed(P.CREATING, pod=pod(PodPhase.RUNNING, ready=False)), at(1))
    assert (decision.phase, decision.reason) == (P.CREATING, Reason.POD_NOT_READY)


def test_ready_pod_means_running_started() -> None:
    now = at(3.5)
    decision = decide(desired(), observed(P.CREATING, pod=READY_POD), now)
    assert (decision.phase, decision.reason) == (P.RUNNING, Reason.STARTED)
    assert decision.status.started_at == at(3)  # whole seconds, as the API server stores them
    assert decision.status.idle_deadline == at(3) + timedelta(minutes=30)
    assert condition(decision, "Ready") == ("True", Reason.STARTED)
    assert condition(decision, "Suspended") == ("False", "Running")
    assert decision.wake_at == decision.status.idle_deadline


def test_running_recreates_a_deleted_service_and_policy() -> None:
    decision = decide(desired(), observed(P.RUNNING, service_present=False, network_policy_present=False), at(10))
    assert decision.phase is P.RUNNING
    assert work(decision) == [EnsureNetworkPolicy(), EnsureService()]


def test_a_running_sandbox_that_is_fine_needs_nothing() -> None:
    decision = decide(desired(), observed(P.RUNNING), at(10))
    assert work(decision) == []
    assert events(decision) == []
    assert condition(decision, "Ready") == ("True", Reason.STARTED)


# --- suspend / resume -----------------------------------------------------------------------------


def test_suspend_deletes_only_the_pod() -> None:
    decision = decide(desired(suspended=True), observed(P.RUNNING), at(60))
    assert (decision.phase, decision.reason) == (P.SUSPENDING, Reason.SUSPEND_REQUESTED)
    assert work(decision) == [DeletePod()]
    assert condition(decision, "Ready") == ("False", "Suspending")


def test_suspending_waits_for_the_pod_then_is_suspended() -> None:
    going = observed(P.SUSPENDING, reason=Reason.SUSPEND_REQUESTED, pod=pod(deleting=True))
    waiting = decide(desired(suspended=True), going, at(61))
    assert waiting.phase is P.SUSPENDING
    assert work(waiting) == []  # no second delete
    done = decide(desired(suspended=True), replace(going, pod=None), at(62))
    assert (done.phase, done.reason) == (P.SUSPENDED, Reason.SUSPEND_REQUESTED)
    assert work(done) == []
    assert condition(done, "Suspended") == ("True", Reason.SUSPEND_REQUESTED)
    assert done.status.idle_deadline is None


def test_resume_creates_the_pod_on_the_same_workspace() -> None:
    decision = decide(desired(suspended=False), observed(P.SUSPENDED), at(120))
    assert (decision.phase, decision.reason) == (P.RESUMING, Reason.RESUME_REQUESTED)
    assert work(decision) == [CreatePod()]  # the PVC, Service and policy are still there


def test_resumed_pod_is_running_with_a_fresh_idle_clock() -> None:
    resuming = observed(P.RESUMING, last_activity_at=at(10))
    decision = decide(desired(), resuming, at(300))
    assert (decision.phase, decision.reason) == (P.RUNNING, Reason.RESUMED)
    assert decision.status.last_activity_at == at(300)
    assert decision.status.idle_deadline == at(300) + timedelta(minutes=30)


def test_a_sandbox_created_suspended_never_starts_and_resumes_like_any_other() -> None:
    new = observed(None, pvc=None, service_present=False, network_policy_present=False)
    entered = decide(desired(suspended=True, persistent_workspace=True), new, at(1))
    assert entered.phase is P.CREATING  # a new object enters Creating first, as any other
    creating = fed_back(new, entered)
    decision = decide(desired(suspended=True, persistent_workspace=True), creating, at(2))
    assert (decision.phase, decision.reason) == (P.SUSPENDING, Reason.SUSPEND_REQUESTED)
    assert CreatePod() not in work(decision)  # nothing runs
    assert {EnsurePVC(), EnsureService(), EnsureNetworkPolicy()} <= set(work(decision))
    creating = replace(creating, pvc=BOUND_PVC, service_present=True, network_policy_present=True)  # written
    suspended = decide(desired(suspended=True), fed_back(creating, decision), at(3))
    assert (suspended.phase, suspended.reason) == (P.SUSPENDED, Reason.SUSPEND_REQUESTED)
    assert suspended.status.started_at is None

    resuming = decide(desired(), fed_back(creating, suspended), at(60))
    assert (resuming.phase, work(resuming)) == (P.RESUMING, [CreatePod()])
    running = decide(desired(), replace(fed_back(creating, resuming), pod=READY_POD), at(61))
    assert (running.phase, running.reason) == (P.RUNNING, Reason.RESUMED)
    assert running.status.started_at == at(61)  # its first run starts now


def test_a_suspended_sandbox_stays_suspended_and_has_no_pod() -> None:
    stray = decide(desired(suspended=True), observed(P.SUSPENDED, pod=READY_POD), at(120))
    assert stray.phase is P.SUSPENDED
    assert work(stray) == [DeletePod()]


def test_resuming_waits_for_a_stray_pod_to_go_first() -> None:
    decision = decide(desired(suspended=False), observed(P.SUSPENDED, pod=pod(deleting=True)), at(120))
    assert decision.phase is P.SUSPENDED
    assert work(decision) == []


# --- deadlines ------------------------------------------------------------------------------------


def test_max_lifetime_terminates_a_running_sandbox() -> None:
    decision = decide(desired(), observed(P.RUNNING), T0 + HOUR)
    assert (decision.phase, decision.reason) == (P.TERMINATING, Reason.MAX_LIFETIME)
    assert work(decision) == [DeletePod()]
    assert decision.wake_at is None


def test_max_lifetime_counts_from_creation_even_while_suspended() -> None:
    decision = decide(desired(suspended=True), observed(P.SUSPENDED), T0 + HOUR)
    assert (decision.phase, decision.reason) == (P.TERMINATING, Reason.MAX_LIFETIME)


def test_suspending_finishes_before_an_expiry_is_acted_on() -> None:
    # Suspending → Terminating is not in the table: the sandbox first becomes Suspended.
    decision = decide(desired(suspended=True), observed(P.SUSPENDING, pod=None), T0 + HOUR)
    assert decision.phase is P.SUSPENDED
    assert decision.wake_at is None  # the passed deadline is not a wake-up time any more


def test_terminating_becomes_terminated_when_the_pod_is_gone() -> None:
    going = observed(P.TERMINATING, reason=Reason.MAX_LIFETIME, pod=None)
    decision = decide(desired(), going, T0 + HOUR + timedelta(seconds=2))
    assert (decision.phase, decision.reason) == (P.TERMINATED, Reason.MAX_LIFETIME)
    assert decision.status.terminated_at == T0 + HOUR + timedelta(seconds=2)
    assert condition(decision, "Terminated") == ("True", Reason.MAX_LIFETIME)
    assert "Ready" not in {c.type for c in decision.conditions}  # withdrawn: it no longer applies
    assert decision.withdrawn == ("Ready",)
    assert work(decision) == []  # the PVC, Service and policy stay with the object
    assert decision.wake_at is None  # no TTL: kept until deleted
    assert decision.status.expires_at is None


def test_ttl_after_terminated_deletes_the_object() -> None:
    ended = observed(P.TERMINATED, reason=Reason.MAX_LIFETIME, terminated_at=at(minutes=61))
    early = decide(desired(ttl_after_terminated=HOUR), ended, at(minutes=90))
    assert work(early) == []
    assert early.wake_at == at(minutes=121)
    late = decide(desired(ttl_after_terminated=HOUR), ended, at(minutes=121))
    assert work(late) == [DeleteObject()]
    assert late.phase is P.TERMINATED
    assert late.wake_at is None


def test_zero_ttl_deletes_at_once() -> None:
    ended = observed(P.TERMINATED, reason=Reason.IDLE_TIMEOUT, terminated_at=at(minutes=61))
    assert work(decide(desired(ttl_after_terminated=timedelta(0)), ended, at(minutes=61))) == [DeleteObject()]


def test_idle_suspends_and_records_it_in_status_not_spec() -> None:
    running = observed(P.RUNNING, last_activity_at=at(minutes=10), resume_request="r1")
    decision = decide(desired(), running, at(minutes=40))
    assert (decision.phase, decision.reason) == (P.SUSPENDING, Reason.IDLE_TIMEOUT)
    assert work(decision) == [DeletePod()]  # no spec write: spec.suspended stays the user's
    assert (decision.status.suspended_by, decision.status.resume_request_seen) == (SuspendCause.IDLE_TIMEOUT, "r1")
    patch = status_patch(decision, {"phase": "Running"}, at(minutes=40))
    assert (patch["suspendedBy"], patch["resumeRequestSeen"]) == ("IdleTimeout", "r1")


def test_an_idle_suspension_holds_until_a_new_resume_request() -> None:
    held = observed(
        P.SUSPENDED,
        reason=Reason.IDLE_TIMEOUT,
        suspended_by=SuspendCause.IDLE_TIMEOUT,
        resume_request_seen="r1",
        resume_request="r1",
    )
    stays = decide(desired(suspended=False), held, at(minutes=50))
    assert (stays.phase, stays.status.suspended_by, stays.status.resume_request_seen) == (
        P.SUSPENDED,
        SuspendCause.IDLE_TIMEOUT,
        "r1",
    )
    assert not stays.has_action(CreatePod)
    # the Suspended sandbox is where it was asked to be: not Reconciling, no Ready (kstatus Current)
    assert {c.type: c.status for c in stays.conditions}[ConditionType.RECONCILING] == "False"
    resumed = decide(desired(suspended=False), replace(held, resume_request="r2"), at(minutes=50))
    assert resumed.phase is P.RESUMING and resumed.has_action(CreatePod)
    assert (resumed.status.suspended_by, resumed.status.resume_request_seen) == (None, None)
    # a first resume request (the annotation was absent when the idle timeout fired) resumes too
    first = replace(held, resume_request_seen=None, resume_request="r1")
    assert decide(desired(suspended=False), first, at(minutes=50)).phase is P.RESUMING


@pytest.mark.parametrize(
    ("wanted", "cause"),
    [({"suspended": True}, SuspendCause.SPEC), ({"paused": True}, SuspendCause.REQUEST)],
)
def test_a_suspension_records_who_asked(wanted: dict[str, bool], cause: SuspendCause) -> None:
    suspending = decide(desired(**wanted), observed(P.RUNNING), at(minutes=5))
    assert (suspending.phase, suspending.reason) == (P.SUSPENDING, Reason.SUSPEND_REQUESTED)
    assert suspending.status.suspended_by is cause
    # the pause request ends when the annotation goes: the sandbox resumes
    suspended = observed(P.SUSPENDED, reason=Reason.SUSPEND_REQUESTED, suspended_by=cause)
    assert decide(desired(**wanted), suspended, at(minutes=6)).phase is P.SUSPENDED
    assert decide(desired(), suspended, at(minutes=6)).phase is P.RESUMING


def test_a_requested_end_replaces_the_lifetime() -> None:
    end = at(minutes=90)
    wanted = desired(end_at=end, idle_timeout=None)  # the lifetime alone would end it at minute 60
    assert decide(wanted, observed(P.RUNNING), at(minutes=61)).phase is P.RUNNING
    assert decide(wanted, observed(P.RUNNING), at(minutes=61)).status.expires_at == end
    assert decide(wanted, observed(P.RUNNING), at(minutes=90)).phase is P.TERMINATING


def test_idle_terminates_when_asked_to() -> None:
    decision = decide(desired(on_idle=OnIdle.TERMINATE), observed(P.RUNNING), at(minutes=31))
    assert (decision.phase, decision.reason) == (P.TERMINATING, Reason.IDLE_TIMEOUT)
    assert work(decision) == [DeletePod()]


def test_idle_counts_from_start_without_activity_and_from_activity_after() -> None:
    quiet = observed(P.RUNNING)  # started at T0 + 5s, no activity
    assert decide(desired(), quiet, at(5, minutes=30) - timedelta(seconds=1)).phase is P.RUNNING
    assert decide(desired(), quiet, at(5, minutes=30)).phase is P.SUSPENDING
    busy = observed(P.RUNNING, last_activity_at=at(minutes=20))
    decision = decide(desired(), busy, at(minutes=35))
    assert decision.phase is P.RUNNING
    assert decision.wake_at == at(minutes=50)


def test_idle_suspended_reason_survives_to_suspended() -> None:
    decision = decide(desired(suspended=True), observed(P.SUSPENDING, reason=Reason.IDLE_TIMEOUT, pod=None), at(1))
    assert (decision.phase, decision.reason) == (P.SUSPENDED, Reason.IDLE_TIMEOUT)


def test_no_timeouts_no_wake_up() -> None:
    decision = decide(desired(max_lifetime=None, idle_timeout=None), observed(P.RUNNING), at(10))
    assert decision.wake_at is None
    assert requeue(decision) is None
    assert decision.status.expires_at is None


def test_expires_at_includes_idle_only_when_idle_terminates() -> None:
    suspend = decide(desired(), observed(P.RUNNING), at(10))
    assert suspend.status.expires_at == T0 + HOUR
    terminate = decide(desired(on_idle=OnIdle.TERMINATE), observed(P.RUNNING), at(10))
    assert terminate.status.expires_at == at(5, minutes=30)


# --- failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failed_pod", "reason"),
    [
        (pod(PodPhase.FAILED, terminated_reasons=("Error",)), Reason.POD_FAILED),
        (pod(PodPhase.FAILED, terminated_reasons=("OOMKilled",)), Reason.OOM_KILLED),
        (pod(PodPhase.RUNNING, terminated_reasons=("OOMKilled",)), Reason.OOM_KILLED),
        (pod(PodPhase.FAILED, reason="Evicted", message="low on memory"), Reason.EVICTED),
        (pod(PodPhase.SUCCEEDED), Reason.POD_SUCCEEDED),
        (pod(PodPhase.PENDING, waiting_reasons=("InvalidImageName",)), Reason.IMAGE_ERROR),
        (
            pod(PodPhase.PENDING, waiting_reasons=("CreateContainerConfigError",)),
            Reason.CONTAINER_CONFIG_ERROR,
        ),
    ],
)
@pytest.mark.parametrize("phase", [P.CREATING, P.RUNNING, P.RESUMING])
def test_pod_failures_are_errors_with_their_reason(failed_pod: object, reason: Reason, phase: Phase) -> None:
    # A running sandbox heals a retryable failure while its budget lasts (below): here it is spent.
    spent = 3 if phase is P.RUNNING and reason in RETRYABLE_REASONS else 0
    decision = decide(desired(), observed(phase, pod=failed_pod, recreate_attempts=spent), at(30))
    assert (decision.phase, decision.reason) == (P.ERROR, reason)
    assert not creates_anything(decision)
    assert work(decision) == []  # the failed pod is kept for `kubectl logs`
    (event,) = events(decision)
    assert (event.type, event.reason) == (EventType.WARNING, reason)
    assert condition(decision, "Ready") == ("False", "Error")


KILLED_AGENT = pod(PodPhase.FAILED, terminated_reasons=("Error",), exit_codes=(137,))


def test_a_crashed_agent_is_replaced_while_the_sandbox_stays_running() -> None:
    """The agent killed (the pod Failed, exit 137): the failed pod is deleted, then recreated like a
    lost one; the sandbox never leaves Running, Ready is False with the failure as its reason (kstatus
    InProgress, not Failed), and the Events say what happened and which attempt this is."""
    crashed = observed(P.RUNNING, reason=Reason.STARTED, pod=KILLED_AGENT)
    seen = decide(desired(), crashed, at(100))
    assert (seen.phase, seen.reason) == (P.RUNNING, Reason.POD_FAILED)
    assert "exit code 137: killed by SIGKILL" in seen.message
    assert work(seen) == [DeletePod()]
    (event,) = events(seen)
    assert (event.type, event.reason, event.message) == (EventType.WARNING, Reason.POD_FAILED, seen.message)
    assert condition(seen, "Ready") == ("False", Reason.POD_FAILED)
    assert condition(seen, "Reconciling")[0] == "True" and condition(seen, "Stalled")[0] == "False"
    assert seen.status.recreate_attempts == 0  # spent when the new pod is made

    going = replace(fed_back(crashed, seen), pod=replace(KILLED_AGENT, deleting=True))
    waiting = decide(desired(), going, at(101))
    assert (waiting.phase, waiting.reason, waiting.message) == (P.RUNNING, Reason.POD_FAILED, seen.message)
    assert (work(waiting), events(waiting)) == ([], [])  # no second delete, no second Event

    gone = replace(fed_back(going, waiting), pod=None)
    recreated = decide(desired(), gone, at(102))
    assert (recreated.phase, recreated.reason) == (P.RUNNING, Reason.POD_RECREATED)
    assert work(recreated) == [CreatePod()]
    (event,) = events(recreated)
    assert (event.type, event.reason) == (EventType.WARNING, Reason.POD_RECREATED)
    assert event.message == "the sandbox pod failed (PodFailed); recreating it (attempt 1 of 3)"
    assert (recreated.status.recreate_attempts, recreated.status.last_recreate_at) == (1, at(102))

    back = decide(desired(), replace(fed_back(gone, recreated), pod=READY_POD), at(110))
    assert (back.phase, back.reason, work(back), events(back)) == (P.RUNNING, Reason.STARTED, [], [])
    assert condition(back, "Ready") == ("True", Reason.STARTED)
    assert back.status.recreate_attempts == 1  # until it has run stably for stable_after


def test_a_second_crash_waits_out_the_backoff_under_its_own_reason() -> None:
    again = observed(P.RUNNING, reason=Reason.POD_FAILED, pod=None, recreate_attempts=1, last_recreate_at=at(100))
    waiting = decide(desired(), again, at(105))
    assert (waiting.phase, waiting.reason, work(waiting)) == (P.RUNNING, Reason.POD_FAILED, [])
    assert requeue(waiting) == 5.0
    retried = decide(desired(), fed_back(again, waiting), at(110))
    assert (retried.reason, work(retried), retried.status.recreate_attempts) == (
        Reason.POD_RECREATED,
        [CreatePod()],
        2,
    )


def test_a_crash_with_the_budget_spent_is_an_error_that_keeps_the_pod() -> None:
    spent = observed(P.RUNNING, pod=KILLED_AGENT, recreate_attempts=3, last_recreate_at=at(100))
    decision = decide(desired(), spent, at(200))
    assert (decision.phase, decision.reason, work(decision)) == (P.ERROR, Reason.POD_FAILED, [])
    assert decision.message.endswith("recreated 3 times already, giving up")
    assert condition(decision, "Stalled") == ("True", Reason.POD_FAILED)
    stays = decide(desired(), fed_back(spent, decision), at(300))
    assert (stays.phase, work(stays)) == (P.ERROR, [])


@pytest.mark.parametrize(
    ("exit_codes", "detail"),
    [((137,), "exit code 137: killed by SIGKILL"), ((1,), "exit code 1"), ((255,), "exit code 255"), ((0,), "")],
)
def test_a_failed_pod_message_names_the_exit_code(exit_codes: tuple[int, ...], detail: str) -> None:
    failed = pod(PodPhase.FAILED, terminated_reasons=("Error",), exit_codes=exit_codes)
    reason, message = classify_pod_failure(failed) or ("", "")
    assert reason == Reason.POD_FAILED
    assert message == f"the sandbox pod failed (Error{', ' + detail if detail else ''})"


def test_evicted_message_is_kept() -> None:
    decision = decide(desired(), observed(P.RUNNING, pod=pod(PodPhase.FAILED, reason="Evicted", message="disk")), at(1))
    assert "disk" in decision.message


def test_a_pod_being_deleted_is_not_a_failure() -> None:
    dying = pod(PodPhase.FAILED, terminated_reasons=("Error",), deleting=True)
    decision = decide(desired(), observed(P.RUNNING, pod=dying), at(30))
    assert (decision.phase, decision.reason) == (P.RUNNING, Reason.POD_TERMINATING)
    assert condition(decision, "Ready") == ("False", Reason.POD_TERMINATING)


def test_lost_workspace_is_an_error() -> None:
    decision = decide(desired(), observed(P.RUNNING, pvc=PvcObservation(phase=PvcPhase.LOST)), at(30))
    assert (decision.phase, decision.reason) == (P.ERROR, Reason.WORKSPACE_LOST)


# --- lost pods and the retry budget ---------------------------------------------------------------


def test_lost_pod_is_recreated_with_an_event() -> None:
    decision = decide(desired(), observed(P.RUNNING, pod=None), at(100))
    assert (decision.phase, decision.reason) == (P.RUNNING, Reason.POD_RECREATED)
    assert work(decision) == [CreatePod()]
    (event,) = events(decision)
    assert (event.type, event.reason) == (EventType.WARNING, Reason.POD_RECREATED)
    assert (decision.status.recreate_attempts, decision.status.last_recreate_at) == (1, at(100))
    assert condition(decision, "Ready") == ("False", Reason.POD_RECREATED)


def test_recreation_backs_off_per_the_schedule() -> None:
    lost_again = observed(P.RUNNING, pod=None, recreate_attempts=1, last_recreate_at=at(100))
    waiting = decide(desired(), lost_again, at(105))
    assert (waiting.phase, waiting.reason) == (P.RUNNING, Reason.RECREATE_BACKOFF)
    assert work(waiting) == []
    assert requeue(waiting) == 5.0  # 10 s after the previous attempt
    retried = decide(desired(), lost_again, at(110))
    assert work(retried) == [CreatePod()]
    assert retried.status.recreate_attempts == 2


def test_recreation_budget_runs_out_into_error() -> None:
    exhausted = observed(P.RUNNING, pod=None, recreate_attempts=3, last_recreate_at=at(100))
    decision = decide(desired(), exhausted, at(1000))
    assert (decision.phase, decision.reason) == (P.ERROR, Reason.RECREATE_BUDGET_EXHAUSTED)
    assert not creates_anything(decision)
    # …and it stays there, still saying why: the budget is spent.
    again = decide(desired(), fed_back(exhausted, decision), at(2000))
    assert (again.phase, again.reason, work(again)) == (P.ERROR, Reason.RECREATE_BUDGET_EXHAUSTED, [])
    assert again.message == decision.message


def test_custom_budget() -> None:
    policy = RetryPolicy(budget=1, backoff=())
    decision = decide(desired(retry=policy), observed(P.RUNNING, pod=None, recreate_attempts=1), at(10))
    assert decision.phase is P.ERROR


def test_attempts_reset_after_a_stable_period() -> None:
    recovered = observed(P.RUNNING, recreate_attempts=2, last_recreate_at=at(100))
    early = decide(desired(), recovered, at(200))
    assert early.status.recreate_attempts == 2
    assert early.wake_at == at(100) + timedelta(minutes=10)
    later = decide(desired(), recovered, at(100) + timedelta(minutes=10))
    assert later.status.recreate_attempts == 0


def test_lost_pod_waits_for_a_workspace_being_deleted() -> None:
    decision = decide(
        desired(),
        observed(P.RUNNING, pod=None, pvc=PvcObservation(phase=PvcPhase.BOUND, deleting=True)),
        at(9),
    )
    assert decision.phase is P.RUNNING
    assert not creates_anything(decision)


# --- error and retry ------------------------------------------------------------------------------


def test_retryable_error_deletes_the_failed_pod_first() -> None:
    failed = observed(P.ERROR, reason=Reason.EVICTED, pod=pod(PodPhase.FAILED, reason="Evicted"))
    decision = decide(desired(), failed, at(60))
    assert decision.phase is P.ERROR
    assert work(decision) == [DeletePod()]


def test_retryable_error_then_retries_into_creating() -> None:
    failed = observed(P.ERROR, reason=Reason.POD_FAILED, pod=None)
    decision = decide(desired(), failed, at(60))
    assert (decision.phase, decision.reason) == (P.CREATING, Reason.RETRYING)
    assert work(decision) == [CreatePod()]
    assert decision.status.recreate_attempts == 1


def test_a_suspended_sandbox_in_error_retries_into_suspended_without_a_pod() -> None:
    failed = observed(P.ERROR, reason=Reason.POD_FAILED, pod=None)
    retried = decide(desired(suspended=True), failed, at(60))
    assert (retried.phase, retried.reason) == (P.CREATING, Reason.RETRYING)
    assert CreatePod() not in work(retried)
    parked = decide(desired(suspended=True), fed_back(failed, retried), at(61))
    assert parked.phase is P.SUSPENDING and CreatePod() not in work(parked)


def test_error_retry_respects_backoff_and_budget() -> None:
    failed = observed(P.ERROR, reason=Reason.POD_FAILED, pod=None, recreate_attempts=2, last_recreate_at=at(50))
    waiting = decide(desired(), failed, at(60))
    assert waiting.phase is P.ERROR
    assert waiting.wake_at == at(80)
    assert decide(desired(), failed, at(80)).phase is P.CREATING
    spent = replace(failed, recreate_attempts=3)
    assert decide(desired(), spent, at(500)).phase is P.ERROR


def test_oom_killed_is_not_retried_until_the_spec_changes() -> None:
    oom = observed(P.ERROR, reason=Reason.OOM_KILLED, pod=None, observed_generation=1)
    stays = decide(desired(generation=1), oom, at(60))
    assert (stays.phase, work(stays)) == (P.ERROR, [])
    retried = decide(desired(generation=2), oom, at(60))
    assert (retried.phase, retried.reason) == (P.CREATING, Reason.SPEC_CHANGED)
    assert retried.status.recreate_attempts == 0
    assert retried.status.observed_generation == 2


def test_spec_change_is_not_forgotten_while_the_old_pod_goes() -> None:
    oom = observed(P.ERROR, reason=Reason.OOM_KILLED, observed_generation=1, pod=pod(PodPhase.FAILED))
    decision = decide(desired(generation=2), oom, at(60))
    assert work(decision) == [DeletePod()]
    assert decision.status.observed_generation == 1  # not acted on yet
    after = decide(desired(generation=2), replace(fed_back(oom, decision), pod=None), at(61))
    assert after.phase is P.CREATING


def test_max_lifetime_ends_an_error() -> None:
    decision = decide(desired(), observed(P.ERROR, reason=Reason.OOM_KILLED, pod=pod(PodPhase.FAILED)), T0 + HOUR)
    assert (decision.phase, decision.reason) == (P.TERMINATING, Reason.MAX_LIFETIME)
    assert work(decision) == [DeletePod()]


# --- resources over the template maximum ---------------------------------------------------------

TOO_BIG = "spec.resources.memory 64Gi exceeds the template maximum 8Gi"


def test_new_sandbox_over_max_creates_nothing_then_errors() -> None:
    first = decide(desired(resources_violation=TOO_BIG), observed(None, pvc=None), T0)
    assert first.phase is P.CREATING
    assert not creates_anything(first)
    assert first.wake_at == T0  # the next step follows at once
    second = decide(desired(resources_violation=TOO_BIG), fed_back(observed(None, pvc=None), first), T0)
    assert (second.phase, second.reason) == (P.ERROR, Reason.RESOURCES_EXCEED_TEMPLATE_MAX)
    assert second.message == TOO_BIG
    assert not creates_anything(second)


def test_error_over_max_recovers_when_it_fits() -> None:
    stuck = observed(P.ERROR, reason=Reason.RESOURCES_EXCEED_TEMPLATE_MAX, pod=None)
    assert decide(desired(resources_violation=TOO_BIG), stuck, at(5)).phase is P.ERROR
    fixed = decide(desired(), stuck, at(5))
    assert fixed.phase is P.CREATING
    assert creates_anything(fixed)


def test_resume_over_max_stays_suspended_with_the_reason() -> None:
    decision = decide(desired(resources_violation=TOO_BIG), observed(P.SUSPENDED), at(60))
    assert (decision.phase, decision.reason) == (P.SUSPENDED, Reason.RESOURCES_EXCEED_TEMPLATE_MAX)
    assert TOO_BIG in decision.message
    assert not creates_anything(decision)
    (event,) = events(decision)
    assert event.type is EventType.WARNING
    repeated = decide(
        desired(resources_violation=TOO_BIG),
        observed(P.SUSPENDED, reason=Reason.RESOURCES_EXCEED_TEMPLATE_MAX),
        at(61),
    )
    assert events(repeated) == []  # said once


def test_lost_pod_over_max_is_an_error() -> None:
    decision = decide(desired(resources_violation=TOO_BIG), observed(P.RUNNING, pod=None), at(60))
    assert (decision.phase, decision.reason) == (P.ERROR, Reason.RESOURCES_EXCEED_TEMPLATE_MAX)
    assert not creates_anything(decision)


# --- what the template refuses: the image, the namespace ----------------------------------------

BAD_IMAGE = "spec.image evil/miner:1 is not allowed by the template's imagePolicy (Template: only ...)"
NOT_HERE = "SandboxTemplate gpu may not be used in namespace team-c (see its allowedNamespaces)"
REFUSALS = [
    pytest.param({"image_violation": BAD_IMAGE}, Reason.IMAGE_NOT_ALLOWED, BAD_IMAGE, id="image"),
    pytest.param({"namespace_violation": NOT_HERE}, Reason.TEMPLATE_NOT_ALLOWED, NOT_HERE, id="namespace"),
]


@pytest.mark.parametrize(("refused", "reason", "message"), REFUSALS)
def test_a_refused_sandbox_never_gets_a_pod_and_errors(refused: dict[str, str], reason: Reason, message: str) -> None:
    first = decide(desired(**refused), observed(None, pvc=None, service_present=None, network_policy_present=None), T0)
    assert first.phase is P.CREATING
    assert not creates_anything(first)
    new = observed(None, pvc=None, service_present=None, network_policy_present=None)
    second = decide(desired(**refused), fed_back(new, first), T0)
    assert (second.phase, second.reason, second.message) == (P.ERROR, reason, message)
    assert not creates_anything(second)
    (event,) = events(second)
    assert (event.type, event.reason) == (EventType.WARNING, reason)
    stays = decide(desired(**refused), fed_back(fed_back(new, first), second), at(5))
    assert (stays.phase, stays.reason) == (P.ERROR, reason)
    assert not creates_anything(stays)


@pytest.mark.parametrize(("refused", "reason", "message"), REFUSALS)
def test_a_refused_sandbox_recovers_free_when_allowed(refused: dict[str, str], reason: Reason, message: str) -> None:
    stuck = observed(P.ERROR, reason=reason, message=message, pod=None, recreate_attempts=2)
    fixed = decide(desired(), stuck, at(5))
    assert (fixed.phase, fixed.reason) == (P.CREATING, Reason.SPEC_CHANGED)
    assert work(fixed) == [CreatePod()]
    assert fixed.status.recreate_attempts == 2  # not a failure: no attempt spent


@pytest.mark.parametrize(("refused", "reason", "message"), REFUSALS)
def test_a_refused_resume_stays_suspended(refused: dict[str, str], reason: Reason, message: str) -> None:
    decision = decide(desired(**refused), observed(P.SUSPENDED), at(60))
    assert (decision.phase, decision.reason) == (P.SUSPENDED, reason)
    assert decision.message == f"cannot resume: {message}"
    assert not creates_anything(decision)


@pytest.mark.parametrize(("refused", "reason", "message"), REFUSALS)
def test_a_refused_lost_pod_is_not_recreated(refused: dict[str, str], reason: Reason, message: str) -> None:
    decision = decide(desired(**refused), observed(P.RUNNING, pod=None), at(60))
    assert (decision.phase, decision.reason) == (P.ERROR, reason)
    assert not creates_anything(decision)


def test_a_pod_made_before_the_refusal_goes() -> None:
    # E.g. a retry in Creating when the template's policy was tightened: the pod does not match it.
    decision = decide(desired(image_violation=BAD_IMAGE), observed(P.CREATING, pod=PENDING_POD), at(5))
    assert (decision.phase, decision.reason) == (P.ERROR, Reason.IMAGE_NOT_ALLOWED)
    assert work(decision) == [DeletePod()]


def test_the_namespace_is_reported_before_the_image_and_the_resources() -> None:
    everything = desired(namespace_violation=NOT_HERE, image_violation=BAD_IMAGE, resources_violation=TOO_BIG)
    decision = decide(everything, observed(P.CREATING, pod=None), at(5))
    assert decision.reason == Reason.TEMPLATE_NOT_ALLOWED
    decision = decide(desired(image_violation=BAD_IMAGE, resources_violation=TOO_BIG), observed(P.CREATING), at(5))
    assert decision.reason == Reason.IMAGE_NOT_ALLOWED


# --- deletion ------------------------------------------------------------------------------------


def test_deletion_deletes_children_and_waits_for_the_pod() -> None:
    decision = decide(desired(), observed(P.RUNNING, deleting=True), at(60))
    assert (decision.phase, decision.reason) == (P.TERMINATING, Reason.DELETED)
    assert work(decision) == [DeletePod(), DeletePVC(), DeleteService(), DeleteNetworkPolicy()]


def test_deletion_finishes_when_the_pod_is_gone() -> None:
    going = observed(
        P.TERMINATING,
        reason=Reason.DELETED,
        deleting=True,
        pod=None,
        pvc=None,
        service_present=None,
        network_policy_present=None,
    )
    decision = decide(desired(), going, at(61))
    assert decision.phase is P.TERMINATED
    assert work(decision) == []  # unobserved children are left to ownerReference GC


@pytest.mark.parametrize("phase", [P.SUSPENDING, P.RESUMING])
def test_deletion_mid_transition_keeps_the_phase(phase: Phase) -> None:
    decision = decide(desired(), observed(phase, deleting=True), at(60))
    assert decision.phase is phase
    assert DeletePod() in decision.actions


def test_deleting_a_never_reconciled_sandbox() -> None:
    decision = decide(
        desired(),
        observed(None, deleting=True, pvc=None, service_present=False, network_policy_present=False),
        T0,
    )
    assert decision.phase is None
    assert work(decision) == []


def test_deletion_never_creates() -> None:
    for phase in [None, *Phase]:
        decision = decide(desired(), observed(phase, deleting=True, pod=None, pvc=None), at(1))
        assert not creates_anything(decision)


def test_without_a_service_asked_for_none_is_made_and_an_old_one_goes() -> None:
    fresh = decide(desired(service=False), observed(None, pod=None, pvc=None, service_present=None), at(0))
    assert not fresh.has_action(EnsureService) and fresh.has_action(CreatePod)
    leftover = decide(desired(service=False), observed(P.RUNNING, service_present=True), at(60))
    assert work(leftover) == [DeleteService()]
    gone = decide(desired(service=False), observed(P.RUNNING, service_present=False), at(60))
    assert work(gone) == []
