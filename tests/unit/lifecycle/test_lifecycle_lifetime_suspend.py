"""decide() with onLifetimeEnd: suspend (E2B's autoPause; docs/lifecycle.md, "The end of the
lifetime"): the end suspends instead of terminating, the suspension is held until a new resume
request, and a resume with the lifetime still over stays suspended instead of bouncing."""

from __future__ import annotations

from dataclasses import replace

from lifecycle_factories import T0, at, desired, observed, work

from sandbox_operator.api import OnIdle, Phase
from sandbox_operator.lifecycle import CreatePod, DeletePod, Observed, Reason, SuspendCause, decide, status_patch

P = Phase
SUSPENDS = {"on_lifetime_end": OnIdle.SUSPEND, "idle_timeout": None}


def held_by_lifetime(resume_request: str) -> Observed:
    """Suspended by its lifetime's end when the resume request was "r1"; now it is `resume_request`."""
    return observed(
        P.SUSPENDED,
        reason=Reason.MAX_LIFETIME,
        suspended_by=SuspendCause.MAX_LIFETIME,
        resume_request_seen="r1",
        resume_request=resume_request,
        pod=None,
    )


def test_the_end_of_the_lifetime_suspends_a_running_sandbox() -> None:
    running = observed(P.RUNNING, resume_request="r1")
    decision = decide(desired(**SUSPENDS), running, at(minutes=61))
    assert (decision.phase, decision.reason) == (P.SUSPENDING, Reason.MAX_LIFETIME)
    assert work(decision) == [DeletePod()]  # the workspace stays
    assert (decision.status.suspended_by, decision.status.resume_request_seen) == (SuspendCause.MAX_LIFETIME, "r1")
    assert decision.fired_timeout is not None
    patch = status_patch(decision, {"phase": "Running"}, at(minutes=61))
    assert patch["suspendedBy"] == "MaxLifetime"
    # The default still terminates.
    assert decide(desired(idle_timeout=None), running, at(minutes=61)).phase is P.TERMINATING


def test_a_suspension_by_the_lifetime_is_held_and_never_terminates() -> None:
    held = held_by_lifetime(resume_request="r1")
    for later in (at(minutes=61), at(minutes=60 * 24 * 30)):
        stays = decide(desired(**SUSPENDS), held, later)
        assert stays.phase is P.SUSPENDED and not stays.has_action(CreatePod)
        assert (stays.status.suspended_by, stays.status.resume_request_seen) == (SuspendCause.MAX_LIFETIME, "r1")
        assert stays.wake_at is None  # nothing is due: no requeue loop on a passed deadline


def test_a_resume_with_a_later_end_runs_it_again() -> None:
    held = held_by_lifetime(resume_request="r2")
    later_end = desired(**SUSPENDS, end_at=at(minutes=120))
    resumed = decide(later_end, held, at(minutes=70))
    assert resumed.phase is P.RESUMING and resumed.has_action(CreatePod)
    assert resumed.wake_at == at(minutes=120)


def test_a_resume_with_the_lifetime_still_over_stays_suspended_and_says_why() -> None:
    held = held_by_lifetime(resume_request="r2")
    stays = decide(desired(**SUSPENDS), held, at(minutes=70))
    assert stays.phase is P.SUSPENDED and not stays.has_action(CreatePod)
    assert "lifetime is over" in stays.message and "sandbox.dev/end-at" in stays.message
    # Held again on the request it saw: the next resume request (with a later end) is a new one.
    assert (stays.status.suspended_by, stays.status.resume_request_seen) == (SuspendCause.MAX_LIFETIME, "r2")
    again = replace(held, resume_request_seen="r2", resume_request="r2")
    assert decide(desired(**SUSPENDS), again, at(minutes=71)).phase is P.SUSPENDED


def test_a_sandbox_still_creating_at_its_end_is_suspended_not_started() -> None:
    creating = observed(P.CREATING, pod=None, created_at=T0)
    decision = decide(desired(**SUSPENDS), creating, at(minutes=61))
    assert (decision.phase, decision.reason) == (P.SUSPENDING, Reason.MAX_LIFETIME)
    assert not decision.has_action(CreatePod)


def test_an_error_still_ends_at_its_lifetime() -> None:
    failed = observed(P.ERROR, reason=Reason.POD_FAILED)
    assert decide(desired(**SUSPENDS), failed, at(minutes=61)).phase is P.TERMINATING
